"""ServerApp: validates the run, describes the federation, federates, selects on ``valid``,
tests on ``test``. The same code runs under the Simulation Engine and the Deployment Engine.

Order matters for the user: everything that can be wrong with the configuration or the data
is checked first (config values, a results-dir it can write, the server's ``valid``/``test``
with their schema and label values, the SuperNodes that connected and what each says its
data is, identities disjoint from ``valid``/``test``, the weights, the images of
``valid``/``test`` (``bad-images``), a fresh run folder), before any embedding is computed
or any round runs. Then
each round logs one line a person can follow, and the run folder gets the results contract
(results.py).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from .config import ConfigError, RunConfig
from .data import check_clients_disjoint, check_clients_distinct, server_identities, server_part
from .internals import add_exit_handler
from .federation import FederationGrid, describe_nodes, wait_for_nodes
from .features import feature_store
from .metrics import fmt
from .mobilenet_layers import describe
from .model import head_for, weights_digest
from .postprocessing import equalized_odds_report
from .report import write_report_or_record
from .results import (HistoryLog, check_resume, create_run_dir, is_write_error, load_checkpoint, read_history,
                      resume_command, run_dir_for, save_torch, write_best, write_history, write_postprocessing,
                      write_round, write_run_end, write_run_start, write_skipped_rows, write_status)
from . import privacy
from . import protocol as P
from . import refusal
from .refusal import RunRefused, refuse  # noqa: F401 - RunRefused: what main raises
from .selection import BestRound
from .round_loop import RoundPolicy
from .strategy import make_strategy
from .task import evaluate_report, evaluate_stats, pick_device
from .tracking import check_available, open_tracker

app = ServerApp()
refusal.install()  # a refused simulation ends on its one line (refusal.py)


@dataclass
class Prepared:
    """What the checks before training found: the run folder's path, the grid of the described
    nodes, the identities per split, the partitions (partitions.json's entries) and the images
    each partition has yet to embed."""

    run_dir: Path
    grid: FederationGrid
    identities: dict[str, int]
    partitions: list[dict]
    to_embed: dict[int, int | None]


def prepare(cfg: RunConfig, grid: Grid) -> Prepared:
    """Every check that can fail before training. The server reads only its own
    ``valid``/``test``; it learns the clients' data from their replies
    (federation.describe_nodes)."""
    server_ids = server_identities(cfg)  # valid/test load and schema, disjoint from each other
    federation = FederationGrid(grid, wait_for_nodes(grid, cfg))
    id_salt = secrets.token_hex(16) if cfg.dp else None  # DP: identities as salted hashes (data/identities.py)
    described = describe_nodes(federation, sorted(federation.node_ids), cfg, id_salt)
    federation.federate(described.partitions, query_timeout=cfg.node_wait_timeout, id_salt=id_salt)
    check_clients_distinct(described.partitions)  # two SuperNodes with the same data would train it twice
    identities = check_clients_disjoint(cfg, server_ids, described.partitions, id_salt)
    return Prepared(run_dir_for(cfg), federation, identities, described.partitions, described.to_embed)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Wire the parts: config, checks, the run folder, the strategy's round loop, the final
    test. Every refusal before the run folder exists is one line and ends the run; after it
    exists, status.json says ``running`` after each round and ``completed`` or ``failed``
    (with the reason) at the end."""
    t_start = time.time()
    try:
        user_cfg = RunConfig.from_run_config(context.run_config)  # as written: what a resume command repeats
        cfg = user_cfg.resolved()
        check_available(cfg.tracking)
        log(INFO, "celeba-fl: dataset %s, weights %s, results-dir %s, cache-dir %s (paths as this "
            "ServerApp resolves them; working directory %s)", cfg.dataset, cfg.weights,
            cfg.results_dir, cfg.cache_dir, Path.cwd())
        ready = prepare(cfg, grid)
        run_dir, grid, identities, partitions, to_embed = (ready.run_dir, ready.grid, ready.identities,
                                                           ready.partitions, ready.to_embed)
        resume = load_checkpoint(run_dir) if cfg.resume else None
        if cfg.resume:
            check_resume(run_dir, cfg, partitions)
            resume["history"] = read_history(run_dir) or []
        num_nodes = len(grid.node_ids)
        strategy = make_strategy(cfg, num_nodes)  # refused here if the federation is too small for it
        budget = None
        if cfg.dp:  # Flower's DP wrapper around it, and the budget it spends (refused here if it cannot be met)
            budget = privacy.budget_for(cfg, num_nodes, sum(int(p["num_train"]) for p in partitions))
            strategy = privacy.wrap(cfg, strategy, budget, num_nodes)
        device = pick_device(cfg)
        store = feature_store(cfg, device)
        store.load_extractor()  # a bad weights file is refused before anything is written
        # valid/test: their images are checked here (bad-images), before the run folder exists
        valid, test = server_part(cfg, "valid"), server_part(cfg, "test")
        if resume is None:
            create_run_dir(run_dir)  # refused if a run of the same run-name created it meanwhile
    except ConfigError as exc:
        log(ERROR, "celeba-fl: %s", exc)
        raise refuse(str(exc)) from None

    if resume is None:
        write_run_start(run_dir, cfg, kind="federated", num_clients=num_nodes, device=str(device),
                        identities=identities, partitions=partitions, weights_id=weights_digest(cfg.weights))
        write_skipped_rows(run_dir, cfg, [valid, test], partitions)
    write_status(run_dir, "running", resume["round"] if resume else None)
    # a resume logs its first round again: what arrived a round late (evaluate-with-train) is in it now
    tracker = open_tracker(cfg.tracking, run_dir, cfg.as_dict(), resume["round"] - 1 if resume else -1)
    log(INFO, "celeba-fl: run folder %s; %d clients, split=%s, target=%s, device=%s; the head reads %s%s", run_dir,
        num_nodes, cfg.split, cfg.target, device, describe(cfg.feature_layer, cfg.feature_pool),
        f"; resuming after round {resume['round']}" if resume else "")
    log_plan(store, [valid, test], to_embed)
    if budget is not None:
        log_budget(cfg, budget)
    last_round = resume["round"] if resume else None
    interrupted = False  # set by a signal (see on_signal)
    finished = False

    def interrupted_reason() -> str:
        return (f"interrupted by a signal (Ctrl-C, SIGTERM or flwr stop) after round {last_round}; "
                f"resume with: {resume_command(user_cfg, run_dir.name)}")

    def on_signal() -> None:
        """Flower's handler for SIGINT/SIGTERM/SIGQUIT (Ctrl-C, ``flwr stop``) calls this
        before the process exits: status.json says ``failed`` and why, not ``running``."""
        nonlocal interrupted
        if not finished and not interrupted:
            interrupted = True
            write_status(run_dir, "failed", last_round, interrupted_reason())

    add_exit_handler(on_signal)
    history_log = HistoryLog(run_dir)
    if resume is not None:  # the log holds exactly the rounds the checkpoint covers
        history_log.restart([h for h in resume["history"] if h["round"] <= resume["round"]])
    last_history: list[dict] | None = None
    try:
        def evaluate_valid(server_round: int, arrays: ArrayRecord) -> dict:
            head = head_for(cfg, state=arrays.to_torch_state_dict())
            return evaluate_report(head, store.for_part(valid), valid.labels, valid.attributes, "valid",
                                   cfg.min_group_size, device)

        def on_round(history: list[dict], checkpoint: dict) -> None:
            nonlocal last_round, last_history
            if tracker:  # before the round is recorded: a kill in between redoes the round, never skips it
                tracker.log_history(history)
            write_round(run_dir, history, checkpoint, history_log)
            last_history = history
            last_round = checkpoint["round"]
            if interrupted:  # the round ended while the process was stopping: still failed, resumable after it
                write_status(run_dir, "failed", last_round, interrupted_reason())

        best = BestRound(cfg.selection_metric, cfg.early_stopping_patience)
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(head_for(cfg, seed=cfg.seed).state_dict()),
            num_rounds=cfg.num_server_rounds,
            train_config=ConfigRecord({"lr": cfg.learning_rate}),  # per round: lr * lr-decay^(r-1)
            server_evaluate=evaluate_valid, best=best, on_round=on_round, resume=resume,
            policy=RoundPolicy(cfg.round_timeout, cfg.min_reply_fraction, cfg.max_skipped_rounds,
                               cfg.evaluate_with_train, cfg.max_update_norm),
            privacy=budget,
            nodes={p["node_id"]: P.Expected(int(p["partition_id"]), int(p["num_train"]), int(p["num_val"]),
                                            tuple(cfg.sensitive_attributes)) for p in partitions},
        )
        last_state = result.arrays.to_torch_state_dict()
        save_torch(run_dir / "head.pt", last_state)  # before the final test: a crash there keeps it

        def test_report(state: dict) -> dict:
            head = head_for(cfg, state=state)
            return evaluate_report(head, store.for_part(test), test.labels, test.attributes, "test",
                                   cfg.min_group_size, device)

        test_rep = test_report(last_state)
        write_best(run_dir, best, test_report)
        postprocess(run_dir, cfg, result.last_evaluate_stats, last_state, store, valid, test, device)
        finished = True
        write_run_end(run_dir, last_state, result.history, test_rep,
                      {"round": last_round, "wall_seconds": time.time() - t_start, "feature_cache": store.stats})
        report_error = write_report_or_record(run_dir)
        if report_error:
            log(WARNING, "celeba-fl: the report could not be written (%s); the results stand, status.json says "
                "completed with report_error; retry with: celeba-report %s", report_error, run_dir)
        if tracker:
            best_json = run_dir / "best.json"
            tracker.log_final(test_rep, json.loads(best_json.read_text()) if best_json.exists() else None, last_round)
            tracker.close()
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised for flwr to end the run
        finished = True
        if tracker:
            tracker.close("KILLED" if interrupted else "FAILED")
        reason = interrupted_reason() if interrupted else (
            "stopped by the user (flwr stop)" if type(exc).__name__ == "RunNotRunningException"
            else f"{type(exc).__name__}: {exc}")
        recorded = write_status(run_dir, "failed", last_round, reason,
                                dp=last_history[-1].get("dp") if last_history else None)
        if last_history is not None:
            try:
                write_history(run_dir, last_history)  # history.json, as a completed run has
            except OSError:
                pass  # e.g. the disk is full: history.jsonl still holds every round
        line = (("run failed before its first round was written" if last_round is None
                 else f"run failed after round {last_round}") + f": {reason}; what was written is kept in {run_dir}"
                + ("" if recorded else " (status.json could not be written: it may still say running)")
                + ("" if "resume with:" in reason else f"; resume with: {resume_command(user_cfg, run_dir.name)}"))
        log(ERROR, "celeba-fl: %s", line)
        if is_write_error(exc):  # the disk's state, not a bug: the line says all, no traceback after it
            raise refuse(line) from None
        raise
    o = test_rep["overall"]
    log(INFO, "celeba-fl: test accuracy %.4f, balanced accuracy %s, AUROC %s, loss %.4f "
        "(n=%d); wall time %.0fs; results in %s", o["accuracy"], fmt(o["balanced_accuracy"]),
        fmt(o["auroc"]), o["loss"], o["n"], time.time() - t_start, run_dir)


