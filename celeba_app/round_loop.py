"""The federated round loop: what ``GroupMetrics.start`` runs, as the strategy of Flower's
advanced-pytorch example owns its rounds.

One place builds each round's record (history.json's entry): the nodes sampled, the replies
and each failure, the bytes each way, the learning rate, what the strategy's
``aggregate_train`` and ``aggregate_evaluate`` returned (their summed statistics, turned into
reports by ``strategy.train_records`` / ``strategy.evaluate_report``), the server's
validation report, the overfitting gap (selection.close_round) and the time. One record is
added per round; the only later change is ``evaluate-with-train``'s: round r's federated
evaluation arrives with round r+1's train replies, and this loop adds it to round r's record
then.

The loop also waits for nodes (at most ``round-timeout``), skips rounds with too few replies,
keeps the best round and stops early (selection.BestRound), and hands the caller the history
and a checkpoint after every round, before the round's log line.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Callable, Iterable, Mapping, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import Result

from . import protocol as P
from .federation import error_reason
from .internals import wire_bytes
from .metrics import fmt, unflatten
from .selection import BestRound, close_round


class RoundStrategy(Protocol):
    """What the loop asks of its strategy (strategy.GroupMetrics): Flower's Message-API
    hooks, whose ``aggregate_*`` return the measured MetricRecord, and the app's own."""

    sampling_seed: int  # seeds Python's random, with which flwr samples nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> Iterable[Message]: ...
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]: ...
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid) -> Iterable[Message]: ...
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None: ...
    def sum_held_out(self, contents: list[RecordDict]) -> MetricRecord | None: ...
    def train_records(self, measured: MetricRecord) -> dict: ...
    def evaluate_report(self, measured: MetricRecord) -> dict: ...
    def round_lr(self, server_round: int) -> float: ...
    def server_state(self) -> dict: ...
    def restore_server_state(self, state: dict) -> None: ...


class NoClientTrained(Exception):
    """Every client failed in round 1: the run ends with their errors."""


class RunFailed(Exception):
    """The run cannot go on (too many skipped rounds, too few nodes); the reason is the message.
    Not a RuntimeError: flwr-serverapp reports those as "Failed to start run" (exit code 203)."""


@dataclass
class RoundPolicy:
    """How a round treats missing nodes and failing clients (run config keys of the same names)."""

    round_timeout: float = 3600.0  # seconds a round waits for its nodes, then for their replies
    min_reply_fraction: float = 0.5  # fewer successful train replies than this share: round skipped
    max_skipped_rounds: int = 3  # this many skipped rounds in a row: the run fails
    # True: no evaluate messages until the last round; round r's train message asks each client
    # to evaluate the head it receives (round r-1's) on its held-out part first, so a round
    # costs one message per client instead of two (on the Deployment Engine, each message
    # waits for its SuperNode's next poll).
    evaluate_with_train: bool = False
    max_update_norm: float = 100.0  # a train reply whose head moved further (L2) is refused


@dataclass
class RoundsResult(Result):
    """flwr's ``Result`` of the round loop, with what the caller writes after the rounds:
    ``history`` (one entry per round, history.json's list) and ``last_evaluate_stats``
    ({slice: metrics.Stats} summed over the clients' held-out parts in the last federated
    evaluation; None if none ran)."""

    history: list[dict] = field(default_factory=list)
    last_evaluate_stats: dict | None = None


