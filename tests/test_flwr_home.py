"""celeba-flwr: pyproject.toml's federations as Flower 1.42's SuperLink connections, pyproject.toml
never rewritten; on 1.42, a real simulation killed and resumed, and a Deployment Engine run."""

import hashlib
import json
import os
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from celeba_app import flwr_home, internals
from flower_procs import BIN, ROOT, Ports, Procs, flwr_env, flwr_run_deployment, overrides, project_copy, \
    start_superlink, start_supernode

ON_1_42 = flwr_home.migrates_federations()
needs_1_42 = pytest.mark.skipif(not ON_1_42, reason="Flower 1.42's config migration")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_without_federations_drops_exactly_the_federation_tables():
    text = (ROOT / "pyproject.toml").read_text()
    staged = flwr_home.without_federations(text)
    original, kept = tomllib.loads(text), tomllib.loads(staged)
    assert "federations" in original["tool"]["flwr"] and "federations" not in kept["tool"]["flwr"]
    del original["tool"]["flwr"]["federations"]
    assert kept == original  # the app, its config and everything after the federations (pytest's table)
    assert all(line in text.splitlines() for line in staged.splitlines())
    assert flwr_home.without_federations("[a]\nx = 1\n[tool.flwr.federations]\ndefault = 'l'\n"
                                         "[tool.flwr.federations.l]   # a comment\naddress = 'h:1'\n[[b]]\ny = 2\n") \
        == "[a]\nx = 1\n[[b]]\ny = 2\n"


def test_the_connection_is_the_first_positional_argument_else_the_default():
    assert flwr_home._connection(["local-deployment", "--stream"], ROOT) == "local-deployment"
    assert flwr_home._connection(["--run-config", "x=1", "--stream", "gpu"], ROOT) == "gpu"
    assert flwr_home._connection(["--run-config", "x=1"], ROOT) == "local-simulation"  # pyproject's default


@pytest.mark.skipif(ON_1_42, reason="flwr 1.25 keeps federations in pyproject.toml")
def test_on_flower_1_25_it_has_nothing_to_do(capsys):
    assert flwr_home.run_command() == "flwr run ."
    assert flwr_home.main(["config"]) == 0
    assert "keeps federations in pyproject.toml; 'config' is not needed" in capsys.readouterr().out


@needs_1_42
def test_config_toml_is_written_from_pyproject_which_stays_byte_identical(tmp_path, monkeypatch):
    project = project_copy(tmp_path / "project")
    before = sha256(project / "pyproject.toml")
    monkeypatch.delenv("FLWR_HOME", raising=False)
    monkeypatch.chdir(project)
    assert flwr_home.main(["config"]) == 0
    assert sha256(project / "pyproject.toml") == before
    home = project / ".flwr"
    config = tomllib.loads((home / "config.toml").read_text())["superlink"]
    federations = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["flwr"]["federations"]
    assert config["default"] == federations["default"] == "local-simulation"
    assert config["local-simulation"]["address"] == ":local:"  # options only: Flower's local SuperLink
    assert config["local-simulation"]["options"]["num-supernodes"] == 50
    assert config["local-deployment"] == {"address": "127.0.0.1:9093", "insecure": True}
    assert config["local-deployment-tls"]["root-certificates"] == str(project.resolve() / "certificates/ca.crt")
    staged = tomllib.loads((home / "app" / "pyproject.toml").read_text())
    assert "federations" not in staged["tool"]["flwr"] and staged["tool"]["flwr"]["app"]["config"]["split"] == "iid"
    assert (home / "app" / "celeba_app" / "server_app.py").read_text() == (ROOT / "celeba_app/server_app.py").read_text()
    (home / "config.toml").write_text((home / "config.toml").read_text() + "[superlink.stale]\naddress = 'x:1'\n")
    assert flwr_home.main(["config"]) == 0
    assert "stale" not in tomllib.loads((home / "config.toml").read_text())["superlink"]  # regenerated


@needs_1_42
def test_on_flower_1_42_a_resume_command_names_celeba_flwr():
    from celeba_app.config import RunConfig
    from celeba_app.results import resume_command

    assert resume_command(RunConfig.from_run_config({"split": "noniid"}), "r1") == \
        "celeba-flwr run . --run-config \"split='noniid' resume='r1'\""


