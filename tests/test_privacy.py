"""Client-level DP: the noise that reaches the aggregated head, the unweighted mean of the
clipped updates, the budget against independent computations, and the refusals."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from scipy.stats import norm

from celeba_app import privacy
from celeba_app import protocol as P
from celeba_app.config import ConfigError, RunConfig
from celeba_app.privacy import Budget, noise_for_epsilon, pld_epsilon, rdp_epsilon
from celeba_app.round_loop import RoundPolicy
from celeba_app.strategy import make_strategy
from replies import ATTRIBUTES, stats_of
from test_round_loop import HONEST, UntrustedGrid, run_loop

WIDTH = 20_000  # head coordinates: enough for the noise's standard deviation to 1%


def _dp_strategy(num_nodes, **overrides):
    cfg = RunConfig.from_run_config({"dp": "server-fixed", "dp-noise-multiplier": 2.0, "dp-clipping-norm": 0.5,
                                     **overrides})
    budget = privacy.budget_for(cfg, num_nodes, num_train_images=1000)
    return privacy.wrap(cfg, make_strategy(cfg, num_nodes), budget, num_nodes), cfg


def _replies(messages, update_of=lambda pid: None, sizes=lambda pid: 20):
    """Train replies to ``messages``: the sent head plus ``update_of(pid)`` (None: unchanged)."""
    out = []
    for pid, m in enumerate(messages):
        sent = m.content["arrays"].to_torch_state_dict()
        delta = update_of(pid)
        arrays = ArrayRecord({k: v + (0 if delta is None else delta[k]) for k, v in sent.items()})
        n = sizes(pid)
        metrics = {"num-examples": n, "local_steps_loss": 0.5, "global_loss": 0.6, "partition_id": pid,
                   **stats_of(n, pid)}
        if m.content["config"].get(P.NORM_BIT, False):
            metrics[P.CLIPPED] = 0
        reply = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=m)
        out.append(reply)
    return out


class Nodes:
    def __init__(self, n):
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return self.ids


def _one_round(strategy, head, update_of=lambda pid: None, sizes=lambda pid: 20, nodes=10):
    msgs = list(strategy.configure_train(1, ArrayRecord(head), ConfigRecord({"lr": 0.01}), Nodes(nodes)))
    for m in msgs:
        m.metadata.__dict__["_message_id"] = m.object_id
    arrays, measured = strategy.aggregate_train(1, _replies(msgs, update_of, sizes))
    return arrays.to_torch_state_dict(), measured, msgs


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed", "client-adaptive"])
def test_the_noise_on_the_aggregated_head_has_the_calibrated_standard_deviation(mode):
    """Ten clients send back the head unchanged: what the round releases is the sent head plus
    Gaussian noise of standard deviation noise_multiplier * clipping_norm / 10."""
    nodes = 200 if mode == "client-adaptive" else 10  # adaptive: Flower's count noise needs clients
    strategy, cfg = _dp_strategy(nodes, dp=mode)
    head = {"w": torch.zeros(WIDTH), "b": torch.ones(1)}
    out, _, msgs = _one_round(strategy, head, nodes=nodes)
    expected = cfg.dp_noise_multiplier * cfg.dp_clipping_norm / nodes
    if mode == "client-adaptive":  # Flower takes the count query's share (Andrew et al.): the heads' is larger
        expected = (cfg.dp_noise_multiplier ** -2 - (2 * nodes / 20) ** -2) ** -0.5 * cfg.dp_clipping_norm / nodes
    noise = out["w"].double()
    assert noise.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(WIDTH)
    if mode != "server-fixed":  # the clients are told the norm to clip to
        assert all(m.content["config"][P.CLIPPING_NORM] == cfg.dp_clipping_norm for m in msgs)
    assert (P.NORM_BIT in msgs[0].content["config"]) == (mode == "client-adaptive")


def test_the_mean_of_the_clipped_updates_is_unweighted():
    """Without noise: client 0's update (norm 3) is clipped to 0.5, client 1's (norm 0.2) kept,
    and each counts once although client 0 declared 100 times the rows."""
    strategy, _ = _dp_strategy(2, **{"dp-noise-multiplier": 0.0})
    direction = torch.zeros(WIDTH)
    direction[0] = 1.0
    updates = {0: {"w": 3.0 * direction, "b": torch.zeros(1)}, 1: {"w": -0.2 * direction, "b": torch.zeros(1)}}
    out, measured, _ = _one_round(strategy, {"w": torch.zeros(WIDTH), "b": torch.zeros(1)},
                                  update_of=updates.get, sizes=lambda pid: 2000 if pid == 0 else 20, nodes=2)
    assert out["w"][0].item() == pytest.approx((0.5 - 0.2) / 2, abs=1e-6)
    assert measured[P.NUM_EXAMPLES] == 2020  # the group statistics are still the clients' own sums


def test_the_round_loop_records_the_budget_spent_after_each_round():
    strategy, cfg = _dp_strategy(3, **{"dp": "client-fixed", "dp-clipping-norm": 1.0})
    budget = privacy.budget_for(cfg, 3, num_train_images=1000)
    _, written = run_loop(strategy, UntrustedGrid("none", None), rounds=3, nodes=HONEST, privacy=budget)
    history = written[-1][0]
    eps = [h["dp"]["epsilon"] for h in history[1:]]
    assert eps == [pytest.approx(budget.epsilon(r)) for r in (1, 2, 3)] and eps[0] < eps[1] < eps[2]
    assert all(h["dp"]["delta"] == 1e-3 and h["dp"]["clipping_norm"] == 1.0 for h in history[1:])
    assert all(not h["nodes"]["train"]["failures"] for h in history[1:])


def test_a_client_that_does_not_clip_is_refused():
    """dp='client-fixed': an update longer than the clipping norm is a broken promise. The
    honest test clients' updates have norms 0.45, 0.67 and 0.89 (they do not clip)."""
    strategy, cfg = _dp_strategy(3, **{"dp": "client-fixed", "dp-clipping-norm": 0.5})
    budget = privacy.budget_for(cfg, 3, 1000)
    _, written = run_loop(strategy, UntrustedGrid("none", None), rounds=1, nodes=HONEST, privacy=budget,
                          policy=RoundPolicy(min_reply_fraction=0.3))
    failures = written[-1][0][1]["nodes"]["train"]["failures"]
    assert [f["node_id"] for f in failures] == [2, 3], failures
    assert all(f["refused"] and "> the DP clipping norm 0.5" in f["reason"] for f in failures), failures


