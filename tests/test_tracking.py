"""Experiment tracking: what the tracker holds is what history.json holds, read back with the
library's own reader; tensorboard and mlflow, fresh and resumed."""

import json
import shutil

import pytest

from celeba_app import tracking
from celeba_app.config import ConfigError, RunConfig
from tracked import assert_tracked, read_back


def test_scalars_are_the_numeric_leaves_named_by_their_path():
    entry = {"round": 3, "lr": 0.01, "skipped": False, "server_valid": {
        "overall": {"accuracy": 0.9, "auroc": None, "n": 10},
        "groups": {"Male": {"1": {"tpr": 0.5, "tpr_ci": [0.1, 0.9]}, "0": None},
                   "Male&Young": {"0&1": {"fpr": 0.25}}},
        "gaps": {"Male": {"equalized_odds_difference": 0.1, "equalized_odds_difference_ci": [0.0, 0.2]}},
        "clients": {"accuracy": {"mean": 0.8}}}}
    assert tracking.history_scalars(entry) == {
        "lr": 0.01, "server_valid/overall/accuracy": 0.9, "server_valid/overall/n": 10.0,
        "server_valid/groups/Male/1/tpr": 0.5, "server_valid/groups/Male_and_Young/0_1/fpr": 0.25,
        "server_valid/gaps/Male/equalized_odds_difference": 0.1}


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_the_tracker_holds_history_json_and_a_resume_adds_only_new_rounds(two_runs, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    history = json.loads((run / "history.json").read_text())
    test = json.loads((run / "test.json").read_text())
    first = tracking.open_tracker(kind, run, {"seed": 7, "split": "iid"})
    first.log_history(history[:2])
    first.close("KILLED")  # the process stopped after round 1
    second = tracking.open_tracker(kind, run, {"seed": 7, "split": "iid"}, logged_rounds=1)
    for i in range(2, len(history) + 1):
        second.log_history(history[:i])  # the whole list each round, as the round loop passes it
    second.log_final(test, None, history[-1]["round"])
    second.close()
    assert_tracked(kind, run)
    got = read_back(kind, run)
    assert set(got["server_valid/overall/accuracy"]) == {h["round"] for h in history}
    if kind == "mlflow":
        import os
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient
        client = MlflowClient((run / "mlruns").resolve().as_uri())
        r = client.get_run((run / "mlruns" / "celeba-fl-run-id").read_text().strip())
        assert r.data.params["split"] == "iid" and r.info.status == "FINISHED"


def test_an_unknown_tracker_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"tracking='wandb' is not known; accepted: \"\" \(none\), tensorboard, mlflow"):
        RunConfig.from_run_config({"tracking": "wandb"}, check_paths=False)


def test_a_missing_library_is_refused_naming_the_extra(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"tracking='mlflow' needs the 'mlflow' package.*\.\[tracking\]"):
        tracking.check_available("mlflow")
    tracking.check_available("")  # none needed


def test_a_failing_tracker_never_ends_the_run(two_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    tracker = tracking.open_tracker("tensorboard", run, {})
    tracker._write = lambda new, step: (_ for _ in ()).throw(OSError("disk full"))
    tracker.log_history(json.loads((run / "history.json").read_text()))
    tracker.close()
    assert "tracking='tensorboard' failed (OSError: disk full); the run goes on" in capsys.readouterr().err


def test_a_tracker_that_cannot_start_is_one_line_and_none(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "mlruns").write_text("a file where the store's folder should be")
    assert tracking.open_tracker("mlflow", run, {}) is None
    assert "tracking='mlflow' could not start" in capsys.readouterr().err
