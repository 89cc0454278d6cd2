"""The app on Flower's Deployment Engine: a SuperLink and three SuperNodes on loopback (one of
them served by a long-running ``celeba-clientapp`` process).

Each SuperNode holds only its own folder (``data-path``, written by celeba-partition); the
server's dataset has no ``train`` split at all. The run must write the same results contract
as a simulation, and train the same head as a simulation of the same config.
"""

import json
import time

import pytest
import torch

from celeba_app.partition_folders import main as celeba_partition
from conftest import TINY
from flower_procs import (Ports, Procs, flwr_run_command, flwr_run_deployment, flwr_run_simulation, start_superlink,
                          start_supernode)

pytestmark = pytest.mark.e2e  # real Flower processes: `pytest -m "not e2e"` skips them


def _run_config(celeba_dir, weights_file, tmp_path, **overrides) -> dict:
    """The tests' Deployment Engine run config: the tiny data, one local epoch, loopback timeouts."""
    return {"dataset": str(celeba_dir), "weights": str(weights_file), **TINY, "local-epochs": 1,
            "results-dir": str(tmp_path / "outputs"), "cache-dir": str(tmp_path / "cache"), **overrides}


def _federation(procs, tmp_path, node_config=lambda i: {"partition-id": i, "num-partitions": 3}) -> Ports:
    """A SuperLink and SuperNodes ``supernode-0..2`` (``node_config(i)``) on loopback; their ports."""
    ports = Ports()
    start_superlink(procs, ports, workdir=tmp_path)
    for i in range(3):
        start_supernode(procs, ports, f"supernode-{i}", node_config(i), workdir=tmp_path)
    return ports


