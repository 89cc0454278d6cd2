"""Metrics that can be computed federatedly: sufficient statistics, summed, then derived.

A client-weighted mean of per-client F1 or balanced accuracy is not the global F1, so clients
send *counts* and the server sums them: per slice (everyone, each value of each sensitive
attribute, each pairwise intersection) the number of rows and positives, the summed loss, the
confusion matrix at the decision threshold, and per-bin histograms of the predicted
probability (``NUM_BINS`` equal bins of [0, 1]) split by label, with the summed probability
per bin. From these sums:

* loss, accuracy, balanced accuracy, precision, recall (TPR), FPR, F1, base rate and positive
  prediction rate are exact;
* ECE (``ECE_BINS`` equal-width bins, torchmetrics' definition) is exact, because its bins are
  unions of the histogram bins;
* AUROC is computed from the binned ROC curve (trapezoids between bin edges, i.e. pairs in the
  same bin count one half). It differs from the exact AUROC by at most the fraction of
  positive/negative pairs that share a bin; with 120 bins that is well under 0.01 (tested).

``summarize`` turns one slice's stats into metrics; ``report`` adds Wilson intervals, group
tables and fairness gaps. The same code serves the server's central evaluation (stats built
from its own predictions) and the federated one, so the two can be compared exactly.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

NUM_BINS = 120
ECE_BINS = 15
SCALARS = ("n", "pos", "loss_sum", "tp", "fp", "tn", "fn")
HISTS = ("hist_pos", "hist_neg", "prob_sum")
ALL = "all"
Z95 = 1.959963984540054


@dataclass
class Stats:
    """Additive sufficient statistics of one slice of predictions."""

    n: float = 0
    pos: float = 0
    loss_sum: float = 0.0
    tp: float = 0
    fp: float = 0
    tn: float = 0
    fn: float = 0
    hist_pos: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    hist_neg: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    prob_sum: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))

    @classmethod
    def of(cls, probs: np.ndarray, labels: np.ndarray, losses: np.ndarray,
           threshold: float = 0.5) -> "Stats":
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels).astype(bool)
        pred = probs >= threshold
        bins = np.minimum((probs * NUM_BINS).astype(np.int64), NUM_BINS - 1)
        return cls(
            n=len(labels), pos=int(labels.sum()), loss_sum=float(np.sum(losses)),
            tp=int((pred & labels).sum()), fp=int((pred & ~labels).sum()),
            tn=int((~pred & ~labels).sum()), fn=int((~pred & labels).sum()),
            hist_pos=np.bincount(bins[labels], minlength=NUM_BINS).astype(np.float64),
            hist_neg=np.bincount(bins[~labels], minlength=NUM_BINS).astype(np.float64),
            prob_sum=np.bincount(bins, weights=probs, minlength=NUM_BINS),
        )

    def __add__(self, other: "Stats") -> "Stats":
        return Stats(**{k: getattr(self, k) + getattr(other, k) for k in SCALARS + HISTS})

    def to_flat(self, prefix: str) -> dict[str, float | list[float]]:
        out: dict[str, float | list[float]] = {f"{prefix}|{k}": float(getattr(self, k)) for k in SCALARS}
        out.update({f"{prefix}|{k}": getattr(self, k).tolist() for k in HISTS})
        return out

    @classmethod
    def from_flat(cls, flat: Mapping, prefix: str) -> "Stats":
        kw = {k: float(flat[f"{prefix}|{k}"]) for k in SCALARS}
        kw.update({k: np.asarray(flat[f"{prefix}|{k}"], dtype=np.float64) for k in HISTS})
        return cls(**kw)


# --------------------------------------------------------------------------- slices
def slice_masks(attributes: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Boolean masks: ``all``, ``A=v`` for each attribute and value, ``A=v&B=w`` for each
    pair of attributes (the intersections)."""
    masks = {ALL: np.ones(n, dtype=bool)}
    names = list(attributes)
    for a in names:
        for v in (0, 1):
            masks[f"{a}={v}"] = np.asarray(attributes[a]) == v
    for a, b in itertools.combinations(names, 2):
        for v, w in itertools.product((0, 1), repeat=2):
            masks[f"{a}={v}&{b}={w}"] = masks[f"{a}={v}"] & masks[f"{b}={w}"]
    return masks


def slice_stats(probs, labels, losses, attributes: Mapping[str, np.ndarray],
                threshold: float = 0.5) -> dict[str, Stats]:
    probs, labels, losses = map(np.asarray, (probs, labels, losses))
    return {name: Stats.of(probs[m], labels[m], losses[m], threshold)
            for name, m in slice_masks(attributes, len(labels)).items()}


def flatten(stats: Mapping[str, Stats]) -> dict[str, float | list[float]]:
    out: dict = {}
    for name, s in stats.items():
        out.update(s.to_flat(name))
    return out


def unflatten(flat: Mapping) -> dict[str, Stats]:
    names = sorted({k.rsplit("|", 1)[0] for k in flat if "|" in k})
    return {name: Stats.from_flat(flat, name) for name in names}


def sum_stats(many: list[Mapping[str, Stats]]) -> dict[str, Stats]:
    out: dict[str, Stats] = {}
    for stats in many:
        for name, s in stats.items():
            out[name] = out[name] + s if name in out else s
    return out


# --------------------------------------------------------------------------- derived metrics
def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def wilson(successes: float, total: float, z: float = Z95) -> list[float] | None:
    """Wilson score interval for a proportion (None when total is 0)."""
    if not total:
        return None
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # The interval always contains p; clamp so rounding never puts p outside it.
    return [max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))]


