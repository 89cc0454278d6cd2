"""FedAvg that aggregates metrics from sufficient statistics and keeps a per-round history.

The arrays are averaged exactly as flwr's FedAvg does (weighted by ``num-examples``). The
metrics are not: clients send confusion counts and score histograms per slice (metrics.py),
which this strategy sums before deriving accuracy, F1, AUROC, group metrics and gaps; a
weighted mean of per-client ratios would not be the global value. It also records each
client's own accuracy, whose spread is the client-level fairness view.

What flwr logs as the "Aggregated MetricRecord" is a compact headline; the full reports land
in ``self.history`` (round -> {"train": ..., "federated_evaluate": ...}).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, QFedAvg, Result

from .federation import error_reason
from . import protocol as P
from .internals import wire_bytes
from .results import json_safe
from .metrics import ALL, MIN_GROUP_SIZE, client_distribution, fmt, metrics_report, sum_stats, unflatten
from .selection import BestRound

HEADLINE = ("loss", "accuracy", "balanced_accuracy", "f1", "auroc")


class NoClientTrained(Exception):
    """Every client failed in round 1: the run ends with their errors."""


def headline(rep: dict) -> MetricRecord:
    """The few numbers worth a log line, from a metrics.metrics_report()."""
    return MetricRecord({k: float(v) for k, v in rep["overall"].items() if k in HEADLINE and v is not None})


def aggregate_reports(contents: list[RecordDict], where: str, min_group_size: int = MIN_GROUP_SIZE) -> dict:
    """Sum the clients' slice statistics; report globally and per client."""
    per_client = []
    extra: dict[str, float] = {}
    for content in contents:
        metrics = P.reply_metrics(content)
        stats = unflatten(metrics)
        per_client.append(stats)
        for key, value in metrics.items():
            if "|" not in key and not isinstance(value, list) and key not in P.NOT_SUMMED:
                extra[key] = extra.get(key, 0.0) + float(value) * float(metrics[P.NUM_EXAMPLES])
    total = sum(float(P.reply_metrics(c)[P.NUM_EXAMPLES]) for c in contents)
    rep = metrics_report(sum_stats(per_client), where=where, min_group_size=min_group_size)
    rep["num_clients"] = len(contents)
    # Example-weighted means of the clients' scalar extras (e.g. the running training loss).
    rep["client_means"] = {k: v / total for k, v in extra.items()} if total else {}
    pids = [int(P.reply_metrics(c).get(P.PARTITION_ID, -1)) for c in contents]
    acc = {pid: (s[ALL].tp + s[ALL].tn) / s[ALL].n for pid, s in zip(pids, per_client) if s[ALL].n}
    sizes = {pid: s[ALL].n for pid, s in zip(pids, per_client) if s[ALL].n}
    rep["clients"] = {
        "accuracy": client_distribution(list(acc.values())),
        "num_examples": client_distribution([s[ALL].n for s in per_client]),
        "accuracy_by_partition": {str(pid): acc[pid] for pid in sorted(acc)},
        "num_examples_by_partition": {str(pid): int(sizes[pid]) for pid in sorted(acc)},
    }
    return rep


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


@dataclass
class RoundsResult(Result):
    """flwr's ``Result`` of ``GroupMetrics.start``, with what the caller writes after the
    rounds: ``history`` (one entry per round, history.json's list) and
    ``last_evaluate_stats`` ({slice: metrics.Stats} summed over the clients' held-out parts
    in the last federated evaluation; None if none ran)."""

    history: list[dict] = field(default_factory=list)
    last_evaluate_stats: dict | None = None


class RunFailed(Exception):
    """The run cannot go on (too many skipped rounds, too few nodes); the reason is the message.
    Not a RuntimeError: flwr-serverapp reports those as "Failed to start run" (exit code 203)."""


