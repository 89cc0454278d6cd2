"""The yardstick: the same frozen backbone and head, trained without federation.

``python -m celeba_app.centralized [--run-config "k=v ..."] [--num-partitions 50]`` reads the
same ``[tool.flwr.app.config]`` of pyproject.toml and the same overrides as ``flwr run``. It
trains on the union of the clients' local training parts (the same partitioning, so exactly
the images the federation trained on, without the clients' held-out parts), for
``num-server-rounds`` x ``local-epochs`` epochs with the same optimiser, learning rate and batch
size; one "round" here is ``local-epochs`` passes over the union, at the learning rate the
federation's clients get that round (``lr-decay``), with the same ``weight-decay`` and
``balance-groups`` loss weights (server-side strategies and FedProx's term have no centralized
counterpart and are not applied). It writes the same run folder
(config.json, partitions.json, history.json, test.json, best.json, postprocessing.json, head.pt,
report.md, plots),
with the same best-round selection on ``valid``, early stopping and overfitting gap
(selection.close_round), and
``kind: "centralized"``: ``train`` is the head on the union of training parts,
``local_validation`` on the union of the clients' held-out parts, ``server_valid`` on ``valid``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, RunConfig, load_run_config
from .data import (NodeData, LabeledRows, check_identity_disjoint, client_parts, load_federated,
                   partition_summary, server_part)
from .features import feature_store
from .postprocessing import equalized_odds_report
from .report import write_report_or_record
from .model import head_for, weights_digest
from .results import (create_run_dir, run_dir_for, write_best, write_postprocessing, write_run_end, write_run_start,
                      write_skipped_rows)
from .selection import BestRound, close_round
from .task import evaluate_report, evaluate_stats, group_balance_weights, pick_device, train_head
from .tracking import check_available, open_tracker


def _union(parts: list[LabeledRows], feats: list[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray, dict]:
    labels = np.concatenate([p.labels for p in parts])
    attrs = {a: np.concatenate([p.attributes[a] for p in parts]) for a in parts[0].attributes}
    return torch.cat(feats, dim=-2), labels, attrs


def run(cfg: RunConfig, num_partitions: int) -> Path:
    """Train the centralized head for ``cfg`` (module docstring) on the union of
    ``num_partitions`` clients' training parts; returns the run folder. Raises ConfigError
    (one line naming the bad value) for any refusal, before the run folder exists."""
    t_start = time.time()
    if not cfg.run_name:
        cfg = dataclasses.replace(cfg, run_name=f"{time.strftime('%Y%m%d-%H%M%S')}-central-{cfg.split}")
    cfg = cfg.resolved()  # config.json and report.md name absolute paths, as a federated run's do
    run_dir = run_dir_for(cfg)
    load_federated(cfg, num_partitions)
    identities = check_identity_disjoint(cfg, num_partitions)
    try:
        partitions = partition_summary(cfg, num_partitions)
    except ConfigError:
        raise
    except ValueError as exc:  # e.g. more clients than identities
        raise ConfigError(f"{exc} ({num_partitions} partitions)") from exc
    device = pick_device(cfg)
    store = feature_store(cfg, device)
    store.load_extractor()  # a bad weights file is refused before anything is written
    valid, test = server_part(cfg, "valid"), server_part(cfg, "test")  # images checked (bad-images)
    check_available(cfg.tracking)
    create_run_dir(run_dir)
    write_run_start(run_dir, cfg, kind="centralized", num_clients=num_partitions, device=str(device),
                    identities=identities, partitions=partitions, weights_id=weights_digest(cfg.weights))
    write_skipped_rows(run_dir, cfg, [valid, test], partitions)
    trains, vals = zip(*(client_parts(cfg, NodeData.partition(cfg, pid, num_partitions))
                         for pid in range(num_partitions)))
    print(f"celeba-fl centralized: embedding {sum(map(len, trains))} training images "
          f"({num_partitions} clients' parts) ...", flush=True)
    x_train, y_train, a_train = _union(list(trains), [store.for_part(p, cfg.augment_hflip) for p in trains])
    x_val, y_val, a_val = _union(list(vals), [store.for_part(p) for p in vals])
    f_valid, f_test = store.for_part(valid), store.for_part(test)
    plain_train = x_train[0] if cfg.augment_hflip else x_train

    head = head_for(cfg, seed=cfg.seed)
    weights = group_balance_weights(a_train, cfg.balance_groups) if cfg.balance_groups else None
    best = BestRound(cfg.selection_metric, cfg.early_stopping_patience)
    history = []
    tracker = open_tracker(cfg.tracking, run_dir, cfg.as_dict())
    for rnd in range(cfg.num_server_rounds + 1):
        t0 = time.time()
        entry: dict = {"round": rnd}
        if rnd > 0:
            res = train_head(head, x_train, torch.as_tensor(y_train), epochs=cfg.local_epochs,
                             lr=cfg.learning_rate * cfg.lr_decay ** (rnd - 1), batch_size=cfg.batch_size,
                             seed=cfg.seed + rnd, device=device, weight_decay=cfg.weight_decay,
                             sample_weight=weights)
            entry["train"] = evaluate_report(head, plain_train, y_train, a_train, "train", cfg.min_group_size, device)
            entry["train"]["client_means"] = {"local_steps_loss": res["loss"]}
            if len(y_val):
                entry["local_validation"] = evaluate_report(head, x_val, y_val, a_val, "local val", cfg.min_group_size,
                                                            device)
        entry["server_valid"] = evaluate_report(head, f_valid, valid.labels, valid.attributes, "valid",
                                                cfg.min_group_size, device)
        stop = close_round(entry, best, head.state_dict())
        entry["seconds"] = time.time() - t0
        history.append(entry)
        if tracker:
            tracker.log_history(history)
        v = entry["server_valid"]["overall"]
        print(f"celeba-fl centralized: round {rnd}/{cfg.num_server_rounds} | valid loss {v['loss']:.4f} "
              f"acc {v['accuracy']:.4f} AUROC {v['auroc']:.4f}", flush=True)
        if stop:
            print(f"celeba-fl centralized: early stopping after round {rnd} (best: round {best.round})")
            break

    def test_report(state: dict) -> dict:
        model = head_for(cfg, state=state)
        return evaluate_report(model, f_test, test.labels, test.attributes, "test", cfg.min_group_size, device)

    test_rep = test_report(head.state_dict())
    write_best(run_dir, best, test_report)
    error = write_postprocessing(run_dir, lambda: equalized_odds_report(
        {"valid": evaluate_stats(head, f_valid, valid.labels, valid.attributes, device),
         "clients' held-out": evaluate_stats(head, x_val, y_val, a_val, device) if len(y_val) else None},
        evaluate_stats(head, f_test, test.labels, test.attributes, device),
        list(cfg.sensitive_attributes), cfg.min_group_size))
    if error:
        print(f"celeba-fl centralized: equalized-odds post-processing failed: {error}", file=sys.stderr)
    write_run_end(run_dir, head.state_dict(), history, test_rep,
                  {"round": history[-1]["round"], "wall_seconds": time.time() - t_start,
                   "feature_cache": store.stats})
    report_error = write_report_or_record(run_dir)
    if report_error:
        print(f"celeba-fl centralized: the report could not be written ({report_error}); the results stand; "
              f"retry with: celeba-report {run_dir}", file=sys.stderr)
    if tracker:
        tracker.log_final(test_rep, json.loads((run_dir / "best.json").read_text())
                          if (run_dir / "best.json").exists() else None, history[-1]["round"])
        tracker.close()
    o = test_rep["overall"]
    print(f"celeba-fl centralized: test accuracy {o['accuracy']:.4f}, balanced accuracy "
          f"{o['balanced_accuracy']:.4f}, AUROC {o['auroc']:.4f}; results in {run_dir}", flush=True)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """The CLI (module docstring): 0 on success, 2 and one line on stderr for a refused config."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", action="append", default=[],
                        help='overrides, as for flwr run: "key=value key=value"')
    parser.add_argument("--num-partitions", type=int, default=50,
                        help="clients whose training parts are pooled (default 50, as the federation)")
    parser.add_argument("--project", type=Path, default=Path("."), help="folder of pyproject.toml")
    args = parser.parse_args(argv)
    try:
        cfg = RunConfig.from_run_config(load_run_config(args.project, args.run_config))
        run(cfg, args.num_partitions)
    except ConfigError as exc:
        print(f"celeba-fl: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
