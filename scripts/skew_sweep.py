"""Where non-IID data starts to cost: skew regimes from mild to extreme, several seeds each.

    python scripts/skew_sweep.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth [--seeds 1 2 42] [--out outputs/skew]

Regimes (50 clients, 10 rounds, defaults otherwise; `flwr run .` per regime and seed, with
one shared embedding cache, so only the first run embeds):

* ``iid``: the reference;
* ``Male x Young, alpha a`` for a in 100, 1, 0.5, 0.1, 0.05: the non-IID split, each client's
  demographic mix drawn from Dirichlet(a) over Male x Young (identity-disjoint clients);
* ``label skew, alpha 0.1``: the same partitioner over the target itself
  (``noniid-attributes='Smiling'``): clients differ in how often people smile.

* ``one celebrity per client (LEAF)``: ``split='celebrity'``, one SuperNode per identity of the
  train split (3,800 on celeba-10k; ``--celebrity-supernodes`` for another dataset), 50 of them
  sampled per round (``fraction-train=0.0132``). ``--regimes`` runs a subset.

Prints, per regime (mean +- standard deviation over seeds), from each run's folder: test
accuracy and its difference to IID, the train-valid accuracy gap of the last round (the
clients' locally trained heads on their own data minus the global head on ``valid``), the
spread of the clients' held-out accuracies (std over clients, last round) and the test
equalized-odds differences for Male and Young; writes ``<out>/accuracy_vs_skew.png``.
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

REGIMES: dict[str, str] = {  # name -> run-config overrides
    "iid": "split='iid'",
    "Male x Young, alpha 100": "split='noniid' noniid-alpha=100.0",
    "Male x Young, alpha 1": "split='noniid' noniid-alpha=1.0",
    "Male x Young, alpha 0.5": "split='noniid' noniid-alpha=0.5",
    "Male x Young, alpha 0.1": "split='noniid' noniid-alpha=0.1",
    "Male x Young, alpha 0.05": "split='noniid' noniid-alpha=0.05",
    "label skew, alpha 0.1": "split='noniid' noniid-alpha=0.1 noniid-attributes='Smiling'",
    # LEAF's extreme: one SuperNode per identity of celeba-10k's train split (3,800), 50 sampled per round
    "one celebrity per client (LEAF)": "split='celebrity' fraction-train=0.0132 fraction-evaluate=0.0132",
}
#: SuperNodes per regime where it is not the federation's default (50).
SUPERNODES = {"one celebrity per client (LEAF)": 3800}


def measures(run: Path) -> dict:
    """The figures of one finished run folder."""
    test = json.loads((run / "test.json").read_text())
    last = json.loads((run / "history.json").read_text())[-1]
    gap = (last.get("gap_train_minus_valid") or {}).get("accuracy")
    clients = ((last.get("federated_evaluate") or {}).get("clients") or {}).get("accuracy") or {}
    return {"accuracy": test["overall"]["accuracy"], "train_valid_gap": gap, "client_acc_std": clients.get("std"),
            "eo_male": test["gaps"]["Male"]["equalized_odds_difference"],
            "eo_young": test["gaps"]["Young"]["equalized_odds_difference"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 42])
    ap.add_argument("--out", type=Path, default=Path("outputs/skew"))
    ap.add_argument("--cache-dir", default=".cache/celeba-fl")
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES), metavar="REGIME",
                    help="a subset of the regimes (names as in the table)")
    ap.add_argument("--celebrity-supernodes", type=int, default=SUPERNODES["one celebrity per client (LEAF)"],
                    help="identities in the train split (one SuperNode each)")
    args = ap.parse_args()
    SUPERNODES["one celebrity per client (LEAF)"] = args.celebrity_supernodes
    out = args.out.resolve()
    common = (f"dataset='{Path(args.data).resolve()}' weights='{Path(args.weights).resolve()}' "
              f"results-dir='{out}' cache-dir='{Path(args.cache_dir).resolve()}'")
    results: dict[str, list[dict]] = {}
    for name, overrides in REGIMES.items():
        if name not in args.regimes:
            continue
        for seed in args.seeds:
            run = ensure_run(out / f"{slug(name)}-s{seed}", f"{common} {overrides} seed={seed}",
                             f"options.num-supernodes={SUPERNODES[name]}" if name in SUPERNODES else None)
            results.setdefault(name, []).append(measures(run))
            print(f"{run.name}: {results[name][-1]}", flush=True)

    def cell(name: str, key: str, minus: float = 0.0) -> str:
        v = np.array([r[key] for r in results[name] if r[key] is not None], dtype=float) - minus
        return "–" if not len(v) else f"{v.mean():+.3f} ± {v.std():.3f}" if minus else f"{v.mean():.3f} ± {v.std():.3f}"

    iid = float(np.mean([r["accuracy"] for r in results["iid"]])) if "iid" in results else float("nan")
    print("\n| regime | test acc. | vs IID | train-valid acc. gap | client acc. std | EOdds diff. Male | "
          "EOdds diff. Young | seeds |\n|---|---|---|---|---|---|---|---|")
    for name in results:
        print(f"| {name} | {cell(name, 'accuracy')} | {cell(name, 'accuracy', iid)} | "
              f"{cell(name, 'train_valid_gap')} | {cell(name, 'client_acc_std')} | {cell(name, 'eo_male')} | "
              f"{cell(name, 'eo_young')} | {len(results[name])} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [(float(n.rsplit(" ", 1)[1]), n) for n in results if n.startswith("Male x Young")]
    if not alphas:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [a for a, _ in alphas]
    for key, label in (("accuracy", "test accuracy"), ("eo_male", "EOdds diff. Male")):
        m = [np.mean([r[key] for r in results[n]]) for _, n in alphas]
        s = [np.std([r[key] for r in results[n]]) for _, n in alphas]
        ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, label=label)
    ax.axhline(iid, color="grey", ls="--", lw=1, label="IID test accuracy")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("Dirichlet alpha over Male x Young (right: more skew)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_skew.png", dpi=120)
    print(f"\nplot: {out / 'accuracy_vs_skew.png'}")


if __name__ == "__main__":
    main()
