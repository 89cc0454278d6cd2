"""Strategies aggregate arrays their own way and metrics from summed statistics."""

import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from celeba_app.config import RunConfig
from celeba_app.strategy import (FairFed, FedAdamWithGroupMetrics, FedAvgWithGroupMetrics, FedAvgMWithGroupMetrics,
                                 FedProxWithGroupMetrics, QFedAvgWithGroupMetrics, make_strategy)
from replies import FakeGrid, reply


@pytest.mark.parametrize("name, cls", [("fedavg", FedAvgWithGroupMetrics), ("fedprox", FedProxWithGroupMetrics),
                                       ("fedavgm", FedAvgMWithGroupMetrics), ("fedadam", FedAdamWithGroupMetrics),
                                       ("qfedavg", QFedAvgWithGroupMetrics), ("fairfed", FairFed)])
@pytest.mark.parametrize("width", [4, 1280, 4704])  # a head on any feature-layer and feature-pool
def test_every_strategy_aggregates_and_records_fair_metrics(name, cls, width):
    extra = {"proximal-mu": 0.1} if name == "fedprox" else {}
    strategy = make_strategy(RunConfig.from_run_config({"strategy": name, "lr-decay": 0.5, **extra}), 3)
    assert isinstance(strategy, cls)
    start = ArrayRecord({"1.weight": torch.zeros(1, width), "1.bias": torch.zeros(1)})
    messages = list(strategy.configure_train(2, start, ConfigRecord(), FakeGrid()))
    config = messages[0].content["config"]
    assert config["lr"] == pytest.approx(0.005 * 0.5)  # round 2: lr * decay^1
    if name == "fedprox":
        assert config["proximal-mu"] == 0.1
    arrays, measured = strategy.aggregate_train(2, [reply(1.0, 30, 0, width=width), reply(3.0, 10, 1, width=width)])
    w = arrays.to_torch_state_dict()["1.weight"]
    assert w.shape == (1, width)
    if name == "fedavg":
        assert torch.allclose(w, torch.full((1, width), 1.5))  # (30*1 + 10*3) / 40
    if name == "qfedavg":  # a step towards the clients' heads; of FedAvg's size on a small head (its
        # denominator grows with ||update||^2, hence with the width: the formula's test is below)
        assert (1.0 if width == 4 else 0.0) < w.mean().item() < 3.0
    if name == "fairfed":  # a convex combination of the clients' heads
        assert 1.0 <= w.min().item() and w.max().item() <= 3.0
    assert not torch.equal(w, torch.zeros(1, width))
    rep = strategy.train_records(measured)["train"]
    assert rep["overall"]["n"] == 40 and rep["num_clients"] == 2
    assert set(rep["clients"]["accuracy_by_partition"]) == {"0", "1"}
    assert set(rep["clients"]["num_examples_by_partition"]) == {"0", "1"}
    assert all(isinstance(n, int) and n > 0 for n in rep["clients"]["num_examples_by_partition"].values())
    assert measured["num-examples"] == 40 and measured["all|n"] == 40  # the sums, from which rep is derived


def test_fairfed_moves_weight_away_from_the_client_whose_gap_is_far_from_the_global_one():
    cfg = RunConfig.from_run_config({"strategy": "fairfed", "fairfed-beta": 1.0})
    strategy = make_strategy(cfg, 3)
    start = ArrayRecord({"1.weight": torch.zeros(1, 4), "1.bias": torch.zeros(1)})
    [msg, *_] = strategy.configure_train(1, start, ConfigRecord(), FakeGrid())
    assert msg.content["config"]["global-stats"] is True  # clients send the received head's statistics
    replies = [reply(1.0, 400, 0), reply(2.0, 400, 1), reply(3.0, 400, 2, male_shift=0.6)]
    arrays, measured = strategy.aggregate_train(1, replies)
    record = strategy.train_records(measured)["fairfed"]
    w = record["weights"]
    assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0
    assert record["delta"]["2"] > max(record["delta"]["0"], record["delta"]["1"])
    assert w["2"] < 1 / 3 < min(w["0"], w["1"])  # equal sizes: FedAvg would give 1/3 each
    expected = sum(w[str(i)] * (i + 1.0) for i in range(3))
    assert torch.allclose(arrays.to_torch_state_dict()["1.weight"], torch.full((1, 4), expected))
    # the weights carry over to the next round, and keep moving
    _, measured = strategy.aggregate_train(2, replies)
    assert strategy.train_records(measured)["fairfed"]["weights"]["2"] < w["2"]


def test_fairfed_with_beta_0_is_fedavg():
    strategy = make_strategy(RunConfig.from_run_config({"strategy": "fairfed", "fairfed-beta": 0.0}), 3)
    arrays, _ = strategy.aggregate_train(1, [reply(1.0, 30, 0), reply(3.0, 10, 1, male_shift=0.5)])
    assert torch.allclose(arrays.to_torch_state_dict()["1.weight"], torch.full((1, 4), 1.5))  # (30*1 + 10*3)/40


