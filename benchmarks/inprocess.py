"""A federation in this process, for benchmarks and experiment scripts that run many
federations: client_app's own handlers as the nodes, the app's round loop (``strategy.start``,
with the reply checks of a real run) as the server, and no Flower engine in between (no Ray,
no SuperLink: a run costs what its clients and the server compute).

What it leaves out of a real run: Flower's serialisation, the ClientApp's mods (so DP runs
here use ``dp = "server-fixed"``, whose clipping is the server's), time-outs and process
isolation. tests/test_simulation.py checks the real engine against the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def add_data_args(parser) -> None:
    """``--data``, ``--weights`` and ``--cache-dir``: what every real-data benchmark and
    experiment script reads (the paths of ../shared on this project's machines)."""
    parser.add_argument("--data", required=True, help="a folder of CelebA parquet files, e.g. ../shared/data/celeba-10k")
    parser.add_argument("--weights", required=True, help="a mobilenet_v2 state_dict file")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "celeba-fl"))


def data_run_config(args) -> dict:
    """``add_data_args``' values as run-config keys, the paths made absolute."""
    return {"dataset": str(Path(args.data).resolve()), "weights": str(Path(args.weights).resolve()),
            "cache-dir": str(Path(args.cache_dir).resolve())}


@dataclass
class InProcessFederation:
    """``clients`` nodes (``partition-id`` 0..clients-1 of ``clients``) of ``run_config`` (a
    flat run config, as ``context.run_config``), each described once (the query message).
    ``tamper(node_id, message_type, content)`` may alter any reply before the server sees it."""

    run_config: dict
    clients: int
    tamper: Callable | None = None
    nodes: dict = field(init=False)

    def __post_init__(self) -> None:
        from flwr.app import ConfigRecord, RecordDict

        from celeba_app import client_app
        from celeba_app import protocol as P
        from celeba_app.config import RunConfig
        from celeba_app.data import server_part
        from celeba_app.features import feature_store

        self.cfg = RunConfig.from_run_config(self.run_config)
        self.store = feature_store(self.cfg, "cpu")
        self.valid, self.test = server_part(self.cfg, "valid"), server_part(self.cfg, "test")
        client_app.Message = lambda content=None, reply_to=None, error=None: content  # replies need a SuperLink
        self.partitions, self.nodes = [], {}
        for nid in range(1, self.clients + 1):
            entry = P.parse_description(self.ask("query", nid, RecordDict({P.CONFIG: ConfigRecord()}))[P.DESCRIPTION])
            entry["node_id"] = nid
            self.partitions.append(entry)
            self.nodes[nid] = P.Expected(int(entry["partition_id"]), int(entry["num_train"]), int(entry["num_val"]),
                                         tuple(self.cfg.sensitive_attributes))

    def context(self, nid: int):
        from flwr.app import Context, RecordDict

        return Context(run_id=1, node_id=nid, node_config={"partition-id": nid - 1, "num-partitions": self.clients},
                       state=RecordDict(), run_config=self.run_config)

    def ask(self, kind: str, nid: int, content):
        """Node ``nid``'s handler of ``kind`` ("query", "train", "evaluate") on ``content``: the reply's content."""
        from flwr.app import Message

        from celeba_app import client_app

        handler = {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate}[kind]
        return handler(Message(content=content, dst_node_id=nid, message_type=kind), self.context(nid))

    # ------------------------------------------------------------------ Flower's Grid
    @property
    def node_ids(self) -> set[int]:
        return set(self.nodes)

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message

        from celeba_app import client_app
        from celeba_app.internals import set_src_node_id

        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            nid = m.metadata.dst_node_id
            handler = client_app.train if m.metadata.message_type == "train" else client_app.evaluate
            content = handler(m, self.context(nid))
            if self.tamper is not None:
                self.tamper(nid, m.metadata.message_type, content)
            reply = Message(content, reply_to=m)
            set_src_node_id(reply, nid)
            out.append(reply)
        return out

    # ------------------------------------------------------------------ a run
    def run(self, strategy, rounds: int, **loop) -> dict:
        """``rounds`` rounds of ``strategy`` (strategy.make_strategy's, or a privacy.wrap of it)
        from the seeded initial head; ``loop`` goes to ``strategy.start`` (e.g. ``privacy``).
        Returns {"result": RoundsResult, "test": the last head's test report, "seconds": per round}."""
        from flwr.app import ArrayRecord, ConfigRecord

        from celeba_app import protocol as P
        from celeba_app.model import head_for
        from celeba_app.selection import BestRound

        t0 = time.perf_counter()
        result = strategy.start(self, ArrayRecord(head_for(self.cfg, seed=self.cfg.seed).state_dict()),
                                num_rounds=rounds, train_config=ConfigRecord({P.LR: self.cfg.learning_rate}),
                                server_evaluate=lambda rnd, arrays: self.report(arrays, "valid"), best=BestRound(),
                                nodes=self.nodes, **loop)
        seconds = (time.perf_counter() - t0) / rounds
        return {"result": result, "test": self.report(result.arrays, "test"), "seconds": seconds}

    def report(self, arrays, split: str) -> dict:
        """The head ``arrays`` on the server's ``valid`` or ``test`` part: task.evaluate_report's report."""
        from celeba_app.model import head_for
        from celeba_app.task import evaluate_report

        part = self.valid if split == "valid" else self.test
        head = head_for(self.cfg, state=arrays.to_torch_state_dict())
        return evaluate_report(head, self.store.for_part(part), part.labels, part.attributes, split,
                               self.cfg.min_group_size, "cpu")
