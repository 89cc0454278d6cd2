"""A run folder made readable: PNG plots and a ``report.md`` that embeds them.

Written at the end of every run (federated or centralized), and on demand with
``python -m celeba_app.report RUN_DIR``. Everything comes from the run's JSON files, so a
report can be rebuilt at any time without re-running anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from .metrics import fmt, wilson  # noqa: E402
from .mobilenet_layers import feature_dim  # noqa: E402
from .config import ROBUST_STRATEGIES  # noqa: E402
from .results import process_ended, read_history, read_status  # noqa: E402

SOURCES = (("train", "train (after local steps)"), ("federated_evaluate", "federated eval (clients' held-out)"),
           ("local_validation", "clients' held-out (central)"), ("server_valid", "server valid"))
CURVES = (("loss", "loss"), ("accuracy", "accuracy"), ("auroc", "AUROC"))
GAP_KEYS = (("equalized_odds_difference", "equalized odds diff."),
            ("demographic_parity_difference", "demographic parity diff."),
            ("accuracy_gap", "accuracy gap"))


def save(fig, path: Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_round(ax, title: str) -> None:
    """Title, x label and grid of a per-round axis."""
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def load_run(run_dir: Path) -> dict:
    """A run folder's JSON files as {"dir", "name", "config", "partitions", "history", "test",
    "best", "postprocessing"}; a file not (yet) written is None (a run still going, or
    failed, has no test.json)."""
    run_dir = Path(run_dir)
    out = {"dir": run_dir, "name": run_dir.name}
    for name in ("config", "partitions", "test", "best", "postprocessing"):
        path = run_dir / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.exists() else None
    out["history"] = read_history(run_dir)  # history.jsonl of a run still going or killed
    return out


def series(history: list[dict], source: str, key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of ``history[i][source]["overall"][key]`` (e.g. source
    ``server_valid``, key ``accuracy``), for the rounds that have it."""
    xs, ys = [], []
    for entry in history:
        rep = entry.get(source)
        value = rep and rep.get("overall", {}).get(key)
        if value is not None:
            xs.append(entry["round"])
            ys.append(value)
    return xs, ys


