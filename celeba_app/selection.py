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
        """Record a round's validation report; True when it is the new best. Round 0 (the
        untrained head) is never selected."""
        value = metric_value(rep, self.metric)
        if server_round < 1 or value is None:
            return False
        larger_better = SELECTION_METRICS[self.metric]
        better = self.value is None or (value > self.value if larger_better else value < self.value)
        if better:
            self.round, self.value, self.state, self.since_best = server_round, value, state, 0
        else:
            self.since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` rounds (> 0) have passed without a new best."""
        return self.patience > 0 and self.since_best >= self.patience
