"""Who pays for differential privacy: accuracy and TPR per demographic group against epsilon.

    python scripts/dp_sweep.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth [--out outputs/dp-sweep] [--write-doc]

For each federation, head and seed (``--seeds``, default 0, 1, 2), the app is trained with
client-level DP (``dp = "server-fixed"``: Flower's wrapper clips each client's head update to
``--clip-*`` and adds the Gaussian noise whose multiplier the RDP accountant solves for each
epsilon of ``--epsilons``, default inf, 8, 3, 1, at dp-delta = 1 / the clients' training
images), and once without DP (``off``: FedAvg weighted by rows, the app's default). ``inf`` is
clipping and the unweighted mean without noise, so inf -> 8 -> 3 -> 1 isolates the noise's cost.

Federations (``--federations``):

* ``iid50``: 50 IID clients, all sampled every round, ``--rounds-iid`` rounds (default 10);
* ``celebrity``: one celebrity per client (3,800 on celeba-10k), ``--celebrity-fraction`` of
  them sampled per round (default 0.05: 190), ``--rounds-celebrity`` rounds (default 20);
  sampling amplifies privacy, so the same epsilon needs far less noise per client.

Heads (``--heads``): ``default`` (the pyproject's: conv1x1 on features[13] pooled 7x7, the
features issue's choice) and ``linear-18`` (a linear head on the pooled last layer, the
app's head before that issue), the latter on ``iid50`` only.

The federations run in this process (benchmarks/inprocess.py: the app's round loop and reply
checks over client_app's handlers). Each run's figures are kept in ``<out>/runs/<name>.json``,
and a run already there is not redone (a killed sweep continues). Writes ``<out>/sweep.json``,
``<out>/sweep.md`` (per group and setting: accuracy and TPR on ``test``, the mean over seeds
with its 95% t-interval over seeds, cut to [0, 1]) and ``<out>/dp_sweep.png``; ``--write-doc`` fills the
``dp-sweep`` block of docs/RESULTS.md and copies the plot to docs/img. ``--norms`` prints, instead, the round-1 update norms
without DP that the clipping norms were chosen from.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  #: Student's t, 97.5%, by degrees of freedom
HEADS = {"default": {}, "linear-18": {"head": "linear", "feature-layer": 18, "feature-pool": 1}}
MARGINAL = ("Male", "Young", "Pale_Skin")


def federation_config(args, name: str) -> tuple[dict, int, int, float]:
    """(run config, clients, rounds, clipping norm) of federation ``name``."""
    from inprocess import data_run_config

    base = {**data_run_config(args), "fraction-evaluate": 0.0}
    if name == "iid50":
        return {**base, "split": "iid"}, 50, args.rounds_iid, args.clip_iid
    return ({**base, "split": "celebrity", "fraction-train": args.celebrity_fraction}, identities(args.data),
            args.rounds_celebrity, args.clip_celebrity)


def identities(data: str) -> int:
    """celeb_ids in the ``train`` split of ``data`` (data.check_identity_disjoint's count)."""
    from celeba_app.config import RunConfig
    from celeba_app.data import check_identity_disjoint

    return check_identity_disjoint(RunConfig(dataset=str(Path(data).resolve())), 1)["train"]


def run_one(federation, cfg_overrides: dict, rounds: int) -> dict:
    """One run of ``federation`` (an InProcessFederation) with ``cfg_overrides`` (the DP keys)."""
    from celeba_app import privacy
    from celeba_app.config import RunConfig
    from celeba_app.strategy import make_strategy

    cfg = RunConfig.from_run_config({**federation.run_config, **cfg_overrides})
    strategy, budget = make_strategy(cfg, federation.clients), None
    if cfg.dp:
        budget = privacy.budget_for(cfg, federation.clients, sum(int(p["num_train"]) for p in federation.partitions))
        strategy = privacy.wrap(cfg, strategy, budget, federation.clients)
    out = federation.run(strategy, rounds, privacy=budget)
    test, last = out["test"], out["result"].history[-1]
    groups = {f"{attr}={value}": {"accuracy": g["accuracy"], "tpr": g["tpr"], "n": g["n"]}
              for attr, values in test["groups"].items() for value, g in values.items() if not g["small"]}
    eps = (last.get("dp") or {}).get("epsilon") if cfg.dp else "off"
    return {"accuracy": test["overall"]["accuracy"], "auroc": test["overall"]["auroc"], "groups": groups,
            "epsilon": "inf" if isinstance(eps, float) and math.isinf(eps) else eps,
            "noise_multiplier": budget.noise_multiplier if budget else None,
            "delta": budget.delta if budget else None, "sampling_rate": budget.sampling_rate if budget else None,
            "seconds_per_round": out["seconds"], "rounds": last["round"]}


def update_norms(args) -> None:
    """Print, per federation, the L2 norms of the clients' round-1 head updates without DP
    (median, 10% and 90% quantiles): what the clipping norms ``--clip-*`` were chosen from."""
    import numpy as np
    import torch

    from celeba_app import protocol as P
    from celeba_app.model import head_for
    from celeba_app.strategy import make_strategy
    from inprocess import InProcessFederation

    for fed_name in args.federations.split(","):
        run_config, clients, _, clip = federation_config(args, fed_name)
        norms, sent = [], {}

        def measure(nid, kind, content):
            if kind == "train":
                state = content[P.ARRAYS].to_torch_state_dict()
                norms.append(math.sqrt(sum(float(torch.sum((state[k] - sent[k]) ** 2)) for k in state)))

        federation = InProcessFederation({**run_config, "seed": 0}, clients, measure)
        sent.update(head_for(federation.cfg, seed=federation.cfg.seed).state_dict())
        federation.run(make_strategy(federation.cfg, clients), 1)
        q10, med, q90 = np.quantile(norms, [0.1, 0.5, 0.9])
        print(f"{fed_name}: {len(norms)} round-1 updates, L2 norm median {med:.3f} (10%: {q10:.3f}, 90%: {q90:.3f}); "
              f"--clip-{fed_name.rstrip('0123456789')} {clip:g}")


def settings(epsilons: list[str], clip: float) -> list[tuple[str, dict]]:
    out = [("off", {})]
    for eps in epsilons:
        dp = {"dp": "server-fixed", "dp-clipping-norm": clip}
        out.append((eps, {**dp, "dp-noise-multiplier": 0.0} if eps == "inf" else {**dp, "dp-target-epsilon": float(eps)}))
    return out


def sweep(args) -> list[dict]:
    from inprocess import InProcessFederation

    runs_dir = Path(args.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for fed_name in args.federations.split(","):
        run_config, clients, rounds, clip = federation_config(args, fed_name)
        for head in args.heads.split(","):
            if head != "default" and fed_name != "iid50":
                continue
            for seed in [int(s) for s in args.seeds.split(",")]:
                todo = []
                for eps, overrides in settings(args.epsilons.split(","), clip):
                    path = runs_dir / f"{fed_name}-{head}-seed{seed}-eps{eps}.json"
                    if path.exists():
                        row = json.loads(path.read_text())
                        if isinstance(row["epsilon"], float) and math.isinf(row["epsilon"]):
                            row["epsilon"] = "inf"
                        rows.append(row)
                    else:
                        todo.append((eps, overrides, path))
                if not todo:
                    continue
                federation = InProcessFederation({**run_config, **HEADS[head], "seed": seed}, clients)
                for eps, overrides, path in todo:
                    row = {"federation": fed_name, "head": head, "seed": seed, "setting": eps, "clients": clients,
                           "clipping_norm": clip if eps != "off" else None,
                           **run_one(federation, overrides, rounds)}
                    path.write_text(json.dumps(row, indent=1))
                    rows.append(row)
                    print(f"{fed_name} {head} seed {seed} eps {eps}: accuracy {row['accuracy']:.4f} "
                          f"(z={row['noise_multiplier']}, {row['seconds_per_round']:.1f} s/round)", flush=True)
    return rows


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval over seeds (0 for one value)."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, T_975.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))


def summarise(rows: list[dict], epsilons: list[str]) -> list[dict]:
    """One entry per (federation, head, setting): the means and intervals over seeds."""
    out = []
    keys = sorted({(r["federation"], r["head"]) for r in rows}, key=lambda k: (k[0] != "iid50", k[1] != "default"))
    for fed, head in keys:
        for setting in ["off", *epsilons]:
            group_rows = [r for r in rows if (r["federation"], r["head"], r["setting"]) == (fed, head, setting)]
            if not group_rows:
                continue
            names = sorted({g for r in group_rows for g in r["groups"]})
            entry = {"federation": fed, "head": head, "setting": setting, "seeds": len(group_rows),
                     "clients": group_rows[0]["clients"], "accuracy": mean_ci([r["accuracy"] for r in group_rows]),
                     "noise_multiplier": group_rows[0]["noise_multiplier"],
                     "epsilon": group_rows[0]["epsilon"], "delta": group_rows[0]["delta"],
                     "sampling_rate": group_rows[0]["sampling_rate"], "clipping_norm": group_rows[0]["clipping_norm"],
                     "groups": {g: {m: mean_ci([r["groups"].get(g, {}).get(m) for r in group_rows])
                                    for m in ("accuracy", "tpr")} for g in names}}
            out.append(entry)
    return out


def cell(mci) -> str:
    """``mean [low, high]``: the 95% t-interval over seeds, cut to [0, 1] (a rate's range)."""
    m, h = mci
    return "-" if math.isnan(m) else f"{m:.3f} [{max(0.0, m - h):.2f}, {min(1.0, m + h):.2f}]"


def tables(summary: list[dict], groups=None) -> list[str]:
    lines = []
    for fed, head in dict.fromkeys((s["federation"], s["head"]) for s in summary):
        part = [s for s in summary if (s["federation"], s["head"]) == (fed, head)]
        names = groups or sorted({g for s in part for g in s["groups"]}, key=lambda g: ("&" in g, g))
        first = part[-1]
        lines += [f"**{fed}** ({first['clients']} clients, sampling rate {first['sampling_rate'] or 1:.3g}, "
                  f"clipping norm {first['clipping_norm']}, delta {first['delta']:.2g}), head `{head}`, "
                  f"{first['seeds']} seeds:", ""]
        for metric in ("accuracy", "tpr"):
            lines += [f"| epsilon | noise multiplier | overall accuracy | " + " | ".join(f"{metric} {g}" for g in names)
                      + " |", "|---" * (3 + len(names)) + "|"]
            for s in part:
                z = "-" if s["noise_multiplier"] is None else f"{s['noise_multiplier']:.3g}"
                eps = {"off": "off (no DP)", "inf": "∞ (clipping only)"}.get(s["setting"], s["setting"])
                lines.append(f"| {eps} | {z} | {cell(s['accuracy'])} | "
                             + " | ".join(cell(s["groups"].get(g, {}).get(metric, (math.nan, math.nan)))
                                          for g in names) + " |")
            lines.append("")
    return lines


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((s["federation"], s["head"]) for s in summary))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7.5), squeeze=False, sharey="row")
    for col, (fed, head) in enumerate(panels):
        part = [s for s in summary if (s["federation"], s["head"]) == (fed, head) and s["setting"] != "off"]
        x = list(range(len(part)))
        labels = ["∞" if s["setting"] == "inf" else s["setting"] for s in part]
        off = next((s for s in summary if (s["federation"], s["head"], s["setting"]) == (fed, head, "off")), None)
        for row, metric in enumerate(("accuracy", "tpr")):
            ax = axes[row][col]
            names = [f"{a}={v}" for a in MARGINAL for v in (0, 1)]
            for k, g in enumerate(names):
                pts = [s["groups"].get(g, {}).get(metric, (math.nan, math.nan)) for s in part]
                _bars(ax, [i + 0.04 * (k - len(names) / 2) for i in x], pts, label=g,
                      linestyle="-" if g.endswith("1") else "--")
            if metric == "accuracy":
                _bars(ax, x, [s["accuracy"] for s in part], color="black", marker="s", linewidth=2, label="overall")
                if off is not None:
                    ax.axhline(off["accuracy"][0], color="black", linestyle=":", linewidth=1, label="overall, no DP")
            ax.set_ylim(0, 1.02)
            ax.set_xticks(x, labels)
            ax.set_xlabel("epsilon (client-level, delta = 1/training images)")
            ax.set_ylabel(f"test {metric.upper() if metric == 'tpr' else metric}")
            ax.set_title(f"{fed}, head {head}")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Who pays for DP: test accuracy and TPR per group, mean over seeds, 95% t-interval cut to [0, 1]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _bars(ax, x, points, **style) -> None:
    """Means with their intervals (``mean_ci`` pairs), the bars cut to [0, 1]."""
    means = [p[0] for p in points]
    low = [m - max(0.0, m - h) for m, h in points]
    high = [min(1.0, m + h) - m for m, h in points]
    ax.errorbar(x, means, yerr=[low, high], capsize=3, marker=style.pop("marker", "o"), **style)