def plot_learning_curves(history: list[dict], path: Path) -> Path:
    """Loss, accuracy and AUROC per round for every source of ``SOURCES`` (clients' training,
    federated evaluation, server ``valid``) to ``path`` (PNG); returns ``path``."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, CURVES):
        for source, label in SOURCES:
            xs, ys = series(history, source, key)
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=label)
        per_round(ax, title)
    axes[0].legend(fontsize=8)
    fig.suptitle("Learning curves (train above validation = overfitting)", fontsize=10)
    return save(fig, path)


def group_label(attr: str, value: str) -> str:
    """A group in words: ``Male``/``1`` is "Male", ``Male``/``0`` "not Male", and
    ``Male&Young``/``0&1`` "not Male & Young"."""
    return " & ".join(a if v == "1" else f"not {a}" for a, v in zip(attr.split("&"), value.split("&")))


def _group_rows(test: dict) -> list[tuple[str, dict]]:
    rows = []
    for attr, groups in test["groups"].items():
        for value, row in groups.items():
            if row is not None:
                rows.append((group_label(attr, value), row))
    return rows


def plot_groups(test: dict, path: Path) -> Path:
    """Accuracy, TPR and FPR of every group of a metrics_report (``test``) with 95% Wilson
    intervals, against the overall value, to ``path`` (PNG); returns ``path``."""
    rows = _group_rows(test)
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.32 * len(rows) + 1.6), sharey=True)
    labels = [f"{name} (n={row['n']}){' *' if row.get('small') else ''}" for name, row in rows]
    ys = list(range(len(rows)))
    for ax, key in zip(axes, ("accuracy", "tpr", "fpr")):
        vals = [row[key] if row[key] is not None else float("nan") for _, row in rows]
        lo = [v - row[f"{key}_ci"][0] if row[f"{key}_ci"] else 0 for v, (_, row) in zip(vals, rows)]
        hi = [row[f"{key}_ci"][1] - v if row[f"{key}_ci"] else 0 for v, (_, row) in zip(vals, rows)]
        ax.errorbar(vals, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=2)
        overall = test["overall"].get(key if key != "tpr" else "recall")
        if overall is not None:
            ax.axvline(overall, color="grey", ls="--", lw=1)
        ax.set_title(f"{key.upper() if key != 'accuracy' else 'accuracy'} (95% Wilson CI)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(ys, labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("Test split, per group; dashed line: the overall value; * fewer than min-group-size "
                 f"({next((g.get('min_group_size') for g in test['gaps'].values()), '?')}) images", fontsize=9)
    return save(fig, path)


def plot_gaps(history: list[dict], path: Path, source: str = "server_valid") -> Path:
    """Each gap of ``GAP_KEYS`` per trained round (round 0, the untrained head, is left out:
    its near-zero gaps mean nothing), one line per sensitive attribute (intersections left
    out) with its 95% Newcombe band, from ``history[i][source]``, to ``path`` (PNG); the split
    is named in the title, since the run's tables report ``test``. Returns ``path``."""
    attrs = [a for a in (history[-1].get(source) or {}).get("gaps", {}) if "&" not in a]
    rounds = [h for h in history if h.get(source) and h["round"] >= 1]
    fig, axes = plt.subplots(1, len(GAP_KEYS), figsize=(13, 3.6), sharey=True)
    for ax, (key, title) in zip(axes, GAP_KEYS):
        for attr in attrs:
            xs = [h["round"] for h in rounds]
            gaps = [h[source]["gaps"][attr] for h in rounds]
            ys = [float("nan") if g[key] is None else g[key] for g in gaps]
            line, = ax.plot(xs, ys, marker="o", ms=3, label=attr)
            cis = [g.get(f"{key}_ci") for g in gaps]
            if all(cis):
                ax.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis], color=line.get_color(), alpha=0.12)
        ax.axhline(0, color="grey", lw=0.8)
        per_round(ax, title)
    axes[0].legend(fontsize=8)
    where = {"server_valid": "the server's VALID split", "federated_evaluate": "the clients' held-out parts"}
    fig.suptitle(f"Fairness gaps per round on {where.get(source, source)} (bands: 95% Newcombe intervals); "
                 "the tables report TEST", fontsize=11)
    return save(fig, path)


def last_client_round(history: list[dict], source: str = "federated_evaluate") -> dict | None:
    """The last round with per-client figures on the clients' held-out parts, as {"round",
    "clients": [{"partition_id", "n", "accuracy", "accuracy_ci"}]} (95% Wilson intervals;
    ``n`` is None for a run recorded before per-client sizes were); None when no round has them."""
    rounds = [h for h in history if h.get(source) and h[source].get("clients")]
    if not rounds:
        return None
    clients = rounds[-1][source]["clients"]
    sizes = clients.get("num_examples_by_partition", {})
    rows = []
    for pid, acc in clients.get("accuracy_by_partition", {}).items():
        n = sizes.get(pid)
        rows.append({"partition_id": int(pid), "n": n, "accuracy": acc,
                     "accuracy_ci": wilson(round(acc * n), n) if n else None})
    return {"round": rounds[-1]["round"], "clients": rows}


