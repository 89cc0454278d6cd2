"""Strategies aggregate arrays their own way and metrics from summed statistics."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from celeba_app.config import RunConfig
from celeba_app.metrics import flatten, slice_stats
from celeba_app.strategy import (FairFedAdam, FairFedAvg, FairFedAvgM, FairFedProx, FairQFedAvg,
                                 make_strategy)
from celeba_app.task import bce_per_row


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3]


def reply(weight: float, n: int, seed: int) -> Message:
    rng = np.random.default_rng(seed)
    p, y = rng.random(n), rng.integers(0, 2, n)
    attrs = {"Male": rng.integers(0, 2, n)}
    metrics = {"num-examples": n, "train_loss": 0.5, "global_loss": 0.6 + seed / 10,
               "partition_id": seed, **flatten(slice_stats(p, y, bce_per_row(p, y), attrs))}
    arrays = ArrayRecord({"1.weight": torch.full((1, 4), weight), "1.bias": torch.zeros(1)})
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}),
                   dst_node_id=1, message_type="train")


@pytest.mark.parametrize("name, cls", [("fedavg", FairFedAvg), ("fedprox", FairFedProx),
                                       ("fedavgm", FairFedAvgM), ("fedadam", FairFedAdam),
                                       ("qfedavg", FairQFedAvg)])
def test_every_strategy_aggregates_and_records_fair_metrics(name, cls):
    extra = {"proximal-mu": 0.1} if name == "fedprox" else {}
    strategy = make_strategy(RunConfig.from_run_config({"strategy": name, "lr-decay": 0.5, **extra}), 3)
    assert isinstance(strategy, cls)
    start = ArrayRecord({"1.weight": torch.zeros(1, 4), "1.bias": torch.zeros(1)})
    messages = list(strategy.configure_train(2, start, ConfigRecord(), FakeGrid()))
    config = messages[0].content["config"]
    assert config["lr"] == pytest.approx(0.005 * 0.5)  # round 2: lr * decay^1
    if name == "fedprox":
        assert config["proximal-mu"] == 0.1
    arrays, headline = strategy.aggregate_train(2, [reply(1.0, 30, 0), reply(3.0, 10, 1)])
    w = arrays.to_torch_state_dict()["1.weight"]
    if name == "fedavg":
        assert torch.allclose(w, torch.full((1, 4), 1.5))  # (30*1 + 10*3) / 40
    assert not torch.equal(w, torch.zeros(1, 4))
    rep = strategy.history[2]["train"]
    assert rep["overall"]["n"] == 40 and rep["num_clients"] == 2
    assert set(rep["clients"]["accuracy_by_partition"]) == {"0", "1"}
    assert "accuracy" in headline


def test_early_stopped_strategy_sends_nothing():
    strategy = make_strategy(RunConfig(), 3)
    strategy.stop(3)
    start = ArrayRecord({"1.weight": torch.zeros(1, 4)})
    assert list(strategy.configure_train(4, start, ConfigRecord(), FakeGrid())) == []
    assert list(strategy.configure_evaluate(4, start, ConfigRecord(), FakeGrid())) == []
