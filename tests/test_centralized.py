"""The centralized baseline: the same run-folder contract, optimiser and CLI as the federation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from celeba_app import centralized
from celeba_app.config import RunConfig
from celeba_app.data import NodeData, client_parts
from celeba_app.task import group_balance_weights
from conftest import TINY, TINY_RC

ROOT = Path(__file__).resolve().parents[1]


def test_centralized_run_writes_the_same_contract(two_runs):
    run = two_runs[0]
    for name in ("config.json", "partitions.json", "history.json", "test.json", "best.json", "head.pt", "report.md"):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "centralized" and config["num_clients"] == 4
    history = json.loads((run / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    assert {"train", "local_validation", "server_valid"} <= set(history[-1])
    from pathlib import Path
    assert all(Path(config["run_config"][k]).is_absolute() for k in ("dataset", "weights", "results-dir", "cache-dir"))
    post = json.loads((run / "postprocessing.json").read_text())
    assert set(post["attributes"]) == {"Male", "Young", "Pale_Skin"}
    assert {"test_before", "valid", "clients' held-out"} <= set(post["attributes"]["Young"])
    assert "## Equalized-odds post-processing (test)" in (run / "report.md").read_text()


def test_centralized_trains_with_the_federations_lr_decay_weight_decay_and_group_weights(
        tmp_path, celeba_dir, weights_file, monkeypatch):
    calls = []
    real = centralized.train_head

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(centralized, "train_head", spy)
    cfg = RunConfig.from_run_config({
        "dataset": str(celeba_dir), "weights": str(weights_file), **TINY, "num-server-rounds": 2,
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
    rc = (f"dataset='{celeba_dir}' weights='{weights_file}' {TINY_RC} num-server-rounds=1 "
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
    features._feature_store.cache_clear()
    rc = f"dataset='{celeba_dir}' weights='imagenet' results-dir='{tmp_path}' run-name='x'"
    assert centralized.main(["--project", str(ROOT), "--run-config", rc, "--num-partitions", "3"]) == 2
    assert "weights='imagenet' could not be downloaded" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