def plot_client_accuracy(history: list[dict], path: Path, partitions: dict | None = None,
                         source: str = "federated_evaluate") -> Path | None:
    """The spread of the clients' accuracies on their held-out parts per round (min-max band,
    10th percentile, mean), and in the last round each client's accuracy with its 95% Wilson
    interval against its share of the first sensitive attribute in partitions.json (against
    its held-out size without it), to ``path`` (PNG); None, and nothing written, when no round
    has per-client figures."""
    rounds = [h for h in history if h.get(source) and h[source].get("clients")]
    last = last_client_round(history, source)
    if not rounds or not last:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    xs = [h["round"] for h in rounds]
    dist = [h[source]["clients"]["accuracy"] for h in rounds]
    ax1.fill_between(xs, [d["min"] for d in dist], [d["max"] for d in dist], alpha=0.15, label="min-max")
    ax1.plot(xs, [d["p10"] for d in dist], label="10th percentile")
    ax1.plot(xs, [d["mean"] for d in dist], label="mean")
    ax1.set_title("per-client accuracy on its held-out part")
    ax1.set_xlabel("round")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    parts = {p["partition_id"]: p for p in (partitions or {}).get("partitions") or []}
    attr = next(iter(next(iter(parts.values()))["group_rates"]), None) if parts else None
    rows = [c for c in last["clients"] if c["partition_id"] in parts] if attr else last["clients"]
    x = [parts[c["partition_id"]]["group_rates"][attr] if attr else (c["n"] or 0) for c in rows]
    y = [c["accuracy"] for c in rows]
    err = [[c["accuracy"] - c["accuracy_ci"][0] if c["accuracy_ci"] else 0 for c in rows],
           [c["accuracy_ci"][1] - c["accuracy"] if c["accuracy_ci"] else 0 for c in rows]]
    ax2.errorbar(x, y, yerr=err, fmt="o", ms=3, capsize=2, elinewidth=0.6, alpha=0.8)
    ns = [c["n"] for c in rows if c["n"]]
    size = f"held-out n = {sizes_phrase(ns, ' per client')}" if ns else "n not recorded"
    ax2.set_title(f"round {last['round']}: each client, 95% Wilson CI; {size}", fontsize=9)
    ax2.set_xlabel(f"client's {attr} share" if attr else "client's held-out images")
    ax2.set_ylabel("accuracy")
    ax2.grid(alpha=0.3)
    return save(fig, path)


def sizes_phrase(ns: list[int], unit: str) -> str:
    """Clients' sizes in words: "14 images (median 14)" when all are equal, else
    "12-14 images (median 13)" (``unit`` = " images")."""
    spread = f"{min(ns)}" if min(ns) == max(ns) else f"{min(ns)}-{max(ns)}"
    return f"{spread}{unit} (median {int(np.median(ns))})"


def clients_section(history: list[dict], partitions: dict | None, worst: int = 5) -> list[str]:
    """report.md's per-client paragraph: held-out sizes, what one image moves, and the
    ``worst`` lowest-accuracy clients with n, interval and composition (markdown lines)."""
    last = last_client_round(history)
    if not last or not last["clients"]:
        return []
    ns = [c["n"] for c in last["clients"] if c["n"]]
    parts = {p["partition_id"]: p for p in (partitions or {}).get("partitions") or []}
    attrs = list(next(iter(parts.values()))["group_rates"]) if parts else []
    out = ["## Per-client accuracy", ""]
    if ns:
        out += [f"Round {last['round']}, the global head on each client's held-out part: {len(ns)} clients of "
                f"{sizes_phrase(ns, ' images')}, so one image moves a client's "
                f"accuracy by about {1 / np.median(ns):.3f}, and its 95% interval is wide. The lowest "
                f"{min(worst, len(ns))}, with their composition (partitions.json):", ""]
    head = "| client | n | accuracy [95% CI] | " + " | ".join(f"{a} share" for a in attrs) + " |"
    out += [head, "|---" * (3 + len(attrs)) + "|"]
    for c in sorted(last["clients"], key=lambda c: c["accuracy"])[:worst]:
        rates = parts.get(c["partition_id"], {}).get("group_rates", {})
        out.append(f"| {c['partition_id']} | {c['n'] if c['n'] else '–'} | {fmt(c['accuracy'], 3)} "
                   f"{_ci(c['accuracy_ci'])} | " + " | ".join(fmt(rates.get(a), 2) for a in attrs) + " |")
    return out + [""]


