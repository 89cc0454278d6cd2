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
  same bin count one half). It differs from the exact AUROC by at most half the fraction of
  positive/negative pairs that share a bin, and every report gives that bound
  (``auroc_max_error``): small for a trained head, whose scores spread over the bins, but up
  to ~0.02 for a poorly trained one, whose scores crowd a few bins around 0.5.

``summarize`` turns one slice's stats into metrics; ``metrics_report`` adds Wilson intervals, group
tables and fairness gaps, each gap with a 95% Newcombe interval (from the same counts, so it
works federatedly). The same code serves the server's central evaluation (stats built
from its own predictions) and the federated one, so the two can be compared exactly.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

NUM_BINS = 120
ECE_BINS = 15
SCALARS = ("n", "pos", "loss_sum", "tp", "fp", "tn", "fn")
HISTS = ("hist_pos", "hist_neg", "prob_sum")
ALL = "all"
Z95 = 1.959963984540054


@dataclass
class Stats:
    """Additive sufficient statistics of one slice of predictions.

    Why: every metric this app reports (accuracy, TPR/FPR, selection rate, loss, AUROC,
    calibration, the gaps and their intervals) is a function of these sums, and sums add up
    across clients, so a federated metric is exact, not an average of client metrics.

    Counts (``n``, ``pos`` = label-positive rows, ``tp``/``fp``/``tn``/``fn`` at the decision
    threshold) are numbers of rows; ``loss_sum`` is the summed binary cross-entropy in nats;
    ``hist_pos``/``hist_neg`` (NUM_BINS,) count label-positive/negative rows per bin of the
    predicted probability; ``prob_sum`` (NUM_BINS,) sums the probabilities per bin (for the
    calibration error). ``a + b`` adds every field.
    """

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
        """The statistics of ``probs`` (N,) in [0, 1] (the positive class's probability),
        ``labels`` (N,) 0/1 or bool and ``losses`` (N,) per-row BCE; a row counts as predicted
        positive when its probability is >= ``threshold``.

        Example::

            >>> s = Stats.of(np.array([0.9, 0.2]), np.array([1, 1]), np.array([0.1, 1.6]))
            >>> (s.n, s.tp, s.fn)
            (2, 1, 1)
        """
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
        """``{"<prefix>|<field>": value}``: one slice in the wire format (``flatten``)."""
        out: dict[str, float | list[float]] = {f"{prefix}|{k}": float(getattr(self, k)) for k in SCALARS}
        out.update({f"{prefix}|{k}": getattr(self, k).tolist() for k in HISTS})
        return out

    @classmethod
    def from_flat(cls, flat: Mapping, prefix: str) -> "Stats":
        """The slice ``prefix`` read back from the wire format; KeyError if a field is missing."""
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


def slice_names(attributes: Sequence[str]) -> list[str]:
    """The slices ``slice_masks`` makes for these attribute names, in its order."""
    names = [ALL] + [f"{a}={v}" for a in attributes for v in (0, 1)]
    return names + [f"{a}={v}&{b}={w}" for a, b in itertools.combinations(attributes, 2)
                    for v, w in itertools.product((0, 1), repeat=2)]