def run_rounds(strategy: RoundStrategy, grid, initial_arrays: ArrayRecord, num_rounds: int,
               train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None, *,
               server_evaluate: Callable[[int, ArrayRecord], dict], best: BestRound,
               on_round: Callable[[list[dict], dict], None] = lambda history, checkpoint: None,
               policy: RoundPolicy | None = None, resume: dict | None = None,
               nodes: Mapping[int, P.Expected] | None = None, privacy=None) -> RoundsResult:
    """Rounds ``1..num_rounds`` (or from a checkpoint's next round): train, federated
    evaluation, ``server_evaluate`` (the global head on ``valid``: a metrics report), the
    best round and early stopping (no round runs after it), then ``on_round(history,
    checkpoint)`` so the caller can write both before the next round starts, and only then
    the round's log line: a round the log announces is a round a resumed run will not redo.

    Each round records the nodes sampled, the replies and each failure (node, partition,
    error code and reason). A round with fewer successful train replies than
    ``min_reply_fraction`` of those sampled keeps the global head and is marked skipped;
    ``max_skipped_rounds`` in a row raise RunFailed, as do fewer connected nodes than
    ``min_reply_fraction`` of the federation after ``round_timeout``. If no client trains in
    round 1, NoClientTrained. Returns a ``RoundsResult`` whose ``arrays`` is the last global head.

    ``resume``: a checkpoint (``on_round``'s) with ``history``, the records of its rounds.
    ``nodes`` holds what each node described (protocol.Expected): with it, every reply is
    checked (protocol.train_reply_problem, evaluate_reply_problem) before it reaches an
    aggregate, and one that breaks a rule is refused: left out of the round and recorded as
    the node's failure, with ``refused: true`` and the rule as its reason. Without it
    (in-process use), replies are not checked.

    ``privacy``: the run's privacy.Budget when DP is on (``strategy`` is then Flower's DP
    wrapper): each round's record gets ``dp``, epsilon spent after it (every round from 1
    counts, skipped or not) and the clipping norm in force, and its log line epsilon.
    """
    loop = _Loop(strategy, grid, policy or RoundPolicy(), dict(nodes) if nodes is not None else None,
                 evaluate_config or ConfigRecord())
    train_config = train_config or ConfigRecord()
    arrays, history, skipped_in_row, first = initial_arrays, [], 0, 1
    random.seed(strategy.sampling_seed)  # flwr samples nodes with Python's random
    if resume is not None:
        arrays, history, skipped_in_row, first = _restore(strategy, resume, best)
        log(INFO, "celeba-fl: resuming after round %d of %d", first - 1, num_rounds)
    else:
        t0 = time.time()
        valid = server_evaluate(0, arrays)
        history.append({"round": 0, "seconds": time.time() - t0, "bytes_sent": 0, "server_valid": valid,
                        "gap_train_minus_valid": None})
        on_round(history, _checkpoint(strategy, 0, arrays, history, best, 0))
        _log_round(0, num_rounds, history[-1])
    for rnd in range(first, num_rounds + 1):
        t0 = time.time()
        loop.rejoin()
        _wait_for_nodes(grid, loop.policy)
        previous = history[-1] if (loop.policy.evaluate_with_train and history[-1]["round"] >= 1
                                   and not history[-1].get("skipped")) else None
        train_config[P.EVALUATE_RECEIVED] = previous is not None
        entry, arrays, skipped = loop.train_round(rnd, arrays, train_config, previous)
        skipped_in_row = skipped_in_row + 1 if skipped else 0
        if skipped and skipped_in_row > loop.policy.max_skipped_rounds:
            sampled = entry["nodes"]["train"]
            raise RunFailed(f"{skipped_in_row} rounds in a row skipped (max-skipped-rounds="
                            f"{loop.policy.max_skipped_rounds}); last: {sampled['succeeded']} of "
                            f"{len(sampled['sampled'])} sampled clients replied")
        entry["server_valid"] = server_evaluate(rnd, arrays)
        stop = close_round(entry, best, arrays.to_torch_state_dict())
        if privacy is not None:
            entry["dp"] = privacy.record(rnd, strategy)
        entry["seconds"] = time.time() - t0
        history.append(entry)
        # Written before it is announced: a run killed right after its "round N" line
        # resumes after round N, not N-1.
        on_round(history, _checkpoint(strategy, rnd, arrays, history, best, skipped_in_row))
        _log_round(rnd, num_rounds, entry)
        if stop:
            log(INFO, "celeba-fl: early stopping after round %d: no better validation %s for %d "
                "rounds (best: round %d)", rnd, best.metric, best.patience, best.round)
            break
    last = history[-1]
    if loop.policy.evaluate_with_train and last["round"] >= 1 and not last.get("skipped") \
            and "federated_evaluate" not in last:
        # the last head was not sent for training: evaluate it with evaluate messages
        loop.evaluate(last["round"], arrays, last)
        fe = (last.get("federated_evaluate") or {}).get("overall") or {}
        log(INFO, "celeba-fl: round %d's head on the clients' held-out parts (evaluate messages) | fed-eval "
            "loss %s acc %s", last["round"], fmt(fe.get("loss")), fmt(fe.get("accuracy")))
        on_round(history, _checkpoint(strategy, last["round"], arrays, history, best, skipped_in_row))
    return RoundsResult(arrays=arrays, history=history, last_evaluate_stats=loop.last_evaluate_stats)


