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

from logging import ERROR
from typing import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, QFedAvg

from .federation import error_reason
from .metrics import ALL, client_distribution, report, sum_stats, unflatten

NOT_SUMMED = ("num-examples", "partition_id")  # identifiers, not quantities
HEADLINE = ("loss", "accuracy", "balanced_accuracy", "f1", "auroc")


class NoClientTrained(RuntimeError):
    """Every client failed in round 1: the run ends with their errors."""


def headline(rep: dict) -> MetricRecord:
    """The few numbers worth a log line, from a metrics.report()."""
    return MetricRecord({k: float(v) for k, v in rep["overall"].items() if k in HEADLINE and v is not None})


def aggregate_reports(contents: list[RecordDict], where: str) -> dict:
    """Sum the clients' slice statistics; report globally and per client."""
    per_client = []
    extra: dict[str, float] = {}
    for content in contents:
        metrics = next(iter(content.metric_records.values()))
        stats = unflatten(metrics)
        per_client.append(stats)
        for key, value in metrics.items():
            if "|" not in key and not isinstance(value, list) and key not in NOT_SUMMED:
                extra[key] = extra.get(key, 0.0) + float(value) * float(metrics["num-examples"])
    total = sum(float(next(iter(c.metric_records.values()))["num-examples"]) for c in contents)
    rep = report(sum_stats(per_client), where=where)
    rep["num_clients"] = len(contents)
    # Example-weighted means of the clients' scalar extras (e.g. the running training loss).
    rep["client_means"] = {k: v / total for k, v in extra.items()} if total else {}
    pids = [int(next(iter(c.metric_records.values())).get("partition_id", -1)) for c in contents]
    acc = {pid: (s[ALL].tp + s[ALL].tn) / s[ALL].n for pid, s in zip(pids, per_client) if s[ALL].n}
    rep["clients"] = {
        "accuracy": client_distribution(list(acc.values())),
        "num_examples": client_distribution([s[ALL].n for s in per_client]),
        "accuracy_by_partition": {str(pid): acc[pid] for pid in sorted(acc)},
    }
    return rep


class FairMetrics:
    """Mixin for any flwr Message-API strategy: summed-statistic metrics, a per-round history,
    bytes sent, the per-round learning rate (``lr * lr_decay^(round-1)``) and early stopping.

    The strategy's own ``aggregate_train`` still aggregates the arrays (FedAvg's weighted mean,
    FedAvgM's momentum, FedAdam's server optimiser, q-FedAvg's reweighting), so the fairness
    metrics work whichever strategy runs.
    """

    def __init__(self, *args, learning_rate: float = 1e-3, lr_decay: float = 1.0, **kwargs) -> None:
        # Metrics are summed in aggregate_*; skip FedAvg's weighted mean of every key.
        kwargs.setdefault("train_metrics_aggr_fn", lambda records, key: MetricRecord())
        kwargs.setdefault("evaluate_metrics_aggr_fn", lambda records, key: MetricRecord())
        super().__init__(*args, **kwargs)
        self.learning_rate = learning_rate
        self.lr_decay = lr_decay
        self.history: dict[int, dict] = {}
        self.bytes_sent: dict[int, int] = {}
        self.stopped_after: int | None = None

    def stop(self, server_round: int) -> None:
        """Early stopping: later rounds send nothing (the loop runs on, doing no work)."""
        if self.stopped_after is None:
            self.stopped_after = server_round

    def configure_train(self, server_round, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        if self.stopped_after is not None:
            return []
        config["lr"] = self.learning_rate * self.lr_decay ** (server_round - 1)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        head_bytes = sum(a.numpy().nbytes for a in arrays.values())
        self.bytes_sent[server_round] = head_bytes * len(messages)
        self.history.setdefault(server_round, {})["lr"] = config["lr"]
        return messages

    def configure_evaluate(self, server_round, arrays: ArrayRecord, config, grid) -> Iterable[Message]:
        if self.stopped_after is not None:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if server_round == 1 and not any(not m.has_error() for m in replies):
            # Nothing will train in later rounds either (e.g. every node misses its data):
            # stop with the clients' own errors instead of running empty rounds.
            errors = [f"node {m.metadata.src_node_id}: {error_reason(m)}" for m in replies if m.has_error()]
            reason = "; ".join(errors[:3]) or "no client replied"
            log(ERROR, "celeba-fl: no client could train in round 1 (%d of %d failed): %s",
                len(errors), len(replies), reason)
            raise NoClientTrained(f"no client could train in round 1: {reason}")
        if not replies:
            return None, None
        arrays, _ = super().aggregate_train(server_round, replies)
        contents = [m.content for m in replies if not m.has_error()]
        if not contents:
            return arrays, None
        rep = aggregate_reports(contents, "clients' training data")
        self.history.setdefault(server_round, {})["train"] = rep
        return arrays, headline(rep)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        valid, _ = self._check_and_log_replies(list(replies), is_train=False)
        contents = [m.content for m in valid]
        contents = [c for c in contents if next(iter(c.metric_records.values()))["num-examples"] > 0]
        if not contents:
            return None
        rep = aggregate_reports(contents, "clients' validation data")
        self.history.setdefault(server_round, {})["federated_evaluate"] = rep
        return headline(rep)


class FairFedAvg(FairMetrics, FedAvg):
    """FedAvg with FairMetrics."""


class FairFedProx(FairMetrics, FedProx):
    """FedProx (the client adds (mu/2)||w - w_global||^2 to its loss) with FairMetrics."""


class FairFedAvgM(FairMetrics, FedAvgM):
    """FedAvg with server momentum, with FairMetrics."""


class FairFedAdam(FairMetrics, FedAdam):
    """FedAdam (Adam on the server over the clients' mean update), with FairMetrics."""


class FairQFedAvg(FairMetrics, QFedAvg):
    """q-FedAvg (clients with higher loss weigh more; q=0 is FedAvg), with FairMetrics."""


def make_strategy(cfg, num_nodes: int) -> FairMetrics:
    """The strategy named by ``cfg.strategy``, configured from the run config."""
    common = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1, min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=num_nodes, learning_rate=cfg.learning_rate, lr_decay=cfg.lr_decay,
    )
    if cfg.strategy == "fedprox":
        return FairFedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedavgm":
        return FairFedAvgM(server_learning_rate=cfg.server_learning_rate,
                           server_momentum=cfg.server_momentum, **common)
    if cfg.strategy == "fedadam":
        return FairFedAdam(eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, **common)
    if cfg.strategy == "qfedavg":
        return FairQFedAvg(client_learning_rate=cfg.learning_rate, q=cfg.qfedavg_q,
                           train_loss_key="global_loss", **common)
    return FairFedAvg(**common)
