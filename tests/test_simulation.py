"""One real Flower simulation (`flwr run .`, 3 supernodes, 2 rounds) and the results contract."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flower_procs import Procs, flwr_run_command
from flower_procs import flwr_run_simulation as flwr_run
from tracked import assert_tracked
from untrusted_app import copy_app

pytestmark = pytest.mark.e2e  # real Flower processes: `pytest -m "not e2e"` skips them


@pytest.mark.parametrize("split", ["noniid"])
def test_flwr_run_writes_the_results_contract(run_config, tmp_path, split):
    tracker = {"iid": "tensorboard", "noniid": "mlflow"}[split]  # each split tries one tracker
    run_config.update({"split": split, "run-name": "e2e", "tracking": tracker})
    proc = flwr_run(run_config, supernodes=3)
    out = proc.stdout + proc.stderr
    run = Path(run_config["results-dir"]) / "e2e"
    assert (run / "test.json").exists(), out[-4000:]
    assert "celeba-fl: round 2/2" in out and "celeba-fl: test accuracy" in out
    assert "celeba-fl: before round 1: the server embedded" in out and "the 3 clients have " in out
    post = json.loads((run / "postprocessing.json").read_text())
    sensitive = json.loads((run / "config.json").read_text())["run_config"]["sensitive-attributes"]
    assert set(post["attributes"]) == set(sensitive.split(",")), post
    assert "## Equalized-odds post-processing (test)" in (run / "report.md").read_text()

    config = json.loads((run / "config.json").read_text())
    assert config["run_config"]["split"] == split and config["num_clients"] == 3
    assert config["packages"]["flwr"].startswith("1.25")
    assert len(config["weights"]["digest"]) == 64

    parts = json.loads((run / "partitions.json").read_text())["partitions"]
    assert [p["partition_id"] for p in parts] == [0, 1, 2]
    ids = [set(p["celeb_ids"]) for p in parts]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert all(p["num_train"] > 0 and 0 <= p["target_rate"] <= 1 for p in parts)

    history = json.loads((run / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    last = history[-1]
    for key in ("train", "federated_evaluate", "server_valid"):
        assert 0 <= last[key]["overall"]["accuracy"] <= 1, key
    assert last["train"]["num_clients"] == 3
    # the default conv1x1 head on features[13] pooled 2x2 (conftest.TINY): 96x8 + 8 + 8x2x2 + 1 float32
    assert last["head_bytes"] == (96 * 8 + 8 + 8 * 4 + 1) * 4
    assert last["bytes_sent"] == 3 * last["head_bytes"]  # the head only, to 3 clients
    report = (run / "report.md").read_text()
    assert "The conv1x1 head reads `features[13]` of the frozen MobileNetV2, average-pooled to 2x2 (384 numbers per " \
           "image), 3,236 bytes per head sent" in report
    assert last["federated_evaluate"]["clients"]["accuracy"]["count"] >= 1

    test = json.loads((run / "test.json").read_text())
    assert test["overall"]["n"] > 0
    assert test["groups"]["Male"]["1"]["accuracy_ci"][0] <= test["groups"]["Male"]["1"]["accuracy"]
    assert "equalized_odds_difference" in test["gaps"]["Male"]
    assert (run / "head.pt").stat().st_size > 0
    assert (run / "report.md").exists() and (run / "best.json").exists()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["last_completed_round"] == 2
    assert last["nodes"]["train"]["succeeded"] == 3 and last["nodes"]["train"]["failures"] == []
    assert_tracked(tracker, run)  # the ServerApp logged every figure of history.json and test.json


def test_flwr_run_with_every_remedy_switch(run_config):
    run_config.update({"split": "noniid", "run-name": "remedies", "num-server-rounds": 3,
                       "strategy": "qfedavg", "balance-groups": "Male,Young", "augment-hflip": True,
                       "head-dropout": 0.2, "weight-decay": 0.01, "lr-decay": 0.8, "head": "linear",
                       "selection-metric": "worst_group_accuracy"})
    proc = flwr_run(run_config, supernodes=3)
    out = proc.stdout + proc.stderr
    run = Path(run_config["results-dir"]) / "remedies"
    assert (run / "test.json").exists(), out[-4000:]
    history = json.loads((run / "history.json").read_text())
    assert history[1]["lr"] == pytest.approx(0.005) and history[2]["lr"] == pytest.approx(0.004)
    assert history[1]["gap_train_minus_valid"]["accuracy"] is not None
    best = json.loads((run / "best.json").read_text())
    assert best["selection_metric"] == "worst_group_accuracy" and 1 <= best["round"] <= 3
    assert best["overall"]["n"] == json.loads((run / "test.json").read_text())["overall"]["n"]
    assert (run / "head_best.pt").exists()
    import torch

    head = torch.load(run / "head.pt", weights_only=True)  # the linear head travelled (the others: conv1x1)
    assert {k: tuple(v.shape) for k, v in head.items()} == {"1.weight": (1, 96 * 2 * 2), "1.bias": (1,)}
    assert history[-1]["round"] == 3  # early stopping: tests/test_strategy.py and test_server_app.py


def test_a_killed_run_resumes_where_it_stopped(run_config, tmp_path):
    """Killed after round 2 of 4, resumed: the same final head as an uninterrupted run, and a
    continuous history."""
    run_config.update({"split": "noniid", "num-server-rounds": 4, "strategy": "fedavgm", "tracking": "tensorboard"})
    whole = flwr_run({**run_config, "run-name": "whole"}, supernodes=3)
    assert (Path(run_config["results-dir"]) / "whole" / "head.pt").exists(), (whole.stdout + whole.stderr)[-3000:]

    cmd = flwr_run_command({**run_config, "run-name": "killed"}, supernodes=3)
    with Procs(tmp_path / "logs") as procs:
        procs.start("killed", cmd)
        assert procs.wait_for("killed", "celeba-fl: round 2/4", 300), procs.logs()
        # a round's log line comes after its checkpoint and status.json: killed as soon as the
        # line is seen, the run must resume after round 2 (or later), never redo it
        procs.stop("killed", grace=0)  # SIGTERM then SIGKILL to the whole process group
    run = Path(run_config["results-dir"]) / "killed"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] in ("running", "failed") and 2 <= status["last_completed_round"] < 4
    assert not (run / "head.pt").exists() or status["state"] == "failed"

    resumed = flwr_run({**run_config, "resume": "killed"}, supernodes=3)
    out = resumed.stdout + resumed.stderr
    assert f"resuming after round {status['last_completed_round']}" in out, out[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    history = json.loads((run / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2, 3, 4]
    import torch

    a, b = torch.load(run / "head.pt"), torch.load(Path(run_config["results-dir"]) / "whole" / "head.pt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert_tracked("tensorboard", run)  # the tracker continued: every round once, the resumed ones too

    changed = flwr_run({**run_config, "resume": "killed", "learning-rate": 0.01}, supernodes=3)
    assert "that run completed" in changed.stdout + changed.stderr


def _ray_agents(driver_pids: set[int]) -> set[int]:
    """Ray agent processes of the Ray sessions started by ``driver_pids`` (Ray names a session
    after its driver's pid), so that other Ray instances on the machine do not count."""
    out = subprocess.run(["pgrep", "-af", "ray/dashboard/agent.py|ray/_private/runtime_env/agent/main.py"],
                         capture_output=True, text=True).stdout
    mine = set()
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        if any(f"_{d} " in cmd + " " or f"_{d}/" in cmd for d in driver_pids):
            mine.add(int(pid))
    return mine


def test_ctrl_c_leaves_failed_in_status_json_and_no_processes(run_config, tmp_path):
    """SIGINT to ``flwr run``'s process group (Ctrl-C in its terminal) during round 3: status.json
    says failed and why, and Ray's agents are gone within 20 s (pyproject's init-args)."""
    run_config.update({"num-server-rounds": 30, "run-name": "ctrl-c"})
    cmd = flwr_run_command(run_config, supernodes=3)
    with Procs(tmp_path / "logs") as procs:
        proc = procs.start("run", cmd)
        assert procs.wait_for("run", "celeba-fl: round 2/30", 300), procs.logs()
        drivers = {int(p) for p in subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "flower-simulation"],
                                                  capture_output=True, text=True).stdout.split()}
        assert drivers and _ray_agents(drivers), "no Ray agent of this run found: the check below would be empty"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    status = json.loads((Path(run_config["results-dir"]) / "ctrl-c" / "status.json").read_text())
    assert status["state"] == "failed" and status["last_completed_round"] >= 2, status
    assert "Simulation Engine stopped" in status["reason"], status
    deadline = time.time() + 20
    while _ray_agents(drivers) and time.time() < deadline:
        time.sleep(1)
    assert not _ray_agents(drivers)