class GroupMetrics:
    """Mixin for any flwr Message-API strategy: metrics per demographic group from summed
    statistics, a per-round history, bytes sent, the per-round learning rate
    (``lr * lr_decay^(round-1)``), and the round loop. It measures groups; it does not change
    how the strategy aggregates (``FairFed`` below is the fairness algorithm).

    The strategy's own ``aggregate_train`` still aggregates the arrays (FedAvg's weighted mean,
    FedAvgM's momentum, FedAdam's server optimiser, q-FedAvg's reweighting), so the group
    metrics work whichever strategy runs.

    ``start`` owns the round loop, as the strategy of Flower's advanced-pytorch example does:
    one place for the history, timing, failures, the best round, early stopping and the
    per-round writes that make a killed run resumable.
    """

    def __init__(self, *args, learning_rate: float = 1e-3, lr_decay: float = 1.0, sampling_seed: int = 0,
                 **kwargs) -> None:
        # Metrics are summed in aggregate_*; skip FedAvg's weighted mean of every key.
        kwargs.setdefault("train_metrics_aggr_fn", lambda records, key: MetricRecord())
        kwargs.setdefault("evaluate_metrics_aggr_fn", lambda records, key: MetricRecord())
        super().__init__(*args, **kwargs)
        self.learning_rate = learning_rate
        self.lr_decay = lr_decay
        self.history: dict[int, dict] = {}
        self.bytes_sent: dict[int, int] = {}
        self.min_group_size = MIN_GROUP_SIZE  # make_strategy sets the run config's
        self.last_evaluate_stats = None  # summed clients' held-out Stats of the last evaluate round
        self.stopped_after: int | None = None
        self.sampling_seed = sampling_seed

    # ------------------------------------------------------------------ the round loop
    def start(self, grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              *, server_evaluate: Callable[[int, ArrayRecord], dict],
              best: BestRound, on_round: Callable[[list[dict], dict], None] = lambda history, checkpoint: None,
              policy: RoundPolicy | None = None, resume: dict | None = None,
              node_partitions: Mapping[int, int] | None = None) -> RoundsResult:
        """Rounds ``1..num_rounds`` (or from a checkpoint's next round): train, federated
        evaluation, ``server_evaluate`` (the global head on ``valid``: a metrics report), the
        best round and early stopping (no round runs after it), then ``on_round(history,
        checkpoint)`` so the caller can write both before the next round starts, and only then
        the round's log line: a round the log announces is a round a resumed run will not redo.

        Each round records the nodes sampled, the replies and each failure (node, partition,
        error code and reason). A round with fewer successful train replies than
        ``min_reply_fraction`` of those sampled keeps the global head and is marked skipped;
        ``max_skipped_rounds`` in a row raise RunFailed, as do fewer connected nodes than
        ``min_reply_fraction`` of the federation after ``round_timeout``. If no client trains in round 1, NoClientTrained.
        Returns a ``RoundsResult``: flwr's ``Result`` whose ``arrays`` is the last global head,
        with the run's ``history`` (history.json's list) and the clients' summed held-out
        statistics of the last federated evaluation (``last_evaluate_stats``).
        """
        policy = policy or RoundPolicy(round_timeout=timeout)
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        partitions = dict(node_partitions or {})
        arrays, history, skipped_in_row, first = initial_arrays, [], 0, 1
        random.seed(self.sampling_seed)  # flwr samples nodes with Python's random
        if resume is not None:
            arrays, history, skipped_in_row, first = self._restore(resume, best)
            log(INFO, "celeba-fl: resuming after round %d of %d", first - 1, num_rounds)
        else:
            t0 = time.time()
            valid = server_evaluate(0, arrays)
            history.append({"round": 0, "seconds": time.time() - t0, "bytes_sent": 0, "server_valid": valid,
                            "gap_train_minus_valid": None})
            on_round(history, self._checkpoint(0, arrays, history, best, 0))
            _log_round(0, num_rounds, history[-1])
        for rnd in range(first, num_rounds + 1):
            t0 = time.time()
            _wait_for_nodes(grid, policy)
            entry: dict = {"round": rnd}
            previous = history[-1] if (policy.evaluate_with_train and history[-1]["round"] >= 1
                                       and not history[-1].get("skipped")) else None
            train_config[P.EVALUATE_RECEIVED] = previous is not None
            train_msgs = list(self.configure_train(rnd, arrays, train_config, grid))
            replies = list(grid.send_and_receive(train_msgs, timeout=policy.round_timeout))
            entry["nodes"] = {"train": _outcome(train_msgs, replies, partitions, policy.round_timeout)}
            entry["message_bytes"] = {"train": message_bytes(train_msgs, replies)}
            ok = [m for m in replies if not m.has_error()]
            if previous is not None:
                self._evaluate_previous(previous, ok, entry["nodes"]["train"])
            if rnd == 1 and not ok:
                # Nothing will train in later rounds either (e.g. every node misses its data):
                # stop with the clients' own errors instead of running empty rounds.
                errors = [f"node {f['node_id']}: {f['reason']}" for f in entry["nodes"]["train"]["failures"]]
                reason = "; ".join(errors[:3]) or "no client was sampled"
                log(ERROR, "celeba-fl: no client could train in round 1 (%d sampled): %s", len(train_msgs), reason)
                raise NoClientTrained(f"no client could train in round 1: {reason}")
            if not train_msgs or len(ok) < math.ceil(policy.min_reply_fraction * len(train_msgs)):
                skipped_in_row += 1
                entry["skipped"] = True
                log(WARNING, "celeba-fl: round %d skipped: %d of %d sampled clients replied (min-reply-fraction"
                    "=%g); the global head is unchanged", rnd, len(ok), len(train_msgs), policy.min_reply_fraction)
                if skipped_in_row > policy.max_skipped_rounds:
                    raise RunFailed(f"{skipped_in_row} rounds in a row skipped (max-skipped-rounds="
                                    f"{policy.max_skipped_rounds}); last: {len(ok)} of {len(train_msgs)} "
                                    "sampled clients replied")
            else:
                skipped_in_row = 0
                new_arrays, _ = self.aggregate_train(rnd, replies)
                arrays = new_arrays if new_arrays is not None else arrays
                if not policy.evaluate_with_train:
                    self._evaluate(rnd, arrays, evaluate_config, grid, entry, partitions, policy)
            entry["bytes_sent"] = self.bytes_sent.get(rnd, 0)
            entry.update(self.history.get(rnd, {}))
            entry["server_valid"] = server_evaluate(rnd, arrays)
            entry["gap_train_minus_valid"] = _gaps(entry)
            best.update(rnd, entry["server_valid"], {k: v.clone() for k, v in arrays.to_torch_state_dict().items()})
            entry["seconds"] = time.time() - t0
            history.append(entry)
            stop = best.should_stop
            if stop:
                self.stopped_after = rnd
                entry["early_stopped"] = True
            # Written before it is announced: a run killed right after its "round N" line
            # resumes after round N, not N-1.
            on_round(history, self._checkpoint(rnd, arrays, history, best, skipped_in_row))
            _log_round(rnd, num_rounds, entry)
            if stop:
                log(INFO, "celeba-fl: early stopping after round %d: no better validation %s for %d "
                    "rounds (best: round %d)", rnd, best.metric, best.patience, best.round)
                break
        last = history[-1]
        if policy.evaluate_with_train and last["round"] >= 1 and not last.get("skipped") \
                and "federated_evaluate" not in last:
            # the last head was not sent for training: evaluate it with evaluate messages
            self._evaluate(last["round"], arrays, evaluate_config, grid, last, partitions, policy)
            last.update(self.history.get(last["round"], {}))
            fe = (last.get("federated_evaluate") or {}).get("overall") or {}
            log(INFO, "celeba-fl: round %d's head on the clients' held-out parts (evaluate messages) | fed-eval "
                "loss %s acc %s", last["round"], fmt(fe.get("loss")), fmt(fe.get("accuracy")))
            on_round(history, self._checkpoint(last["round"], arrays, history, best, skipped_in_row))
        return RoundsResult(arrays=arrays, history=history, last_evaluate_stats=self.last_evaluate_stats)

    def _evaluate(self, rnd: int, arrays: ArrayRecord, evaluate_config: ConfigRecord, grid, entry: dict,
                  partitions: Mapping[int, int], policy: RoundPolicy) -> None:
        """Round ``rnd``'s federated evaluation by evaluate messages, recorded in ``entry``."""
        eval_msgs = list(self.configure_evaluate(rnd, arrays, evaluate_config, grid))
        eval_replies = list(grid.send_and_receive(eval_msgs, timeout=policy.round_timeout))
        entry["nodes"]["evaluate"] = _outcome(eval_msgs, eval_replies, partitions, policy.round_timeout)
        entry["message_bytes"]["evaluate"] = message_bytes(eval_msgs, eval_replies)
        self.aggregate_evaluate(rnd, eval_replies)

    def _evaluate_previous(self, previous: dict, ok: list[Message], train_outcome: dict) -> None:
        """``evaluate-with-train``: the previous round's federated evaluation, from the
        ``evaluate_received`` records of this round's successful train replies (the received
        head is the previous round's), written into that round's history entry."""
        contents = [RecordDict({P.METRICS: MetricRecord(dict(m.content.config_records[P.HELD_OUT]))})
                    for m in sorted(ok, key=_partition_order) if P.HELD_OUT in m.content.config_records]
        previous["nodes"]["evaluate"] = {**train_outcome, "succeeded": len(contents), "with_train": True}
        rep = self._aggregate_evaluate_contents(previous["round"], contents)
        if rep is not None:
            previous["federated_evaluate"] = fe = self.history[previous["round"]]["federated_evaluate"]
            log(INFO, "celeba-fl: round %d's head on the clients' held-out parts (evaluated with the next train "
                "messages) | fed-eval loss %s acc %s", previous["round"], fmt(fe["overall"].get("loss")),
                fmt(fe["overall"].get("accuracy")))

    # Server-side state of flwr's strategies that a resumed run needs (FedAvgM's momentum,
    # FedAdam's moments, the arrays they step from).
    SERVER_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t", "fairfed_weights")

    def _checkpoint(self, rnd: int, arrays: ArrayRecord, history: list[dict], best: BestRound,
                    skipped_in_row: int) -> dict:
        state = {k: _to_tensors(getattr(self, k)) for k in self.SERVER_STATE if getattr(self, k, None) is not None}
        return {"round": rnd, "arrays": arrays.to_torch_state_dict(), "server_state": state,
                "best": {"round": best.round, "value": best.value, "state": best.state,
                         "since_best": best.since_best},
                "skipped_in_row": skipped_in_row, "random_state": _random_state(),
                "history_json": json.dumps(json_safe(history))}

    def _restore(self, ckpt: dict, best: BestRound) -> tuple[ArrayRecord, list[dict], int, int]:
        for key, value in ckpt["server_state"].items():
            setattr(self, key, _from_tensors(value, key))
        b = ckpt["best"]
        best.round, best.value, best.state, best.since_best = b["round"], b["value"], b["state"], b["since_best"]
        random.setstate(_random_state_from(ckpt["random_state"]))
        return (ArrayRecord(ckpt["arrays"]), json.loads(ckpt["history_json"]), int(ckpt["skipped_in_row"]),
                int(ckpt["round"]) + 1)

    def configure_train(self, server_round, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        """The base strategy's train messages, with this round's learning rate
        (learning-rate x lr-decay^(round-1)) in their config; records the bytes sent."""
        config[P.LR] = self.learning_rate * self.lr_decay ** (server_round - 1)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        head_bytes = sum(a.numpy().nbytes for a in arrays.values())
        self.bytes_sent[server_round] = head_bytes * len(messages)
        self.history.setdefault(server_round, {}).update(lr=config[P.LR], head_bytes=head_bytes)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """The base strategy's aggregate of the replies sorted by partition id, and the
        clients' summed training statistics as a report in the history; (None, None) when
        every reply is an error."""
        # Replies arrive in any order, and a float sum depends on its order: sorted by
        # partition, the same run gives the same head bit for bit (resumed or not).
        replies = sorted(replies, key=_partition_order)
        if not any(not m.has_error() for m in replies):
            return None, None
        arrays, _ = super().aggregate_train(server_round, replies)
        contents = [m.content for m in replies if not m.has_error()]
        if not contents:
            return arrays, None
        rep = aggregate_reports(contents, "clients' training data", self.min_group_size)
        self.history.setdefault(server_round, {})["train"] = rep
        return arrays, headline(rep)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        """The federated evaluation: the clients' held-out statistics summed into one report
        (history ``federated_evaluate``); None when no reply has a held-out row. Summed in
        partition order, as training is, so a run's figures do not depend on arrival order."""
        valid, _ = self._check_and_log_replies(sorted(replies, key=_partition_order), is_train=False)
        return self._aggregate_evaluate_contents(server_round, [m.content for m in valid])

    def _aggregate_evaluate_contents(self, server_round: int, contents: list[RecordDict]):
        contents = [c for c in contents if P.reply_metrics(c)[P.NUM_EXAMPLES] > 0]
        if not contents:
            return None
        rep = aggregate_reports(contents, "clients' validation data", self.min_group_size)
        # the summed held-out statistics of this round's head: what federated post-processing fits on
        self.last_evaluate_stats = sum_stats([unflatten(P.reply_metrics(c)) for c in contents])
        self.history.setdefault(server_round, {})["federated_evaluate"] = rep
        return headline(rep)


class FedAvgWithGroupMetrics(GroupMetrics, FedAvg):
    """Flower's FedAvg (the mean of the clients' heads, weighted by training rows), with GroupMetrics."""


class FedProxWithGroupMetrics(GroupMetrics, FedProx):
    """FedProx (the client adds (mu/2)||w - w_global||^2 to its loss) with GroupMetrics."""


class FedAvgMWithGroupMetrics(GroupMetrics, FedAvgM):
    """FedAvgM (FedAvg's mean update applied with server momentum), with GroupMetrics."""


class FedAdamWithGroupMetrics(GroupMetrics, FedAdam):
    """FedAdam (Adam on the server over the clients' mean update), with GroupMetrics."""


class QFedAvgNoGC(QFedAvg):
    """flwr 1.25's QFedAvg with the same aggregation, minus a full garbage collection per reply.

    flwr reads every reply's arrays with ``to_numpy_ndarrays(keep_input=False)``, which runs
    ``gc.collect()`` for each reply (its cost: docs/RESULTS.md, "q-FedAvg that trains"). Here the arrays are read with
    ``keep_input=True`` and copied, and flwr's own ``compute_delta_and_h`` does the math
    (tested equal to flwr's QFedAvg).
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """flwr's q-FedAvg update (compute_delta_and_h per reply, then w - sum(delta)/sum(h))."""
        from flwr.app import Array
        from flwr.serverapp.strategy.qfedavg import compute_delta_and_h, get_train_loss

        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self.current_arrays is None:
            raise RuntimeError("q-FedAvg: configure_train must run before aggregate_train")
        lipschitz = 1.0 / self.client_learning_rate
        keys = list(self.current_arrays.keys())
        global_weights = self.current_arrays.to_numpy_ndarrays(keep_input=True)
        sum_delta, sum_h = None, 0.0
        for msg in valid:
            arrays = P.reply_arrays(msg.content)
            local = [np.array(a, copy=True) for a in arrays.to_numpy_ndarrays(keep_input=True)]
            delta, h = compute_delta_and_h(global_weights, local, self.q, lipschitz,
                                           get_train_loss(msg, self.train_loss_key))
            sum_delta = delta if sum_delta is None else [a + b for a, b in zip(sum_delta, delta)]
            sum_h += h
        new = [Array(np.asarray(g - d / sum_h)) for g, d in zip(global_weights, sum_delta)]
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(dict(zip(keys, new))), metrics


class QFedAvgWithGroupMetrics(GroupMetrics, QFedAvgNoGC):
    """q-FedAvg (Li, Sanjabi, Beirami & Smith, ICLR 2020: clients with higher loss weigh more;
    q=0 is FedAvg), with GroupMetrics.

    Its step is sum_k F_k^q L d_k / sum_k (q F_k^(q-1) ||L d_k||^2 + L F_k^q), with d_k the
    client's change of the head and L the loss's Lipschitz constant, which flwr takes as
    1 / client_learning_rate, i.e. one local SGD step. This app's clients run several epochs
    of Adam, so d_k is many steps long: with L = 1/lr the ||L d_k||^2 term dominates and the
    head hardly moves (docs/RESULTS.md, q-FedAvg). ``qfedavg-lipschitz`` sets L (default
    0.01): small enough that the step is FedAvg's size, reweighted by F_k^q.
    """


class FairFed(GroupMetrics, FedAvg):
    """FairFed (Ezzeldin, Yan, He, Ferrara & Avestimehr, AAAI 2023): FedAvg whose aggregation
    weights move, every round, towards the clients whose local fairness gap is close to the
    global one.

    Each client reports the slice statistics of the *received* (global) head on its training
    part (``global_model``, a ConfigRecord beside its MetricRecord). From them the server gets
    each client's gap F_k of ``metric`` for ``attribute`` and the global gap F from their sum
    (exact: summed counts). With Delta_k = |F - F_k| (|Acc - Acc_k| for a client whose gap is
    undefined, e.g. with one group only), the weights start at n_k / n and follow
    ``w_k <- w_k - beta * (Delta_k - mean(Delta))``, clipped at 0 and renormalised over the
    round's clients; the new global head is sum_k w_k * head_k. ``beta = 0`` is FedAvg.
    ``history[round]["fairfed"]`` records F, each Delta_k and each weight.
    """

    def __init__(self, *, beta: float, attribute: str, metric: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.beta, self.attribute, self.metric = beta, attribute, metric
        self.fairfed_weights: dict[str, float] | None = None  # by partition id; checkpointed

    def configure_train(self, server_round, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        """Train messages that also ask each client for the received head's statistics on its
        training part (``global-stats``): FairFed's local fairness gap of the global model."""
        config[P.GLOBAL_STATS] = True  # clients add the received head's statistics (client_app.train)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """The clients' heads averaged with FairFed's weights (``weights_for``) instead of
        FedAvg's; the weights go to the history (``fairfed``)."""
        replies = sorted(replies, key=_partition_order)
        fedavg_arrays, metrics = super().aggregate_train(server_round, replies)
        valid = [m for m in replies if not m.has_error()]
        if not valid or fedavg_arrays is None:
            return fedavg_arrays, metrics
        weights, record = self.weights_for(valid)
        self.history.setdefault(server_round, {})["fairfed"] = record
        states = [P.reply_arrays(m.content).to_torch_state_dict() for m in valid]
        merged = {k: sum(w * st[k].double() for w, st in zip(weights, states)).to(states[0][k].dtype)
                  for k in states[0]}
        return ArrayRecord(merged), metrics

    def weights_for(self, valid: list[Message]) -> tuple[list[float], dict]:
        """This round's aggregation weights (in ``valid``'s order) and what they came from."""
        pids = [str(_partition_order(m)[1]) for m in valid]
        stats = [unflatten(dict(m.content[P.GLOBAL_MODEL])) for m in valid]
        sizes = [float(P.reply_metrics(m.content)[P.NUM_EXAMPLES]) for m in valid]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a client without some group: its gap is None
            glob = metrics_report(sum_stats(stats), min_group_size=1)
            local = [metrics_report(s, min_group_size=1) for s in stats]
        gap = (glob["gaps"].get(self.attribute) or {}).get(self.metric)
        acc = glob["overall"]["accuracy"]
        deltas = []
        for rep in local:
            own = (rep["gaps"].get(self.attribute) or {}).get(self.metric)
            deltas.append(abs(gap - own) if gap is not None and own is not None
                          else abs((acc or 0.0) - (rep["overall"]["accuracy"] or 0.0)))
        if self.fairfed_weights is None:
            self.fairfed_weights = {}
        total = sum(sizes)
        prev = [float(self.fairfed_weights.get(pid, n / total)) for pid, n in zip(pids, sizes)]
        mean = sum(deltas) / len(deltas)
        raw = [max(0.0, w - self.beta * (d - mean)) for w, d in zip(prev, deltas)]
        norm = sum(raw) or 1.0
        weights = [w / norm if sum(raw) else n / total for w, n in zip(raw, sizes)]
        self.fairfed_weights.update(dict(zip(pids, weights)))
        return weights, {"global_gap": gap, "metric": self.metric, "attribute": self.attribute,
                         "delta": dict(zip(pids, deltas)), "weights": dict(zip(pids, weights))}


def make_strategy(cfg, num_nodes: int) -> GroupMetrics:
    """The strategy named by ``cfg.strategy``, configured from the run config.

    ``min_available_nodes`` is 1: flwr's node sampling waits for it with no time limit, so
    the round loop waits for the federation's nodes itself, at most ``round-timeout``."""
    common = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1, min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=1, learning_rate=cfg.learning_rate, lr_decay=cfg.lr_decay, sampling_seed=cfg.seed,
    )
    if cfg.strategy == "fedprox":
        strategy = FedProxWithGroupMetrics(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.strategy == "fedavgm":
        strategy = FedAvgMWithGroupMetrics(server_learning_rate=cfg.server_learning_rate,
                               server_momentum=cfg.server_momentum, **common)
    elif cfg.strategy == "fedadam":
        strategy = FedAdamWithGroupMetrics(eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, **common)
    elif cfg.strategy == "fairfed":
        strategy = FairFed(beta=cfg.fairfed_beta, attribute=cfg.fairfed_attribute, metric=cfg.fairfed_metric,
                           **common)
    elif cfg.strategy == "qfedavg":
        # flwr takes L as 1 / client_learning_rate (see QFedAvgWithGroupMetrics)
        strategy = QFedAvgWithGroupMetrics(client_learning_rate=1.0 / cfg.qfedavg_lipschitz, q=cfg.qfedavg_q,
                               train_loss_key=P.GLOBAL_LOSS, **common)
    else:
        strategy = FedAvgWithGroupMetrics(**common)
    strategy.min_group_size = cfg.min_group_size
    return strategy


# ---------------------------------------------------------------------- helpers of the loop
def _partition_order(reply: Message) -> tuple:
    """Sort key of a reply: successful ones by the partition id in their metrics."""
    if reply.has_error():
        return (1, reply.metadata.src_node_id)
    metrics = next(iter(reply.content.metric_records.values()), {})  # protocol.reply_metrics, or none
    return (0, int(metrics.get(P.PARTITION_ID, -1)), reply.metadata.src_node_id)


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


def message_bytes(sent: list[Message], replies: list[Message]) -> dict:
    """Mean serialized size in bytes of one message each way: {"to_client", "to_server"}
    (the content as Flower's protobuf encodes it; None when there was none)."""
    def mean(messages):
        sizes = [wire_bytes(m.content) for m in messages if not m.has_error()]
        return round(sum(sizes) / len(sizes)) if sizes else None

    return {"to_client": mean(sent), "to_server": mean(replies)}


def _outcome(sent: list[Message], replies: list[Message], partitions: Mapping[int, int], timeout: float) -> dict:
    """What a phase of a round got: nodes sampled, replies, and each failure with its reason."""
    failures = []
    for m in replies:
        if m.has_error():
            nid = m.metadata.src_node_id
            failures.append({"node_id": nid, "partition_id": partitions.get(nid), "code": int(m.error.code),
                             "reason": error_reason(m)})
    answered = {m.metadata.src_node_id for m in replies}  # one message per node and phase
    for m in sent:
        if m.metadata.dst_node_id not in answered:
            nid = m.metadata.dst_node_id
            failures.append({"node_id": nid, "partition_id": partitions.get(nid), "code": None,
                             "reason": f"no reply within round-timeout={timeout:g}s"})
    failures.sort(key=lambda f: f["node_id"])  # flwr samples in random order
    for f in failures:
        log(WARNING, "celeba-fl: client failed: node %s (partition %s): %s", f["node_id"], f["partition_id"],
            f["reason"])
    return {"sampled": sorted(m.metadata.dst_node_id for m in sent), "replies": len(replies),
            "succeeded": sum(not m.has_error() for m in replies), "failures": failures}


def _gaps(entry: dict) -> dict | None:
    """Train minus server-validation loss, accuracy and AUROC: the overfitting gap."""
    tr, va = entry.get("train"), entry.get("server_valid")
    if not tr or not va:
        return None
    out = {}
    for key in ("loss", "accuracy", "auroc"):
        a, b = tr["overall"].get(key), va["overall"].get(key)
        out[key] = None if a is None or b is None else a - b
    return out



def _log_round(rnd: int, total: int, entry: dict) -> None:
    tr = entry.get("train") or {}
    fe = entry.get("federated_evaluate") or {}
    va = entry["server_valid"]["overall"]
    nodes = entry.get("nodes", {}).get("train")
    replied = f" | {nodes['succeeded']}/{len(nodes['sampled'])} clients" if nodes else ""
    log(INFO, "celeba-fl: round %d/%d | train loss %s acc %s | fed-eval loss %s acc %s | "
        "valid loss %s acc %s AUROC %s%s%s | %.1fs", rnd, total,
        fmt((tr.get("overall") or {}).get("loss")), fmt((tr.get("overall") or {}).get("accuracy")),
        fmt((fe.get("overall") or {}).get("loss")), fmt((fe.get("overall") or {}).get("accuracy")),
        fmt(va["loss"]), fmt(va["accuracy"]), fmt(va["auroc"]), replied,
        " | SKIPPED" if entry.get("skipped") else "", entry.get("seconds") or 0.0)


def _to_tensors(value):
    """flwr strategy state (ArrayRecord, dict or list of ndarrays) -> tensors, for torch.save."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": value.to_torch_state_dict()}
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    return [torch.from_numpy(np.array(v)) for v in value]


def _from_tensors(value, key: str):
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord(value["__arrayrecord__"])
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return [v.numpy() for v in value]


def _random_state():
    """Python's ``random`` state (flwr samples nodes with it), as a torch-loadable value."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _random_state_from(saved) -> tuple:
    return (saved[0], tuple(saved[1]), saved[2])
