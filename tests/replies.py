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
