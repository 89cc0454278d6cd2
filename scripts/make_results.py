"""Regenerate the generated blocks of docs/RESULTS.md: IID vs non-IID vs centralized, the remedies, the appendix.

    python scripts/make_results.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth

Runs (from the project root, results under outputs/results-<tag>/, embeddings cached):
  1. `flwr run .` IID and non-IID (50 clients, 10 rounds, defaults otherwise) and the
     centralized baseline, seed 42; `celeba-compare` of the three; docs/img/*.png.
  2. Each experiment of ``REMEDIES`` (keyed by name; its run folders are
     ``remedy-<name>-seed<seed>``) with --seeds seeds (a seed changes the partitioning, the
     local hold-outs, the head's initialisation and batch order): mean and standard deviation.

Then rewrites, in docs/RESULTS.md (and README.md's ``readme-results``), only the blocks between ``<!-- generated: NAME -->`` and
``<!-- /generated -->`` (``BLOCKS``: the tables and figures, from the run folders alone); the
text around them, the reading of the figures included, is the document's own and is kept.
A block missing from the document is one error line, and nothing is written. ``--only
baseline|remedies`` runs one part; ``--write-only`` rebuilds the blocks from existing run folders.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from celeba_app.compare import compare  # noqa: E402
from celeba_app.report import gap_table, group_table, load_run  # noqa: E402
from experiment_runs import ensure_run, set_aside_incomplete, slug  # noqa: E402

REMEDIES: dict[str, tuple[str, str]] = {  # experiment name -> (split, run-config overrides)
    "FedAvg (IID reference)": ("iid", ""),
    "FedAvg": ("noniid", ""),
    "head dropout 0.3": ("noniid", "head-dropout=0.3"),
    "weight decay 0.5 (AdamW)": ("noniid", "weight-decay=0.5"),
    "2 local epochs, lr decay 0.8": ("noniid", "local-epochs=2 lr-decay=0.8"),
    "FedProx mu=0.5": ("noniid", "strategy='fedprox' proximal-mu=0.5"),
    "FedAvgM (server momentum 0.7)": ("noniid", "strategy='fedavgm' server-momentum=0.7"),
    "FedAdam (server lr 0.01)": ("noniid", "strategy='fedadam' server-learning-rate=0.01"),
    "q-FedAvg q=1": ("noniid", "strategy='qfedavg' qfedavg-q=1.0"),
    "group-balanced loss (Male x Young)": ("noniid", "balance-groups='Male,Young'"),
}


def central_run(rc: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "celeba_app.centralized", "--run-config", rc]
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    print(f"  {time.time() - t0:5.0f}s  centralized {rc[-60:]}", flush=True)


def base_rc(args, out: Path) -> str:
    return f"dataset='{args.data}' weights='{args.weights}' results-dir='{out}' num-server-rounds={args.rounds}"


def run_baseline(args, out: Path) -> None:
    for split in ("iid", "noniid"):
        ensure_run(out / f"fed-{split}", base_rc(args, out) + f" split='{split}'")
    set_aside_incomplete(out / "central")
    if not (out / "central" / "test.json").exists():
        central_run(base_rc(args, out) + " run-name='central'", out / "central.log")


def remedy_dir(name: str, seed: int) -> str:
    """The run folder of experiment ``name`` (a key of REMEDIES) and ``seed``."""
    return f"remedy-{slug(name)}-seed{seed}"


#: The centralized head on the same features, over the remedies' seeds: the yardstick of the
#: remedies table (its split only decides which images the clients hold out).
CENTRAL = "centralized (same features)"


def run_remedies(args, out: Path) -> None:
    for seed in args.seeds:
        for remedy, (split, extra) in REMEDIES.items():
            if seed != args.seeds[0] and remedy in args.first_seed_only:
                continue
            ensure_run(out / remedy_dir(remedy, seed), base_rc(args, out) + f" split='{split}' seed={seed} {extra}")
        run = out / remedy_dir(CENTRAL, seed)
        set_aside_incomplete(run)
        if not (run / "test.json").exists():
            central_run(base_rc(args, out) + f" split='iid' seed={seed} run-name='{run.name}'", out / f"{run.name}.log")


# --------------------------------------------------------------------------- the document
def _f(v, d=3):
    return "–" if v is None else f"{v:.{d}f}"


def _ms(values: list[float | None], d=3) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return _f(vals[0], d)
    return f"{np.mean(vals):.{d}f} ± {np.std(vals, ddof=1):.{d}f}"


def remedy_row(runs: list[dict]) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in ("acc", "best_acc", "bal", "wga", "eo_male", "eo_young", "gap", "auroc")}
    for run in runs:
        t, b, h = run["test"], run["best"] or run["test"], run["history"][-1]
        worst = [g["worst_group_accuracy"] for a, g in t["gaps"].items() if g["worst_group_accuracy"] is not None]
        cols["acc"].append(t["overall"]["accuracy"])
        cols["best_acc"].append(b["overall"]["accuracy"])
        cols["bal"].append(t["overall"]["balanced_accuracy"])
        cols["auroc"].append(t["overall"]["auroc"])
        cols["wga"].append(min(worst) if worst else None)
        cols["eo_male"].append(t["gaps"]["Male"]["equalized_odds_difference"])
        cols["eo_young"].append(t["gaps"]["Young"]["equalized_odds_difference"])
        gap = h.get("gap_train_minus_valid") or {}
        cols["gap"].append(gap.get("accuracy"))
    return cols


def remedies_section(out: Path, seeds: list[int]) -> list[str]:
    rows = []
    for name, (split, extra) in {**REMEDIES, CENTRAL: ("central", "")}.items():
        runs = [load_run(out / remedy_dir(name, s)) for s in seeds if (out / remedy_dir(name, s)).exists()]
        runs = [r for r in runs if r["test"]]
        if runs:
            rows.append((name, split, extra, remedy_row(runs), len(runs)))
    if not rows:
        return []
    ref = next(r for r in rows if r[0] == "FedAvg")
    keys = ("acc", "best_acc", "bal", "auroc", "wga", "eo_male", "eo_young", "gap")
    # Run-to-run noise per metric: the standard deviation over seeds, pooled over every
    # non-IID row that has several seeds (more stable than one row's two or three runs).
    pooled = {}
    for key in keys:
        variances = [np.var([v for v in cols[key] if v is not None], ddof=1)
                     for name, split, _, cols, n in rows if split == "noniid" and n > 1]
        pooled[key] = float(np.sqrt(np.mean(variances))) if variances else None
    seeds_used = sorted({int(d.name.rsplit("seed", 1)[1]) for d in out.glob("remedy-*-seed*")
                         if (d / "test.json").exists()})
    lines = [
        f"Non-IID split (alpha 0.5 over Male x Young), 50 clients, 10 rounds; seeds {', '.join(map(str, seeds_used))} "
        "(mean ± standard deviation over seeds; a seed changes the partitioning, the clients' hold-outs, the "
        "initial head and the batch order). Test split. *Last* is the head after round 10, *best* the head "
        "of the round with the lowest validation loss (selected on `valid`, never on test). Worst-group "
        "accuracy is the lowest accuracy over every group and pairwise intersection of Male, Young, "
        "Pale_Skin (the smallest cells have under 20 test images, so it is noisy). The train-valid gap is "
        "the last round's accuracy of the clients' locally trained heads on their own training data minus "
        "the global head's accuracy on `valid`: the overfitting gap. The last row is the yardstick: the same "
        "head trained centrally (celeba-centralized) on the union of the clients' training parts, on the same "
        "features and seeds.",
        "",
        "**Noise.** With this few seeds a row's own ± is a poor noise estimate, so the run-to-run standard "
        "deviation of each metric is pooled over all non-IID rows: "
        + ", ".join(f"{k} {_f(v)}" for k, v in pooled.items()) + ". A difference to FedAvg smaller than two "
        "standard errors of a difference of means (2 x pooled sd x sqrt(2/runs)) is marked ⚠: within noise.",
        "",
        "| remedy | split | test acc. (last) | test acc. (best round) | balanced acc. | AUROC | worst-group acc. | EOdds diff. Male | EOdds diff. Young | train-valid acc. gap | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, split, extra, cols, n in rows:
        cells = []
        for key in keys:
            cell = _ms(cols[key])
            vals = [v for v in cols[key] if v is not None]
            ref_vals = [v for v in ref[3][key] if v is not None]
            if split == "noniid" and name != "FedAvg" and vals and ref_vals and pooled[key] is not None:
                if abs(np.mean(vals) - np.mean(ref_vals)) < 2 * pooled[key] * np.sqrt(2 / min(len(vals), len(ref_vals))):
                    cell += " ⚠"
            cells.append(cell)
        label = f"{name} `{extra}`" if extra else name
        lines.append(f"| {label} | {split} | " + " | ".join(cells) + f" | {n} |")
    return lines + [""]


BASELINE = [("fed-iid", "federated IID"), ("fed-noniid", "federated non-IID"), ("central", "centralized")]


def baseline_runs(out: Path) -> dict[str, dict]:
    return {label: load_run(out / name) for name, label in BASELINE if (out / name / "test.json").exists()}


def groups_section(out: Path) -> list[str]:
    """Appendix: every group's and intersection's figures and the gaps, per baseline run."""
    lines = []
    for label, r in baseline_runs(out).items():
        lines += [f"### Groups and gaps, {label} (test)", "", group_table(r["test"]), "", gap_table(r["test"]), ""]
    return lines


def baseline_section(out: Path, img: Path) -> list[str]:
    runs = baseline_runs(out)
    if not runs:
        return []
    compare([r["dir"] for r in runs.values()], out / "compare")
    img.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "compare" / "compare_valid.png", img / "compare_valid.png")
    shutil.copy(out / "compare" / "compare_gaps.png", img / "compare_gaps.png")
    for name, png in (("fed-noniid", "learning_curves.png"), ("fed-noniid", "partitions.png"),
                      ("central", "learning_curves.png")):
        if (out / name / png).exists():
            shutil.copy(out / name / png, img / f"{name}-{png}")
    keys = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc", "ece", "loss")
    lines = ["Same data, weights, head, optimiser and seed (42); 50 clients, 10 rounds (centralized: 10 x "
             "`local-epochs` epochs on the union of the clients' training parts). Test split (1,941 images, "
             "1,086 identities), last round; *best round* is the round with the lowest validation loss "
             "(selected on `valid`). Wall time is the server process's, embeddings cached from earlier "
             "runs or not (see docs/SPEED.md for timed runs).", "",
             "| run | " + " | ".join(keys) + " | valid acc. | best round: test acc. | wall time |",
             "|---" * (len(keys) + 4) + "|"]
    for label, r in runs.items():
        o = r["test"]["overall"]
        v = r["history"][-1]["server_valid"]["overall"]["accuracy"]
        b = r["best"]
        best = f"{_f(b['overall']['accuracy'], 4)} (round {b['round']})" if b else "–"
        lines.append(f"| {label} | " + " | ".join(_f(o[k], 4) for k in keys) +
                     f" | {_f(v, 4)} | {best} | {r['test'].get('wall_seconds', 0):.0f}s |")
    lines += ["", "Accuracy's 95% Wilson interval on 1,941 test images is about ±0.018: differences "
              "between these three rows smaller than that are not evidence of a difference. Every group's "
              "figures and the gaps with their intervals: appendix.", ""]
    if "federated non-IID" in runs:
        parts = runs["federated non-IID"]["partitions"]["partitions"]
        male = np.array([p["group_rates"]["Male"] for p in parts])
        young = np.array([p["group_rates"]["Young"] for p in parts])
        smile = np.array([p["target_rate"] for p in parts])
        size = np.array([p["num_train"] + p["num_val"] for p in parts])
        lines += ["### How skewed is the non-IID split", "",
                  f"Per client (50): images {size.min()}–{size.max()} (median {int(np.median(size))}); share "
                  f"Male {male.min():.2f}–{male.max():.2f} (std {male.std():.2f}); share Young "
                  f"{young.min():.2f}–{young.max():.2f} (std {young.std():.2f}); Smiling rate "
                  f"{smile.min():.2f}–{smile.max():.2f} (std {smile.std():.2f}).", "",
                  "![partitions](img/fed-noniid-partitions.png)", ""]
    lines += ["### Curves", "", "![validation](img/compare_valid.png)", "", "![gaps](img/compare_gaps.png)", "",
              "Federated non-IID (train = the clients' locally trained heads on their own data):", "",
              "![non-IID learning curves](img/fed-noniid-learning_curves.png)", "",
              "Centralized (overfits after round 1):", "",
              "![centralized learning curves](img/central-learning_curves.png)", ""]
    return lines


def defaults_in_words() -> str:
    """The head's defaults from pyproject.toml, e.g. "the head reads features[13] pooled 7x7 (4704
    numbers); AdamW lr 0.001, 5 local epochs, batch 32"."""
    import tomllib

    from celeba_app.mobilenet_layers import describe

    c = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return (f"the head reads {describe(c['feature-layer'], c['feature-pool'])}; AdamW lr {c['learning-rate']}, "
            f"weight decay {c['weight-decay']}, {c['local-epochs']} local epochs, batch {c['batch-size']}")


