"""Equalized-odds post-processing (Hardt, Price & Srebro 2016) from per-group score histograms.

A trained head gives each group its own ROC curve. Equalized odds asks for equal true- and
false-positive rates in every group. Hardt et al. choose, per group, a possibly randomized
threshold rule so that every group sits at one common (FPR, TPR) point, the one that
maximizes accuracy among the points every group can reach: below each group's ROC convex
hull and above the diagonal. fairlearn's ``ThresholdOptimizer(constraints="equalized_odds")``
does the same on raw scores; here everything comes from the histograms metrics.py already
sums (``Stats.hist_pos``/``hist_neg``: ``NUM_BINS`` equal bins of the predicted probability,
per group), so the rule is fitted

* federatedly, on the sum of the clients' held-out histograms (no score leaves a client), or
* centrally, on the server's ``valid``,

and applied to ``test`` from its histograms: the expected confusion counts of the randomized
rule, exactly, without drawing random numbers. Thresholds are bin edges (a resolution of
1/NUM_BINS in probability), hence small differences from fairlearn (tested).

It needs the sensitive attribute at prediction time: the rule is per group. It changes no
score, so AUROC is unchanged; it moves the operating point of each group, usually costing
some accuracy (reported before and after).

Rule for a group (``GroupRule``): with probability ``1 - p_ignore``, a randomized threshold:
predict positive when the score's bin is at least ``k_low`` with probability ``1 - w``, or at
least ``k_high`` with probability ``w``; with probability ``p_ignore``, ignore the score and
predict positive with probability ``x`` (a point on the diagonal). P(positive | bin b) is
``positive_probability``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from .metrics import ALL, NUM_BINS, Stats, metrics_report

GRID = 1001  # FPR grid of the search, as fairlearn's default grid_size=1000


@dataclass(frozen=True)
class GroupRule:
    """One group's randomized rule (module docstring); ``point``: its (FPR, TPR) on the data
    it was fitted on."""

    k_low: int
    k_high: int
    w: float
    p_ignore: float
    x: float
    point: tuple[float, float]

    def positive_probability(self) -> np.ndarray:
        """P(predict positive | score bin b), float (NUM_BINS,)."""
        b = np.arange(NUM_BINS)
        thresholded = (1 - self.w) * (b >= self.k_low) + self.w * (b >= self.k_high)
        return (1 - self.p_ignore) * thresholded + self.p_ignore * self.x


def roc_points(s: Stats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, threshold bin k) of "predict positive when bin >= k" for k = NUM_BINS..0,
    FPR ascending. Needs positives and negatives."""
    k = np.arange(NUM_BINS, -1, -1)
    above_pos = np.concatenate([np.cumsum(s.hist_pos[::-1])[::-1], [0.0]])  # rows with bin >= k
    above_neg = np.concatenate([np.cumsum(s.hist_neg[::-1])[::-1], [0.0]])
    return above_neg[k] / s.hist_neg.sum(), above_pos[k] / s.hist_pos.sum(), k


def upper_hull(x: np.ndarray, y: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC convex hull's vertices (upper hull of the points, x ascending), with their k."""
    order = np.lexsort((-y, x))
    hull: list[int] = []
    for i in order:
        if hull and x[hull[-1]] == x[i]:
            continue  # same FPR: the first (highest TPR) is kept
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a]) >= 0:
                hull.pop()  # b is not above the segment a-i
            else:
                break
        hull.append(i)
    h = np.array(hull)
    return x[h], y[h], k[h]


