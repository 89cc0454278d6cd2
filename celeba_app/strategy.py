"""Flower's Message-API strategies with metrics per demographic group from summed statistics,
and FairFed.

The arrays are aggregated as each flwr strategy does (FedAvg weighted by ``num-examples``).
The metrics are not averaged: clients send confusion counts and score histograms per slice
(metrics.py), which ``aggregate_train`` / ``aggregate_evaluate`` sum into one MetricRecord
(``sum_replies``) before anything is derived; a weighted mean of per-client ratios would not
be the global value. The record also keeps each client's own accuracy, whose spread is the
client-level fairness view. ``start`` runs the round loop (round_loop.py), which turns these
records into each round's history entry.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (Bulyan, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum,
                                     MultiKrum, QFedAvg)

from . import protocol as P
from .config import ROBUST_STRATEGIES, ConfigError
from .metrics import ALL, MIN_GROUP_SIZE, client_distribution, flatten, metrics_report, sum_stats, unflatten
from .round_loop import RoundPolicy, RoundsResult, run_rounds

# Keys of the MetricRecord that GroupMetrics.aggregate_train / aggregate_evaluate return,
# beside the summed slice statistics (metrics.flatten's "<slice>|<statistic>" keys) and the
# example-weighted means of the clients' scalars (their own keys, e.g. local_steps_loss).
NUM_CLIENTS = "num-clients"  #: replies summed
CLIENTS_PARTITION_ID = "clients-partition-id"  #: list: each summed reply's partition id, in order
CLIENTS_NUM_EXAMPLES = "clients-num-examples"  #: list: each reply's rows (its all|n)
CLIENTS_CORRECT = "clients-correct"  #: list: each reply's correct predictions (all|tp + all|tn)
FAIRFED_DELTA = "fairfed-delta"  #: list, FairFed: each client's |F - F_k|, in partition order
FAIRFED_WEIGHT = "fairfed-weight"  #: list, FairFed: each client's aggregation weight
FAIRFED_GLOBAL_GAP = "fairfed-global-gap"  #: FairFed: the global gap F (absent when undefined)
_OWN = (P.NUM_EXAMPLES, NUM_CLIENTS, CLIENTS_PARTITION_ID, CLIENTS_NUM_EXAMPLES, CLIENTS_CORRECT,
        FAIRFED_DELTA, FAIRFED_WEIGHT, FAIRFED_GLOBAL_GAP)


def sum_replies(contents: list[RecordDict]) -> MetricRecord:
    """What a round measured from ``contents`` (replies' contents, in partition order), as one
    MetricRecord: the summed slice statistics, ``num-examples``, the example-weighted mean of
    each scalar the clients sent, and per reply its partition id, rows and correct predictions
    (the clients' own accuracy: client-level fairness)."""
    per_client = []
    extra: dict[str, float] = {}
    for content in contents:
        metrics = P.reply_metrics(content)
        per_client.append(unflatten(metrics))
        for key, value in metrics.items():
            if "|" not in key and not isinstance(value, list) and key not in P.NOT_SUMMED:
                extra[key] = extra.get(key, 0.0) + float(value) * float(metrics[P.NUM_EXAMPLES])
    total = sum(float(P.reply_metrics(c)[P.NUM_EXAMPLES]) for c in contents)
    record = MetricRecord(flatten(sum_stats(per_client)))
    record[P.NUM_EXAMPLES] = total
    record[NUM_CLIENTS] = len(contents)
    for key, value in extra.items():
        if total:
            record[key] = value / total
    record[CLIENTS_PARTITION_ID] = [int(P.reply_metrics(c).get(P.PARTITION_ID, -1)) for c in contents]
    record[CLIENTS_NUM_EXAMPLES] = [float(s[ALL].n) for s in per_client]
    record[CLIENTS_CORRECT] = [float(s[ALL].tp + s[ALL].tn) for s in per_client]
    return record


def _unit_weights(replies: list[Message]) -> list[Message]:
    """The replies' heads, each with weight 1 as its ``num-examples``: the unweighted mean of a
    DP round (privacy.py), which counts every client once whatever its size; a client with no
    training rows (its head unchanged) is not counted."""
    return [Message(RecordDict({P.ARRAYS: P.reply_arrays(m.content), P.METRICS: MetricRecord({P.NUM_EXAMPLES: 1})}),
                    dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type)
            for m in replies if not m.has_error() and P.reply_metrics(m.content)[P.NUM_EXAMPLES] > 0]


def report_of(record: MetricRecord, where: str, min_group_size: int = MIN_GROUP_SIZE) -> dict:
    """``sum_replies``'s record as a report: metrics.metrics_report of the sums, with
    ``num_clients``, ``client_means`` and ``clients`` (the spread of the clients' accuracy and
    size, and each by partition id)."""
    rep = metrics_report(unflatten(record), where=where, min_group_size=min_group_size)
    rep["num_clients"] = int(record[NUM_CLIENTS])
    rep["client_means"] = {k: v for k, v in record.items() if "|" not in k and k not in _OWN}
    pids, sizes, correct = (list(record[k]) for k in (CLIENTS_PARTITION_ID, CLIENTS_NUM_EXAMPLES, CLIENTS_CORRECT))
    acc = {pid: c / n for pid, n, c in zip(pids, sizes, correct) if n}
    by_size = {pid: n for pid, n in zip(pids, sizes) if n}
    rep["clients"] = {
        "accuracy": client_distribution(list(acc.values())),
        "num_examples": client_distribution(sizes),
        "accuracy_by_partition": {str(pid): acc[pid] for pid in sorted(acc)},
        "num_examples_by_partition": {str(pid): int(by_size[pid]) for pid in sorted(acc)},
    }
    return rep


class GroupMetrics:
    """Mixin for any flwr Message-API strategy: metrics per demographic group from summed
    statistics and the per-round learning rate (``lr * lr_decay^(round-1)``). It measures
    groups; it does not change how the strategy aggregates (``FairFed`` below is the fairness
    algorithm).

    The strategy's own ``aggregate_train`` still aggregates the arrays (FedAvg's weighted mean,
    FedAvgM's momentum, FedAdam's server optimiser, q-FedAvg's reweighting), so the group
    metrics work whichever strategy runs. ``aggregate_train`` and ``aggregate_evaluate``
    return what they measured (``sum_replies``'s MetricRecord); the round loop
    (round_loop.py, run by ``start``) turns it into the round's record with
    ``train_records`` and ``evaluate_report``.
    """

    # Server-side state of flwr's strategies that a resumed run needs (FedAvgM's momentum,
    # FedAdam's moments, the arrays they step from; FairFed's weights).
    SERVER_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t", "fairfed_weights")

    def __init__(self, *args, learning_rate: float = 1e-3, lr_decay: float = 1.0, sampling_seed: int = 0,
                 min_group_size: int = MIN_GROUP_SIZE, **kwargs) -> None:
        # Metrics are summed in aggregate_*; skip FedAvg's weighted mean of every key.
        kwargs.setdefault("train_metrics_aggr_fn", lambda records, key: MetricRecord())
        kwargs.setdefault("evaluate_metrics_aggr_fn", lambda records, key: MetricRecord())
        super().__init__(*args, **kwargs)
        self.learning_rate = learning_rate
        self.lr_decay = lr_decay
        self.min_group_size = min_group_size
        self.sampling_seed = sampling_seed  # seeds Python's random, with which flwr samples nodes
        self.uniform_weights = False  # True (privacy.wrap): each reply counts once in the mean of the heads

    def start(self, grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              *, policy: RoundPolicy | None = None, **loop) -> RoundsResult:
        """Flower's ``Strategy.start``: the app's round loop (round_loop.run_rounds, whose
        keyword arguments ``loop`` passes on: ``server_evaluate``, ``best``, ``on_round``,
        ``resume``, ``nodes``); ``timeout`` is the round timeout unless ``policy`` is given."""
        return run_rounds(self, grid, initial_arrays, num_rounds, train_config, evaluate_config,
                          policy=policy or RoundPolicy(round_timeout=timeout), **loop)

    def round_lr(self, server_round: int) -> float:
        """The clients' learning rate in round ``server_round``: learning-rate x lr-decay^(round-1)."""
        return self.learning_rate * self.lr_decay ** (server_round - 1)

    def configure_train(self, server_round, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        """The base strategy's train messages, with this round's learning rate in their config."""
        config[P.LR] = self.round_lr(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """The base strategy's aggregate of the replies sorted by partition id, and what they
        measured (``sum_replies``); (None, None) when every reply is an error."""
        # Replies arrive in any order, and a float sum depends on its order: sorted by
        # partition, the same run gives the same head bit for bit (resumed or not).
        replies = sorted(replies, key=P.partition_order)
        contents = [m.content for m in replies if not m.has_error()]
        if not contents:
            return None, None
        arrays, _ = super().aggregate_train(server_round, _unit_weights(replies) if self.uniform_weights else replies)
        return arrays, sum_replies(contents)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The federated evaluation: the clients' held-out statistics summed (``sum_held_out``).
        Summed in partition order, as training is, so a run's figures do not depend on arrival order."""
        valid, _ = self._check_and_log_replies(sorted(replies, key=P.partition_order), is_train=False)
        return self.sum_held_out([m.content for m in valid])

    def sum_held_out(self, contents: list[RecordDict]) -> MetricRecord | None:
        """``sum_replies`` of the contents with a held-out row; None when none has one."""
        contents = [c for c in contents if P.reply_metrics(c)[P.NUM_EXAMPLES] > 0]
        return sum_replies(contents) if contents else None

    def train_records(self, measured: MetricRecord) -> dict:
        """A round's record entries from ``aggregate_train``'s MetricRecord: ``train``."""
        return {"train": report_of(measured, "clients' training data", self.min_group_size)}

    def evaluate_report(self, measured: MetricRecord) -> dict:
        """The federated evaluation's report from ``aggregate_evaluate``'s MetricRecord."""
        return report_of(measured, "clients' validation data", self.min_group_size)

    def server_state(self) -> dict:
        """``SERVER_STATE``'s attributes that are set, as tensors (torch.save, weights_only)."""
        return {k: _to_tensors(getattr(self, k)) for k in self.SERVER_STATE if getattr(self, k, None) is not None}

    def restore_server_state(self, state: dict) -> None:
        """``server_state``'s inverse."""
        for key, value in state.items():
            setattr(self, key, _from_tensors(value))


class FedAvgWithGroupMetrics(GroupMetrics, FedAvg):
    """Flower's FedAvg (the mean of the clients' heads, weighted by training rows), with GroupMetrics."""


class FedProxWithGroupMetrics(GroupMetrics, FedProx):
    """FedProx (the client adds (mu/2)||w - w_global||^2 to its loss) with GroupMetrics."""


class FedAvgMWithGroupMetrics(GroupMetrics, FedAvgM):
    """FedAvgM (FedAvg's mean update applied with server momentum), with GroupMetrics."""


class FedAdamWithGroupMetrics(GroupMetrics, FedAdam):
    """FedAdam (Adam on the server over the clients' mean update), with GroupMetrics."""


class FedMedianWithGroupMetrics(GroupMetrics, FedMedian):
    """Flower's FedMedian (the coordinate-wise median of the clients' heads; Yin et al. 2018), with GroupMetrics."""


class FedTrimmedAvgWithGroupMetrics(GroupMetrics, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (per coordinate, the mean without the ``beta`` share at each end), with GroupMetrics."""


class KrumWithGroupMetrics(GroupMetrics, Krum):
    """Flower's Krum (Blanchard et al. 2017: the head with the smallest summed distance to its
    n - f - 2 nearest others), with GroupMetrics."""


class MultiKrumWithGroupMetrics(GroupMetrics, MultiKrum):
    """Flower's Multi-Krum (the mean of the ``num_nodes_to_select`` heads Krum scores best), with GroupMetrics."""


class BulyanWithGroupMetrics(GroupMetrics, Bulyan):
    """Flower's Bulyan (El Mhamdi et al. 2018: Multi-Krum's choice of n - 2f heads, then the
    mean of the values closest to the coordinate-wise median), with GroupMetrics."""


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
    The round's record (``fairfed``) has F, each Delta_k and each weight.
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
        FedAvg's; the measured MetricRecord also holds each client's Delta_k and weight and
        the global gap F (``FAIRFED_*``)."""
        replies = sorted(replies, key=P.partition_order)
        fedavg_arrays, metrics = super().aggregate_train(server_round, replies)
        valid = [m for m in replies if not m.has_error()]
        if not valid or fedavg_arrays is None:
            return fedavg_arrays, metrics
        weights, deltas, gap = self.weights_for(valid)
        metrics[FAIRFED_DELTA], metrics[FAIRFED_WEIGHT] = deltas, weights
        if gap is not None:
            metrics[FAIRFED_GLOBAL_GAP] = gap
        states = [P.reply_arrays(m.content).to_torch_state_dict() for m in valid]
        merged = {k: sum(w * st[k].double() for w, st in zip(weights, states)).to(states[0][k].dtype)
                  for k in states[0]}
        return ArrayRecord(merged), metrics

    def train_records(self, measured: MetricRecord) -> dict:
        """GroupMetrics' ``train``, and ``fairfed``: F, each Delta_k and each weight, by partition id."""
        pids = [str(pid) for pid in measured[CLIENTS_PARTITION_ID]]
        return {**super().train_records(measured),
                "fairfed": {"global_gap": measured.get(FAIRFED_GLOBAL_GAP), "metric": self.metric,
                            "attribute": self.attribute, "delta": dict(zip(pids, measured[FAIRFED_DELTA])),
                            "weights": dict(zip(pids, measured[FAIRFED_WEIGHT]))}}

    def weights_for(self, valid: list[Message]) -> tuple[list[float], list[float], float | None]:
        """This round's aggregation weights and each client's Delta_k (both in ``valid``'s
        order), and the global gap F (None when undefined); the weights are kept for the next round."""
        pids = [str(P.partition_order(m)[1]) for m in valid]
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
        return weights, deltas, gap


def make_strategy(cfg, num_nodes: int) -> GroupMetrics:
    """The strategy named by ``cfg.strategy``, configured from the run config.

    ``min_available_nodes`` is 1: flwr's node sampling waits for it with no time limit, so
    the round loop waits for the federation's nodes itself, at most ``round-timeout``."""
    common = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1, min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=1, learning_rate=cfg.learning_rate, lr_decay=cfg.lr_decay, sampling_seed=cfg.seed,
        min_group_size=cfg.min_group_size,
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
    elif cfg.strategy in ROBUST_STRATEGIES:
        strategy = _robust(cfg, num_nodes, common)
    elif cfg.strategy == "qfedavg":
        # flwr takes L as 1 / client_learning_rate (see QFedAvgWithGroupMetrics)
        strategy = QFedAvgWithGroupMetrics(client_learning_rate=1.0 / cfg.qfedavg_lipschitz, q=cfg.qfedavg_q,
                               train_loss_key=P.GLOBAL_LOSS, **common)
    else:
        strategy = FedAvgWithGroupMetrics(**common)
    return strategy


#: The class of each of config.ROBUST_STRATEGIES.
ROBUST = {"fedmedian": FedMedianWithGroupMetrics, "fedtrimmedavg": FedTrimmedAvgWithGroupMetrics,
          "krum": KrumWithGroupMetrics, "multikrum": MultiKrumWithGroupMetrics, "bulyan": BulyanWithGroupMetrics}


def _robust(cfg, num_nodes: int, common: dict) -> GroupMetrics:
    """One of Flower's Byzantine-robust aggregators; ConfigError (one line) when a round's
    sampled clients are too few for it to tolerate ``robust-malicious-nodes`` attackers."""
    f, sampled = cfg.robust_malicious_nodes, max(1, int(num_nodes * cfg.fraction_train))
    need = {"krum": f + 3, "multikrum": max(f + 3, cfg.multikrum_select), "bulyan": 4 * f + 3}.get(cfg.strategy, 1)
    if sampled < need:
        raise ConfigError(f"strategy={cfg.strategy!r} with robust-malicious-nodes={f}"
                          + (f" and multikrum-select={cfg.multikrum_select}" if cfg.strategy == "multikrum" else "")
                          + f" needs at least {need} clients a round; this federation samples {sampled} "
                          f"({num_nodes} nodes x fraction-train={cfg.fraction_train:g})")
    extra = {"fedtrimmedavg": {"beta": cfg.trimmed_avg_beta}, "krum": {"num_malicious_nodes": f},
             "multikrum": {"num_malicious_nodes": f, "num_nodes_to_select": cfg.multikrum_select},
             "bulyan": {"num_malicious_nodes": f}}.get(cfg.strategy, {})
    return ROBUST[cfg.strategy](**extra, **common)


# ---------------------------------------------------------------------- server state as tensors
def _to_tensors(value):
    """flwr strategy state (ArrayRecord, dict or list of ndarrays) -> tensors, for torch.save."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": value.to_torch_state_dict()}
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    return [torch.from_numpy(np.array(v)) for v in value]


def _from_tensors(value):
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord(value["__arrayrecord__"])
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return [v.numpy() for v in value]