def postprocess(run_dir: Path, cfg: RunConfig, clients_held_out: dict | None, state: dict, store, valid, test,
                device) -> None:
    """postprocessing.json: equalized-odds post-processing of the final head, fitted on the
    server's ``valid`` (central) and on the clients' summed held-out histograms of the last
    round (federated), applied to ``test`` (postprocessing.py). Optional: a failure here is
    logged and recorded in the file, and the run goes on."""
    head = head_for(cfg, state=state)

    def make_report() -> dict:
        fit_on = {"valid": evaluate_stats(head, store.for_part(valid), valid.labels, valid.attributes, device),
                  "clients' held-out": clients_held_out}
        test_stats = evaluate_stats(head, store.for_part(test), test.labels, test.attributes, device)
        return equalized_odds_report(fit_on, test_stats, list(cfg.sensitive_attributes), cfg.min_group_size)

    error = write_postprocessing(run_dir, make_report)
    if error:
        log(WARNING, "celeba-fl: equalized-odds post-processing failed: %s", error)


def log_budget(cfg: RunConfig, budget) -> None:
    """The DP settings and the epsilon the whole run will spend, before round 1."""
    solved = f" (solved for dp-target-epsilon={cfg.dp_target_epsilon:g})" if cfg.dp_target_epsilon else ""
    log(INFO, "celeba-fl: differential privacy dp=%s: noise multiplier %.4g%s, clipping norm %g%s, sampling rate %.3g "
        "(the share of the clients each round samples); after %d rounds epsilon %.3g at delta %.3g. %s", cfg.dp,
        budget.noise_multiplier, solved, cfg.dp_clipping_norm,
        " (adaptive: the first)" if cfg.dp == "client-adaptive" else "", budget.sampling_rate,
        cfg.num_server_rounds, budget.epsilon(cfg.num_server_rounds), budget.delta, privacy.COVERS)


def log_plan(store, server_parts: list, to_embed: dict[int, int | None]) -> None:
    """Before round 1: what will be embedded and how long that should take. The server embeds
    its own ``valid``/``test`` now (progress lines past 15 s), which measures this machine's
    rate; the clients said in their descriptions how many of their images are not cached."""
    t0, before = time.perf_counter(), store.stats["rows_computed"]
    for part in server_parts:
        store.for_part(part)
    server_new, dt = store.stats["rows_computed"] - before, time.perf_counter() - t0
    clients = sum(n for n in to_embed.values() if n)
    known = all(n is not None for n in to_embed.values())
    line = (f"celeba-fl: before round 1: the server embedded {server_new} of its "
            f"{sum(len(p) for p in server_parts)} valid/test images in {dt:.0f}s; the {len(to_embed)} clients "
            f"have {clients}{'' if known else '+'} images to embed in round 1 (the rest are cached)")
    if clients and server_new and dt > 0:
        rate = server_new / dt
        line += (f": at this server's {rate:.0f} img/s that is about {clients / rate:.0f}s of one process's "
                 "time, shared by the processes that run clients at once")
    log(INFO, line)
