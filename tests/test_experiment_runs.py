"""scripts/experiment_runs.py: run folders of the experiment scripts, and when a run happens."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import experiment_runs  # noqa: E402


def test_slug_keeps_letters_and_digits_and_joins_the_rest_with_single_dashes():
    assert experiment_runs.slug("FedProx mu=0.5") == "fedprox-mu-0-5"
    assert experiment_runs.slug("Male x Young, alpha 0.5") == "male-x-young-alpha-0-5"
    assert experiment_runs.slug("  FedAvg (IID reference) ") == "fedavg-iid-reference"


def test_an_incomplete_run_folder_is_set_aside_and_a_finished_one_is_kept(tmp_path):
    killed = tmp_path / "killed"
    (killed / "history.json").parent.mkdir()
    (killed / "history.json").write_text("[]")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "test.json").write_text("{}")
    aside = experiment_runs.set_aside_incomplete(killed)
    assert aside is not None and aside.name.startswith("killed.incomplete-") and (aside / "history.json").exists()
    assert not killed.exists()
    assert experiment_runs.set_aside_incomplete(finished) is None and (finished / "test.json").exists()
    assert experiment_runs.set_aside_incomplete(tmp_path / "never-started") is None


def test_a_finished_run_is_not_run_again(tmp_path, monkeypatch):
    run = tmp_path / "done-s1"
    run.mkdir()
    (run / "test.json").write_text("{}")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("flwr run started for a finished run"))
    assert experiment_runs.ensure_run(run, "seed=1") == run


def test_a_run_that_ends_without_test_json_stops_the_script_with_its_log(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd, stdout, stderr, env):
        calls.append(cmd)
        stdout.write("celeba-fl: split='nope' is not known; accepted: iid, noniid, celebrity\n")
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(SystemExit, match=r"(?s)bad-s1 failed \(exit 1\).*split='nope' is not known"):
        experiment_runs.ensure_run(tmp_path / "bad-s1", "split='nope' seed=1", "options.num-supernodes=3")
    assert calls[0][1:4] == ["run", str(ROOT), "--run-config"]
    assert calls[0][4] == "split='nope' seed=1 run-name='bad-s1'"
    assert calls[0][5:] == ["--federation-config", "options.num-supernodes=3"]
