"""The run folder: ``<results-dir>/<run-name>/`` and the files of the results contract.

config.json, partitions.json, history.json, status.json, checkpoint.pt, test.json and head.pt
(docs/RUNS.md, "The run folder"); skipped_rows.json with ``bad-images="skip"``. A run never writes into an existing folder: a clashing run-name is
refused before training, so nothing an earlier run wrote is ever overwritten; only
``resume='<run-name>'`` continues a stopped run in its own folder.

Every file is written to a temporary name and renamed, so a run killed at any moment leaves
the previous complete version: after each round, checkpoint.pt (what resuming needs) and
status.json (``running``, ``completed`` or ``failed``, the reason, the last completed round).
The history grows by a line per round in history.jsonl (``HistoryLog``: appended, so a round
costs the same to write in round 1,000 as in round 1); history.json, the whole list, is
written when the run ends, completed or failed. ``read_history`` reads either.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .config import ConfigError, RunConfig
from .flwr_home import run_command

PACKAGES = ("flwr", "flwr-datasets", "datasets", "torch", "torchvision",
            "onnxruntime", "numpy")


def run_dir_for(cfg: RunConfig) -> Path:
    """The folder this run will write; refuses one that exists (checked before training).
    With ``resume``, the stopped run's folder, which must exist (see ``check_resume``).
    First of all, ``results-dir`` must be a folder this process can write (or create)."""
    check_results_dir(cfg.results_dir)
    if cfg.resume:
        path = Path(cfg.results_dir) / cfg.resume
        status = read_status(path) if path.is_dir() else None
        if load_checkpoint_path(path) is None or status is None:
            raise ConfigError(f"resume={cfg.resume!r}: no stopped run with a checkpoint in "
                              f"results-dir={cfg.results_dir!r}; accepted: the run-name of a run that "
                              "completed at least one round")
        if status["state"] == "completed":
            raise ConfigError(f"resume={cfg.resume!r}: that run completed; accepted: a stopped or failed run")
        return path
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.split}"
    path = Path(cfg.results_dir) / name
    if path.exists():
        raise ConfigError(
            f"run-name={name!r} already exists in results-dir={cfg.results_dir!r}; accepted: a "
            "run-name not used before (earlier results are never overwritten)"
        )
    return path


_WRITABLE = "accepted: a folder this process can write (created if missing)"


def check_results_dir(results_dir: str) -> None:
    """Refuse, in one line, a ``results-dir`` that is a file (or below one) or that cannot be
    written: probed by creating and removing a hidden file in it, or in its nearest existing
    parent when it does not exist yet (nothing is created that stays)."""
    root = Path(results_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"results-dir={results_dir!r} is a file; {_WRITABLE}")
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"results-dir={results_dir!r} cannot be created: {str(existing)!r} is a file; {_WRITABLE}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".celeba-fl-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"results-dir={results_dir!r} cannot be written ({exc.strerror or exc} in "
                          f"{str(existing)!r}); {_WRITABLE}") from exc


def load_checkpoint_path(path: Path) -> Path | None:
    """``path``/checkpoint.pt if that file exists (a run folder that finished a round), else None."""
    p = Path(path) / "checkpoint.pt"
    return p if p.is_file() else None


#: Run-config keys that do not change what a run computes: they may differ on resume.
NOT_RESULT_KEYS = ("resume", "run-name", "results-dir", "cache-dir", "feature-cache", "extract-batch-size",
                   "device", "min-nodes", "node-wait-timeout", "round-timeout", "num-server-rounds")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def resume_command(cfg: RunConfig, run_name: str) -> str:
    """The command that resumes run ``run_name`` of ``cfg`` (as the user wrote it, not resolved):
    ``flwr run . --run-config "<every key that differs from the defaults> resume='<run_name>'"``
    (``celeba-flwr run .`` on Flower 1.42: ``flwr_home.run_command``)."""
    defaults = RunConfig().as_dict()
    keep = {k: v for k, v in cfg.as_dict().items()
            if k not in ("resume", "run-name") and k in defaults and v != defaults[k]}
    overrides = " ".join(f"{k}={_toml(v)}" for k, v in keep.items())
    return f'{run_command()} --run-config "{overrides + " " if overrides else ""}resume=\'{run_name}\'"'


def check_resume(run_dir: Path, cfg: RunConfig, partitions: list[dict]) -> None:
    """Refuse, in one line naming the keys, a resume whose run config or partitions differ
    from the saved ones in anything that changes results."""
    saved = json.loads((run_dir / "config.json").read_text())["run_config"]
    now = cfg.as_dict()
    differ = [f"{k} ({saved.get(k)!r} saved, {now.get(k)!r} now)" for k in sorted(set(saved) | set(now))
              if k not in NOT_RESULT_KEYS and saved.get(k) != now.get(k)]
    if differ:
        raise ConfigError(f"resume={cfg.resume!r}: the run config differs from the saved one in "
                          f"{', '.join(differ)}; accepted: the saved values, or a new run-name")
    def identity(p: dict):  # with DP, the identities' hashes change with every run's salt: the data's fingerprint
        return p["celeb_ids"] if "celeb_ids" in p else (len(p["celeb_id_hashes"]), p.get("data_fingerprint"))

    old = {p["partition_id"]: (p["num_train"], p["num_val"], identity(p))
           for p in json.loads((run_dir / "partitions.json").read_text())["partitions"]}
    new = {p["partition_id"]: (p["num_train"], p["num_val"], identity(p)) for p in partitions}
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(f"resume={cfg.resume!r}: the SuperNodes' data differs from the saved "
                          f"partitions.json (partitions {changed[:10]}); accepted: the same partitions")


def create_run_dir(path: Path) -> Path:
    """Create the run folder; a ConfigError (one line) if it appeared since ``run_dir_for``
    checked (two runs of one run-name started at once: the second is refused) or cannot be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"results-dir={str(path.parent)!r} cannot be created ({exc.strerror or exc}); "
                          f"{_WRITABLE}") from exc
    try:
        path.mkdir(exist_ok=False)
    except FileExistsError as exc:
        raise ConfigError(
            f"run-name={path.name!r} already exists in results-dir={str(path.parent)!r} (another run "
            "created it after this one started); accepted: a run-name not used before (earlier results "
            "are never overwritten)") from exc
    except OSError as exc:
        raise ConfigError(f"results-dir={str(path.parent)!r} cannot be written ({exc.strerror or exc}); "
                          f"{_WRITABLE}") from exc
    return path