@dataclass
class _Loop:
    """What every round of one run shares: the strategy, the grid, the policy, which
    partition each node holds, the evaluate config, and the last federated evaluation's sums."""

    strategy: RoundStrategy
    grid: object
    policy: RoundPolicy
    nodes: dict[int, P.Expected] | None
    evaluate_config: ConfigRecord
    last_evaluate_stats: dict | None = None

    def rejoin(self) -> None:
        """A grid that can take back restarted nodes (federation.FederationGrid.rejoin): each
        one's expected replies move to its new node id."""
        rejoin = getattr(self.grid, "rejoin", None)
        for old, new in (rejoin() if rejoin else {}).items():
            if self.nodes is not None and old in self.nodes:
                self.nodes[new] = self.nodes.pop(old)

    def partition(self, node_id: int) -> int | None:
        expected = (self.nodes or {}).get(node_id)
        return expected.partition_id if expected else None

    def screen(self, replies: list[Message], problem_of: Callable[[RecordDict, P.Expected], str | None]
               ) -> tuple[list[Message], dict[int, str]]:
        """(the replies that break no rule, {node id: the rule the others broke}); errors
        pass through, as failures of their own."""
        if self.nodes is None:
            return replies, {}
        kept, refused = [], {}
        for m in replies:
            nid = m.metadata.src_node_id
            if not m.has_error():
                problem = "this node did not describe itself" if nid not in self.nodes \
                    else problem_of(m.content, self.nodes[nid])
                if problem is not None:
                    refused[nid] = problem
                    continue
            kept.append(m)
        return kept, refused

    def train_round(self, rnd: int, arrays: ArrayRecord, train_config: ConfigRecord,
                    previous: dict | None) -> tuple[dict, ArrayRecord, bool]:
        """Round ``rnd``'s train messages, their aggregate and (unless evaluate-with-train)
        the federated evaluation: (the round's record so far, the new global head, skipped)."""
        entry: dict = {"round": rnd}
        train_msgs = list(self.strategy.configure_train(rnd, arrays, train_config, self.grid))
        replies = list(self.grid.send_and_receive(train_msgs, timeout=self.policy.round_timeout))
        entry["message_bytes"] = {"train": message_bytes(train_msgs, replies)}
        replies, refused = self.screen(replies, lambda content, expected: P.train_reply_problem(
            content, arrays, expected, self.policy.max_update_norm, train_config))
        entry["nodes"] = {"train": self.outcome(train_msgs, replies, refused)}
        ok = [m for m in replies if not m.has_error()]
        if previous is not None:
            self.evaluate_previous(previous, ok, entry["nodes"]["train"])
        if rnd == 1 and not ok:
            # Nothing will train in later rounds either (e.g. every node misses its data):
            # stop with the clients' own errors instead of running empty rounds.
            errors = [f"node {f['node_id']}: {f['reason']}" for f in entry["nodes"]["train"]["failures"]]
            reason = "; ".join(errors[:3]) or "no client was sampled"
            log(ERROR, "celeba-fl: no client could train in round 1 (%d sampled): %s", len(train_msgs), reason)
            raise NoClientTrained(f"no client could train in round 1: {reason}")
        skipped = not train_msgs or len(ok) < math.ceil(self.policy.min_reply_fraction * len(train_msgs))
        head_bytes = sum(a.numpy().nbytes for a in arrays.values())
        measured: dict = {"lr": self.strategy.round_lr(rnd), "head_bytes": head_bytes}
        if skipped:
            entry["skipped"] = True
            log(WARNING, "celeba-fl: round %d skipped: %d of %d sampled clients replied (min-reply-fraction"
                "=%g); the global head is unchanged", rnd, len(ok), len(train_msgs), self.policy.min_reply_fraction)
        else:
            new_arrays, metrics = self.strategy.aggregate_train(rnd, replies)
            arrays = new_arrays if new_arrays is not None else arrays
            if metrics is not None:
                measured.update(self.strategy.train_records(metrics))
            if not self.policy.evaluate_with_train:
                self.evaluate(rnd, arrays, entry, measured)
        entry["bytes_sent"] = head_bytes * len(train_msgs)
        entry.update(measured)
        return entry, arrays, skipped

    def evaluate(self, rnd: int, arrays: ArrayRecord, entry: dict, into: dict | None = None) -> None:
        """Round ``rnd``'s federated evaluation by evaluate messages: the nodes' outcome in
        ``entry``, the report (``federated_evaluate``) in ``into`` (default ``entry``)."""
        eval_msgs = list(self.strategy.configure_evaluate(rnd, arrays, self.evaluate_config, self.grid))
        eval_replies = list(self.grid.send_and_receive(eval_msgs, timeout=self.policy.round_timeout))
        entry["message_bytes"]["evaluate"] = message_bytes(eval_msgs, eval_replies)
        eval_replies, refused = self.screen(eval_replies, P.evaluate_reply_problem)
        entry["nodes"]["evaluate"] = self.outcome(eval_msgs, eval_replies, refused)
        self.record_evaluation(self.strategy.aggregate_evaluate(rnd, eval_replies), entry if into is None else into)

    def evaluate_previous(self, previous: dict, ok: list[Message], train_outcome: dict) -> None:
        """``evaluate-with-train``: the previous round's federated evaluation, from the
        ``HELD_OUT`` records of this round's successful train replies (the received head is
        the previous round's), added to that round's record."""
        contents = [RecordDict({P.METRICS: MetricRecord(dict(m.content.config_records[P.HELD_OUT]))})
                    for m in sorted(ok, key=P.partition_order) if P.HELD_OUT in m.content.config_records]
        previous["nodes"]["evaluate"] = {**train_outcome, "succeeded": len(contents), "with_train": True}
        if self.record_evaluation(self.strategy.sum_held_out(contents), previous):
            fe = previous["federated_evaluate"]["overall"]
            log(INFO, "celeba-fl: round %d's head on the clients' held-out parts (evaluated with the next train "
                "messages) | fed-eval loss %s acc %s", previous["round"], fmt(fe.get("loss")), fmt(fe.get("accuracy")))

    def record_evaluation(self, metrics: MetricRecord | None, into: dict) -> bool:
        """An aggregate of held-out statistics as ``into["federated_evaluate"]``, kept as the
        last evaluation's sums (what federated post-processing fits on); False if None."""
        if metrics is None:
            return False
        into["federated_evaluate"] = self.strategy.evaluate_report(metrics)
        self.last_evaluate_stats = unflatten(metrics)
        return True

    def outcome(self, sent: list[Message], replies: list[Message], refused: dict[int, str]) -> dict:
        """What a phase of a round got: nodes sampled, replies (refused ones included), and
        each failure with its reason: an error reply, a refused reply, or none in time."""
        failures = []
        for m in replies:
            if m.has_error():
                nid = m.metadata.src_node_id
                failures.append({"node_id": nid, "partition_id": self.partition(nid), "code": int(m.error.code),
                                 "reason": error_reason(m)})
        for nid, problem in refused.items():
            failures.append({"node_id": nid, "partition_id": self.partition(nid), "code": None,
                             "reason": f"reply refused: {problem}", "refused": True})
        answered = {m.metadata.src_node_id for m in replies} | set(refused)  # one message per node and phase
        for m in sent:
            if m.metadata.dst_node_id not in answered:
                nid = m.metadata.dst_node_id
                failures.append({"node_id": nid, "partition_id": self.partition(nid), "code": None,
                                 "reason": f"no reply within round-timeout={self.policy.round_timeout:g}s"})
        failures.sort(key=lambda f: f["node_id"])  # flwr samples in random order
        for f in failures:
            log(WARNING, "celeba-fl: client failed: node %s (partition %s): %s", f["node_id"], f["partition_id"],
                f["reason"])
        return {"sampled": sorted(m.metadata.dst_node_id for m in sent), "replies": len(replies) + len(refused),
                "succeeded": sum(not m.has_error() for m in replies), "failures": failures}


