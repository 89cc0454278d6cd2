"""Equalized-odds post-processing from histograms, cross-checked with fairlearn's ThresholdOptimizer."""

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin

from celeba_app.metrics import ALL, metrics_report, slice_stats
from celeba_app.postprocessing import apply_rules, attribute_groups, fit_equalized_odds
from celeba_app.task import bce_per_row


def scores(n, seed):
    """Scores whose ROC curves differ by group (as a head trained on skewed data gives)."""
    rng = np.random.default_rng(seed)
    male = (rng.random(n) < 0.45).astype(int)
    y = (rng.random(n) < np.where(male == 1, 0.3, 0.6)).astype(int)
    sharp = np.where(male == 1, 2.2, 1.1)
    p = 1 / (1 + np.exp(-(sharp * (2 * y - 1) + rng.normal(0, 1.0, n) - 0.6 * male)))
    return p, y, {"Male": male}


class Scores(ClassifierMixin, BaseEstimator):
    """An already trained 'estimator' whose score is the input itself (for fairlearn)."""

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        x = np.asarray(X)[:, 0]
        return np.column_stack([1 - x, x])

    def predict(self, X):
        return (np.asarray(X)[:, 0] >= 0.5).astype(int)


def rates(p1, y, group):
    """Expected TPR and FPR per group of a per-row probability of predicting positive."""
    out = {}
    for g in (0, 1):
        m = group == g
        out[g] = (p1[m & (y == 1)].mean(), p1[m & (y == 0)].mean())
    return out


def test_fitted_rules_equalize_tpr_and_fpr_and_match_fairlearn():
    from fairlearn.postprocessing import ThresholdOptimizer

    p, y, attrs = scores(6000, seed=0)
    stats = slice_stats(p, y, bce_per_row(p, y), attrs)
    fitted = fit_equalized_odds(attribute_groups(stats, "Male"))
    after = apply_rules(attribute_groups(stats, "Male"), fitted)
    rep = metrics_report(after)
    # On the data it was fitted on, every group sits at the common point.
    assert rep["gaps"]["Male"]["equalized_odds_difference"] < 1e-6
    for g in ("0", "1"):
        assert rep["groups"]["Male"][g]["tpr"] == pytest.approx(fitted["point"][1], abs=1e-9)
        assert rep["groups"]["Male"][g]["fpr"] == pytest.approx(fitted["point"][0], abs=1e-9)
    before = metrics_report(stats)["gaps"]["Male"]["equalized_odds_difference"]
    assert before > 0.1

    # fairlearn on the same scores: the same operating point, up to our bins of 1/120.
    opt = ThresholdOptimizer(estimator=Scores(), constraints="equalized_odds", objective="accuracy_score",
                             prefit=True, predict_method="predict_proba")
    opt.fit(p[:, None], y, sensitive_features=attrs["Male"])
    theirs = rates(opt._pmf_predict(p[:, None], sensitive_features=attrs["Male"])[:, 1], y, attrs["Male"])
    for g in (0, 1):
        assert theirs[g][0] == pytest.approx(fitted["point"][1], abs=0.02)  # TPR
        assert theirs[g][1] == pytest.approx(fitted["point"][0], abs=0.02)  # FPR
    acc_ours = metrics_report(after)["overall"]["accuracy"]
    pmf = opt._pmf_predict(p[:, None], sensitive_features=attrs["Male"])[:, 1]
    acc_theirs = np.mean(np.where(y == 1, pmf, 1 - pmf))
    assert acc_ours == pytest.approx(acc_theirs, abs=0.01)


def test_rules_fitted_on_one_sample_narrow_the_gap_on_another():
    p, y, attrs = scores(6000, seed=1)
    fitted = fit_equalized_odds(attribute_groups(slice_stats(p, y, bce_per_row(p, y), attrs), "Male"))
    pt, yt, at = scores(4000, seed=2)  # "test": same population, other rows
    test = slice_stats(pt, yt, bce_per_row(pt, yt), at)
    before, after = metrics_report(test), metrics_report(apply_rules(attribute_groups(test, "Male"), fitted))
    assert after["gaps"]["Male"]["equalized_odds_difference"] < 0.5 * before["gaps"]["Male"]["equalized_odds_difference"]
    assert after["overall"]["n"] == before["overall"]["n"] == len(yt)
    assert abs(after["overall"]["accuracy"] - before["overall"]["accuracy"]) < 0.1  # a cost, bounded


def test_a_group_without_both_labels_keeps_its_counts_and_is_named():
    p, y, attrs = scores(3000, seed=3)
    attrs["Young"] = (np.random.default_rng(4).random(3000) < 0.7).astype(int)
    cell = (attrs["Male"] == 1) & (attrs["Young"] == 0)
    y[cell] = 1  # this intersection has positives only: no ROC curve
    stats = slice_stats(p, y, bce_per_row(p, y), attrs)
    groups = attribute_groups(stats, "Male&Young")
    assert sorted(groups) == ["Male=0&Young=0", "Male=0&Young=1", "Male=1&Young=0", "Male=1&Young=1"]
    fitted = fit_equalized_odds(groups)
    assert fitted["left_out"] == ["Male=1&Young=0"]
    after = apply_rules(groups, fitted)
    assert after["Male=1&Young=0"] is groups["Male=1&Young=0"] and after[ALL].n == 3000
    with pytest.raises(ValueError, match="needs two groups with both labels"):
        fit_equalized_odds({"Male=1&Young=0": groups["Male=1&Young=0"]})