def binned_auroc(hist_pos: np.ndarray, hist_neg: np.ndarray) -> float | None:
    """AUROC from per-bin counts: P(score_pos > score_neg) + 0.5 P(same bin)."""
    p, q = hist_pos.sum(), hist_neg.sum()
    if not p or not q:
        return None
    neg_below = np.concatenate([[0.0], np.cumsum(hist_neg)[:-1]])
    return float((hist_pos * (neg_below + 0.5 * hist_neg)).sum() / (p * q))


def binned_ece(hist_pos: np.ndarray, hist_neg: np.ndarray, prob_sum: np.ndarray) -> float | None:
    """Expected calibration error over ``ECE_BINS`` equal bins (torchmetrics' binary ECE)."""
    count = hist_pos + hist_neg
    total = count.sum()
    if not total:
        return None
    group = NUM_BINS // ECE_BINS
    c = count.reshape(ECE_BINS, group).sum(1)
    conf = prob_sum.reshape(ECE_BINS, group).sum(1)
    acc = hist_pos.reshape(ECE_BINS, group).sum(1)
    return float(np.abs(conf - acc).sum() / total)


def summarize(s: Stats) -> dict[str, float | None]:
    """Every metric of one slice; None where undefined (no rows, no positives, ...)."""
    tpr = _div(s.tp, s.tp + s.fn)
    tnr = _div(s.tn, s.tn + s.fp)
    precision = _div(s.tp, s.tp + s.fp)
    f1 = _div(2 * s.tp, 2 * s.tp + s.fp + s.fn)
    bal = (tpr + tnr) / 2 if tpr is not None and tnr is not None else None
    return {
        "n": int(s.n),
        "loss": _div(s.loss_sum, s.n),
        "accuracy": _div(s.tp + s.tn, s.n),
        "balanced_accuracy": bal,
        "precision": precision,
        "recall": tpr,
        "f1": f1,
        "auroc": binned_auroc(s.hist_pos, s.hist_neg),
        "ece": binned_ece(s.hist_pos, s.hist_neg, s.prob_sum),
        "base_rate": _div(s.pos, s.n),
        "positive_rate": _div(s.tp + s.fp, s.n),
        "tpr": tpr,
        "fpr": _div(s.fp, s.fp + s.tn),
    }


def group_metrics(s: Stats) -> dict:
    """A group's row: n, rates, accuracy/TPR/FPR with 95% Wilson intervals, AUROC."""
    m = summarize(s)
    keep = ("n", "base_rate", "positive_rate", "accuracy", "tpr", "fpr", "auroc", "balanced_accuracy")
    row = {k: m[k] for k in keep}
    row["accuracy_ci"] = wilson(s.tp + s.tn, s.n)
    row["tpr_ci"] = wilson(s.tp, s.tp + s.fn)
    row["fpr_ci"] = wilson(s.fp, s.fp + s.tn)
    return row


def _gap(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) - min(vals) if len(vals) >= 2 else None


def report(stats: Mapping[str, Stats], where: str = "") -> dict:
    """Overall metrics, per-group tables and per-attribute gaps from summed slice stats.

    Keys: ``overall`` (summarize), ``groups[attr][value]`` and, for intersections,
    ``groups["A&B"]["v&w"]`` (group_metrics), ``gaps[attr]`` with demographic_parity_difference,
    equal_opportunity_difference (TPR gap), equalized_odds_difference (max of TPR and FPR
    gaps), accuracy_gap and worst_group_accuracy. An empty group is null with a warning.
    """
    out: dict = {"overall": summarize(stats[ALL]), "groups": {}, "gaps": {}}
    by_attr: dict[str, dict[str, Stats]] = {}
    for name, s in stats.items():
        if name == ALL:
            continue
        parts = [p.split("=") for p in name.split("&")]
        attr = "&".join(a for a, _ in parts)
        value = "&".join(v for _, v in parts)
        by_attr.setdefault(attr, {})[value] = s
    for attr, groups in by_attr.items():
        table = {}
        for value, s in sorted(groups.items()):
            if not s.n:
                warnings.warn(f"group {attr}={value} has no members{' in ' + where if where else ''};"
                              " its metrics are null", stacklevel=2)
                table[value] = None
            else:
                table[value] = group_metrics(s)
        out["groups"][attr] = table
        rows = [r for r in table.values() if r is not None]
        tpr_gap = _gap([r["tpr"] for r in rows])
        fpr_gap = _gap([r["fpr"] for r in rows])
        accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        out["gaps"][attr] = {
            "demographic_parity_difference": _gap([r["positive_rate"] for r in rows]),
            "equal_opportunity_difference": tpr_gap,
            "equalized_odds_difference": (max(tpr_gap, fpr_gap)
                                          if tpr_gap is not None and fpr_gap is not None else None),
            "accuracy_gap": _gap(accs),
            "worst_group_accuracy": min(accs) if accs else None,
        }
    return out


def client_distribution(values: list[float]) -> dict[str, float | None]:
    """Spread of per-client values (client-level fairness): mean, std, min, p10, median, max."""
    if not values:
        return {k: None for k in ("count", "mean", "std", "min", "p10", "median", "max")}
    v = np.asarray(values, dtype=np.float64)
    return {"count": len(v), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p10": float(np.percentile(v, 10)), "median": float(np.median(v)), "max": float(v.max())}
