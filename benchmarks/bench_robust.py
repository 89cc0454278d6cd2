"""What each robust aggregator does against clients that send a constant head, and what it
costs without them (docs/RESULTS.md, "Untrusted clients").

    python benchmarks/bench_robust.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth [--rounds 5] [--attackers 5]

The federation is the app's default (50 IID clients, the default head and features), run in
this process: the round loop (``strategy.start``, with the reply checks of a real run) over a
grid whose nodes are client_app's own handlers. The attackers (partitions 0..attackers-1)
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def run(run_config: dict, strategy: str, attackers: int, rounds: int, clients: int, bias: float = 25.0,
        tamper=None) -> dict:
    """One federation of ``clients`` in this process; the last head's test figures.
    ``tamper(node_id, message_type, content)``, if given, alters replies instead of the
    constant-head attack (benchmarks/bench_attacks.py)."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from celeba_app import client_app
    from celeba_app import protocol as P
    from celeba_app.config import RunConfig
    from celeba_app.data import server_part
    from celeba_app.features import feature_store
    from celeba_app.internals import set_src_node_id
    from celeba_app.model import head_for
    from celeba_app.selection import BestRound
    from celeba_app.strategy import make_strategy
    from celeba_app.task import evaluate_report

    cfg = RunConfig.from_run_config({**run_config, "strategy": strategy})
    store = feature_store(cfg, "cpu")
    valid, test = server_part(cfg, "valid"), server_part(cfg, "test")
    client_app.Message = lambda content=None, reply_to=None, error=None: content  # replies need a SuperLink

    def context(nid: int) -> Context:
        return Context(run_id=1, node_id=nid, node_config={"partition-id": nid - 1, "num-partitions": clients},
                       state=RecordDict(), run_config={**run_config, "strategy": strategy})

    def ask(kind: str, nid: int, content: RecordDict) -> RecordDict:
        msg = Message(content=content, dst_node_id=nid, message_type=kind)
        return {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate}[kind](
            msg, context(nid))

    nodes = {}
    for nid in range(1, clients + 1):
        entry = P.parse_description(ask("query", nid, RecordDict({P.CONFIG: ConfigRecord()}))[P.DESCRIPTION])
        nodes[nid] = P.Expected(int(entry["partition_id"]), int(entry["num_train"]), int(entry["num_val"]),
                                tuple(cfg.sensitive_attributes))

    class Grid:
        node_ids = set(nodes)

        def get_node_ids(self):
            return sorted(self.node_ids)

        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for m in messages:
                m.metadata.__dict__["_message_id"] = m.object_id
                nid = m.metadata.dst_node_id
                content = (client_app.train if m.metadata.message_type == "train" else client_app.evaluate)(
                    m, context(nid))
                if tamper is not None:
                    tamper(nid, m.metadata.message_type, content)
                elif m.metadata.message_type == "train" and nid <= attackers:
                    state = content[P.ARRAYS].to_torch_state_dict()
                    content[P.ARRAYS] = ArrayRecord({k: torch.full_like(v, bias) if k.endswith("bias")
                                                     else torch.zeros_like(v) for k, v in state.items()})
                reply = Message(content, reply_to=m)
                set_src_node_id(reply, nid)
                out.append(reply)
            return out

    def evaluate_valid(server_round, arrays):
        head = head_for(cfg, state=arrays.to_torch_state_dict())
        return evaluate_report(head, store.for_part(valid), valid.labels, valid.attributes, "valid",
                               cfg.min_group_size, "cpu")

    t0 = time.perf_counter()
    result = make_strategy(cfg, clients).start(
        Grid(), ArrayRecord(head_for(cfg, seed=cfg.seed).state_dict()), num_rounds=rounds,
        train_config=ConfigRecord({P.LR: cfg.learning_rate}), server_evaluate=evaluate_valid,
        best=BestRound(), nodes=nodes)
    seconds = (time.perf_counter() - t0) / rounds
    head = head_for(cfg, state=result.arrays.to_torch_state_dict())
    rep = evaluate_report(head, store.for_part(test), test.labels, test.attributes, "test", cfg.min_group_size, "cpu")
    failures = [f for h in result.history[1:] for o in h["nodes"].values() for f in o["failures"]]
    return {"accuracy": rep["overall"]["accuracy"], "eo_male": rep["gaps"]["Male"]["equalized_odds_difference"],
            "seconds": seconds, "refused": sum(bool(f.get("refused")) for f in failures),
            "reasons": sorted({f["reason"] for f in failures}), "rounds": result.history[-1]["round"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "celeba-fl"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--attackers", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--attack-bias", type=float, default=25.0)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_config = {"dataset": str(Path(args.data).resolve()), "weights": str(Path(args.weights).resolve()),
                  "cache-dir": args.cache_dir, "robust-malicious-nodes": args.attackers,
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
