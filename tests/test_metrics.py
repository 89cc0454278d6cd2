import numpy as np
import pytest
import torch
from fairlearn.metrics import (MetricFrame, demographic_parity_difference,
                               equalized_odds_difference, false_positive_rate, true_positive_rate)
from sklearn.metrics import accuracy_score, roc_auc_score
from torchmetrics.functional.classification import (binary_accuracy, binary_auroc,
                                                    binary_calibration_error, binary_f1_score,
                                                    binary_precision, binary_recall)

from celeba_app.metrics import (ALL, Stats, flatten, metrics_report, slice_stats, sum_stats, summarize,
                                unflatten, wilson)
from celeba_app.task import bce_per_row


def sample(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    male = (rng.random(n) < 0.4).astype(int)
    young = (rng.random(n) < 0.7).astype(int)
    pale = (rng.random(n) < 0.05).astype(int)
    y = (rng.random(n) < np.where(male == 1, 0.35, 0.6)).astype(int)
    logit = 1.6 * (2 * y - 1) + rng.normal(0, 1.3, n) - 0.4 * male
    p = 1 / (1 + np.exp(-logit))
    return p, y, {"Male": male, "Young": young, "Pale_Skin": pale}


def test_overall_metrics_match_torchmetrics():
    p, y, attrs = sample()
    m = summarize(slice_stats(p, y, bce_per_row(p, y), attrs)[ALL])
    tp, ty = torch.tensor(p), torch.tensor(y)
    assert m["accuracy"] == pytest.approx(binary_accuracy(tp, ty).item(), abs=1e-6)  # float32
    assert m["precision"] == pytest.approx(binary_precision(tp, ty).item(), abs=1e-6)
    assert m["recall"] == pytest.approx(binary_recall(tp, ty).item(), abs=1e-6)
    assert m["f1"] == pytest.approx(binary_f1_score(tp, ty).item(), abs=1e-6)
    assert m["loss"] == pytest.approx(torch.nn.functional.binary_cross_entropy(tp, ty.double()).item(), abs=1e-9)
    # Binned: within the documented tolerance of the exact values.
    assert m["auroc"] == pytest.approx(binary_auroc(tp, ty).item(), abs=0.005)
    assert m["ece"] == pytest.approx(binary_calibration_error(tp, ty, n_bins=15).item(), abs=0.005)
    assert m["balanced_accuracy"] == pytest.approx(0.5 * (m["tpr"] + 1 - m["fpr"]))


def test_group_metrics_and_gaps_match_fairlearn():
    p, y, attrs = sample()
    pred = (p >= 0.5).astype(int)
    rep = metrics_report(slice_stats(p, y, bce_per_row(p, y), attrs))
    for attr in ("Male", "Young", "Pale_Skin"):
        frame = MetricFrame(metrics={"acc": accuracy_score, "tpr": true_positive_rate,
                                     "fpr": false_positive_rate},
                            y_true=y, y_pred=pred, sensitive_features=attrs[attr])
        for value in (0, 1):
            row = rep["groups"][attr][str(value)]
            assert row["n"] == int((attrs[attr] == value).sum())
            for ours, theirs in (("accuracy", "acc"), ("tpr", "tpr"), ("fpr", "fpr")):
                assert row[ours] == pytest.approx(frame.by_group[theirs][value], abs=1e-12)
            mask = attrs[attr] == value
            assert row["auroc"] == pytest.approx(roc_auc_score(y[mask], p[mask]), abs=0.01)
        gaps = rep["gaps"][attr]
        assert gaps["demographic_parity_difference"] == pytest.approx(
            demographic_parity_difference(y, pred, sensitive_features=attrs[attr]), abs=1e-12)
        assert gaps["equalized_odds_difference"] == pytest.approx(
            equalized_odds_difference(y, pred, sensitive_features=attrs[attr]), abs=1e-12)
        assert gaps["worst_group_accuracy"] == pytest.approx(frame.by_group["acc"].min())
    # The intersection Male x Young has four cells.
    assert set(rep["groups"]["Male&Young"]) == {"0&0", "0&1", "1&0", "1&1"}
    cell = rep["groups"]["Male&Young"]["1&0"]
    mask = (attrs["Male"] == 1) & (attrs["Young"] == 0)
    assert cell["n"] == mask.sum()
    assert cell["accuracy"] == pytest.approx((pred[mask] == y[mask]).mean())


def test_federated_sum_equals_central_computation_on_the_union():
    p, y, attrs = sample(n=2000, seed=1)
    # Label-skewed clients (as under the non-IID split): sort rows by a noisy label.
    order = np.argsort(y + np.random.default_rng(2).uniform(0, 1.5, len(y)), kind="stable")
    p, y, attrs = p[order], y[order], {k: v[order] for k, v in attrs.items()}
    central = slice_stats(p, y, bce_per_row(p, y), attrs)
    cuts = [0, 137, 900, 901, 1500, 2000]
    clients = []
    for a, b in zip(cuts, cuts[1:]):
        sub = {k: v[a:b] for k, v in attrs.items()}
        local = slice_stats(p[a:b], y[a:b], bce_per_row(p[a:b], y[a:b]), sub)
        clients.append(unflatten(flatten(local)))  # through the MetricRecord encoding
    federated = sum_stats(clients)
    fed, cen = metrics_report(federated), metrics_report(central)
    assert fed["overall"] == pytest.approx(cen["overall"], abs=1e-9)
    for attr in cen["gaps"]:
        assert fed["gaps"][attr] == cen["gaps"][attr]  # integer counts sum exactly
        assert fed["groups"][attr] == cen["groups"][attr]
    # ... while the example-weighted mean of client F1s is not the global F1.
    pairs = [(summarize(c[ALL])["f1"], c[ALL].n) for c in clients]
    f1s, ns = zip(*[(f, n) for f, n in pairs if f is not None])
    assert abs(np.average(f1s, weights=ns) - cen["overall"]["f1"]) > 1e-3


def test_empty_group_is_null_with_a_warning_not_a_crash():
    p, y, attrs = sample(n=200)
    attrs["Pale_Skin"] = np.zeros(200, dtype=int)
    with pytest.warns(UserWarning, match="group Pale_Skin=1 has no members in test"):
        rep = metrics_report(slice_stats(p, y, bce_per_row(p, y), attrs), where="test")
    assert rep["groups"]["Pale_Skin"]["1"] is None
    assert rep["gaps"]["Pale_Skin"]["equalized_odds_difference"] is None
    assert rep["groups"]["Pale_Skin"]["0"]["n"] == 200


def test_wilson_interval_hand_computed():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0) is None
    for k, n in ((0, 7), (7, 7), (0, 1), (3, 3)):  # the interval always holds the estimate
        lo, hi = wilson(k, n)
        assert 0 <= lo <= k / n <= hi <= 1