def plot_partitions(partitions: dict, path: Path, target: str = "target") -> Path | None:
    """Per client: images (train and held-out), target rate and each sensitive attribute's
    share, from partitions.json, to ``path`` (PNG); None, and nothing written, without it."""
    parts = partitions and partitions.get("partitions")
    if not parts:
        return None
    pid = [p["partition_id"] for p in parts]
    fig, axes = plt.subplots(3, 1, figsize=(12, 6.5), sharex=True)
    axes[0].bar(pid, [p["num_train"] for p in parts], label="train")
    axes[0].bar(pid, [p["num_val"] for p in parts], bottom=[p["num_train"] for p in parts], label="local val")
    axes[0].set_ylabel("images")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[1].bar(pid, [p["target_rate"] or 0 for p in parts])
    axes[1].set_ylabel(f"{target} rate")
    attrs = list(parts[0]["group_rates"])
    width = 0.8 / max(1, len(attrs))
    for i, a in enumerate(attrs):
        axes[2].bar([x + i * width - 0.4 + width / 2 for x in pid], [p["group_rates"][a] for p in parts],
                    width=width, label=a)
    axes[2].set_ylabel("share")
    axes[2].set_xlabel("client (partition id)")
    axes[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"Partition composition ({partitions['split']}, {len(parts)} clients)", fontsize=10)
    return save(fig, path)


def _ci(ci) -> str:
    return "–" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def overall_table(reports: dict[str, dict]) -> str:
    """A Markdown table, one row per {name: metrics_report}, of the overall metrics."""
    keys = ("n", "loss", "accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc", "ece")
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, rep in reports.items():
        o = rep["overall"]
        lines.append(f"| {name} | " + " | ".join(str(o[k]) if k == "n" else fmt(o[k]) for k in keys) + " |")
    return "\n".join(lines)


