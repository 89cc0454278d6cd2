"""What each robust aggregator does against clients that send a constant head, and what it
costs without them (docs/RESULTS.md, "Untrusted clients").

    python benchmarks/bench_robust.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth [--rounds 5] [--attackers 5]

The federation is the app's default (50 IID clients, the default head and features), run in
this process (inprocess.py: the round loop, with the reply checks of a real run, over
client_app's own handlers). The attackers (partitions 0..attackers-1)
answer every train message with a constant head (every weight 0, every bias ``--attack-bias``,
default 25: "smiling" for every face; the default head's nine biases then move it by about 78,
under max-update-norm=100) beside
their honest metrics, so their replies pass every check. For each
strategy, with 0 and with ``--attackers`` attackers: test accuracy and the Male
equalized-odds gap of the last head, and the rounds' mean seconds. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def run(run_config: dict, strategy: str, attackers: int, rounds: int, clients: int, bias: float = 25.0,
        tamper=None) -> dict:
    """One federation of ``clients`` in this process (inprocess.py); the last head's test figures.
    ``tamper(node_id, message_type, content)``, if given, alters replies instead of the
    constant-head attack (benchmarks/bench_attacks.py)."""
    import torch
    from flwr.app import ArrayRecord

    from celeba_app import protocol as P
    from celeba_app.strategy import make_strategy
    from inprocess import InProcessFederation

    def constant_head(nid, kind, content):
        if kind == "train" and nid <= attackers:
            state = content[P.ARRAYS].to_torch_state_dict()
            content[P.ARRAYS] = ArrayRecord({k: torch.full_like(v, bias) if k.endswith("bias")
                                             else torch.zeros_like(v) for k, v in state.items()})

    federation = InProcessFederation({**run_config, "strategy": strategy}, clients, tamper or constant_head)
    out = federation.run(make_strategy(federation.cfg, clients), rounds)
    result, rep = out["result"], out["test"]
    failures = [f for h in result.history[1:] for o in h["nodes"].values() for f in o["failures"]]
    return {"accuracy": rep["overall"]["accuracy"], "eo_male": rep["gaps"]["Male"]["equalized_odds_difference"],
            "seconds": out["seconds"], "refused": sum(bool(f.get("refused")) for f in failures),
            "reasons": sorted({f["reason"] for f in failures}), "rounds": result.history[-1]["round"]}


def main() -> None:
    from inprocess import add_data_args, data_run_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--attackers", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--attack-bias", type=float, default=25.0)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_config = {**data_run_config(args), "robust-malicious-nodes": args.attackers,
                  "multikrum-select": args.clients - 2 * args.attackers}
    print(f"{args.clients} IID clients, {args.rounds} rounds, attackers send a constant head (bias {args.attack_bias:g}) "
          f"(robust-malicious-nodes={args.attackers}, multikrum-select={args.clients - 2 * args.attackers})\n")
    print(f"| strategy | test accuracy, 0 attackers | Male EOdds gap, 0 | s/round, 0 | test accuracy, "
          f"{args.attackers} attackers | Male EOdds gap, {args.attackers} | replies refused |")
    print("|---|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        clean = run(run_config, strategy, 0, args.rounds, args.clients)
        attacked = run(run_config, strategy, args.attackers, args.rounds, args.clients, args.attack_bias)
        print(f"| {strategy} | {clean['accuracy']:.4f} | {clean['eo_male']:.3f} | {clean['seconds']:.1f} | "
              f"{attacked['accuracy']:.4f} | {attacked['eo_male']:.3f} | {attacked['refused']} |", flush=True)


if __name__ == "__main__":
    main()