def test_qfedavg_without_gc_aggregates_as_flwrs_qfedavg():
    """Our QFedAvg skips flwr's gc.collect() per reply; the aggregate must not change."""
    from flwr.serverapp.strategy import QFedAvg

    from celeba_app.strategy import QFedAvgNoGC

    start = ArrayRecord({"1.weight": torch.full((1, 4), 0.5), "1.bias": torch.zeros(1)})
    heads = []
    for cls in (QFedAvg, QFedAvgNoGC):
        strategy = cls(client_learning_rate=100.0, q=1.0, train_loss_key="global_loss", min_available_nodes=1,
                       min_train_nodes=1)
        list(strategy.configure_train(1, start, ConfigRecord(), FakeGrid()))
        arrays, _ = strategy.aggregate_train(1, [reply(1.0, 30, 0), reply(3.0, 10, 1), reply(-2.0, 20, 2)])
        heads.append(arrays.to_torch_state_dict())
    for k in heads[0]:
        assert torch.allclose(heads[0][k], heads[1][k], atol=1e-7), k
    assert not torch.equal(heads[1]["1.weight"], start.to_torch_state_dict()["1.weight"])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_optimisers_take_the_steps_of_their_papers(name):
    """FedAvgM (Hsu et al. 2019: heavy-ball momentum on the pseudo-gradient) and FedAdam
    (Reddi et al. 2021, with flwr's bias-corrected step), over two rounds, against the
    formulas written out here."""
    overrides = {"fedavgm": {"server-learning-rate": 0.5, "server-momentum": 0.8},
                 "fedadam": {"server-learning-rate": 0.1}}[name]
    strategy = make_strategy(RunConfig.from_run_config({"strategy": name, **overrides}), 3)
    arrays = ArrayRecord({"1.weight": torch.zeros(1, 4), "1.bias": torch.zeros(1)})
    x, m, v = np.zeros((1, 4)), None, None
    for rnd, (w0, w1) in ((1, (1.0, 3.0)), (2, (2.0, -2.0))):
        list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid()))
        arrays, _ = strategy.aggregate_train(rnd, [reply(w0, 30, 0), reply(w1, 10, 1)])
        mean = (30 * w0 + 10 * w1) / 40  # the clients' FedAvg
        if name == "fedavgm":
            g = x - mean  # pseudo-gradient
            m = g if m is None else 0.8 * m + g
            x = x - 0.5 * m
        else:
            b1, b2, tau = strategy.beta_1, strategy.beta_2, strategy.tau
            d = mean - x
            m = (1 - b1) * d if m is None else b1 * m + (1 - b1) * d
            v = (1 - b2) * d ** 2 if v is None else b2 * v + (1 - b2) * d ** 2
            eta = 0.1 * np.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))
            x = x + eta * m / (np.sqrt(v) + tau)
        got = arrays.to_torch_state_dict()["1.weight"].double().numpy()
        assert np.allclose(got, x, atol=1e-6), (rnd, got, x)
        assert not np.allclose(got, mean)  # not FedAvg's mean


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "qfedavg", "fairfed"])
def test_every_strategy_aggregates_the_conv1x1_heads_four_arrays(name):
    """head='conv1x1' sends four arrays; every strategy aggregates each, keeping its shape."""
    shapes = {"conv.weight": (8, 96, 1, 1), "conv.bias": (8,), "out.weight": (1, 392), "out.bias": (1,)}
    extra = {"proximal-mu": 0.1} if name == "fedprox" else {}
    strategy = make_strategy(RunConfig.from_run_config({"strategy": name, "head": "conv1x1", **extra}), 3)
    start = ArrayRecord({k: torch.zeros(s) for k, s in shapes.items()})
    list(strategy.configure_train(1, start, ConfigRecord(), FakeGrid()))
    replies = []
    for weight, n, seed in ((1.0, 30, 0), (3.0, 10, 1)):
        r = reply(weight, n, seed)
        r.content["arrays"] = ArrayRecord({k: torch.full(s, weight) for k, s in shapes.items()})
        replies.append(r)
    arrays, _ = strategy.aggregate_train(1, replies)
    out = arrays.to_torch_state_dict()
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    if name == "fedavg":
        assert all(torch.allclose(v, torch.full(v.shape, 1.5)) for v in out.values())


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_robust_aggregators_resist_one_outlying_head_and_keep_exact_group_sums(name):
    """Seven clients, one sending a head 100 times the others': the robust aggregate stays
    within the honest heads' range (FedAvg's does not), and the group metrics are the exact
    sums of every reply's statistics, whichever heads the aggregator chose."""
    overrides = {"strategy": name, "robust-malicious-nodes": 1, "multikrum-select": 3, "trimmed-avg-beta": 0.2}
    strategy = make_strategy(RunConfig.from_run_config(overrides), 7)
    start = ArrayRecord({"1.weight": torch.zeros(1, 4), "1.bias": torch.zeros(1)})
    list(strategy.configure_train(1, start, ConfigRecord(), FakeGrid()))
    def replies():  # Flower's robust aggregators consume the replies' arrays (keep_input=False)
        return [reply(1.0 + 0.1 * i, 30, i) for i in range(6)] + [reply(100.0, 30, 6)]

    arrays, measured = strategy.aggregate_train(1, replies())
    w = arrays.to_torch_state_dict()["1.weight"]
    assert 1.0 <= w.min().item() and w.max().item() <= 1.5, w
    fedavg, _ = make_strategy(RunConfig(), 7).aggregate_train(1, replies())
    assert fedavg.to_torch_state_dict()["1.weight"].min().item() > 10
    assert measured["num-examples"] == 7 * 30 and measured["all|n"] == 7 * 30


@pytest.mark.parametrize("name, overrides, nodes, says", [
    ("bulyan", {"robust-malicious-nodes": 2}, 10, "strategy='bulyan' with robust-malicious-nodes=2 needs at least 11 "
                                                  "clients a round; this federation samples 10 (10 nodes x fraction-train=1)"),
    ("krum", {"robust-malicious-nodes": 1}, 3, "needs at least 4 clients a round"),
    ("multikrum", {"robust-malicious-nodes": 1, "multikrum-select": 8}, 6, "and multikrum-select=8 needs at least 8"),
])
def test_a_federation_too_small_for_a_robust_aggregator_is_refused_in_one_line(name, overrides, nodes, says):
    from celeba_app.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(says)):
        make_strategy(RunConfig.from_run_config({"strategy": name, **overrides}), nodes)
