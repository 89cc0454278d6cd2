"""Optional experiment tracking: a run's config, every round's metrics and the final test, to
TensorBoard event files or an MLflow local file store inside the run folder.

``tracking = "tensorboard"`` writes ``<run folder>/tensorboard/`` (read it with
``tensorboard --logdir outputs``); ``tracking = "mlflow"`` writes ``<run folder>/mlruns/``
(``mlflow ui --backend-store-uri outputs/<run>/mlruns``; MLflow's file store, in maintenance
mode upstream, enabled here with ``MLFLOW_ALLOW_FILE_STORE``). Both work offline. The
ServerApp (and ``celeba-centralized``) log; clients never do.

A round's scalars are the numeric leaves of its history.json entry (``history_scalars``),
named by their path with ``/``: ``server_valid/overall/accuracy``,
``server_valid/groups/Male/1/tpr`` (an intersection ``Male&Young`` = ``0&1`` is
``Male_and_Young/0_1``), ``server_valid/gaps/Male/equalized_odds_difference``, ``lr``; the step
is the round. Intervals and per-client lists are left out (they are in history.json). The final
test and best-round figures are logged under ``test/`` and ``best/`` at the last round.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from .config import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
SKIPPED = ("_ci", "_by_partition", "clients")  # intervals and per-client detail: history.json only


def check_available(kind: str) -> None:
    """Raise ConfigError (one line) when ``kind``'s library is not installed; "" needs none."""
    if not kind:
        return
    import importlib.util

    if importlib.util.find_spec(PACKAGES[kind]) is None:
        raise ConfigError(f"tracking={kind!r} needs the {PACKAGES[kind]!r} package, which is not installed; "
                          "accepted: install the extra (pip install -e \".[tracking]\") or tracking=\"\"")


def _name(part: str) -> str:
    return re.sub(r"[^\w./ -]", "_", str(part).replace("&", "_and_" if not part[:1].isdigit() else "_"))


def history_scalars(entry: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a history.json entry (or any nested dict) as {tag: value},
    without ``round``, booleans, None, lists, intervals and per-client detail."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if key == "round" or any(key.endswith(s) or key == s for s in SKIPPED):
            continue
        tag = f"{prefix}{_name(key)}"
        if isinstance(value, dict):
            out.update(history_scalars(value, f"{tag}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


class Tracker:
    """One run's tracker (``open_tracker``): ``log_history`` after every round, ``log_final``
    at the end, ``close`` always. Each (tag, round) is logged once, so calling
    ``log_history`` with the whole history every round adds only what is new (e.g. round r's
    federated evaluation, which arrives in round r+1 with ``evaluate-with-train``)."""

    def __init__(self, kind: str, run_dir: Path, run_config: dict, logged_rounds: int = -1):
        self.kind, self.run_dir = kind, Path(run_dir)
        self._seen: set[tuple[str, int]] = set()
        self.broken: str | None = None  # why logging stopped, after a failure
        self._done_rounds = logged_rounds  # a resumed run: rounds up to this were logged before
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            if logged_rounds < 0:
                self._writer.add_text("config", "```\n" + json.dumps(run_config, indent=1) + "\n```")
        else:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            import mlflow

            self._client = mlflow.tracking.MlflowClient((self.run_dir / "mlruns").resolve().as_uri())
            id_file = self.run_dir / "mlruns" / "celeba-fl-run-id"
            if id_file.exists():
                self._run_id = id_file.read_text().strip()
            else:
                experiment = self._client.get_experiment_by_name("celeba-fl") or None
                exp_id = experiment.experiment_id if experiment else self._client.create_experiment("celeba-fl")
                self._run_id = self._client.create_run(exp_id, run_name=self.run_dir.name).info.run_id
                id_file.write_text(self._run_id)
                self._client.log_batch(self._run_id, params=[
                    mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(run_config.items())])

    def _log(self, scalars: dict[str, float], step: int) -> None:
        new = {t: v for t, v in scalars.items() if (t, step) not in self._seen}
        if not new or self.broken:
            return
        try:
            self._write(new, step)
        except Exception as exc:  # noqa: BLE001 - tracking is an extra: the run goes on without it
            self.broken = f"{type(exc).__name__}: {exc}"
            print(f"celeba-fl: tracking={self.kind!r} failed ({self.broken}); the run goes on, its figures are "
                  "in history.json", file=sys.stderr, flush=True)
            return
        self._seen.update((t, step) for t in new)

    def _write(self, new: dict[str, float], step: int) -> None:
        if self.kind == "tensorboard":
            for tag, value in new.items():
                self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()
        else:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(t, v, now, step) for t, v in new.items()]
            for i in range(0, len(metrics), 1000):  # MLflow's batch limit
                self._client.log_batch(self._run_id, metrics=metrics[i:i + 1000])

    def log_history(self, history: list[dict]) -> None:
        """Log what is new in ``history`` (history.json's list), each entry at its round."""
        for entry in history:
            if entry["round"] > self._done_rounds:
                self._log(history_scalars(entry), entry["round"])

    def log_final(self, test: dict, best: dict | None, step: int) -> None:
        """The final test (test.json's metrics) and the best round's, at ``step``."""
        self._log(history_scalars({"test": {k: test.get(k) for k in ("overall", "groups", "gaps")}}), step)
        if best:
            self._log(history_scalars({"best": {"selected_round": best.get("round"),
                                                 **{k: best.get(k) for k in ("overall", "groups", "gaps")}}}), step)

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close; MLflow's run ends with ``status`` (FINISHED, FAILED, KILLED)."""
        try:
            if self.kind == "tensorboard":
                self._writer.close()
            else:
                self._client.set_terminated(self._run_id, status=status)
        except Exception:  # noqa: BLE001 - already reported by _log, or nothing left to lose
            pass


def open_tracker(kind: str, run_dir: Path, run_config: dict, logged_rounds: int = -1) -> Tracker | None:
    """A Tracker for ``tracking=kind`` writing into ``run_dir``; None for "". ``logged_rounds``:
    the last round a resumed run's earlier process logged (its rounds are not logged again).
    A tracker that cannot start (its store cannot be written, say) is one line on stderr and
    None: the run goes on without it."""
    if not kind:
        return None
    try:
        return Tracker(kind, run_dir, run_config, logged_rounds)
    except Exception as exc:  # noqa: BLE001 - tracking is an extra
        print(f"celeba-fl: tracking={kind!r} could not start ({type(exc).__name__}: {exc}); the run goes on, "
              "its figures are in history.json", file=sys.stderr, flush=True)
        return None