def stats_problem(flat: Mapping, attributes: Sequence[str], n: float | None = None) -> str | None:
    """The first way ``flat`` (``flatten``'s format, other keys ignored) is not the slice
    statistics of real predictions on rows with these sensitive ``attributes``; None if
    there is none. Checked: every slice of ``slice_names`` present with every field and
    nothing else; counts and histograms non-negative whole numbers, ``NUM_BINS`` long;
    ``loss_sum`` finite and >= 0; per slice tp+fp+tn+fn = n, tp+fn = pos, the histograms sum
    to pos and n-pos, each bin's ``prob_sum`` within its bin's edges times its count; every
    statistic of an attribute's two groups adds up to ``all``'s, and of each pair of
    intersections to their group's; and ``all|n`` equals ``n`` when given."""
    slices = slice_names(attributes)
    expected = {f"{s}|{k}" for s in slices for k in SCALARS + HISTS}
    got = {k for k in flat if "|" in k}
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        return (f"slice statistics differ from the protocol's: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                f", unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    lo = np.arange(NUM_BINS) / NUM_BINS
    stats = {}
    for name in slices:
        for k in SCALARS:
            value = flat[f"{name}|{k}"]
            if isinstance(value, (list, tuple)) or not math.isfinite(float(value)) or float(value) < 0:
                return f"{name}|{k}={value!r} is not a finite number >= 0"
            if k != "loss_sum" and float(value) != int(float(value)):
                return f"{name}|{k}={value!r} is not a whole number"
        for k in HISTS:
            h = flat[f"{name}|{k}"]
            arr = np.asarray(h, dtype=np.float64) if isinstance(h, (list, tuple)) else None
            if arr is None or arr.shape != (NUM_BINS,) or not np.isfinite(arr).all() or (arr < 0).any():
                return f"{name}|{k} is not {NUM_BINS} finite numbers >= 0"
            if k != "prob_sum" and (arr != np.round(arr)).any():
                return f"{name}|{k} has counts that are not whole numbers"
        s = stats[name] = Stats.from_flat(flat, name)
        if s.tp + s.fp + s.tn + s.fn != s.n:
            return f"slice {name}: tp+fp+tn+fn={s.tp + s.fp + s.tn + s.fn:g} != n={s.n:g}"
        if s.tp + s.fn != s.pos:
            return f"slice {name}: tp+fn={s.tp + s.fn:g} != pos={s.pos:g}"
        if s.hist_pos.sum() != s.pos or s.hist_neg.sum() != s.n - s.pos:
            return (f"slice {name}: the score histograms hold {s.hist_pos.sum():g} positive and "
                    f"{s.hist_neg.sum():g} negative rows, its counts {s.pos:g} and {s.n - s.pos:g}")
        count = s.hist_pos + s.hist_neg
        slack = 1e-6 * (count + 1)
        if (s.prob_sum < lo * count - slack).any() or (s.prob_sum > (lo + 1 / NUM_BINS) * count + slack).any():
            return f"slice {name}: prob_sum lies outside its bins' edges"
    if n is not None and stats[ALL].n != n:
        return f"all|n={stats[ALL].n:g} != num-examples={n:g}"
    parts = [(f"{a}=0 + {a}=1", ALL, [f"{a}=0", f"{a}=1"]) for a in attributes]
    for a, b in itertools.combinations(attributes, 2):
        parts += [(f"{a}={v}&{b}=0 + {a}={v}&{b}=1", f"{a}={v}", [f"{a}={v}&{b}={w}" for w in (0, 1)]) for v in (0, 1)]
        parts += [(f"{a}=0&{b}={w} + {a}=1&{b}={w}", f"{b}={w}", [f"{a}={v}&{b}={w}" for v in (0, 1)]) for w in (0, 1)]
    for label, whole, pieces in parts:
        total = stats[pieces[0]] + stats[pieces[1]]
        for k in SCALARS + HISTS:
            mine, theirs = np.asarray(getattr(total, k)), np.asarray(getattr(stats[whole], k))
            exact = k not in ("loss_sum", "prob_sum")
            if not (np.array_equal(mine, theirs) if exact else np.allclose(mine, theirs, rtol=1e-6, atol=1e-6)):
                return f"slices {label} do not add up to {whole} in {k}"
    return None


def slice_stats(probs, labels, losses, attributes: Mapping[str, np.ndarray],
                threshold: float = 0.5) -> dict[str, Stats]:
    """{slice name: Stats} over every slice of ``slice_masks(attributes)``: ``probs``,
    ``labels`` and ``losses`` are (N,) as in ``Stats.of``; ``attributes`` maps each sensitive
    attribute to its (N,) 0/1 values. An empty slice has all-zero statistics."""
    probs, labels, losses = map(np.asarray, (probs, labels, losses))
    return {name: Stats.of(probs[m], labels[m], losses[m], threshold)
            for name, m in slice_masks(attributes, len(labels)).items()}


def flatten(stats: Mapping[str, Stats]) -> dict[str, float | list[float]]:
    """Slice statistics as the flat mapping a Flower ``MetricRecord`` (or ``ConfigRecord``)
    carries: the wire format of every reply's statistics, defined here and nowhere else.

    Keys are ``"<slice>|<statistic>"``; slices are ``all``, ``A=v`` and ``A=v&B=w``
    (``slice_masks``), statistics are ``SCALARS`` (floats) and ``HISTS`` (lists of
    ``NUM_BINS`` floats). Keys without ``|`` (``num-examples``, ``local_steps_loss``, ...) are the
    reply's own and ignored by ``unflatten``. Example::

        {"all|n": 120.0, "all|tp": 41.0, ..., "Male=1&Young=0|hist_pos": [0.0, 2.0, ...],
         "num-examples": 120, "partition_id": 3}
    """
    out: dict = {}
    for name, s in stats.items():
        out.update(s.to_flat(name))
    return out


def unflatten(flat: Mapping) -> dict[str, Stats]:
    """The inverse of ``flatten``: {slice: Stats} from a reply's record (other keys ignored).
    Raises KeyError if a slice lacks one of its statistics."""
    names = sorted({k.rsplit("|", 1)[0] for k in flat if "|" in k})
    return {name: Stats.from_flat(flat, name) for name in names}


def sum_stats(many: list[Mapping[str, Stats]]) -> dict[str, Stats]:
    """{slice: the sum of that slice's Stats over ``many``} (e.g. over the clients' replies);
    a slice missing from some replies is summed over those that have it."""
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


def auroc_max_error(hist_pos: np.ndarray, hist_neg: np.ndarray) -> float | None:
    """The most ``binned_auroc`` can differ from the exact AUROC of the same scores: pairs
    that share a bin count one half, while their true order may give 0 or 1."""
    p, q = hist_pos.sum(), hist_neg.sum()
    if not p or not q:
        return None
    return float(0.5 * (hist_pos * hist_neg).sum() / (p * q))


def newcombe(x1: float, n1: float, x2: float, n2: float, z: float = Z95) -> list[float] | None:
    """95% interval for the difference of two proportions x1/n1 - x2/n2 (Newcombe 1998,
    method 10: the hybrid score interval built from each proportion's Wilson interval).
    None when either total is 0. Example: newcombe(30, 50, 20, 50) -> about [0.006, 0.372]."""
    a, b = wilson(x1, n1, z), wilson(x2, n2, z)
    if a is None or b is None:
        return None
    p1, p2 = x1 / n1, x2 / n2
    d = p1 - p2
    return [max(-1.0, d - math.sqrt((p1 - a[0]) ** 2 + (b[1] - p2) ** 2)),
            min(1.0, d + math.sqrt((a[1] - p1) ** 2 + (p2 - b[0]) ** 2))]


def binned_ece(hist_pos: np.ndarray, hist_neg: np.ndarray, prob_sum: np.ndarray) -> float | None:
    """Expected calibration error over ``ECE_BINS`` equal bins (torchmetrics' binary ECE)."""
    count = hist_pos + hist_neg
    total = count.sum()
    if not total:
        return None
    group = NUM_BINS // ECE_BINS
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
        "auroc_max_error": auroc_max_error(s.hist_pos, s.hist_neg),
        "ece": binned_ece(s.hist_pos, s.hist_neg, s.prob_sum),
        "base_rate": _div(s.pos, s.n),
        "selection_rate": _div(s.tp + s.fp, s.n),
        "tpr": tpr,
        "fpr": _div(s.fp, s.fp + s.tn),
    }


