"""Runs side by side: ``celeba-compare RUN_DIR RUN_DIR ... [--out DIR]``.

Works for any run folders, federated or centralized. Writes ``comparison.md`` (test metrics,
worst-group accuracy and gaps per run, final train-minus-validation gap) and overlaid plots of
validation loss/accuracy/AUROC per round and of the equalized-odds gap per round.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import fmt, load_run, overall_table, per_round, save, series  # noqa: E402


def _label(run: dict) -> str:
    """A run in a legend: its run-name, unless that is the default timestamp, then its kind and split."""
    cfg = run["config"] or {}
    rc = cfg.get("run_config", {})
    what = f"{cfg.get('kind', 'federated')}, {rc.get('split', '?')}"
    return what if rc.get("run-name", run["name"]) == "" and run["name"][:8].isdigit() else f"{run['name']} ({what})"


def overlay(runs: list[dict], path: Path) -> Path:
    """Server-``valid`` loss, accuracy and AUROC per round, one line per run (report.load_run
    dicts), to ``path`` (PNG); returns ``path``."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ("loss", "accuracy", "auroc")):
        for run in runs:
            xs, ys = series(run["history"] or [], "server_valid", key)
            ax.plot(xs, ys, marker="o", ms=3, label=_label(run))
        per_round(ax, f"server valid {key}")
    axes[0].legend(fontsize=7)
    return save(fig, path)


def overlay_gaps(runs: list[dict], path: Path, attrs=("Male", "Young", "Pale_Skin")) -> Path:
    """The equalized-odds difference on ``valid`` per trained round, one panel per attribute of
    ``attrs`` and one line per run, to ``path`` (PNG); returns ``path``."""
    fig, axes = plt.subplots(1, len(attrs), figsize=(13, 3.4), sharey=True)
    for ax, attr in zip(axes, attrs):
        for run in runs:
            hist = [h for h in (run["history"] or []) if h.get("server_valid") and h["round"] >= 1]  # not the untrained head
            xs = [h["round"] for h in hist]
            ys = [(h["server_valid"]["gaps"].get(attr) or {}).get("equalized_odds_difference") for h in hist]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=_label(run))
        per_round(ax, f"equalized odds diff. ({attr}, valid)")
    axes[0].legend(fontsize=7)
    return save(fig, path)


def train_val_gap(run: dict) -> float | None:
    """Final round's train accuracy minus server-valid accuracy (overfitting)."""
    last = (run["history"] or [{}])[-1]
    tr = (last.get("train") or {}).get("overall", {}).get("accuracy")
    va = (last.get("server_valid") or {}).get("overall", {}).get("accuracy")
    return None if tr is None or va is None else tr - va


def fairness_table(runs: list[dict], attrs=("Male", "Young", "Pale_Skin", "Male&Young")) -> str:
    """A Markdown table, one row per finished run: the train-valid accuracy gap and, per
    attribute (or intersection) of ``attrs``, test worst-group accuracy / equalized-odds
    difference ("–" where a run has no such attribute)."""
    head = "| run | train-valid acc. gap | " + " | ".join(
        f"{a}: worst-group acc. / EOdds diff." for a in attrs) + " |"
    lines = [head, "|---" * (len(attrs) + 2) + "|"]
    for run in runs:
        gaps = run["test"]["gaps"]
        cells = [f"{fmt((gaps.get(a) or {}).get('worst_group_accuracy'), 3)} / "
                 f"{fmt((gaps.get(a) or {}).get('equalized_odds_difference'), 3)}" for a in attrs]
        lines.append(f"| {_label(run)} | {fmt(train_val_gap(run), 3)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_table(runs: list[dict]) -> str:
    """A Markdown table, one row per run: test accuracy of the last round's head and of the
    best round's (selected on ``valid``), each with its 95% Wilson interval, and whether the
    run's interval overlaps the first run's (an overlap is no evidence of a difference)."""
    from .metrics import wilson

    def cell(rep: dict | None) -> tuple[str, list | None]:
        if not rep:
            return "–", None
        o = rep["overall"]
        ci = wilson(o["accuracy"] * o["n"], o["n"])
        return f"{o['accuracy']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]", ci

    lines = ["| run | last round: test acc. [95% CI] | best round (by valid): test acc. [95% CI] | vs the first run |",
             "|---|---|---|---|"]
    first = None
    for run in runs:
        last, last_ci = cell(run["test"])
        best, best_ci = cell(run["best"])
        ci = best_ci or last_ci
        if first is None:
            first, versus = ci, "reference"
        else:
            versus = "intervals overlap: no evidence of a difference" if ci[0] <= first[1] and first[0] <= ci[1] \
                else "intervals apart"
        rounds = f" (round {run['best']['round']})" if run["best"] else ""
        lines.append(f"| {_label(run)} | {last} | {best}{rounds} | {versus} (best round) |")
    return "\n".join(lines)


def compare(run_dirs: list[Path], out: Path) -> Path:
    """Write ``out``/comparison.md and its two plots for finished run folders; returns the
    Markdown file's path. SystemExit (one line naming them) if any folder has no test.json."""
    runs = [load_run(d) for d in run_dirs]
    missing = [str(r["dir"]) for r in runs if r["test"] is None]
    if missing:
        raise SystemExit(f"celeba-compare: no test.json in {', '.join(missing)}; accepted: finished run folders")
    out.mkdir(parents=True, exist_ok=True)
    overlay(runs, out / "compare_valid.png")
    overlay_gaps(runs, out / "compare_gaps.png")
    text = ["# Comparison", "", "Test split. The last round's head, and the head of the round selected on "
            "`valid` (a centralized head that overfits is judged by the latter).", "",
            accuracy_table(runs), "", "Every metric of the last round's head:", "",
            overall_table({_label(r): r["test"] for r in runs}), "",
            "## Fairness (test) and overfitting", "", fairness_table(runs), "",
            "![validation curves](compare_valid.png)", "", "![gaps](compare_gaps.png)", ""]
    path = out / "comparison.md"
    path.write_text("\n".join(text))
    return path


def main(argv: list[str] | None = None) -> None:
    """``celeba-compare RUN_DIR... [--out DIR]``: prints the comparison's path."""
    parser = argparse.ArgumentParser(description="Compare finished run folders side by side.")
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: outputs/compare-<timestamp>)")
    args = parser.parse_args(argv)
    out = args.out or Path("outputs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    print(compare(args.run_dirs, out))


if __name__ == "__main__":
    main()
