"""Methods that close the Male gap, with what they cost: several seeds, IID and non-IID, one Pareto plot.

    python scripts/fairness_methods.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth [--seeds 1 2 42] [--out outputs/fairness]

Per split (``iid``; ``noniid``: alpha 0.5 over Male x Young, the default) and seed, `flwr run .`
(50 clients, 10 rounds, defaults otherwise; one shared embedding cache) of:

* ``FedAvg``, whose postprocessing.json also gives equalized-odds post-processing of its
  final head, fitted on the clients' held-out parts (federated) and on ``valid`` (central);
* ``FairFed`` (``strategy='fairfed'``, beta 0.1, Male, equalized-odds difference);
* ``group-balanced loss`` (``balance-groups='Male,Young'``), with ``--runs``: the remedies
  table of docs/RESULTS.md has it over 3 seeds on the non-IID split.

With ``--remedies-from outputs/results-<tag>`` it also reads every remedy of
scripts/make_results.py (``REMEDIES``: dropout, weight decay, fewer local epochs, FedProx,
FedAvgM, FedAdam, q-FedAvg, the group-balanced loss), from the run folders that
``make_results.py --only remedies`` wrote for the same seeds, so that the table and the plot
show every method and remedy (the remedies are defined, and run, in one place).

Prints one row per method and split: test accuracy and its difference to FedAvg, the Male
equalized-odds difference (mean +- standard deviation over seeds), the mean of its 95%
Newcombe interval's bounds, and in how many seeds that interval includes 0. Writes
``--plot`` (default docs/img/pareto_accuracy_vs_male_eodds.png): accuracy against the Male
equalized-odds difference, each point a method and split (mean over seeds), its error bars
the mean 95% interval of the difference and the seeds' accuracy spread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from experiment_runs import ensure_run, slug  # noqa: E402
from make_results import REMEDIES, remedy_dir  # noqa: E402

RUNS: dict[str, str] = {  # name -> run-config overrides
    "FedAvg": "",
    "FairFed beta 0.1": "strategy='fairfed' fairfed-beta=0.1",
    "group-balanced loss": "balance-groups='Male,Young'",
}
DEFAULT_RUNS = ["FedAvg", "FairFed beta 0.1"]  # group-balanced loss: 3 seeds in the remedies table
POST = {"post-processing, fitted on clients' held-out": "clients' held-out",
        "post-processing, fitted on valid": "valid"}
SPLITS = {"iid": "split='iid'", "noniid": "split='noniid'"}


def male(summary: dict) -> dict:
    """accuracy, Male equalized-odds difference and its interval, from test.json or a
    postprocessing.json test summary."""
    gaps = summary["gaps"]["Male"] if "Male" in summary["gaps"] else summary["gaps"]
    return {"accuracy": summary["overall"]["accuracy"] if "overall" in summary else summary["accuracy"],
            "eo": gaps["equalized_odds_difference"], "ci": gaps["equalized_odds_difference_ci"]}


def measures(run: Path) -> dict[str, dict]:
    """{method: figures} of one finished run folder (FedAvg's also gives post-processing)."""
    out = {"run": male(json.loads((run / "test.json").read_text()))}
    post = run / "postprocessing.json"
    if post.exists():
        entry = json.loads(post.read_text()).get("attributes", {}).get("Male", {})
        for label, fit in POST.items():
            if "test_after" in entry.get(fit, {}):
                out[label] = male(entry[fit]["test_after"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 42])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS), metavar="NAME",
                    help=f"which runs (default: {', '.join(DEFAULT_RUNS)}; all: {', '.join(RUNS)})")
    ap.add_argument("--out", type=Path, default=Path("outputs/fairness"))
    ap.add_argument("--cache-dir", default=".cache/celeba-fl")
    ap.add_argument("--remedies-from", type=Path, default=None, metavar="DIR",
                    help="make_results.py's run folder (e.g. outputs/results-<tag>): add its remedies")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/img/pareto_accuracy_vs_male_eodds.png")
    args = ap.parse_args()
    out = args.out.resolve()
    common = (f"dataset='{Path(args.data).resolve()}' weights='{Path(args.weights).resolve()}' "
              f"results-dir='{out}' cache-dir='{Path(args.cache_dir).resolve()}' num-server-rounds={args.rounds}")
    rows: dict[tuple[str, str], list[dict]] = {}
    for split in args.splits:
        for name, overrides in RUNS.items():
            if name not in args.runs:
                continue
            for seed in args.seeds:
                run = ensure_run(out / f"{slug(f'{name}-{split}')}-s{seed}",
                                 f"{common} {SPLITS[split]} {overrides} seed={seed}")
                for method, figures in measures(run).items():
                    if method != "run" and name != "FedAvg":
                        continue  # post-processing of FedAvg's head only
                    label = name if method == "run" else method
                    rows.setdefault((label, split), []).append(figures)
    if args.remedies_from is not None:
        rows.update(remedy_rows(args.remedies_from.resolve(), args.seeds))
    table(rows, args.seeds)
    plot(rows, args.plot)