def header_section(args) -> list[str]:
    return [
        "```bash",
        f"python scripts/make_results.py --data {args.data} --weights {args.weights}",
        "```",
        "",
        f"Data: `{args.data}` (real CelebA aligned images 000001-010000 at 89x109, identity-disjoint "
        "train 7,094 / valid 965 / test 1,941). Weights: "
        f"`{args.weights}` (ImageNet MobileNetV2 from Coral's de-quantised TFLite model, top-1 0.80 in "
        "torchvision, slightly weaker than torchvision's own IMAGENET1K_V1). Images resized to 224 px. "
        f"Defaults of pyproject.toml unless stated ({defaults_in_words()}, chosen on `valid`: "
        "\"Which layer the head reads\"). Generated on a 2-core CPU machine on "
        f"{time.strftime('%Y-%m-%d')}. Numbers are from one run per row unless a ± says otherwise; with "
        "test sets of this size, read them with their intervals.",
    ]


def readme_section(out: Path, seeds: list[int]) -> list[str]:
    """README's results: FedAvg IID and non-IID and the centralized head over the remedies' seeds,
    with the intervals a reader needs, and the validation curves of the baseline."""
    from celeba_app.metrics import wilson
    from celeba_app.mobilenet_layers import describe

    rows = [("federated, IID", "FedAvg (IID reference)"), ("federated, non-IID (alpha 0.5)", "FedAvg"),
            ("centralized, same features", CENTRAL)]
    lines = ["| run | test accuracy | 95% CI (one run) | at the best round (by valid loss) | AUROC | EOdds diff. Male | "
             "mean 95% CI | seeds |", "|---|---|---|---|---|---|---|---|"]
    config = None
    for label, name in rows:
        runs = [load_run(out / remedy_dir(name, s)) for s in seeds]
        runs = [r for r in runs if r["test"]]
        if not runs:
            continue
        config = config or runs[0]["config"]["run_config"]
        acc = [r["test"]["overall"]["accuracy"] for r in runs]
        auroc = [r["test"]["overall"]["auroc"] for r in runs]
        male = [r["test"]["gaps"]["Male"] for r in runs]
        o = runs[0]["test"]["overall"]
        ci = wilson(o["accuracy"] * o["n"], o["n"])
        lo = np.mean([m["equalized_odds_difference_ci"][0] for m in male])
        hi = np.mean([m["equalized_odds_difference_ci"][1] for m in male])
        best = [(r["best"] or r["test"])["overall"]["accuracy"] for r in runs]
        lines.append(f"| {label} | {_ms(acc)} | [{ci[0]:.3f}, {ci[1]:.3f}] | {_ms(best)} | {_ms(auroc)} | "
                     f"{_ms([m['equalized_odds_difference'] for m in male])} | [{lo:.3f}, {hi:.3f}] | {len(runs)} |")
    if config is None:
        return []
    return [f"celeba-10k (real CelebA: 7,094 train / 965 valid / 1,941 test images), the shared ImageNet "
            f"MobileNetV2 weights, 50 clients, 10 rounds; the head reads "
            f"{describe(config['feature-layer'], config['feature-pool'])}. Test split, mean ± standard "
            "deviation over seeds; the accuracy interval is one run's 95% Wilson interval, the equalized-odds "
            "interval the mean of the seeds' 95% Newcombe intervals. The centralized head overfits after its "
            "first round (5 epochs): its fair figure is the best round's. Made by `python scripts/make_results.py` "
            "([docs/RESULTS.md](docs/RESULTS.md), where every figure has its command).", "",
            *lines, "", "![validation accuracy and loss per round](docs/img/compare_valid.png)"]