def test_celebrity_split_samples_a_few_of_one_supernode_per_identity(run_config):
    """LEAF's setting: one partition per identity (60 in the tiny train split), 6 sampled per round."""
    run_config.update({"split": "celebrity", "fraction-train": 0.1, "fraction-evaluate": 0.1, "run-name": "leaf"})
    proc = flwr_run(run_config, supernodes=60)
    run = Path(run_config["results-dir"]) / "leaf"
    assert (run / "test.json").exists(), (proc.stdout + proc.stderr)[-4000:]
    parts = json.loads((run / "partitions.json").read_text())["partitions"]
    assert len(parts) == 60 and all(len(p["celeb_ids"]) == 1 for p in parts)
    history = json.loads((run / "history.json").read_text())
    assert [len(h["nodes"]["train"]["sampled"]) for h in history[1:]] == [6, 6]
    wrong = flwr_run({**run_config, "run-name": "leaf-wrong"}, supernodes=3)
    assert "split='celebrity' makes one partition per identity" in wrong.stdout + wrong.stderr
    assert "accepted: num-partitions=60" in wrong.stdout + wrong.stderr


def test_a_refused_simulation_ends_on_its_one_line_without_tracebacks(run_config):
    """refusal.py: Flower's and Python's tracebacks of a refusal are dropped, and the line is
    the last thing printed (flwr run adds nothing after it)."""
    run_config.update({"split": "non-iid", "run-name": "refused"})
    proc = flwr_run(run_config, supernodes=3, timeout=180)
    line = "celeba-fl: split='non-iid' is not known; accepted: iid, noniid, celebrity"
    assert [x for x in proc.stderr.splitlines() if x.strip()][-1] == line, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "returned non-zero exit status" not in proc.stderr
    assert not (Path(run_config["results-dir"]) / "refused").exists()


