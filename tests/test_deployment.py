"""The app on Flower's Deployment Engine: a SuperLink and three SuperNodes on loopback.

Each SuperNode holds only its own folder (``data-path``, written by celeba-partition); the
server's dataset has no ``train`` split at all. The run must write the same results contract
as a simulation, and train the same head as a simulation of the same config.
"""

import json
from pathlib import Path

import torch

from celeba_app.partition_folders import main as celeba_partition
from flower_procs import Ports, Procs, flwr_run_deployment, start_superlink, start_supernode
from test_simulation import flwr_run


def test_three_supernodes_train_the_simulations_head(celeba_dir, weights_file, tmp_path):
    parts = tmp_path / "parts"
    common = {"split": "noniid", "seed": 7}
    assert celeba_partition(["--run-config", f"dataset='{celeba_dir}' split='noniid' seed=7",
                             "--num-partitions", "3", "--out", str(parts)]) == 0
    assert sorted(p.name for p in (parts / "server").glob("*.parquet")) == [
        "test-00000-of-00001.parquet", "valid-00000-of-00001.parquet"]  # no train split for the server

    run_config = {**common, "weights": str(weights_file), "image-size": 32, "num-server-rounds": 2,
                  "local-epochs": 1, "batch-size": 16, "extract-batch-size": 32}
    with Procs(tmp_path / "logs") as procs:
        ports = Ports()
        start_superlink(procs, ports, workdir=tmp_path)
        for i in range(3):
            start_supernode(procs, ports, f"supernode-{i}", workdir=tmp_path, node_config={
                "data-path": str(parts / f"partition_{i}"), "cache-dir": str(tmp_path / f"node-{i}-cache")})
        proc = flwr_run_deployment(procs, ports, {
            **run_config, "dataset": "parts/server",  # relative: resolved where the ServerApp runs
            "results-dir": "outputs", "cache-dir": "server-cache", "run-name": "deployed",
            "min-nodes": 3, "node-wait-timeout": 60.0}, timeout=400)
        out = proc.stdout
        run = tmp_path / "outputs" / "deployed"
        assert (run / "test.json").exists(), procs.logs()
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
    sim = flwr_run({**run_config, "dataset": str(celeba_dir), "results-dir": str(tmp_path / "sim"),
                    "cache-dir": str(tmp_path / "sim-cache"), "run-name": "simulated"}, supernodes=3)
    sim_run = tmp_path / "sim" / "simulated"
    assert (sim_run / "head.pt").exists(), (sim.stdout + sim.stderr)[-3000:]
    sim_parts = json.loads((sim_run / "partitions.json").read_text())["partitions"]
    for a, b in zip(parts_json, sim_parts):
        assert (a["num_train"], a["num_val"], a["celeb_ids"]) == (b["num_train"], b["num_val"], b["celeb_ids"])
    deployed, simulated = torch.load(run / "head.pt"), torch.load(sim_run / "head.pt")
    diff = max((deployed[k] - simulated[k]).abs().max().item() for k in simulated)
    assert diff < 1e-5, diff
    assert not torch.equal(simulated["1.bias"], torch.zeros_like(simulated["1.bias"]))
