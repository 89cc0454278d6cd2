"""report.md, plots, the centralized baseline and celeba-compare on tiny runs."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from celeba_app import centralized, compare, report
from celeba_app.config import RunConfig
from celeba_app.data import NodeData, client_parts
from celeba_app.task import group_balance_weights

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, celeba_dir, weights_file):
    out = tmp_path_factory.mktemp("runs")
    base = {"dataset": str(celeba_dir), "weights": str(weights_file), "image-size": 32,
            "num-server-rounds": 2, "local-epochs": 1, "batch-size": 16,
            "results-dir": str(out), "cache-dir": str(out / "cache")}
    runs = []
    for split in ("iid", "noniid"):
        cfg = RunConfig.from_run_config({**base, "split": split, "run-name": f"central-{split}"})
        runs.append(centralized.run(cfg, num_partitions=4))
    return runs


def test_centralized_run_writes_the_same_contract(two_runs):
    run = two_runs[0]
    for name in ("config.json", "partitions.json", "history.json", "test.json", "best.json", "head.pt", "report.md"):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "centralized" and config["num_clients"] == 4
    history = json.loads((run / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    assert {"train", "local_validation", "server_valid"} <= set(history[-1])


def test_report_plots_are_pngs_and_tables_hold_the_json_numbers(two_runs):
    run = two_runs[1]
    text = (run / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (run / png).read_bytes()[:8] == PNG, png
    assert {"learning_curves.png", "groups_test.png", "fairness_gaps.png", "partitions.png"} <= set(
        re.findall(r"\]\(([^)]+\.png)\)", text))
    test = json.loads((run / "test.json").read_text())
    assert f"{test['overall']['accuracy']:.4f}" in text
    male = test["groups"]["Male"]["1"]
    assert male["small"] and f"| Male=1 | {male['n']}* |" in text  # under min-group-size: marked
    assert f"{male['accuracy']:.3f} [{male['accuracy_ci'][0]:.3f}, {male['accuracy_ci'][1]:.3f}]" in text
    young = test["gaps"]["Young"]
    eo, (lo, hi) = young["equalized_odds_difference"], young["equalized_odds_difference_ci"]
    assert f"{eo:.3f} [{lo:.3f}, {hi:.3f}]" in text


def test_report_can_be_rebuilt_from_the_json_alone(two_runs, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(two_runs[0], copy)
    for png in copy.glob("*.png"):
        png.unlink()
    (copy / "report.md").unlink()
    report.main([str(copy)])
    assert (copy / "report.md").exists() and (copy / "learning_curves.png").read_bytes()[:8] == PNG


def test_compare_puts_runs_side_by_side(two_runs, tmp_path):
    compare.main([*map(str, two_runs), "--out", str(tmp_path / "cmp")])
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    for run in two_runs:
        acc = json.loads((run / "test.json").read_text())["overall"]["accuracy"]
        assert run.name in text and f"{acc:.4f}" in text
    assert (tmp_path / "cmp" / "compare_valid.png").read_bytes()[:8] == PNG
    assert (tmp_path / "cmp" / "compare_gaps.png").read_bytes()[:8] == PNG


def test_compare_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(SystemExit, match="no test.json"):
        compare.main([str(tmp_path / "half"), "--out", str(tmp_path / "cmp")])


def test_centralized_trains_with_the_federations_lr_decay_weight_decay_and_group_weights(
        tmp_path, celeba_dir, weights_file, monkeypatch):
    calls = []
    real = centralized.train_head

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(centralized, "train_head", spy)
    cfg = RunConfig.from_run_config({
        "dataset": str(celeba_dir), "weights": str(weights_file), "image-size": 32, "num-server-rounds": 2,
        "local-epochs": 1, "results-dir": str(tmp_path), "cache-dir": str(tmp_path / "c"), "run-name": "wd",
        "learning-rate": 0.01, "lr-decay": 0.5, "weight-decay": 0.3, "balance-groups": "Male"})
    centralized.run(cfg, num_partitions=3)
    assert [c["lr"] for c in calls] == pytest.approx([0.01, 0.005])
    assert all(c["weight_decay"] == 0.3 for c in calls)
    male = np.concatenate([client_parts(cfg, NodeData.partition(cfg, pid, 3))[0].attributes["Male"] for pid in range(3)])
    expected = group_balance_weights({"Male": male}, ("Male",))
    assert len(set(expected.tolist())) == 2  # both groups present: the weights are not all ones
    assert all(torch.equal(c["sample_weight"], expected) for c in calls)


def test_centralized_cli_reads_pyproject_and_overrides(tmp_path, celeba_dir, weights_file, capsys):
    rc = (f"dataset='{celeba_dir}' weights='{weights_file}' image-size=32 num-server-rounds=1 "
          f"local-epochs=1 results-dir='{tmp_path}' cache-dir='{tmp_path / 'c'}' run-name='cli' target='Bald'")
    assert centralized.main(["--project", str(ROOT), "--run-config", rc, "--num-partitions", "3"]) == 0
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["run_config"]["target"] == "Bald" and config["run_config"]["batch-size"] == 32
    assert centralized.main(["--project", str(ROOT), "--run-config", "split='bogus'"]) == 2
    assert "split='bogus' is not known" in capsys.readouterr().err


def test_unreachable_weights_stop_before_anything_is_written(tmp_path, celeba_dir, monkeypatch, capsys):
    from urllib.error import URLError

    import torchvision.models

    from celeba_app import features

    monkeypatch.setattr(torchvision.models, "mobilenet_v2",
                        lambda weights=None: (_ for _ in ()).throw(URLError("offline")))
    features._STORES.clear()
    rc = f"dataset='{celeba_dir}' weights='imagenet' results-dir='{tmp_path}' run-name='x'"
    assert centralized.main(["--project", str(ROOT), "--run-config", rc, "--num-partitions", "3"]) == 2
    assert "weights='imagenet' could not be downloaded" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_partial_run_gets_a_report_marked_incomplete_naming_failed_clients(two_runs, tmp_path):
    """A run stopped after round 1 (no test.json yet), whose round 1 lost a client."""
    import shutil

    from celeba_app.results import write_status

    run = tmp_path / "partial"
    shutil.copytree(two_runs[0], run)
    for name in ("test.json", "best.json", "head.pt", "report.md"):
        (run / name).unlink()
    history = json.loads((run / "history.json").read_text())[:2]
    history[1]["train"]["num_clients"] = 3
    history[1]["nodes"] = {"train": {"sampled": [11, 12, 13, 14], "replies": 4, "succeeded": 3, "failures": [
        {"node_id": 12, "partition_id": 1, "code": 2, "reason": "row 7 of client-1/train cannot be decoded"}]}}
    (run / "history.json").write_text(json.dumps(history))
    write_status(run, "failed", 1, "RunFailed: 4 rounds in a row skipped")
    text = (report.write_report(run)).read_text()
    assert "**Incomplete run**: status `failed`, last completed round 1 (RunFailed: 4 rounds in a row skipped)" in text
    assert "resume='partial'" in text
    assert "Training metrics cover fewer clients than the federation's 4 in rounds 1 (3 of 4)." in text
    assert "| 1 | train | 12 | 1 | 2 | row 7 of client-1/train cannot be decoded |" in text
    assert "## Final metrics" not in text and (run / "learning_curves.png").exists()
