"""ServerApp: validates the run, describes the federation, federates, selects on ``valid``,
tests on ``test``. The same code runs under the Simulation Engine and the Deployment Engine.

Order matters for the user: everything that can be wrong with the configuration or the data
is checked first (config values, the server's ``valid``/``test`` and their schema, a fresh
run folder, the SuperNodes that connected and what each says its data is, identities
disjoint from ``valid``/``test``), before any embedding is computed or any round runs. Then
each round logs one line a person can follow, and the run folder gets the results contract
(results.py).
"""

from __future__ import annotations

import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from .config import ConfigError, RunConfig
from .data import check_clients_disjoint, server_identities, server_part
from .federation import FederationGrid, describe_nodes, wait_for_nodes
from .features import feature_store
from .metrics import report
from .model import make_head, weights_digest
from .results import create_run_dir, run_dir_for, write_best, write_run_end, write_run_start
from .selection import BestRound
from .strategy import make_strategy
from .task import evaluate_stats, pick_device

app = ServerApp()


class RunRefused(Exception):
    """The run cannot start (bad config, data or federation): its one-line reason was logged.

    An exception, not SystemExit: Flower's ServerApp runners (simulation and the Deployment
    Engine's flwr-serverapp) catch exceptions, mark the run failed and end the process;
    SystemExit left the Deployment Engine's ServerApp process and run alive.
    """


def prepare(cfg: RunConfig, grid: Grid):
    """Every check that can fail before training; returns (run_dir, the federation's grid,
    identities, partitions). The server reads only its own ``valid``/``test``; it learns the clients'
    data from their replies (federation.describe_nodes)."""
    run_dir = run_dir_for(cfg)
    server_ids = server_identities(cfg)  # valid/test load and schema, disjoint from each other
    federation = FederationGrid(grid, wait_for_nodes(grid, cfg))
    partitions = describe_nodes(federation, sorted(federation.node_ids), cfg)
    identities = check_clients_disjoint(cfg, server_ids, partitions)
    return run_dir, federation, identities, partitions


@app.main()
def main(grid: Grid, context: Context) -> None:
    t_start = time.time()
    try:
        cfg = RunConfig.from_run_config(context.run_config).resolved()
        log(INFO, "celeba-fl: dataset %s, weights %s, results-dir %s, cache-dir %s (paths as this "
            "ServerApp resolves them; working directory %s)", cfg.dataset, cfg.weights,
            cfg.results_dir, cfg.cache_dir, Path.cwd())
        run_dir, grid, identities, partitions = prepare(cfg, grid)
        num_nodes = len(grid.node_ids)
        device = pick_device(cfg)
        store = feature_store(cfg, device)
        store.extractor  # noqa: B018 - loads the weights now: a bad file is refused before training
    except ConfigError as exc:
        log(ERROR, "celeba-fl: %s", exc)
        raise RunRefused(str(exc)) from None

    create_run_dir(run_dir)
    log(INFO, "celeba-fl: run folder %s; %d clients, split=%s, target=%s, device=%s",
        run_dir, num_nodes, cfg.split, cfg.target, device)
    write_run_start(run_dir, cfg, kind="federated", num_clients=num_nodes, device=str(device),
                    identities=identities, partitions=partitions, weights_id=weights_digest(cfg.weights))

    valid, test = server_part(cfg, "valid"), server_part(cfg, "test")
    valid_reports: dict[int, dict] = {}
    strategy = make_strategy(cfg, num_nodes)
    best = BestRound(cfg.selection_metric, cfg.early_stopping_patience)
    round_times: dict[int, float] = {}
    t_round = [time.time()]

    def evaluate_valid(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        head = make_head(cfg.head_dropout, state=arrays.to_torch_state_dict())
        stats = evaluate_stats(head, store.for_part(valid), valid.labels, valid.attributes, device)
        rep = report(stats, where="valid")
        valid_reports[server_round] = rep
        if strategy.stopped_after is None:
            best.update(server_round, rep, {k: v.clone() for k, v in head.state_dict().items()})
            if best.should_stop:
                strategy.stop(server_round)
                log(INFO, "celeba-fl: early stopping after round %d: no better validation %s for %d "
                    "rounds (best: round %d)", server_round, cfg.selection_metric, best.patience, best.round)
        now = time.time()
        round_times[server_round] = now - t_round[0]
        t_round[0] = now
        _log_round(server_round, cfg.num_server_rounds, strategy.history.get(server_round, {}), rep,
                   round_times[server_round])
        o = rep["overall"]
        return MetricRecord({"loss": float(o["loss"]), "accuracy": float(o["accuracy"]),
                             "auroc": float(o["auroc"] or 0.0)})

    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(make_head(cfg.head_dropout, seed=cfg.seed).state_dict()),
        num_rounds=cfg.num_server_rounds,
        train_config=ConfigRecord({"lr": cfg.learning_rate}),  # per round: lr * lr-decay^(r-1)
        evaluate_fn=evaluate_valid,
    )

    def test_report(state: dict) -> dict:
        head = make_head(cfg.head_dropout, state=state)
        return report(evaluate_stats(head, store.for_part(test), test.labels, test.attributes, device), "test")

    last_state = result.arrays.to_torch_state_dict()
    test_rep = test_report(last_state)
    last_round = strategy.stopped_after or cfg.num_server_rounds
    history = []
    for rnd in sorted(set(valid_reports) | set(strategy.history)):
        entry = {"round": rnd, "seconds": round_times.get(rnd),
                 "bytes_sent": strategy.bytes_sent.get(rnd, 0)}
        entry.update(strategy.history.get(rnd, {}))
        entry["server_valid"] = valid_reports.get(rnd)
        entry["gap_train_minus_valid"] = _gaps(entry)
        if strategy.stopped_after is not None and rnd > strategy.stopped_after:
            entry["early_stopped"] = True
        history.append(entry)
    write_best(run_dir, best, test_report)
    write_run_end(run_dir, last_state, history, test_rep,
                  {"round": last_round, "wall_seconds": time.time() - t_start,
                   "feature_cache": store.stats})
    o = test_rep["overall"]
    log(INFO, "celeba-fl: test accuracy %.4f, balanced accuracy %.4f, AUROC %.4f, loss %.4f "
        "(n=%d); wall time %.0fs; results in %s", o["accuracy"], o["balanced_accuracy"] or 0,
        o["auroc"] or 0, o["loss"], o["n"], time.time() - t_start, run_dir)


def _gaps(entry: dict) -> dict | None:
    """Train minus server-validation loss, accuracy and AUROC: the overfitting gap."""
    tr, va = entry.get("train"), entry.get("server_valid")
    if not tr or not va:
        return None
    out = {}
    for key in ("loss", "accuracy", "auroc"):
        a, b = tr["overall"].get(key), va["overall"].get(key)
        out[key] = None if a is None or b is None else a - b
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _log_round(rnd: int, total: int, hist: dict, valid: dict, seconds: float) -> None:
    tr = hist.get("train", {})
    fe = hist.get("federated_evaluate", {})
    log(INFO, "celeba-fl: round %d/%d | train loss %s acc %s | fed-eval loss %s acc %s | "
        "valid loss %s acc %s AUROC %s | %.1fs", rnd, total,
        _fmt(tr.get("client_means", {}).get("train_loss")), _fmt(tr.get("overall", {}).get("accuracy")),
        _fmt(fe.get("overall", {}).get("loss")), _fmt(fe.get("overall", {}).get("accuracy")),
        _fmt(valid["overall"]["loss"]), _fmt(valid["overall"]["accuracy"]),
        _fmt(valid["overall"]["auroc"]), seconds)