def write_doc(lines: list[str]) -> None:
    """Replace the ``dp-sweep`` generated block of docs/RESULTS.md with ``lines``."""
    doc = ROOT / "docs" / "RESULTS.md"
    text = doc.read_text()
    start, end = "<!-- generated: dp-sweep -->", "<!-- /generated -->"
    if start not in text:
        raise SystemExit(f"{doc} has no {start} block")
    head, rest = text.split(start, 1)
    doc.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    from inprocess import add_data_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "dp-sweep"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--federations", default="iid50,celebrity")
    parser.add_argument("--heads", default="default,linear-18")
    parser.add_argument("--rounds-iid", type=int, default=10)
    parser.add_argument("--rounds-celebrity", type=int, default=20)
    parser.add_argument("--celebrity-fraction", type=float, default=0.05)
    parser.add_argument("--clip-iid", type=float, default=1.0)
    parser.add_argument("--clip-celebrity", type=float, default=0.5)
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("--norms", action="store_true", help="only print the round-1 update norms without DP")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if args.norms:
        return update_norms(args)
    rows = sweep(args)
    epsilons = args.epsilons.split(",")
    summary = summarise(rows, epsilons)
    out = Path(args.out)
    (out / "sweep.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=1))
    command = ("python scripts/dp_sweep.py --data ../shared/data/celeba-10k --weights "
               "../shared/weights/mobilenet_v2_imagenet.pth")
    full = [f"Generated by `{command}`.", "", *tables(summary)]
    (out / "sweep.md").write_text("\n".join(full) + "\n")
    plot(summary, out / "dp_sweep.png")
    print("\n".join(full))
    if args.write_doc:
        import shutil

        shutil.copyfile(out / "dp_sweep.png", ROOT / "docs" / "img" / "dp_sweep.png")
        write_doc([f"Generated by `{command} --write-doc` (every group of at least min-group-size test "
                   f"images: `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}/sweep.md`).", "",
                   *tables(summary, groups=[f"{a}={v}" for a in MARGINAL for v in (0, 1)])])


if __name__ == "__main__":
    main()
