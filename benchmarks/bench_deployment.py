"""Deployment Engine benchmark: a SuperLink and N SuperNodes on loopback, against a simulation.

    python benchmarks/bench_deployment.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth --nodes 3 --rounds 10

Cuts the dataset into N ``data-path`` folders with celeba-partition, starts ``flower-superlink``
and N ``flower-supernode`` processes (free loopback ports, each node with its own cache dir),
runs ``flwr run . local-deployment --stream`` (round 1 embeds every node's images; the
Deployment Engine starts one ClientApp process per message, so later rounds show what one
message costs once the embeddings are on the node's disk), then the same run config as a
simulation over the same partitions of the whole dataset. Prints wall times, per-round
times and the max abs difference between the two final heads. Every process it starts is
ended by process group, also on failure. ``--kill-node-after-round K`` ends the last SuperNode
once round K is logged and prints how long the run took to finish and what report.md says.
On flwr 1.42 the same (``celeba-flwr``; SuperNodes in their default subprocess isolation; not
``--long-running-clientapp`` or ``--kill-node-after-round``).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from flower_procs import (BIN, ON_1_42, Ports, Procs, flwr_env, flwr_run_command, flwr_run_deployment,  # noqa: E402
                          overrides, project_copy, start_superlink, start_supernode)


def rounds_line(run: Path) -> str:
    history = json.loads((run / "history.json").read_text())
    secs = {h["round"]: h["seconds"] for h in history}
    later = [secs[r] for r in secs if r >= 2]
    return (f"round 0 (server valid) {secs.get(0, 0):.1f}s | round 1 {secs.get(1, 0):.1f}s | rounds 2-{max(secs)} "
            f"mean {sum(later) / max(1, len(later)):.1f}s, max {max(later, default=0):.1f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--split", default="noniid")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--kill-node-after-round", type=int, default=0,
                        help="end the last SuperNode once this round is logged (0: never)")
    parser.add_argument("--round-timeout", type=float, default=3600.0)
    parser.add_argument("--evaluate-with-train", action="store_true",
                        help="run config evaluate-with-train=true (one message per client per round)")
    parser.add_argument("--long-running-clientapp", action="store_true",
                        help="SuperNodes in --isolation process, each served by one celeba-clientapp process")
    args = parser.parse_args()
    if ON_1_42 and (args.long_running_clientapp or args.kill_node_after_round):
        parser.error("--long-running-clientapp and --kill-node-after-round: accepted on flwr 1.25 only")
    # SIGTERM (timeout, kill) ends the processes started below too: Procs' with-block runs on SystemExit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data, weights = Path(args.data).resolve(), Path(args.weights).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    common = {"split": args.split, "weights": str(weights), "num-server-rounds": args.rounds,
              "evaluate-with-train": args.evaluate_with_train}
    subprocess.run([str(BIN / "celeba-partition"), "--run-config", f"dataset='{data}' split='{args.split}'",
                    "--num-partitions", str(args.nodes), "--out", str(work / "parts")], cwd=ROOT, check=True,
                   capture_output=True)
    mode = "one celeba-clientapp process per node" if args.long_running_clientapp else "one ClientApp process per message"
    print(f"# {args.nodes} SuperNodes ({mode}), {args.rounds} rounds, split={args.split}, "
          f"evaluate-with-train={str(args.evaluate_with_train).lower()}, data {data}; "
          f"work folder {work}")
    with Procs(work / "logs") as procs:
        ports = Ports()
        start_superlink(procs, ports, workdir=work)
        for i in range(args.nodes):
            start_supernode(procs, ports, f"supernode-{i}", workdir=work, node_config={
                "data-path": str(work / "parts" / f"partition_{i}"), "cache-dir": str(work / f"node-{i}-cache")},
                long_running=args.long_running_clientapp)
        t0 = time.time()
        run_config = {**common, "dataset": str(work / "parts" / "server"), "results-dir": str(work / "outputs"),
                      "run-name": "deployed", "cache-dir": str(work / "server-cache"), "min-nodes": args.nodes,
                      "round-timeout": args.round_timeout}
        if args.kill_node_after_round:
            procs.start("flwr-run", flwr_run_command(run_config, "local-deployment", control_port=ports.control))
            procs.wait_for("flwr-run", f"celeba-fl: round {args.kill_node_after_round}/", 3600)
            t_kill = time.time()
            procs.stop(f"supernode-{args.nodes - 1}")
            procs.procs["flwr-run"].wait(timeout=3600)
            print(f"supernode-{args.nodes - 1} ended after round {args.kill_node_after_round}; "
                  f"the run finished {time.time() - t_kill:.0f}s later")
        else:
            flwr_run_deployment(procs, ports, run_config, timeout=3600)
        wall = time.time() - t0
        run = work / "outputs" / "deployed"
        if not (run / "test.json").exists():
            print(procs.logs()[-6000:])
            return 1
    test = json.loads((run / "test.json").read_text())["overall"]
    print(f"deployment  wall {wall:.0f}s | {rounds_line(run)} | test acc {test['accuracy']:.4f}")
    if args.kill_node_after_round:
        report = (run / "report.md").read_text()
        start = report.find("## Client failures")
        print(report[start:report.find("\n## ", start + 5)] if start >= 0 else "(report.md: no client failures)")
        print("status.json:", json.loads((run / "status.json").read_text()))
    if args.skip_simulation:
        return 0
    t0 = time.time()
    sim_config = overrides({**common, "dataset": str(data), "results-dir": str(work / "sim"),
                            "run-name": "simulated", "cache-dir": str(work / "sim-cache")})
    if ON_1_42:  # celeba-flwr in a project copy, with its own FLWR_HOME and local SuperLink, ended after
        project = project_copy(work / "sim-project")
        env = flwr_env(project)
        sim = subprocess.run([str(BIN / "celeba-flwr"), "run", ".", "local-simulation", "--stream",
                              "--federation-config", f"num-supernodes={args.nodes} client-resources-num-cpus=2",
                              "--run-config", sim_config], cwd=project, env=env, capture_output=True, text=True)
        subprocess.run([str(BIN / "celeba-flwr"), "stop-superlink"], cwd=project, env=env, capture_output=True)
    else:
        sim = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "local-simulation", "--federation-config",
                              f"options.num-supernodes={args.nodes}", "--run-config", sim_config],
                             cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    sim_run = work / "sim" / "simulated"
    if not (sim_run / "head.pt").exists():
        print((sim.stdout + sim.stderr)[-6000:])
        return 1
    import torch

    test = json.loads((sim_run / "test.json").read_text())["overall"]
    print(f"simulation  wall {wall:.0f}s | {rounds_line(sim_run)} | test acc {test['accuracy']:.4f}")
    a, b = torch.load(run / "head.pt"), torch.load(sim_run / "head.pt")
    print(f"max abs difference of the final heads: {max((a[k] - b[k]).abs().max().item() for k in a):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