def message_bytes(sent: list[Message], replies: list[Message]) -> dict:
    """Mean serialized size in bytes of one message each way: {"to_client", "to_server"}
    (the content as Flower's protobuf encodes it; None when there was none)."""
    def mean(messages):
        sizes = [wire_bytes(m.content) for m in messages if not m.has_error()]
        return round(sum(sizes) / len(sizes)) if sizes else None

    return {"to_client": mean(sent), "to_server": mean(replies)}


def _wait_for_nodes(grid, policy: RoundPolicy) -> None:
    """Go on at once with the federation's connected nodes if they are enough (at least
    ``min_reply_fraction`` of them, and one); else wait for more, at most ``round_timeout``,
    then RunFailed. flwr's own node sampling would wait for ever."""
    expected = len(getattr(grid, "node_ids", ())) or 1
    required = max(1, math.ceil(policy.min_reply_fraction * expected))
    deadline = time.monotonic() + policy.round_timeout
    while (connected := len(list(grid.get_node_ids()))) < required:
        if time.monotonic() >= deadline:
            raise RunFailed(f"{connected} of {expected} SuperNodes connected after round-timeout="
                            f"{policy.round_timeout:g}s, {required} required (min-reply-fraction="
                            f"{policy.min_reply_fraction:g})")
        time.sleep(0.5)
    if connected < expected:
        log(WARNING, "celeba-fl: %d of %d SuperNodes connected; this round goes on with them", connected, expected)