def remedy_rows(results: Path, seeds: list[int]) -> dict[tuple[str, str], list[dict]]:
    """{(remedy, split): figures per seed} of make_results.py's remedies (not its FedAvg
    rows: this script's own FedAvg runs are those), from the seeds each has (make_results'
    ``--first-seed-only`` runs some with fewer). Exits naming a remedy that has none."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for name, (split, _) in REMEDIES.items():
        if name in ("FedAvg", "FedAvg (IID reference)"):
            continue
        runs = [results / remedy_dir(name, seed) for seed in seeds]
        runs = [run for run in runs if (run / "test.json").exists()]
        if not runs:
            sys.exit(f"--remedies-from {results}: {name!r} has no finished run for seeds {seeds}; run "
                     f"scripts/make_results.py --only remedies --seeds {' '.join(map(str, seeds))} first")
        rows[(name, split)] = [measures(run)["run"] for run in runs]
    return rows


def table(rows: dict[tuple[str, str], list[dict]], seeds: list[int]) -> None:
    def ms(values) -> str:
        v = np.asarray(values, dtype=float)
        return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"

    print(f"\nseeds {', '.join(map(str, seeds))} (fewer where the seeds column says so); test split; mean ± "
          "standard deviation over seeds\n")
    print("| method | split | test acc. | vs FedAvg | EOdds diff. Male | mean 95% CI | CI includes 0 | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for (label, split), runs in rows.items():
        ref = np.mean([r["accuracy"] for r in rows[("FedAvg", split)]])
        acc = [r["accuracy"] for r in runs]
        lo, hi = np.mean([r["ci"][0] for r in runs]), np.mean([r["ci"][1] for r in runs])
        zero = sum(r["ci"][0] <= 0 <= r["ci"][1] for r in runs)
        print(f"| {label} | {split} | {ms(acc)} | {np.mean(acc) - ref:+.3f} | {ms([r['eo'] for r in runs])} | "
              f"[{lo:.3f}, {hi:.3f}] | {zero} of {len(runs)} | {len(runs)} |")


def plot(rows: dict[tuple[str, str], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11.5, 6))
    markers = {"iid": "o", "noniid": "s"}
    labels = list(dict.fromkeys(label for label, _ in rows))
    colors = {label: plt.cm.tab20(i % 20) for i, label in enumerate(labels)}
    for (label, split), runs in rows.items():
        eo, acc = np.mean([r["eo"] for r in runs]), np.mean([r["accuracy"] for r in runs])
        lo, hi = np.mean([r["ci"][0] for r in runs]), np.mean([r["ci"][1] for r in runs])
        ax.errorbar(eo, acc, xerr=[[eo - lo], [hi - eo]], yerr=np.std([r["accuracy"] for r in runs]),
                    fmt=markers[split], color=colors[label], capsize=3, label=f"{label} ({split})")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("Male equalized-odds difference on test (bars: mean 95% Newcombe interval)")
    ax.set_ylabel("test accuracy (bars: std over seeds)")
    ax.set_title("Accuracy against the Male gap, per method and remedy (celeba-10k, 50 clients, 10 rounds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