#: The generated blocks of docs/RESULTS.md, by name: what fills ``<!-- generated: NAME -->``.
BLOCKS = {
    "header": lambda args, out, img: header_section(args),
    "baseline": lambda args, out, img: baseline_section(out, img),
    "remedies": lambda args, out, img: remedies_section(out, args.seeds),
    "appendix-groups": lambda args, out, img: groups_section(out),
}


def fill_blocks(text: str, blocks: dict[str, list[str]]) -> str:
    """``text`` with each ``<!-- generated: NAME -->`` ... ``<!-- /generated -->`` block's
    content replaced by ``blocks[NAME]``. Raises ValueError naming a block that is missing or
    not closed; the text outside the blocks is returned unchanged."""
    for name, lines in blocks.items():
        start = f"<!-- generated: {name} -->"
        i = text.find(start)
        j = text.find("<!-- /generated -->", i + len(start)) if i >= 0 else -1
        if i < 0 or j < 0:
            raise ValueError(f"docs/RESULTS.md has no block {start} ... <!-- /generated -->; accepted: the "
                             f"blocks {', '.join(blocks)}, each closed")
        text = text[:i + len(start)] + "\n" + "\n".join(lines).rstrip("\n") + "\n" + text[j:]
    return text


def write_doc(args, out: Path, doc: Path = ROOT / "docs" / "RESULTS.md", img: Path = ROOT / "docs" / "img",
              readme: Path = ROOT / "README.md") -> Path:
    """Fill the generated blocks of ``doc`` and ``readme``'s ``readme-results`` from the run
    folders in ``out`` (plots copied to ``img``); a test passes its own three paths."""
    text = fill_blocks(doc.read_text(), {name: make(args, out, img) for name, make in BLOCKS.items()})
    readme_text = fill_blocks(readme.read_text(), {"readme-results": readme_section(out, args.seeds)})
    doc.write_text(text)
    readme.write_text(readme_text)
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/celeba-10k")
    p.add_argument("--weights", default="../shared/weights/mobilenet_v2_imagenet.pth")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])  # as in docs/RESULTS.md
    p.add_argument("--tag", default="celeba-10k")
    p.add_argument("--first-seed-only", nargs="*", default=[], metavar="NAME",
                   help="experiments of REMEDIES to run with the first seed only (slow ones)")
    p.add_argument("--only", choices=("baseline", "remedies"), default=None)
    p.add_argument("--write-only", action="store_true")
    args = p.parse_args()
    out = (ROOT / "outputs" / f"results-{args.tag}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.write_only:
        if args.only in (None, "baseline"):
            run_baseline(args, out)
        if args.only in (None, "remedies"):
            run_remedies(args, out)
    try:
        print(write_doc(args, out))
    except ValueError as exc:
        sys.exit(f"make_results: {exc}")


if __name__ == "__main__":
    main()