def group_table(test: dict) -> str:
    """Each group's row; a group under ``min-group-size`` is marked * (shown, but left out of
    worst-group accuracy)."""
    lines = ["| group | n | base rate | selection rate | accuracy [95% CI] | TPR [95% CI] | FPR [95% CI] | AUROC |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in _group_rows(test):
        n = f"{r['n']}*" if r.get("small") else str(r["n"])
        lines.append(f"| {name} | {n} | {fmt(r['base_rate'], 3)} | {fmt(r.get('selection_rate', r.get('positive_rate')), 3)} | "
                     f"{fmt(r['accuracy'], 3)} {_ci(r['accuracy_ci'])} | {fmt(r['tpr'], 3)} {_ci(r['tpr_ci'])} | "
                     f"{fmt(r['fpr'], 3)} {_ci(r['fpr_ci'])} | {fmt(r['auroc'], 3)} |")
    return "\n".join(lines)


def smallest_group(test: dict, attr: str) -> dict | None:
    """The smallest group of ``attr`` in a metrics_report, as {"name", "n", "small"}."""
    rows = [(group_label(attr, v), r) for v, r in (test["groups"].get(attr) or {}).items() if r is not None]
    if not rows:
        return None
    name, r = min(rows, key=lambda nr: nr[1]["n"])
    return {"name": name, "n": r["n"], "small": bool(r.get("small"))}


def gap_table(test: dict) -> str:
    """Per attribute: each gap with its 95% Newcombe interval, and worst-group accuracy. An
    attribute whose gaps include a group under min-group-size is marked * with that group
    named, as the group table marks the group (worst-group accuracy leaves such groups out)."""
    keys = ("demographic_parity_difference", "equal_opportunity_difference",
            "equalized_odds_difference", "accuracy_gap")
    lines = ["| attribute | DP diff. [95% CI] | EO diff. (TPR gap) [95% CI] | equalized odds diff. [95% CI] | "
             "accuracy gap [95% CI] | worst-group acc. (groups of n >= min-group-size) | smallest group |",
             "|---|---|---|---|---|---|---|"]
    for attr, g in test["gaps"].items():
        cells = [f"{fmt(g[k], 3)} {_ci(g.get(f'{k}_ci'))}" for k in keys]
        small = smallest_group(test, attr)
        mark = "*" if small and small["small"] else ""
        where = f"{small['name']} (n={small['n']}{mark})" if small else "–"
        lines.append(f"| {attr}{mark} | " + " | ".join(cells) + f" | {fmt(g['worst_group_accuracy'], 3)} | {where} |")
    return "\n".join(lines)


def _eodds(summary: dict) -> float | None:
    return (summary["gaps"] or {}).get("equalized_odds_difference")


def postprocessing_table(post: dict) -> str:
    """Before and after equalized-odds post-processing, per attribute and per fit, with each
    fit's change of the equalized-odds difference and of accuracy against the trained head."""
    lines = ["| attribute | fitted on | test accuracy | equalized odds diff. [95% CI] | change: gap / accuracy "
             "| TPR per group | FPR per group |", "|---|---|---|---|---|---|---|"]

    def cells(summary: dict, change: str) -> str:
        g = summary["gaps"] or {}
        rows = [r for r in summary["groups"].values() if r]
        return (f"{fmt(summary['accuracy'], 3)} | {fmt(g.get('equalized_odds_difference'), 3)} "
                f"{_ci(g.get('equalized_odds_difference_ci'))} | {change} | "
                + " / ".join(fmt(r["tpr"], 3) for r in rows) + " | " + " / ".join(fmt(r["fpr"], 3) for r in rows))

    for attr, entry in post["attributes"].items():
        before = entry["test_before"]
        lines.append(f"| {attr} | (none: the trained head) | {cells(before, '–')} |")
        for name, fit in entry.items():
            if name == "test_before":
                continue
            if "error" in fit:
                lines.append(f"| {attr} | {name} | not fitted: {fit['error']} | | | | |")
                continue
            after = fit["test_after"]
            d_gap = None if _eodds(after) is None or _eodds(before) is None else _eodds(after) - _eodds(before)
            d_acc = after["accuracy"] - before["accuracy"]
            gap = "–" if d_gap is None else f"{d_gap:+.3f}" + (" **wider**" if d_gap > 0 else "")
            lines.append(f"| {attr} | {name} | {cells(after, f'{gap} / {d_acc:+.3f}')} |")
    return "\n".join(lines)


def widened_gaps(post: dict) -> list[str]:
    """The fits whose equalized-odds difference on test is larger than the trained head's, as
    "attribute (fitted on X: before -> after)" phrases."""
    out = []
    for attr, entry in post["attributes"].items():
        before = _eodds(entry["test_before"])
        for name, fit in entry.items():
            after = None if name == "test_before" or "error" in fit else _eodds(fit["test_after"])
            if before is not None and after is not None and after > before:
                out.append(f"{attr} (fitted on {name}: {before:.3f} -> {after:.3f})")
    return out


def failure_lines(history: list[dict], num_clients: int | None) -> list[str]:
    """The clients that failed, per round, and the rounds whose metrics cover fewer clients
    than the federation (markdown lines; none when every client replied every round)."""
    lines = []
    for h in history:
        for phase, outcome in (h.get("nodes") or {}).items():
            for f in outcome["failures"]:
                lines.append(f"| {h['round']} | {phase} | {f['node_id']} | {f.get('partition_id')} | "
                             f"{f.get('code')} | {f['reason']} |")
    short = [f"{h['round']} ({h['train']['num_clients']} of {num_clients})" for h in history
             if num_clients and (h.get("train") or {}).get("num_clients", num_clients) < num_clients]
    skipped = [str(h["round"]) for h in history if h.get("skipped")]
    if not lines and not short and not skipped:
        return []
    out = ["## Client failures", ""]
    if short:
        out += [f"Training metrics cover fewer clients than the federation's {num_clients} in rounds "
                f"{', '.join(short)}.", ""]
    if skipped:
        out += [f"Rounds skipped (too few replies; the global head unchanged): {', '.join(skipped)}.", ""]
    if lines:
        out += ["| round | phase | node | partition | error code | reason |", "|---|---|---|---|---|---|",
                *lines, ""]
    return out


def trust_line(cfg: dict, history: list[dict]) -> str:
    """How the figures are protected from the clients' replies, in one sentence."""
    refused = sum(bool(f.get("refused")) for h in history for o in (h.get("nodes") or {}).values()
                  for f in o["failures"])
    strategy = cfg.get("strategy", "fedavg")
    robust = strategy in ROBUST_STRATEGIES
    return (f"Every client reply was checked before aggregation ({refused} refused; RUNS.md, \"A reply is checked "
            "before it counts\"): the group metrics are exact sums of the accepted replies' validated counts"
            + (f", and the head was aggregated by the robust `{strategy}`, which protects the head, not those sums."
               if robust else "."))


def privacy_line(cfg: dict, history: list[dict]) -> str | None:
    """The DP settings, the epsilon the run spent and what it covers, in two sentences; None without DP."""
    if not cfg.get("dp"):
        return None
    from .privacy import COVERS

    last = next((h["dp"] for h in reversed(history) if h.get("dp")), None)
    if last is None:
        return f"Differential privacy (dp={cfg['dp']!r}) was on; no round completed, so no epsilon was spent. {COVERS}"
    eps = "infinite (no noise)" if last["epsilon"] is None else f"{last['epsilon']:.3g}"
    rounds = max(h["round"] for h in history if h.get("dp"))
    return (f"Differential privacy (dp={cfg['dp']!r}, client-level): noise multiplier {last['noise_multiplier']:.4g}, "
            f"clipping norm {cfg.get('dp-clipping-norm'):g}"
            + (" (adaptive: the first)" if cfg["dp"] == "client-adaptive" else "")
            + f", sampling rate {last['sampling_rate']:.3g} (the share of the clients each round samples); after "
            f"{rounds} rounds epsilon = {eps} "
            f"at delta = {last['delta']:.3g} (dp-accounting's RDP accountant). {COVERS[0].upper() + COVERS[1:]}")


def head_line(cfg: dict, history: list[dict]) -> str:
    """Where the head reads the backbone and what it weighs on the wire, in one sentence."""
    layer, pool = cfg.get("feature-layer", 18), cfg.get("feature-pool", 1)
    head_bytes = next((e["head_bytes"] for e in history if e.get("head_bytes")), None)
    size = f", {head_bytes:,} bytes per head sent" if head_bytes else ""
    return (f"The {cfg.get('head', 'linear')} head reads `features[{layer}]` of the frozen MobileNetV2, average-pooled to "
            f"{pool}x{pool} ({feature_dim(layer, pool):,} numbers per image){size}.")


def write_report_or_record(run_dir: Path) -> str | None:
    """``write_report`` at the end of a run whose results are written: a failure there is
    recorded in status.json (``report_error``) and returned as one line, and the run stays
    ``completed`` (``celeba-report <run folder>`` can retry)."""
    from .results import record_report_error

    try:
        write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - any failure to plot or write leaves the results standing
        error = f"{type(exc).__name__}: {exc}"[:500]
        record_report_error(run_dir, error)
        return error
    return None


def write_report(run_dir: Path) -> Path:
    """Plots and report.md for one run folder; returns the report's path."""
    run = load_run(run_dir)
    run_dir = Path(run_dir)
    history, test = run["history"] or [], run["test"]
    cfg = (run["config"] or {}).get("run_config", {})
    kind = (run["config"] or {}).get("kind", "federated")
    plots = {
        "learning_curves.png": plot_learning_curves(history, run_dir / "learning_curves.png") if history else None,
        "groups_test.png": plot_groups(test, run_dir / "groups_test.png") if test else None,
        "fairness_gaps.png": plot_gaps(history, run_dir / "fairness_gaps.png") if history else None,
        "client_accuracy.png": plot_client_accuracy(history, run_dir / "client_accuracy.png", run["partitions"]),
        "partitions.png": plot_partitions(run["partitions"], run_dir / "partitions.png", cfg.get("target", "target")),
    }
    lines = [f"# Run `{run['name']}`", ""]
    status = read_status(run_dir)
    if status and status["state"] != "completed":
        reason = status.get("reason")
        if process_ended(status):
            reason = (f"its process (pid {status['pid']} on {status['host']}) has ended without recording "
                      "why: killed by a signal it could not handle (SIGKILL, SIGTERM), out of memory or a power loss")
        lines += [f"**Incomplete run**: status `{status['state']}`, last completed round "
                  f"{status['last_completed_round']}" + (f" ({reason})" if reason else "")
                  + ". The figures below cover the rounds written so far; resume it with "
                  f"`--run-config \"resume='{run['name']}'\"`.", ""]
    lines += failure_lines(history, (run["config"] or {}).get("num_clients"))
    lines.append(f"{kind}; split `{cfg.get('split')}`, target `{cfg.get('target')}`, dataset "
                 f"`{cfg.get('dataset')}`, weights `{cfg.get('weights')}`, "
                 f"{(run['config'] or {}).get('num_clients', '–')} clients, "
                 f"{cfg.get('num-server-rounds')} rounds, seed {cfg.get('seed')}.")
    lines.append(head_line(cfg, history))
    if kind == "federated":
        lines.append(trust_line(cfg, history))
        dp_line = privacy_line(cfg, history)
        if dp_line:
            lines.append(dp_line)
    lines.append("")
    if test:
        finals = {f"test, last round ({test.get('round', '?')})": test}
        best = run["best"]
        if best:
            finals[f"test, best round ({best['round']}, by valid {best['selection_metric']})"] = best
        last = history[-1] if history else {}
        for source, label in SOURCES:
            if last.get(source):
                finals[f"{label} (round {last['round']})"] = last[source]
        lines += ["## Final metrics", "", overall_table(finals), ""]
        lines += ["## Test metrics per group", "",
                  "Intervals are 95% Wilson intervals: a group of 70 images has an accuracy "
                  "interval about ±0.1 wide, so small gaps between small groups are not evidence.",
                  "", group_table(test), "", "## Fairness gaps (test)", "",
                  "Each gap is the largest difference between the attribute's groups (an intersection's four "
                  "cells); the smallest group is named. * marks a gap that includes a group under "
                  f"min-group-size ({cfg.get('min-group-size', '?')} images): its interval is wide and its value "
                  "is not evidence, and worst-group accuracy leaves that group out.",
                  "", gap_table(test), ""]
        if run.get("postprocessing") and run["postprocessing"].get("attributes"):
            lines += ["## Equalized-odds post-processing (test)", "",
                      "Per-group, possibly randomized thresholds (Hardt, Price & Srebro 2016) fitted on "
                      "score histograms, then applied to test; it needs the sensitive attribute at "
                      "prediction time. Expected counts of the randomized rule; intervals 95% Newcombe.", "",
                      postprocessing_table(run["postprocessing"]), ""]
            widened = widened_gaps(run["postprocessing"])
            if widened:
                lines += ["Post-processing made the gap on test wider in " + "; ".join(widened) + ". The rule "
                          "equalizes TPR and FPR on the data it was fitted on; on test, with its own sampling "
                          "noise, it need not, and where the trained head's gap was already inside the noise "
                          "(compare the intervals) a fitted rule can widen it: for that attribute such a rule is worse than none.", ""]
    for name, title in (("learning_curves.png", "Learning curves"), ("groups_test.png", "Per-group test metrics"),
                        ("fairness_gaps.png", "Fairness gaps per round"),
                        ("client_accuracy.png", "Per-client accuracy"), ("partitions.png", "Partitions")):
        if name == "client_accuracy.png":
            section = clients_section(history, run["partitions"])
            lines += section
            if plots[name]:
                lines += ([] if section else [f"## {title}", ""]) + [f"![{title}]({name})", ""]
        elif plots[name]:
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    """``celeba-report RUN_DIR...``: (re)write each run folder's plots and report.md."""
    parser = argparse.ArgumentParser(description="Write plots and report.md for run folders.")
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not (run_dir / "config.json").is_file():
            what = "no such folder" if not run_dir.exists() else "not a run folder (no config.json)"
            raise SystemExit(f"celeba-report: {str(run_dir)!r}: {what}; accepted: a run folder, e.g. "
                             "outputs/<run-name>")
        print(write_report(run_dir))


if __name__ == "__main__":
    main()