def test_three_supernodes_train_the_simulations_head(celeba_dir, weights_file, tmp_path):
    parts = tmp_path / "parts"
    common = {"split": "noniid", "seed": 7}
    assert celeba_partition(["--run-config", f"dataset='{celeba_dir}' split='noniid' seed=7",
                             "--num-partitions", "3", "--out", str(parts)]) == 0
    assert sorted(p.name for p in (parts / "server").glob("*.parquet")) == [
        "test-00000-of-00001.parquet", "valid-00000-of-00001.parquet"]  # no train split for the server

    run_config = {**common, "weights": str(weights_file), **TINY, "num-server-rounds": 2,
                  "local-epochs": 1, "batch-size": 16, "extract-batch-size": 32}
    with Procs(tmp_path / "logs") as procs:
        ports = Ports()
        start_superlink(procs, ports, workdir=tmp_path)
        for i in range(3):  # supernode-2 runs every message in one long-running celeba-clientapp
            start_supernode(procs, ports, f"supernode-{i}", workdir=tmp_path, node_config={
                "data-path": str(parts / f"partition_{i}"), "cache-dir": str(tmp_path / f"node-{i}-cache")},
                long_running=i == 2)
        proc = flwr_run_deployment(procs, ports, {
            **run_config, "dataset": "parts/server",  # relative: resolved where the ServerApp runs
            "results-dir": "outputs", "cache-dir": "server-cache", "run-name": "deployed",
            "min-nodes": 3, "node-wait-timeout": 60.0, "evaluate-with-train": True}, timeout=400)
        out = proc.stdout
        run = tmp_path / "outputs" / "deployed"
        assert (run / "test.json").exists(), procs.logs()
        # query, train 1, train 2 (evaluating round 1's head), evaluate of round 2's head: one process
        assert procs.log("supernode-2-clientapp").count("Push `ClientAppOutputs`") == 4, procs.logs()
        assert procs.procs["supernode-2-clientapp"].poll() is None  # still serving
    assert "celeba-fl: round 2/2" in out and "celeba-fl: test accuracy" in out
    assert f"results-dir {tmp_path / 'outputs'}" in out  # absolute, as the ServerApp resolved it

    parts_json = json.loads((run / "partitions.json").read_text())["partitions"]
    assert [p["partition_id"] for p in parts_json] == [0, 1, 2]
    assert all(p["source"] == f"data-path {parts / ('partition_%d' % p['partition_id'])}" for p in parts_json)
    history = json.loads((run / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[-1]["train"]["num_clients"] == 3
    assert json.loads((run / "test.json").read_text())["overall"]["n"] > 0

    # The same config in simulation, over the same partitions of the whole dataset.
    sim = flwr_run_simulation({**run_config, "dataset": str(celeba_dir), "results-dir": str(tmp_path / "sim"),
                    "cache-dir": str(tmp_path / "sim-cache"), "run-name": "simulated"}, supernodes=3)
    sim_run = tmp_path / "sim" / "simulated"
    assert (sim_run / "head.pt").exists(), (sim.stdout + sim.stderr)[-3000:]
    sim_parts = json.loads((sim_run / "partitions.json").read_text())["partitions"]
    for a, b in zip(parts_json, sim_parts):
        assert (a["num_train"], a["num_val"], a["celeb_ids"]) == (b["num_train"], b["num_val"], b["celeb_ids"])
    # evaluate-with-train above, evaluate messages here: the same federated evaluation per round
    for a, b in zip(history[1:], json.loads((sim_run / "history.json").read_text())[1:]):
        fa, fb = a["federated_evaluate"]["overall"], b["federated_evaluate"]["overall"]
        assert fa["n"] == fb["n"] > 0 and abs(fa["loss"] - fb["loss"]) < 1e-4, (a["round"], fa, fb)
    deployed, simulated = torch.load(run / "head.pt"), torch.load(sim_run / "head.pt")
    diff = max((deployed[k] - simulated[k]).abs().max().item() for k in simulated)
    assert diff < 1e-5, diff
    assert set(simulated) == {"conv.weight", "conv.bias", "out.weight", "out.bias"}  # the default head, conv1x1
    assert not torch.equal(simulated["out.bias"], torch.zeros_like(simulated["out.bias"]))


def test_refused_runs_end_with_one_line(celeba_dir, weights_file, tmp_path):
    """On the Deployment Engine a refusal must end the ServerApp and the run (flwr run
    --stream returns), with the app's one line in the stream."""
    run_config = _run_config(celeba_dir, weights_file, tmp_path, **{"node-wait-timeout": 3.0})
    with Procs(tmp_path / "logs") as procs:
        ports = Ports()
        start_superlink(procs, ports, workdir=tmp_path)
        lonely = flwr_run_deployment(procs, ports, {**run_config, "min-nodes": 1}, name="no-nodes", timeout=120)
        assert "celeba-fl: 0 SuperNode(s) connected within node-wait-timeout=3s, 1 required" in lonely.stdout, \
            procs.logs()

        start_supernode(procs, ports, "configured", {"partition-id": 0, "num-partitions": 2}, workdir=tmp_path)
        start_supernode(procs, ports, "unconfigured", {}, workdir=tmp_path)
        refused = flwr_run_deployment(procs, ports, {**run_config, "min-nodes": 2, "node-wait-timeout": 60.0},
                                      name="no-node-config", timeout=180)
        assert "celeba-fl: 1 of 2 SuperNode(s) could not describe their data: node config lacks " \
               "partition-id, num-partitions (has: nothing)" in refused.stdout, procs.logs()

        bad = flwr_run_deployment(procs, ports, {**run_config, "split": "IID"}, name="bad-split", timeout=120)
        assert "celeba-fl: split='IID' is not known; accepted: iid, noniid, celebrity" in bad.stdout, procs.logs()
    for proc in (lonely, refused, bad):
        assert proc.returncode is not None  # it returned: the run ended
        last = [line for line in proc.stdout.splitlines() if line.strip()][-1]
        assert "celeba-fl: " in last and "Traceback" not in proc.stdout and "Exit Code" not in proc.stdout, \
            proc.stdout[-2000:]  # the app's line is the last thing the user sees
    assert not (tmp_path / "outputs").exists()


def test_a_supernode_that_vanishes_mid_run_is_survived_and_reported(celeba_dir, weights_file, tmp_path):
    run_config = _run_config(celeba_dir, weights_file, tmp_path, **{
        "num-server-rounds": 3, "run-name": "vanished", "min-nodes": 3, "node-wait-timeout": 60.0,
        "round-timeout": 45.0})
    with Procs(tmp_path / "logs") as procs:
        ports = _federation(procs, tmp_path)
        cmd_name = "flwr-run"
        procs.start(cmd_name, flwr_run_command(run_config, "local-deployment", control_port=ports.control))
        assert procs.wait_for(cmd_name, "celeba-fl: round 1/3", 300), procs.logs()
        procs.stop("supernode-2")
        assert procs.wait_for(cmd_name, "celeba-fl: test accuracy", 300), procs.logs()
    run = tmp_path / "outputs" / "vanished"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    history = json.loads((run / "history.json").read_text())
    later = [h for h in history if h["round"] >= 2]
    assert all(h["train"]["num_clients"] == 2 for h in later), [h.get("nodes") for h in later]
    failures = [f for h in later for f in h["nodes"]["train"]["failures"]]
    assert failures and all(f["partition_id"] == 2 for f in failures), failures  # the node that was ended
    report = (run / "report.md").read_text()
    assert "Incomplete run" not in report, report[:400]
    short = report[report.index("Training metrics cover fewer clients"):].split("\n")[0]
    assert "2 (2 of 3)" in short and "3 (2 of 3)" in short, short


def test_a_supernode_that_restarts_takes_its_old_place(celeba_dir, weights_file, tmp_path):
    """A SuperNode killed after round 1 and started again gets a new node id: it is asked to
    describe itself, takes its old partition, and the last rounds train all three clients."""
    run_config = _run_config(celeba_dir, weights_file, tmp_path, **{
        "num-server-rounds": 6, "run-name": "restarted", "min-nodes": 3, "node-wait-timeout": 60.0,
        "round-timeout": 45.0})
    node = {"partition-id": 2, "num-partitions": 3, "cache-dir": str(tmp_path / "node-2-cache")}
    with Procs(tmp_path / "logs") as procs:
        ports = _federation(procs, tmp_path, lambda i: node if i == 2 else {"partition-id": i, "num-partitions": 3})
        procs.start("flwr-run", flwr_run_command(run_config, "local-deployment", control_port=ports.control))
        assert procs.wait_for("flwr-run", "celeba-fl: round 1/6", 300), procs.logs()
        procs.stop("supernode-2", grace=0)  # SIGTERM, then SIGKILL: it is gone
        start_supernode(procs, ports, "supernode-2-again", node, workdir=tmp_path)
        assert procs.wait_for("flwr-run", "celeba-fl: test accuracy", 400), procs.logs()
        out = procs.log("flwr-run")
    run = tmp_path / "outputs" / "restarted"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert "rejoined as partition 2 (it was node" in out, out[-3000:]
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["train"]["num_clients"] == 3, [h.get("nodes") for h in history]
    assert "2 of 3 SuperNodes connected" not in out.split("rejoined as partition 2")[-1]


def test_a_supernode_stopped_before_the_run_is_left_out(celeba_dir, weights_file, tmp_path):
    """A SuperNode killed just before ``flwr run`` is still listed by the SuperLink (until its
    heartbeat expires): asked to describe itself, it does not answer, and the run goes on with
    the two that did (min-nodes=2), saying which partition takes no part."""
    run_config = _run_config(celeba_dir, weights_file, tmp_path, **{
        "num-server-rounds": 2, "run-name": "stale", "min-nodes": 2, "node-wait-timeout": 30.0, "round-timeout": 30.0})
    with Procs(tmp_path / "logs") as procs:
        ports = _federation(procs, tmp_path)
        time.sleep(10)  # all three register with the SuperLink
        procs.stop("supernode-2", grace=0)
        result = flwr_run_deployment(procs, ports, run_config)
    out = result.stdout
    run = tmp_path / "outputs" / "stale"
    assert json.loads((run / "status.json").read_text())["state"] == "completed", out[-3000:]
    assert json.loads((run / "config.json").read_text())["num_clients"] == 2
    assert "listed as connected did not answer" in out or "2 SuperNode(s) connected" in out, out[-3000:]
    assert "2 of 3 partitions have a SuperNode; partitions [2] take no part" in out, out[-3000:]
