"""Replies and grids that stand in for clients in the strategy's and the round loop's tests."""

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from celeba_app.metrics import flatten, slice_stats
from celeba_app.task import bce_per_row


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3]


def reply(weight: float, n: int, seed: int, male_shift: float = 0.0, width: int = 4) -> Message:
    """A train reply: arrays filled with ``weight``, statistics of random scores, and (as a
    client asked for "global-stats" sends) the received head's statistics, whose TPR/FPR for
    Male=1 are moved by ``male_shift`` (a client-specific gap)."""
    rng = np.random.default_rng(seed)
    p, y = rng.random(n), rng.integers(0, 2, n)
    attrs = {"Male": rng.integers(0, 2, n)}
    metrics = {"num-examples": n, "local_steps_loss": 0.5, "global_loss": 0.6 + seed / 10,
               "partition_id": seed, **flatten(slice_stats(p, y, bce_per_row(p, y), attrs))}
    arrays = ArrayRecord({"1.weight": torch.full((1, width), weight), "1.bias": torch.zeros(1)})
    g = np.clip(p + male_shift * attrs["Male"], 0, 1)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "global_model": ConfigRecord(flatten(slice_stats(g, y, bce_per_row(g, y), attrs)))})
    return Message(content=content, dst_node_id=1, message_type="train")


ATTRIBUTES = ("Male", "Young")


def stats_of(n: int, seed: int, shift: float = 0.0, attributes=ATTRIBUTES) -> dict:
    """The flat slice statistics of ``n`` random rows: what an honest client sends."""
    rng = np.random.default_rng(seed)
    p, y = np.clip(rng.random(n) + shift, 0, 1), rng.integers(0, 2, n)
    attrs = {a: rng.integers(0, 2, n) for a in attributes}
    return flatten(slice_stats(p, y, bce_per_row(p, y), attrs))


def honest_train(msg: Message, pid: int, n: int, n_val: int = 0) -> RecordDict:
    """A protocol-valid train reply to ``msg``: the received head moved by 0.1 * (pid + 1),
    the statistics of ``n`` rows, and the records the config asked for."""
    sent = msg.content["arrays"].to_torch_state_dict()
    config = msg.content["config"]
    rnd = int(config["server-round"])
    arrays = ArrayRecord({k: v + 0.1 * (pid + 1) for k, v in sent.items()})
    metrics = {"num-examples": n, "local_steps_loss": 0.5, "global_loss": 0.6, "partition_id": pid,
               **stats_of(n, 1000 * rnd + pid)}
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    if config.get("global-stats", False):
        content["global_model"] = ConfigRecord(stats_of(n, 1000 * rnd + pid, shift=0.1))
    if config.get("evaluate-received", False):
        content["evaluate_received"] = ConfigRecord(honest_evaluate_metrics(pid, n_val, rnd))
    return content


def honest_evaluate_metrics(pid: int, n_val: int, rnd: int = 0) -> dict:
    """A protocol-valid evaluate reply's metrics: the statistics of ``n_val`` held-out rows."""
    return {"num-examples": n_val, "partition_id": pid, **stats_of(n_val, 7000 + 100 * rnd + pid)}