def group_metrics(s: Stats) -> dict:
    """A group's row: n, rates, accuracy/TPR/FPR with 95% Wilson intervals, AUROC."""
    m = summarize(s)
    keep = ("n", "base_rate", "selection_rate", "accuracy", "tpr", "fpr", "auroc", "balanced_accuracy")
    row = {k: m[k] for k in keep}
    row["accuracy_ci"] = wilson(s.tp + s.tn, s.n)
    row["tpr_ci"] = wilson(s.tp, s.tp + s.fn)
    row["fpr_ci"] = wilson(s.fp, s.fp + s.tn)
    return row


MIN_GROUP_SIZE = 30
"""Groups with fewer rows are shown but flagged (``small``) and left out of worst-group accuracy."""

#: Each gap: the proportion it compares, as (successes, trials) of a group's Stats.
GAP_PROPORTIONS = {
    "demographic_parity_difference": lambda s: (s.tp + s.fp, s.n),  # selection rate
    "equal_opportunity_difference": lambda s: (s.tp, s.tp + s.fn),  # TPR
    "fpr_difference": lambda s: (s.fp, s.fp + s.tn),
    "accuracy_gap": lambda s: (s.tp + s.tn, s.n),
}


def gap_with_interval(groups: Mapping[str, Stats], proportion) -> dict:
    """The largest difference of a proportion between groups, which groups, and its interval.

    {"value": max - min over groups where the proportion is defined (None with fewer than two),
    "groups": [the highest group, the lowest], "ci": Newcombe's 95% interval for the difference
    of those two proportions}. The interval treats the two groups as given; that they were
    picked as the extremes is not accounted for, so with many small groups it is optimistic.
    """
    rates = {}
    for name, s in groups.items():
        x, n = proportion(s)
        if n:
            rates[name] = (x / n, x, n)
    if len(rates) < 2:
        return {"value": None, "groups": None, "ci": None}
    hi = max(rates, key=lambda k: rates[k][0])
    lo = min(rates, key=lambda k: rates[k][0])
    (p1, x1, n1), (p2, x2, n2) = rates[hi], rates[lo]
    return {"value": p1 - p2, "groups": [hi, lo], "ci": newcombe(x1, n1, x2, n2)}