def package_versions() -> dict[str, str | None]:
    """{"python": version, package: installed version or None} for ``PACKAGES``, for config.json."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> null, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (NaN/inf as null) to a temporary name, then rename: a
    reader, or a crash mid-write, never sees half a file."""
    text = json.dumps(json_safe(obj), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_status(run_dir: Path, state: str, last_round: int | None, reason: str | None = None,
                 dp: dict | None = None) -> bool:
    """status.json: ``running``, ``completed`` or ``failed``, why, the last completed round, and
    the writing process (``host``, ``pid``: see ``process_ended``); with DP, ``dp`` (the last
    round's history ``dp`` entry: epsilon spent so far, delta, ...).
    The documented contract for scripts: flwr 1.25's ``flwr run`` does not always exit non-zero.

    Written atomically; if that fails (a full disk has no room for the temporary copy), the
    existing file is overwritten in place, in the blocks it already holds. True if either
    worked, False if status.json could not be written at all."""
    status = {"state": state, "reason": reason, "last_completed_round": last_round,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "pid": os.getpid()}
    if dp is not None:
        status["dp"] = dp
    path = Path(run_dir) / "status.json"
    try:
        write_json(path, status)
        return True
    except OSError:
        pass
    try:
        with open(path, "r+b") as f:  # a status fits the file system block the old one holds
            f.write(json.dumps(json_safe(status)).encode())
            f.truncate()
        return True
    except OSError:
        return False


#: errno values that mean the run folder cannot be written: the machine's state, not a bug.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def is_write_error(exc: BaseException) -> bool:
    """True for an OSError that says the disk or folder cannot take the write (``WRITE_ERRNOS``)."""
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


def read_status(run_dir: Path) -> dict | None:
    """status.json of ``run_dir`` as a dict (``write_status``), or None before a run wrote one."""
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else None


def process_ended(status: dict) -> bool:
    """True when a ``running`` status was written by a process of this host that no longer
    exists: it was killed without a chance to record why (SIGKILL, out of memory, power loss).
    False when it may still run, or runs on another host (which this process cannot see)."""
    if status.get("state") != "running" or status.get("host") != platform.node() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` to a temporary name, then rename: a kill mid-write keeps the previous file."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class HistoryLog:
    """history.jsonl: a running run's history, one JSON line per round record, appended as
    rounds end. Only the last ``RECENT`` records can still change (evaluate-with-train adds
    round r's federated evaluation in round r+1); a changed one is appended again, and the
    last line of a round is its record (``read_history``). A kill mid-line leaves a torn last
    line, which readers skip."""

    RECENT = 2
    NAME = "history.jsonl"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self.written: dict[int, str] = {}  # round -> its last line written (the recent rounds only)

    def append(self, history: list[dict]) -> None:
        """Append the records of ``history``'s last ``RECENT`` rounds that changed since written."""
        lines = []
        for entry in history[-self.RECENT:]:
            text = json.dumps(json_safe(entry))
            if self.written.get(entry["round"]) != text:
                lines.append(text)
                self.written[entry["round"]] = text
        if lines:
            with open(self.path, "a") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
        keep = {e["round"] for e in history[-self.RECENT:]}
        self.written = {k: v for k, v in self.written.items() if k in keep}

    def restart(self, history: list[dict]) -> None:
        """A resumed run's log: exactly ``history`` (the rounds its checkpoint covers), atomically."""
        text = "".join(json.dumps(json_safe(e)) + "\n" for e in history)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))
        self.written = {e["round"]: json.dumps(json_safe(e)) for e in history[-self.RECENT:]}


def read_history(run_dir: Path) -> list[dict] | None:
    """A run folder's history: history.jsonl while it runs or after a kill (the last record of
    each round, in round order; a torn last line skipped), else history.json; None if neither."""
    run_dir = Path(run_dir)
    log = run_dir / HistoryLog.NAME
    if log.exists():
        records: dict[int, dict] = {}
        for line in log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn last line of a killed write
            records[int(entry["round"])] = entry
        return [records[k] for k in sorted(records)]
    path = run_dir / "history.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_history(run_dir: Path, history: list[dict]) -> None:
    """history.json, the whole list, then history.jsonl removed: the end of a run."""
    write_json(Path(run_dir) / "history.json", history)
    (Path(run_dir) / HistoryLog.NAME).unlink(missing_ok=True)


def write_round(run_dir: Path, history: list[dict], checkpoint: dict, log: HistoryLog) -> None:
    """After each round: the new records to history.jsonl, checkpoint.pt, then status.json (running)."""
    log.append(history)
    save_torch(run_dir / "checkpoint.pt", checkpoint)
    write_status(run_dir, "running", checkpoint["round"], dp=history[-1].get("dp") if history else None)


def load_checkpoint(run_dir: Path) -> dict | None:
    """The last round's checkpoint.pt of ``run_dir`` (``write_round``), loaded with
    ``weights_only=True`` on the CPU; None if there is none."""
    import torch

    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    except Exception as exc:  # noqa: BLE001 - truncated, garbage or foreign: torch raises many kinds
        raise ConfigError(f"resume: {path} cannot be read ({type(exc).__name__}): the file is damaged; "
                          "restore it, or start a new run with another run-name") from None
    if missing:
        raise ConfigError(f"resume: {path} is not this app's checkpoint (no {', '.join(missing)}); "
                          "restore it, or start a new run with another run-name")
    return ckpt


#: What every checkpoint.pt holds (round_loop's checkpoint).
CHECKPOINT_KEYS = ("round", "arrays", "server_state", "best", "skipped_in_row", "random_state")


def record_report_error(run_dir: Path, error: str) -> None:
    """status.json keeps its state and gains ``report_error``: the plots or report.md could
    not be written, and the run's results stand."""
    status = read_status(run_dir) or {}
    write_json(Path(run_dir) / "status.json", {**status, "report_error": error})


def write_run_start(run_dir: Path, cfg: RunConfig, *, kind: str, num_clients: int, device: str,
                    identities: dict, partitions: list[dict], weights_id: str) -> None:
    """config.json and partitions.json: what this run is, written before it trains.
    ``dataset.fingerprint`` is the dataset's content identity (data.dataset_fingerprint: a
    local folder's files, a hub dataset's name), so two runs on folders of one name differ."""
    from .data import cache_dir_for, dataset_fingerprint

    write_json(run_dir / "config.json", {
        "kind": kind, "run_config": cfg.as_dict(), "seed": cfg.seed, "num_clients": num_clients,
        "device": device, "packages": package_versions(),
        "dataset": {"spec": cfg.dataset, "fingerprint": dataset_fingerprint(cfg.dataset, cache_dir_for(cfg, None)),
                    "identities_per_split": identities},
        "weights": {"spec": cfg.weights, "digest": weights_id},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    write_json(run_dir / "partitions.json", {"split": cfg.split, "num_partitions": num_clients,
                                             "partitions": partitions})


def write_skipped_rows(run_dir: Path, cfg: RunConfig, server_parts: list, partitions: list[dict]) -> None:
    """skipped_rows.json (``bad-images="skip"`` only): every row left out because its image
    cannot be decoded, the server's valid/test parts' and the clients' (from their
    descriptions, also in partitions.json), each {"part", "row", "split_row", "celeb_id",
    "error"}; an empty list when none was."""
    if cfg.bad_images != "skip":
        return
    rows = [r for part in server_parts for r in part.skipped_rows]
    rows += [r for entry in partitions for r in entry.get("skipped_rows", [])]
    write_json(run_dir / "skipped_rows.json", rows)


def write_run_end(run_dir: Path, head_state: dict, history: list[dict], test: dict,
                  extra: dict | None = None) -> None:
    """head.pt, history.json, test.json, then status.json (completed). The caller writes the
    plots and report.md after it (``report.write_report``, which reads the status: a report
    written before would call the run incomplete); this module only writes the run's files."""
    save_torch(run_dir / "head.pt", head_state)
    write_history(run_dir, history)
    write_json(run_dir / "test.json", {**test, **(extra or {})})
    write_status(run_dir, "completed", (extra or {}).get("round", history[-1]["round"] if history else None),
                 dp=history[-1].get("dp") if history else None)


def write_postprocessing(run_dir: Path, make_report) -> str | None:
    """postprocessing.json from ``make_report()`` (postprocessing.equalized_odds_report's
    dict). Optional: if it raises, the file records ``{"error": "Type: message"}`` and that
    line is returned for the caller to log; None when it was written."""
    try:
        out, error = make_report(), None
    except Exception as exc:  # noqa: BLE001 - an extra analysis: recorded, not fatal
        error = f"{type(exc).__name__}: {exc}"
        out = {"error": error}
    write_json(run_dir / "postprocessing.json", out)
    return error


def write_best(run_dir: Path, best, test_report) -> None:
    """best.json and head_best.pt for a selection.BestRound (nothing if no round qualified);
    ``test_report(state)`` evaluates a head state on the test split."""
    if best.state is None:
        return
    write_json(run_dir / "best.json", {"round": best.round, "selection_metric": best.metric,
                                       "validation_value": best.value, **test_report(best.state)})
    save_torch(run_dir / "head_best.pt", best.state)
