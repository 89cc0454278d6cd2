"""Each altered reply of the untrusted-clients issue, sent by one client of a real-data
federation: the line the server logs for it, and the final test accuracy beside the clean run's.

    python benchmarks/bench_attacks.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth [--clients 10] [--rounds 2]

The federation runs in this process as in bench_robust.py (the round loop with its reply
checks over client_app's own handlers, IID, the default head). Partition 0 (node 1) alters
every reply of one kind; the others are honest. Prints a Markdown table: attack, the
refusal reason the server recorded (the text of its ``client failed`` warning), rounds
completed, test accuracy, and the clean run's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _metrics(content, record="metrics"):
    return content[record] if record in content else content.config_records[record]


def _arrays(change):
    def tamper(content):
        from flwr.app import ArrayRecord

        state = content["arrays"].to_torch_state_dict()
        content["arrays"] = ArrayRecord(change(state))
    return tamper


def _nan(state):
    state["out.weight"][0, 0] = float("nan")
    return state


def _set(key, value):
    def tamper(content):
        _metrics(content)[key] = value
    return tamper


def _add(keys, amount, record="metrics"):
    def tamper(content):
        rec = _metrics(content, record)
        for key in keys:
            v = rec[key]
            rec[key] = [x + amount for x in v] if isinstance(v, list) else v + amount
    return tamper


def _drop(key):
    def tamper(content):
        del content["metrics"][key]
    return tamper


ATTACKS = {  # name: (message type, tamper)
    "a NaN in one head weight": ("train", _arrays(_nan)),
    "all weights Inf": ("train", _arrays(lambda s: {k: v.fill_(float("inf")) for k, v in s.items()})),
    "a head of shape (1, 10)": ("train", _arrays(lambda s: {**s, "out.weight": s["out.weight"][:, :10].clone()})),
    "a transposed head": ("train", _arrays(lambda s: {**s, "out.weight": s["out.weight"].T.contiguous()})),
    "weights x1e30": ("train", _arrays(lambda s: {k: v * 1e30 for k, v in s.items()})),
    "negative confusion counts": ("train", _set("all|tp", -5.0)),
    "one metric key missing": ("train", _drop("local_steps_loss")),
    "one group slice missing": ("train", _drop("Male=1|fp")),
    "an extra key": ("train", _set("extra", 1.0)),
    "num-examples=1e12": ("train", _set("num-examples", 1e12)),
    "num-examples=-140": ("train", _set("num-examples", -140)),
    "num-examples=-100": ("train", _set("num-examples", -100)),
    "+1e6 to Male=1 false positives and n": ("train", _add(["Male=1|fp", "Male=1|n", "all|fp", "all|n"], 1e6)),
    "+1e4 to the evaluate histograms": ("evaluate", _add(["all|hist_pos", "all|hist_neg"], 1e4)),
    "another partition id": ("train", _set("partition_id", 3)),
}


def main() -> None:
    from bench_robust import run
    from inprocess import add_data_args, data_run_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    run_config = data_run_config(args)
    clean = run(run_config, "fedavg", 0, args.rounds, args.clients)
    print(f"{args.clients} IID clients, {args.rounds} rounds; node 1 (partition 0) alters its replies. "
          f"Clean run: test accuracy {clean['accuracy']:.4f}\n")
    print("| attack | the server's line (client failed: node 1 (partition 0): ...) | rounds | test accuracy | clean |")
    print("|---|---|---|---|---|")
    for name, (kind, change) in ATTACKS.items():
        def tamper(nid, message_type, content, kind=kind, change=change):
            if nid == 1 and message_type == kind:
                change(content)
        got = run(run_config, "fedavg", 0, args.rounds, args.clients, tamper=tamper)
        reasons = "; ".join(got["reasons"]) or "(accepted)"
        print(f"| {name} | {reasons} | {got['rounds']} | {got['accuracy']:.4f} | {clean['accuracy']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