def fit_equalized_odds(groups: Mapping[str, Stats]) -> dict:
    """Fit the rules on per-group stats (groups of one sensitive attribute).

    Returns {"point": [FPR, TPR] common to all groups, "objective": "accuracy", "rules":
    {group: GroupRule as dict}, "left_out": groups without both labels (no ROC curve; they
    keep the plain 0.5 threshold)}. Raises ValueError with fewer than two usable groups.
    """
    usable = {g: s for g, s in groups.items() if s.hist_pos.sum() > 0 and s.hist_neg.sum() > 0}
    if len(usable) < 2:
        raise ValueError(f"equalized-odds post-processing needs two groups with both labels; have {sorted(usable)}")
    hulls = {g: upper_hull(*roc_points(s)) for g, s in usable.items()}
    grid = np.linspace(0.0, 1.0, GRID)
    envelope = np.min([np.interp(grid, hx, hy) for hx, hy, _ in hulls.values()], axis=0)
    envelope = np.maximum(envelope, grid)  # the diagonal is always reachable
    pos = sum(s.hist_pos.sum() for s in usable.values())
    neg = sum(s.hist_neg.sum() for s in usable.values())
    accuracy = (pos * envelope + neg * (1 - grid)) / (pos + neg)
    best = int(np.argmax(accuracy))
    x, y = float(grid[best]), float(envelope[best])
    rules = {}
    for g, (hx, hy, hk) in hulls.items():
        j = int(np.clip(np.searchsorted(hx, x, side="right") - 1, 0, len(hx) - 1))
        j2 = min(j + 1, len(hx) - 1)
        w = 0.0 if hx[j2] == hx[j] else (x - hx[j]) / (hx[j2] - hx[j])
        y_g = (1 - w) * hy[j] + w * hy[j2]
        p_ignore = 0.0 if y_g - x <= 1e-12 else (y_g - y) / (y_g - x)
        rules[g] = GroupRule(int(hk[j]), int(hk[j2]), float(w), float(np.clip(p_ignore, 0, 1)), x, (x, y))
    return {"point": [x, y], "objective": "accuracy", "rules": {g: asdict(r) for g, r in rules.items()},
            "left_out": sorted(set(groups) - set(usable))}


def apply_rules(groups: Mapping[str, Stats], fitted: dict) -> dict[str, Stats]:
    """Expected confusion counts of the fitted rules on other data's per-group stats (e.g.
    ``test``): the histograms stay, tp/fp/tn/fn become expectations (floats); groups without a
    rule keep their counts. The ``ALL`` slice is the sum of the groups."""
    out: dict[str, Stats] = {}
    for g, s in groups.items():
        rule = fitted["rules"].get(g)
        if rule is None:
            out[g] = s
            continue
        p1 = GroupRule(**{**rule, "point": tuple(rule["point"])}).positive_probability()
        out[g] = Stats(n=s.n, pos=s.pos, loss_sum=s.loss_sum,
                       tp=float(s.hist_pos @ p1), fn=float(s.hist_pos @ (1 - p1)),
                       fp=float(s.hist_neg @ p1), tn=float(s.hist_neg @ (1 - p1)),
                       hist_pos=s.hist_pos, hist_neg=s.hist_neg, prob_sum=s.prob_sum)
    out[ALL] = sum(out.values(), Stats())
    return out


def attribute_groups(stats: Mapping[str, Stats], attribute: str) -> dict[str, Stats]:
    """The groups of one attribute (or intersection, "Male&Young") from metrics' slice stats:
    {"Male=0": Stats, "Male=1": Stats} or {"Male=0&Young=0": Stats, ...}."""
    def attr_of(name: str) -> str:
        return "&".join(part.split("=")[0] for part in name.split("&"))
    return {name: s for name, s in stats.items() if name != ALL and attr_of(name) == attribute}


def equalized_odds_report(fit_on: Mapping[str, Mapping[str, Stats] | None], test: Mapping[str, Stats],
                          attributes: list[str], min_group_size: int) -> dict:
    """postprocessing.json: for each sensitive attribute, the rules fitted on each of
    ``fit_on`` (e.g. {"valid": server's stats, "clients' held-out": summed client stats}) and
    what they do on ``test``: accuracy, per-group TPR/FPR and the gaps (with intervals),
    before and after. A fit that cannot be made is recorded with its reason."""
    before = metrics_report(test, "test", min_group_size)
    out: dict = {"method": "equalized-odds post-processing (Hardt, Price & Srebro 2016), thresholds and "
                           "randomization per group, fitted on score histograms",
                 "needs": "the sensitive attribute at prediction time", "attributes": {}}
    for attr in attributes:
        entry: dict = {"test_before": _summary(before, attr)}
        for name, stats in fit_on.items():
            if stats is None:
                continue
            try:
                fitted = fit_equalized_odds(attribute_groups(stats, attr))
            except ValueError as exc:
                entry[name] = {"error": str(exc)}
                continue
            after = metrics_report(apply_rules(attribute_groups(test, attr), fitted), "test", min_group_size)
            entry[name] = {"rule": fitted, "test_after": _summary(after, attr)}
        out["attributes"][attr] = entry
    return out


def _summary(rep: dict, attr: str) -> dict:
    groups = {g: None if r is None else {k: r[k] for k in ("n", "accuracy", "tpr", "fpr", "selection_rate")}
              for g, r in rep["groups"].get(attr, {}).items()}
    return {"accuracy": rep["overall"]["accuracy"], "groups": groups, "gaps": rep["gaps"].get(attr)}