def test_a_resumed_run_gets_back_the_adapted_clipping_norm():
    strategy, _ = _dp_strategy(200, dp="client-adaptive")
    strategy.clipping_norm = 0.123
    state = strategy.server_state()
    fresh, _ = _dp_strategy(200, dp="client-adaptive")
    fresh.restore_server_state(state)
    assert fresh.clipping_norm == pytest.approx(0.123)


def test_protocol_names_are_flowers():
    from celeba_app.internals import differential_privacy

    dp = differential_privacy()
    assert (P.CLIPPING_NORM, P.CLIPPED) == (dp.KEY_CLIPPING_NORM, dp.KEY_NORM_BIT)


# ---------------------------------------------------------------------- the budget
def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity / sigma = mu (Balle & Wang 2018,
    Theorem 8; T rounds without sampling compose to mu = sqrt(T) / sigma), by bisection."""
    def delta_of(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z,rounds", [(1.0, 10), (3.0, 10), (10.0, 100)])
def test_the_rdp_epsilon_bounds_the_exact_gaussian_mechanism_without_sampling(z, rounds):
    exact = _gaussian_epsilon(math.sqrt(rounds) / z, 1e-5)
    assert pld_epsilon(z, 1.0, rounds, 1e-5) == pytest.approx(exact, rel=0.01)
    assert exact <= rdp_epsilon(z, 1.0, rounds, 1e-5) <= 1.25 * exact


@pytest.mark.parametrize("z,q,rounds", [(1.0, 0.05, 100), (0.8, 0.01, 1000)])
def test_the_rdp_epsilon_with_sampling_is_an_upper_bound_close_to_pld(z, q, rounds):
    pld_eps, rdp_eps = pld_epsilon(z, q, rounds, 1e-5), rdp_epsilon(z, q, rounds, 1e-5)
    assert pld_eps <= rdp_eps <= 1.3 * pld_eps


def test_a_target_epsilon_is_met_by_the_noise_it_solves_for():
    z = noise_for_epsilon(3.0, 1.0, 10, 1e-4)
    assert rdp_epsilon(z, 1.0, 10, 1e-4) <= 3.0 < rdp_epsilon(z * 0.99, 1.0, 10, 1e-4)
    with pytest.raises(ConfigError, match=r"dp-target-epsilon=1e-06 cannot be met within num-server-rounds=10"):
        noise_for_epsilon(1e-6, 1.0, 10, 1e-4)


def test_the_budget_uses_the_sampling_rate_and_the_default_delta():
    cfg = RunConfig.from_run_config({"dp": "server-fixed", "fraction-train": 0.1})
    budget = privacy.budget_for(cfg, 3800, num_train_images=8000)
    assert budget.sampling_rate == pytest.approx(380 / 3800) and budget.delta == pytest.approx(1 / 8000)
    assert Budget(0.0, 1.0, 1e-5).epsilon(3) == math.inf


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides,says", [
    ({"dp": "local"}, "dp='local' is not known; accepted: \"\" (off), client-fixed, server-fixed, client-adaptive"),
    ({"dp": "server-fixed", "dp-noise-multiplier": -1.0}, "dp-noise-multiplier=-1.0 is not valid"),
    ({"dp": "server-fixed", "dp-clipping-norm": 0.0}, "dp-clipping-norm=0.0 is not valid"),
    ({"dp": "server-fixed", "dp-delta": 1.0}, "dp-delta=1.0 is not valid; accepted: 0 < x < 1"),
    ({"dp": "server-fixed", "dp-delta": -0.1}, "dp-delta=-0.1 is not valid"),
    ({"dp": "server-fixed", "dp-target-epsilon": -2.0}, "dp-target-epsilon=-2.0 is not valid"),
    ({"dp-target-epsilon": 2.0}, "dp-target-epsilon=2.0 needs dp"),
    ({"dp": "server-fixed", "strategy": "fedavgm"}, "server momentum is built from the un-noised mean"),
    ({"dp": "client-fixed", "strategy": "fedadam"}, "server moments are built from the un-noised mean"),
    ({"dp": "server-fixed", "strategy": "qfedavg"}, "reweights each update by the client's loss"),
    ({"dp": "server-fixed", "strategy": "fairfed"}, "weights each client by its fairness gap"),
    ({"dp": "server-fixed", "strategy": "krum"}, "accepted with dp: fedavg, fedprox"),
])
def test_bad_dp_settings_are_refused_in_one_line(overrides, says):
    with pytest.raises(ConfigError, match=None) as err:
        RunConfig.from_run_config(overrides)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_fedprox_keeps_the_guarantee():
    RunConfig.from_run_config({"dp": "server-fixed", "strategy": "fedprox", "proximal-mu": 0.1})


def test_client_adaptive_with_too_few_clients_for_its_noise_is_refused():
    with pytest.raises(ConfigError, match=r"dp='client-adaptive' with noise multiplier 2 needs more than 20 clients"):
        _dp_strategy(10, dp="client-adaptive")


def test_a_resume_that_changes_a_dp_key_is_refused(tmp_path):
    import json

    from celeba_app.results import check_resume

    saved = RunConfig.from_run_config({"dp": "server-fixed", "dp-noise-multiplier": 1.0})
    (tmp_path / "config.json").write_text(json.dumps({"run_config": saved.as_dict()}))
    (tmp_path / "partitions.json").write_text(json.dumps({"partitions": []}))
    changed = RunConfig.from_run_config({"dp": "server-fixed", "dp-noise-multiplier": 1.5, "resume": "x"})
    with pytest.raises(ConfigError, match=r"differs from the saved one in dp-noise-multiplier \(1.0 saved, 1.5 now\)"):
        check_resume(tmp_path, changed, [])


def test_a_resumed_run_continues_the_same_accountant():
    """Stopped after round 1 of 3 and resumed (the checkpoint through torch.save, as
    results.write_round keeps it): rounds 2 and 3 are charged as rounds 2 and 3."""
    from test_round_loop import _saved

    def fresh():
        strategy, cfg = _dp_strategy(3, **{"dp": "client-fixed", "dp-clipping-norm": 1.0})
        return strategy, privacy.budget_for(cfg, 3, num_train_images=1000)

    strategy, budget = fresh()
    _, written = run_loop(strategy, UntrustedGrid("none", None), rounds=1, nodes=HONEST, privacy=budget)
    checkpoint = torch.load(_saved(written[-1][1]), weights_only=True)
    checkpoint["history"] = written[-1][0]
    strategy, budget = fresh()
    _, rest = run_loop(strategy, UntrustedGrid("none", None), rounds=3, nodes=HONEST, privacy=budget,
                       resume=checkpoint)
    history = rest[-1][0]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert [h["dp"]["epsilon"] for h in history[1:]] == [pytest.approx(budget.epsilon(r)) for r in (1, 2, 3)]


def test_a_client_without_training_rows_does_not_dilute_the_mean():
    """Its head comes back unchanged: counted, it would pull the mean towards the old head."""
    strategy, _ = _dp_strategy(3, **{"dp-noise-multiplier": 0.0})
    direction = torch.zeros(WIDTH)
    direction[0] = 1.0
    updates = {0: {"w": 0.3 * direction, "b": torch.zeros(1)}, 1: {"w": 0.1 * direction, "b": torch.zeros(1)}}
    out, _, _ = _one_round(strategy, {"w": torch.zeros(WIDTH), "b": torch.zeros(1)}, update_of=updates.get,
                           sizes=lambda pid: 0 if pid == 2 else 20, nodes=3)
    assert out["w"][0].item() == pytest.approx(0.2, abs=1e-6) and strategy.num_sampled_clients == 2