#: partition: (phase, attack) of tests/untrusted_app/untrusted_client.py; partition 5 is honest
UNTRUSTED = {0: ("train", "one NaN weight"), 1: ("train", "head of another shape"),
             2: ("train", "num-examples 1e12"), 3: ("train", "a metric key missing"),
             4: ("evaluate", "evaluate histograms +1e4")}
REFUSAL = {"one NaN weight": "non-finite values", "head of another shape": "float32[1, 10]",
           "num-examples 1e12": "num-examples=1000000000000", "a metric key missing": "metric keys",
           "evaluate histograms +1e4": "score histograms"}


def test_untrusted_clients_in_a_real_simulation_are_refused_named_and_change_nothing(run_config, tmp_path):
    """Six SuperNodes, five of which alter a reply through Flower's own serialisation: each
    offender is named with its rule, the run completes, and its head, test figures and
    fairness figures are those of the run whose offenders answered with errors instead."""
    run_config.update({"min-reply-fraction": 0.3})
    runs = {}
    for mode in ("attack", "error"):
        proc = flwr_run({**run_config, "run-name": mode}, supernodes=6, app=copy_app(tmp_path / f"app-{mode}", UNTRUSTED, mode))
        run = Path(run_config["results-dir"]) / mode
        assert json.loads((run / "status.json").read_text())["state"] == "completed", (proc.stdout + proc.stderr)[-4000:]
        runs[mode] = (run, proc.stdout + proc.stderr)
    (attacked, out), (clean, _) = runs["attack"], runs["error"]
    history, clean_history = (json.loads((r / "history.json").read_text()) for r in (attacked, clean))
    for rnd in (1, 2):
        for phase in ("train", "evaluate"):
            failures = {f["partition_id"]: f for f in history[rnd]["nodes"][phase]["failures"]}
            assert set(failures) == {p for p, (ph, _) in UNTRUSTED.items() if ph == phase}, failures
            for pid, failure in failures.items():
                assert failure["refused"] and REFUSAL[UNTRUSTED[pid][1]] in failure["reason"], failure
                assert f"(partition {pid}): reply refused: " in out
        for key in ("train", "federated_evaluate", "server_valid"):
            assert history[rnd][key] == clean_history[rnd][key], (rnd, key)
    import torch

    a, b = (torch.load(r / "head.pt", weights_only=True) for r in (attacked, clean))
    assert all(torch.equal(a[k], b[k]) for k in b)
    test, clean_test = (json.loads((r / "test.json").read_text()) for r in (attacked, clean))
    assert test["overall"] == clean_test["overall"] and test["gaps"] == clean_test["gaps"]
    assert "refused" in (attacked / "report.md").read_text()


def test_a_dp_run_clips_on_the_clients_spends_a_budget_and_hides_the_identities(run_config):
    """dp='client-fixed' through the real engine: Flower's fixedclipping_mod clips every update
    on the clients (none is refused at the server's stricter bound), epsilon grows each round
    in history.json, the log, status.json and report.md, and partitions.json holds salted hashes."""
    run_config.update({"dp": "client-fixed", "dp-noise-multiplier": 0.5, "dp-clipping-norm": 0.1, "run-name": "dp"})
    proc = flwr_run(run_config, supernodes=3)
    out = proc.stdout + proc.stderr
    run = Path(run_config["results-dir"]) / "dp"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed", out[-4000:]
    history = json.loads((run / "history.json").read_text())
    eps = [h["dp"]["epsilon"] for h in history[1:]]
    assert eps[0] < eps[1] and status["dp"]["epsilon"] == eps[-1]
    assert all(h["dp"]["clipping_norm"] == 0.1 and not h["nodes"]["train"]["failures"] for h in history[1:])
    assert "celeba-fl: differential privacy dp=client-fixed: noise multiplier 0.5" in out
    assert "fixedclipping_mod: parameters are clipped by value: 0.1000" in out  # the clients' own log lines
    assert f"epsilon {eps[-1]:.3g}" in out
    report = (run / "report.md").read_text()
    assert f"after 2 rounds epsilon = {eps[-1]:.3g}" in report and "are not privatised" in report
    parts = json.loads((run / "partitions.json").read_text())["partitions"]
    assert all("celeb_ids" not in p and len(p["celeb_id_hashes"]) > 0 for p in parts)
