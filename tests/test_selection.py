import torch

from celeba_app.selection import BestRound, close_round, metric_value


def rep(loss, acc, worst):
    return {"overall": {"loss": loss, "accuracy": acc},
            "gaps": {"Male": {"worst_group_accuracy": worst}, "Young": {"worst_group_accuracy": worst + 0.05}}}


def test_best_round_by_loss_ignores_round_zero_and_keeps_its_state():
    best = BestRound("loss")
    heads = [{"w": torch.tensor([float(r)])} for r in range(4)]
    assert not best.update(0, rep(0.1, 0.9, 0.8), heads[0])
    assert best.update(1, rep(0.6, 0.7, 0.6), heads[1])
    assert best.update(2, rep(0.5, 0.75, 0.6), heads[2])
    assert not best.update(3, rep(0.55, 0.8, 0.7), heads[3])
    heads[2]["w"] += 10  # the caller's head trains on: the best one is a copy
    assert best.round == 2 and best.state["w"].item() == 2.0 and best.value == 0.5


def test_larger_is_better_metrics_and_worst_group():
    best = BestRound("worst_group_accuracy")
    best.update(1, rep(0.6, 0.7, 0.6), {})
    best.update(2, rep(0.5, 0.8, 0.55), {})
    assert best.round == 1
    assert metric_value(rep(0.5, 0.8, 0.55), "worst_group_accuracy") == 0.55


def test_early_stopping_after_patience_rounds_without_improvement():
    best = BestRound("loss", patience=2)
    for r, loss in enumerate([0.5, 0.4, 0.45, 0.41], start=1):
        best.update(r, rep(loss, 0, 0), {})
    assert best.should_stop and best.round == 2
    assert not BestRound("loss", patience=0).should_stop


def test_the_docstring_examples_hold():
    import doctest

    from celeba_app import selection

    result = doctest.testmod(selection)
    assert result.attempted > 0 and result.failed == 0


def test_close_round_records_the_gap_the_best_round_and_early_stopping():
    best = BestRound("loss", patience=1)
    state = {"w": torch.zeros(1)}
    r1 = {"round": 1, "train": {"overall": {"loss": 0.3, "accuracy": 0.9, "auroc": None}},
          "server_valid": {"overall": {"loss": 0.5, "accuracy": 0.8, "auroc": 0.7}}}
    assert not close_round(r1, best, state)
    assert r1["gap_train_minus_valid"] == {"loss": -0.2, "accuracy": 0.9 - 0.8, "auroc": None}
    assert "early_stopped" not in r1 and best.round == 1
    r2 = {"round": 2, "server_valid": {"overall": {"loss": 0.6}}}  # no train report: no gap
    assert close_round(r2, best, state) and r2["early_stopped"] and r2["gap_train_minus_valid"] is None
