"""Read a run folder's tracker back with the library's own reader (tests' helper)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_back(kind: str, run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from ``run_dir/tensorboard`` (TensorBoard's EventAccumulator) or
    ``run_dir/mlruns`` (MlflowClient's metric history)."""
    out: dict[str, dict[int, float]] = {}
    if kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
        return out
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    run_id = (run_dir / "mlruns" / "celeba-fl-run-id").read_text().strip()
    for key in client.get_run(run_id).data.metrics:
        out[key] = {m.step: m.value for m in client.get_metric_history(run_id, key)}
    return out


def expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """What the tracker should hold, from history.json and test.json (tracking.history_scalars)."""
    from celeba_app.tracking import history_scalars

    out: dict[str, dict[int, float]] = {}
    history = json.loads((run_dir / "history.json").read_text())
    for entry in history:
        for tag, value in history_scalars(entry).items():
            out.setdefault(tag, {})[entry["round"]] = value
    test = json.loads((run_dir / "test.json").read_text())
    for tag, value in history_scalars({"test": {k: test[k] for k in ("overall", "groups", "gaps")}}).items():
        out.setdefault(tag, {})[history[-1]["round"]] = value
    return out


def assert_tracked(kind: str, run_dir: Path) -> None:
    """Every figure of history.json and test.json is in the tracker, at its round, equal to
    float32 precision (TensorBoard stores float32)."""
    import pytest

    got, want = read_back(kind, run_dir), expected(run_dir)
    missing = sorted(set(want) - set(got))
    assert not missing, missing[:10]
    for tag, steps in want.items():
        assert set(steps) <= set(got[tag]), (tag, steps, got[tag])
        for step, value in steps.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)
