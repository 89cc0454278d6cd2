"""A slow client in simulation: does it cost only its own reply, or the others' too?

    python benchmarks/bench_slow_client.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth [--sleep 45] [--round-timeout 20]

Three SuperNodes of a real ``flwr run`` simulation, 3 rounds; partition 0 answers every train
message honestly but ``--sleep`` seconds late (tests/untrusted_app). It runs once per
``client-resources.num-cpus`` (2, 1 and 0.5: one, two and four client actors on 2 cores) and
prints, per round, which partitions were recorded as missing ``round-timeout``. Embeddings
should be cached first (any run on the same data and feature settings), or round 1 embeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
BIN = Path(sys.executable).parent


def main() -> None:
    from inprocess import add_data_args, data_run_config
    from untrusted_app import copy_app

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(ap)
    ap.add_argument("--sleep", type=float, default=45.0)
    ap.add_argument("--round-timeout", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    data = " ".join(f"{k}='{v}'" for k, v in data_run_config(args).items())
    with tempfile.TemporaryDirectory() as tmp:
        app = copy_app(Path(tmp) / "app", {0: ("train", f"sleep {args.sleep:g}")})
        rows = []
        for cpus in (2, 1, 0.5):
            name = f"num-cpus-{cpus:g}"
            rc = (f"num-server-rounds={args.rounds} {data} results-dir='{tmp}/out' run-name='{name}' "
                  f"round-timeout={args.round_timeout}")
            subprocess.run([str(BIN / "flwr"), "run", str(app), "local-simulation", "--federation-config",
                            f"options.num-supernodes=3 options.backend.client-resources.num-cpus={cpus}",
                            "--run-config", rc], capture_output=True, text=True, timeout=900)
            run = Path(tmp) / "out" / name
            status = json.loads((run / "status.json").read_text())
            history = json.loads((run / "history.json").read_text()) if (run / "history.json").exists() else []
            late = [sorted(f["partition_id"] for f in h["nodes"]["train"]["failures"]) for h in history[1:]]
            test = json.loads((run / "test.json").read_text())["overall"]["accuracy"] if (run / "test.json").exists() else None
            if status["state"] == "failed":  # the round that failed is not in history.json
                late.append([f"{status['reason'].count('no reply within round-timeout')} nodes (run failed: "
                             f"{status['reason'].split(':')[0]})"])
            rows.append((cpus, status["state"], late, test))
    print(f"partition 0 replies {args.sleep:g} s late; round-timeout={args.round_timeout:g} s; 3 SuperNodes\n")
    print("| client-resources.num-cpus | actors on 2 cores | run | partitions that missed round-timeout, per round | test accuracy |")
    print("|---|---|---|---|---|")
    for cpus, state, late, test in rows:
        rounds = "; ".join(f"r{i + 1}: {', '.join(map(str, p)) or 'none'}" for i, p in enumerate(late)) or "none recorded"
        print(f"| {cpus:g} | {int(2 / cpus)} | {state} | {rounds} | {'-' if test is None else f'{test:.4f}'} |")


if __name__ == "__main__":
    main()
