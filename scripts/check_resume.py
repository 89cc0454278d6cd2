"""Kill a simulation in round K and resume it; compare with an uninterrupted run.

    python scripts/check_resume.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth --kill-after-round 6 [--split noniid]

Runs ``flwr run .`` (50 supernodes, 10 rounds by default) uninterrupted, then the same run
config killed (SIGTERM, then SIGKILL, to its whole process group) once the log shows round K,
then resumed with ``resume='<run-name>'``. Prints each run's wall time, the killed run's
status.json, the resumed history's rounds and the max abs difference of the final heads.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from flower_procs import BIN, Procs, overrides  # noqa: E402


def flwr_run(procs: Procs, name: str, run_config: dict, supernodes: int):
    return procs.start(name, [str(BIN / "flwr"), "run", str(ROOT), "local-simulation", "--federation-config",
                              f"options.num-supernodes={supernodes}", "--run-config", overrides(run_config)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--split", default="iid")
    parser.add_argument("--supernodes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kill-after-round", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="check-resume-"))
    cfg = {"dataset": str(Path(args.data).resolve()), "weights": str(Path(args.weights).resolve()),
           "split": args.split, "num-server-rounds": args.rounds, "results-dir": str(work / "outputs"),
           "cache-dir": str(ROOT / ".cache" / "celeba-fl")}
    print(f"# {args.supernodes} supernodes, {args.rounds} rounds, split={args.split}; outputs in {work}")
    with Procs(work / "logs") as procs:
        t0 = time.time()
        flwr_run(procs, "whole", {**cfg, "run-name": "whole"}, args.supernodes).wait()
        print(f"uninterrupted: wall {time.time() - t0:.0f}s")
        t0 = time.time()
        flwr_run(procs, "killed", {**cfg, "run-name": "killed"}, args.supernodes)
        if not procs.wait_for("killed", f"celeba-fl: round {args.kill_after_round}/{args.rounds}", 3600):
            print(procs.log("killed")[-4000:])
            return 1
        procs.stop("killed", grace=0)
        status = json.loads((work / "outputs" / "killed" / "status.json").read_text())
        print(f"killed after round {args.kill_after_round} ({time.time() - t0:.0f}s): status.json {status}")
        t0 = time.time()
        flwr_run(procs, "resumed", {**cfg, "resume": "killed"}, args.supernodes).wait()
        print(f"resumed: wall {time.time() - t0:.0f}s")
        resumed_log = procs.log("resumed")
    line = next((ln for ln in resumed_log.splitlines() if "resuming after round" in ln), "(no resume line)")
    print("resumed log:", line.split("celeba-fl: ", 1)[-1])
    run = work / "outputs" / "killed"
    history = json.loads((run / "history.json").read_text())
    print("resumed history rounds:", [h["round"] for h in history], "| status:",
          json.loads((run / "status.json").read_text())["state"])
    import torch

    a, b = torch.load(run / "head.pt"), torch.load(work / "outputs" / "whole" / "head.pt")
    print(f"max abs difference of the final heads (resumed vs uninterrupted): "
          f"{max((a[k] - b[k]).abs().max().item() for k in a):.3g}")
    for name in ("whole", "killed"):
        test = json.loads((work / "outputs" / name / "test.json").read_text())["overall"]
        print(f"{name}: test accuracy {test['accuracy']:.4f}, AUROC {test['auroc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
