"""Model selection on the validation split, never on test: the best round and early stopping.

The server evaluates the global head on ``valid`` after every round; ``BestRound`` keeps the
head of the best round by ``selection-metric`` (default validation loss) and says when
``early-stopping-patience`` rounds have passed without improvement. Test metrics are then
reported for both the last round (test.json) and the best one (best.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import SELECTION_METRICS


def metric_value(rep: dict, metric: str) -> float | None:
    """The selection metric of a metrics.metrics_report(); worst_group_accuracy is the lowest group
    accuracy over every sensitive attribute and intersection."""
    if metric == "worst_group_accuracy":
        values = [g["worst_group_accuracy"] for g in rep["gaps"].values()
                  if g["worst_group_accuracy"] is not None]
        return min(values) if values else None
    return rep["overall"].get(metric)


@dataclass
class BestRound:
    """The best round so far on ``valid`` (never on test), and early stopping.

    ``metric``: a key of ``SELECTION_METRICS`` (``loss`` by default: lower is better);
    ``patience``: stop after this many rounds without a new best (0: never stop). ``round``,
    ``value`` and ``state`` (the head's state_dict) describe the best round once there is one.

    Example::

        >>> best = BestRound("loss", patience=2)
        >>> [best.update(r, {"overall": {"loss": v}}, {}) for r, v in [(1, 0.6), (2, 0.5), (3, 0.55)]]
        [True, True, False]
        >>> best.round, best.should_stop
        (2, False)
    """

    metric: str = "loss"
    patience: int = 0
    round: int | None = None
    value: float | None = None
    state: dict | None = field(default=None, repr=False)
    since_best: int = 0

    def update(self, server_round: int, rep: dict, state: dict) -> bool:
        """Record a round's validation report; True when it is the new best, whose head
        ``state`` (a state_dict) is then kept as a copy. Round 0 (the untrained head) is never
        selected."""
        value = metric_value(rep, self.metric)
        if server_round < 1 or value is None:
            return False
        larger_better = SELECTION_METRICS[self.metric]
        better = self.value is None or (value > self.value if larger_better else value < self.value)
        if better:
            self.round, self.value, self.since_best = server_round, value, 0
            self.state = {k: v.clone() for k, v in state.items()}
        else:
            self.since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` rounds (> 0) have passed without a new best."""
        return self.patience > 0 and self.since_best >= self.patience


def close_round(entry: dict, best: BestRound, state: dict) -> bool:
    """The end of a round, in the federated loop and the centralized one alike: ``entry`` (the
    round's history record, with ``server_valid``) gets ``gap_train_minus_valid`` (its
    ``train`` minus ``server_valid`` loss, accuracy and AUROC: the overfitting gap; None
    without both), ``best`` records the round with its head ``state``, and ``early_stopped``
    is set on the round after which early stopping ends the run. True when it ends."""
    tr, va = entry.get("train"), entry.get("server_valid")
    gap = None
    if tr and va:
        gap = {}
        for key in ("loss", "accuracy", "auroc"):
            a, b = tr["overall"].get(key), va["overall"].get(key)
            gap[key] = None if a is None or b is None else a - b
    entry["gap_train_minus_valid"] = gap
    best.update(entry["round"], va, state)
    if best.should_stop:
        entry["early_stopped"] = True
    return best.should_stop