def _log_round(rnd: int, total: int, entry: dict) -> None:
    tr = entry.get("train") or {}
    fe = entry.get("federated_evaluate") or {}
    va = entry["server_valid"]["overall"]
    nodes = entry.get("nodes", {}).get("train")
    replied = f" | {nodes['succeeded']}/{len(nodes['sampled'])} clients" if nodes else ""
    if "dp" in entry:
        replied += f" | epsilon {entry['dp']['epsilon']:.3g} (delta {entry['dp']['delta']:.2g})"
    log(INFO, "celeba-fl: round %d/%d | train loss %s acc %s | fed-eval loss %s acc %s | "
        "valid loss %s acc %s AUROC %s%s%s | %.1fs", rnd, total,
        fmt((tr.get("overall") or {}).get("loss")), fmt((tr.get("overall") or {}).get("accuracy")),
        fmt((fe.get("overall") or {}).get("loss")), fmt((fe.get("overall") or {}).get("accuracy")),
        fmt(va["loss"]), fmt(va["accuracy"]), fmt(va["auroc"]), replied,
        " | SKIPPED" if entry.get("skipped") else "", entry.get("seconds") or 0.0)


# ---------------------------------------------------------------------- the checkpoint
def _checkpoint(strategy: RoundStrategy, rnd: int, arrays: ArrayRecord, history: list[dict], best: BestRound,
                skipped_in_row: int) -> dict:
    """What a resumed run needs after round ``rnd``, beside the history (which the caller
    keeps, results.HistoryLog): the head, the strategy's server state, the best round, the
    skip count and Python's ``random`` state (flwr samples nodes with it); tensors and plain
    values only (``torch.load(weights_only=True)``). Its size does not grow with the rounds."""
    version, internal, gauss = random.getstate()
    return {"round": rnd, "arrays": arrays.to_torch_state_dict(), "server_state": strategy.server_state(),
            "best": {"round": best.round, "value": best.value, "state": best.state, "since_best": best.since_best},
            "skipped_in_row": skipped_in_row, "random_state": [version, list(internal), gauss]}


def _restore(strategy: RoundStrategy, ckpt: dict, best: BestRound) -> tuple[ArrayRecord, list[dict], int, int]:
    """``_checkpoint``'s inverse, with ``ckpt["history"]`` (the records of rounds 0..round, as
    results.read_history gives them): (head, history, skipped in a row, first round to run)."""
    strategy.restore_server_state(ckpt["server_state"])
    b = ckpt["best"]
    best.round, best.value, best.state, best.since_best = b["round"], b["value"], b["state"], b["since_best"]
    version, internal, gauss = ckpt["random_state"]
    random.setstate((version, tuple(internal), gauss))
    history = [h for h in ckpt["history"] if h["round"] <= int(ckpt["round"])]
    return ArrayRecord(ckpt["arrays"]), history, int(ckpt["skipped_in_row"]), int(ckpt["round"]) + 1