@needs_1_42
def test_an_unknown_federation_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    project = project_copy(tmp_path / "project")
    monkeypatch.setenv("FLWR_HOME", str(project / ".flwr"))
    monkeypatch.chdir(project)
    assert flwr_home.main(["run", ".", "local-simulatoin", "--stream"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["celeba-flwr: federation 'local-simulatoin' is not known; accepted: local, local-deployment, "
                   "local-deployment-tls, local-simulation, local-simulation-gpu, supergrid "
                   "(pyproject.toml's [tool.flwr.federations] and Flower's own)"]


@needs_1_42
def test_outside_the_project_folder_it_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert flwr_home.main(["run", "."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"celeba-flwr: {tmp_path} is not the celeba-fl project folder")


# --------------------------------------------------------------------------- real runs on Flower 1.42
def _alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _celeba_flwr(procs: Procs, name: str, project: Path, env: dict, args: list[str]) -> subprocess.Popen:
    return procs.start(name, [str(BIN / "celeba-flwr"), *args], cwd=project, env=env)


@pytest.mark.e2e
@pytest.mark.flower142
@needs_1_42
def test_a_simulation_on_1_42_is_killed_resumed_and_leaves_pyproject_byte_identical(run_config, tmp_path):
    project = project_copy(tmp_path / "project")
    env, before = flwr_env(project), sha256(project / "pyproject.toml")
    rounds = 20  # enough for flwr stop to land mid-run
    run_config.update({"run-name": "on142", "num-server-rounds": rounds})
    run = Path(run_config["results-dir"]) / "on142"
    sim = ["run", ".", "local-simulation", "--stream", "--federation-config", "num-supernodes=3"]
    with Procs(tmp_path / "logs") as procs:
        try:
            _celeba_flwr(procs, "first", project, env, [*sim, "--run-config", overrides(run_config)])
            assert procs.wait_for("first", f"celeba-fl: round 2/{rounds}", 300), procs.logs()[-4000:]
            # killed as a SuperLink's shutdown or an OOM kill would end it: SIGTERM to the
            # flwr-simulation process of the local SuperLink that runs the ServerApp (status.json's pid)
            pid = json.loads((run / "status.json").read_text())["pid"]
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 120
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            procs.procs["first"].wait(timeout=60)
            stopped = json.loads((run / "status.json").read_text())
            done = stopped["last_completed_round"]
            assert stopped["state"] == "failed" and 2 <= done < rounds, stopped

            _celeba_flwr(procs, "resumed", project, env,
                         [*sim, "--run-config", overrides({**run_config, "resume": "on142"})])
            procs.procs["resumed"].wait(timeout=300)
            out = procs.log("resumed")
            status = json.loads((run / "status.json").read_text())
            assert status["state"] == "completed" and status["last_completed_round"] == rounds, out[-4000:]
            assert done < rounds and f"celeba-fl: resuming after round {done} of {rounds}" in out
            config = json.loads((run / "config.json").read_text())
            assert config["packages"]["flwr"].startswith("1.42") and config["num_clients"] == 3
            assert [h["round"] for h in json.loads((run / "history.json").read_text())] == list(range(rounds + 1))
            assert sha256(project / "pyproject.toml") == before  # flwr run never saw its federations
        finally:
            ended = subprocess.run([str(BIN / "celeba-flwr"), "stop-superlink"], cwd=project, env=env,
                                   capture_output=True, text=True, timeout=60)
    assert "ended the local SuperLink (pid" in ended.stdout, ended.stdout + ended.stderr
    assert flwr_home.own_superlink(project / ".flwr") is None


@pytest.mark.e2e
@pytest.mark.flower142
@needs_1_42
def test_a_deployment_engine_run_on_1_42(run_config, tmp_path):
    """A SuperLink (one HTTP API on --port) and two SuperNodes in their default subprocess isolation."""
    run_config.update({"run-name": "deployed142", "min-nodes": 2})
    with Procs(tmp_path / "logs") as procs:
        ports = Ports()
        start_superlink(procs, ports, workdir=tmp_path)
        for i in range(2):
            start_supernode(procs, ports, f"supernode-{i}", {"partition-id": i, "num-partitions": 2}, workdir=tmp_path)
        done = flwr_run_deployment(procs, ports, run_config)
        project = procs.log_dir / "flwr-run-project"
        pyproject = (ROOT / "pyproject.toml").read_text().replace(
            'address = "127.0.0.1:9093"\ninsecure = true', f'address = "127.0.0.1:{ports.control}"\ninsecure = true')
    out = done.stdout
    run = Path(run_config["results-dir"]) / "deployed142"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed", out[-4000:]
    assert json.loads((run / "config.json").read_text())["num_clients"] == 2
    assert "celeba-fl: round 2/2" in out and "2/2 clients" in out
    assert (project / "pyproject.toml").read_text() == pyproject  # not rewritten