def test_undefined_metrics_are_none():
    s = Stats.of(np.array([0.9, 0.8]), np.array([1, 1]), np.zeros(2))
    m = summarize(s)
    assert m["fpr"] is None and m["auroc"] is None and m["accuracy"] == 1.0


def test_newcombe_interval_reproduces_newcombe_1998_table_ii_method_10():
    from celeba_app.metrics import newcombe

    published = {(56, 70, 48, 80): (0.0524, 0.3339), (9, 10, 3, 10): (0.1705, 0.8090),
                 (6, 7, 2, 7): (0.0582, 0.8062), (5, 56, 0, 29): (-0.0381, 0.1926)}
    for counts, (lo, hi) in published.items():
        assert newcombe(*counts) == pytest.approx([lo, hi], abs=6e-5), counts
    assert newcombe(1, 0, 1, 2) is None


def test_every_gap_has_an_interval_around_it_and_names_its_groups():
    p, y, attrs = sample()
    rep = metrics_report(slice_stats(p, y, bce_per_row(p, y), attrs))
    for attr, gaps in rep["gaps"].items():
        for key in ("demographic_parity_difference", "equal_opportunity_difference",
                    "equalized_odds_difference", "accuracy_gap"):
            lo, hi = gaps[f"{key}_ci"]
            assert lo <= gaps[key] <= hi, (attr, key)
            high, low = gaps[f"{key}_groups"]
            assert {high, low} <= set(rep["groups"][attr])
    # wider for the small group (Pale_Skin=1, ~150 rows) than for Male (~1200 vs ~1800)
    width = {a: np.diff(rep["gaps"][a]["accuracy_gap_ci"])[0] for a in ("Male", "Pale_Skin")}
    assert width["Pale_Skin"] > 2 * width["Male"]


def test_worst_group_accuracy_counts_only_groups_of_min_group_size_and_flags_the_rest():
    p, y, attrs = sample(n=600, seed=4)
    attrs["Bald"] = np.zeros(600, dtype=int)
    attrs["Bald"][:12] = 1
    y[:12], p[:12] = 1, 0.1  # a tiny group, all wrong
    rep = metrics_report(slice_stats(p, y, bce_per_row(p, y), attrs), min_group_size=30)
    assert rep["groups"]["Bald"]["1"]["small"] and not rep["groups"]["Bald"]["0"]["small"]
    assert rep["groups"]["Bald"]["1"]["accuracy"] == 0.0
    assert rep["gaps"]["Bald"]["worst_group_accuracy"] == rep["groups"]["Bald"]["0"]["accuracy"]
    assert rep["gaps"]["Bald"]["accuracy_gap"] == rep["groups"]["Bald"]["0"]["accuracy"]  # still shown
    assert metrics_report(slice_stats(p, y, bce_per_row(p, y), attrs), min_group_size=5)["gaps"]["Bald"][
        "worst_group_accuracy"] == 0.0


def test_binned_auroc_stays_within_its_reported_bound_even_for_a_poor_head():
    rng = np.random.default_rng(5)
    bounds = []
    for spread in (0.02, 0.3, 3.0):  # scores crowded around 0.5 ... spread out
        y = (rng.random(4000) < 0.5).astype(int)
        p = 1 / (1 + np.exp(-(spread * (2 * y - 1) * 0.3 + rng.normal(0, spread, 4000))))
        m = summarize(slice_stats(p, y, bce_per_row(p, y), {})[ALL])
        assert abs(m["auroc"] - roc_auc_score(y, p)) <= m["auroc_max_error"] + 1e-12
        bounds.append(m["auroc_max_error"])
    assert bounds[0] > 0.1 and bounds[0] > bounds[1] > bounds[2] and bounds[2] < 0.01


def test_the_docstring_examples_hold():
    import doctest

    from celeba_app import metrics

    result = doctest.testmod(metrics)
    assert result.attempted > 0 and result.failed == 0
