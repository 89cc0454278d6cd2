"""Could torchmetrics hold the clients' per-group statistics? Exactness and speed against
metrics.Stats, on one client's slice statistics.

    python benchmarks/bench_torchmetrics.py --rows 3255 --repeats 20

For ``--rows`` random predictions with three sensitive attributes (19 slices: everyone, 6
groups, 12 intersection cells), both sides compute every slice's confusion counts, summed
loss and the binned AUROC's sufficient statistics, then 50 such clients are merged as the
server does: ``metrics.slice_stats`` + ``sum_stats`` here, and per slice a torchmetrics
``BinaryStatScores`` and ``BinaryAUROC(thresholds=121 points)`` (``validate_args=False``, their fast path)
with ``merge_state``. Printed: the largest difference of counts and of AUROC between the two,
and the seconds per client (compute) and per merge of 50 (server). Not a test: a
measurement for the decision in the closing note of issue #24.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from celeba_app.metrics import NUM_BINS, metrics_report, slice_masks, slice_stats, sum_stats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=3255)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from torchmetrics.classification import BinaryAUROC, BinaryStatScores

    rng = np.random.default_rng(0)
    clients = []
    for _ in range(args.clients):
        labels = rng.integers(0, 2, args.rows)
        probs = np.clip(rng.normal(0.3 + 0.4 * labels, 0.25), 1e-6, 1 - 1e-6)
        attrs = {a: rng.integers(0, 2, args.rows) for a in ("Male", "Young", "Pale_Skin")}
        losses = -(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
        clients.append((probs, labels, losses, attrs))

    def ours(c):
        return slice_stats(*c)

    thresholds = torch.linspace(0, 1, NUM_BINS + 1)

    def theirs(c):
        probs, labels, losses, attrs = c
        p, y = torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels)
        out = {}
        for name, m in slice_masks(attrs, len(labels)).items():
            col = {"stat": BinaryStatScores(validate_args=False),
                   "auroc": BinaryAUROC(thresholds=thresholds, validate_args=False)}
            mt = torch.as_tensor(m)
            for metric in col.values():
                metric.update(p[mt], y[mt])
            out[name] = (col, float(losses[m].sum()))
        return out

    t0 = time.perf_counter()
    for _ in range(args.repeats):
        mine = [ours(c) for c in clients]
    t_ours = (time.perf_counter() - t0) / (args.repeats * args.clients)
    t0 = time.perf_counter()
    summed = None
    for _ in range(args.repeats):
        summed = sum_stats(mine)
    t_ours_merge = (time.perf_counter() - t0) / args.repeats
    t0 = time.perf_counter()
    for _ in range(max(1, args.repeats // 5)):
        tm = [theirs(c) for c in clients]
    t_tm = (time.perf_counter() - t0) / (max(1, args.repeats // 5) * args.clients)
    t0 = time.perf_counter()
    merged = {}
    for name in tm[0]:
        first = tm[0][name][0]
        for other in tm[1:]:
            for key, metric in first.items():
                metric.merge_state(other[name][0][key])
        merged[name] = {key: metric.compute() for key, metric in first.items()}
    t_tm_merge = time.perf_counter() - t0

    rep = metrics_report(summed, "bench", 1)
    overall = summed["all"]
    tp, fp, tn, fn, _ = merged["all"]["stat"].tolist()
    d_counts = max(abs(tp - overall.tp), abs(fp - overall.fp), abs(tn - overall.tn), abs(fn - overall.fn))
    d_auroc = abs(float(merged["all"]["auroc"]) - rep["overall"]["auroc"])
    print(f"rows per client {args.rows}, clients {args.clients}, slices {len(mine[0])}")
    print(f"confusion counts, largest difference: {d_counts:g}")
    print(f"AUROC overall: metrics.Stats {rep['overall']['auroc']:.6f}, torchmetrics binned "
          f"{float(merged['all']['auroc']):.6f}, difference {d_auroc:.2e}")
    print(f"per client (all slices): metrics.Stats {t_ours * 1e3:.2f} ms, torchmetrics {t_tm * 1e3:.2f} ms "
          f"({t_tm / t_ours:.1f}x)")
    print(f"server merge of {args.clients}: sum_stats {t_ours_merge * 1e3:.2f} ms, merge_state + compute "
          f"{t_tm_merge * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
