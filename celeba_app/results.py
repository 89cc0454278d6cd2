"""The run folder: ``<results-dir>/<run-name>/`` and the files of the results contract.

config.json, partitions.json, history.json, test.json and head.pt (see README, "Results").
A run never writes into an existing folder: a clashing run-name is refused before training,
so nothing an earlier run wrote is ever overwritten.
"""

from __future__ import annotations

import json
import math
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig

PACKAGES = ("flwr", "flwr-datasets", "datasets", "torch", "torchvision", "torchmetrics",
            "onnxruntime", "numpy")


def run_dir_for(cfg: RunConfig) -> Path:
    """The folder this run will write; refuses one that exists (checked before training)."""
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.split}"
    path = Path(cfg.results_dir) / name
    if path.exists():
        raise ConfigError(
            f"run-name={name!r} already exists in results-dir={cfg.results_dir!r}; accepted: a "
            "run-name not used before (earlier results are never overwritten)"
        )
    return path


def create_run_dir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(exist_ok=False)
    return path


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> null, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2) + "\n")
    tmp.replace(path)


def write_run_start(run_dir: Path, cfg: RunConfig, *, kind: str, num_clients: int, device: str,
                    identities: dict, partitions: list[dict], weights_id: str) -> None:
    """config.json and partitions.json: what this run is, written before it trains."""
    write_json(run_dir / "config.json", {
        "kind": kind, "run_config": cfg.as_dict(), "seed": cfg.seed, "num_clients": num_clients,
        "device": device, "packages": package_versions(),
        "dataset": {"spec": cfg.dataset, "identities_per_split": identities},
        "weights": {"spec": cfg.weights, "digest": weights_id},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    write_json(run_dir / "partitions.json", {"split": cfg.split, "num_partitions": num_clients,
                                             "partitions": partitions})


def write_run_end(run_dir: Path, head_state: dict, history: list[dict], test: dict,
                  extra: dict | None = None) -> None:
    """head.pt, history.json, test.json, then the plots and report.md."""
    import torch

    from .report import write_report

    torch.save(head_state, run_dir / "head.pt")
    write_json(run_dir / "history.json", history)
    write_json(run_dir / "test.json", {**test, **(extra or {})})
    write_report(run_dir)


def write_best(run_dir: Path, best, test_report) -> None:
    """best.json and head_best.pt for a selection.BestRound (nothing if no round qualified);
    ``test_report(state)`` evaluates a head state on the test split."""
    import torch

    if best.state is None:
        return
    write_json(run_dir / "best.json", {"round": best.round, "selection_metric": best.metric,
                                       "validation_value": best.value, **test_report(best.state)})
    torch.save(best.state, run_dir / "head_best.pt")