def metrics_report(stats: Mapping[str, Stats], where: str = "", min_group_size: int = MIN_GROUP_SIZE) -> dict:
    """Overall metrics, per-group tables and per-attribute gaps from summed slice stats.

    Keys: ``overall`` (summarize), ``groups[attr][value]`` and, for intersections,
    ``groups["A&B"]["v&w"]`` (group_metrics, with ``small`` when the group has fewer than
    ``min_group_size`` rows), ``gaps[attr]`` with demographic_parity_difference (selection-rate
    gap), equal_opportunity_difference (TPR gap), equalized_odds_difference (the larger of the
    TPR and FPR gaps), accuracy_gap, each with ``<name>_ci`` (95%, ``gap_with_interval``) and
    ``<name>_groups``, and worst_group_accuracy over the groups of at least ``min_group_size``
    rows (None if there is none). An empty group is null with a warning.
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
                table[value]["small"] = s.n < min_group_size
        out["groups"][attr] = table
        present = {v: s for v, s in groups.items() if s.n}
        found = {k: gap_with_interval(present, f) for k, f in GAP_PROPORTIONS.items()}
        tpr, fpr = found["equal_opportunity_difference"], found["fpr_difference"]
        odds = tpr if tpr["value"] is not None and (fpr["value"] is None or tpr["value"] >= fpr["value"]) else fpr
        if tpr["value"] is None or fpr["value"] is None:
            odds = {"value": None, "groups": None, "ci": None}
        found["equalized_odds_difference"] = odds
        accs = [r["accuracy"] for r in table.values() if r is not None and not r["small"]]
        gaps: dict = {}
        for key in ("demographic_parity_difference", "equal_opportunity_difference",
                    "equalized_odds_difference", "accuracy_gap"):
            gaps[key] = found[key]["value"]
            gaps[f"{key}_ci"] = found[key]["ci"]
            gaps[f"{key}_groups"] = found[key]["groups"]
        gaps["worst_group_accuracy"] = min(accs) if accs else None
        gaps["min_group_size"] = min_group_size
        out["gaps"][attr] = gaps
    return out


def client_distribution(values: list[float]) -> dict[str, float | None]:
    """Spread of per-client values (client-level fairness): mean, std, min, p10, median, max."""
    if not values:
        return {k: None for k in ("count", "mean", "std", "min", "p10", "median", "max")}
    v = np.asarray(values, dtype=np.float64)
    return {"count": len(v), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p10": float(np.percentile(v, 10)), "median": float(np.median(v)), "max": float(v.max())}


def fmt(value: float | None, digits: int = 4) -> str:
    """A metric for a log line or a table: ``digits`` decimals, or "–" for None (undefined,
    e.g. a TPR without positives)."""
    return "–" if value is None else f"{value:.{digits}f}"
