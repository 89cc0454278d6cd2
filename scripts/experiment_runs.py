"""Run folders of the experiment scripts (make_results, fairness_methods, skew_sweep): their
names, and one `flwr run .` per folder that has no finished result yet.

Why one module: the three scripts run many `flwr run` commands, each into a run folder named
after an experiment and a seed, and must agree on what counts as done (``test.json``
exists), on what happens to a folder that a killed run left behind (renamed aside, never
overwritten), and on how `flwr` finds ``flower-simulation`` (this interpreter's bin folder
first on PATH, so a virtual environment works without being activated).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def slug(name: str) -> str:
    """A folder-safe form of an experiment's name: lower case, each run of other characters one
    ``-``. Example: ``slug("FedProx mu=0.5")`` is ``"fedprox-mu-0-5"``."""
    text = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(filter(None, text.split("-")))


def set_aside_incomplete(run: Path) -> Path | None:
    """Rename a run folder without test.json (an interrupted or failed run) to
    ``<name>.incomplete-<time>``, so that a new run never writes into it; returns the new
    path, or None if there was nothing to set aside."""
    if run.exists() and not (run / "test.json").exists():
        aside = run.with_name(f"{run.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        run.rename(aside)
        return aside
    return None


def ensure_run(run: Path, run_config: str, federation_config: str | None = None) -> Path:
    """``run`` (a folder under the run config's ``results-dir`` whose name is its
    ``run-name``) with a finished result: if it has no test.json yet, runs ``flwr run .
    --run-config RUN_CONFIG run-name=...`` from the project root, logging to
    ``<run>.log`` beside it. Exits with the log's last lines when the run ends without
    test.json. Prints one line: the folder, and the seconds the run took (or ``done``)."""
    if (run / "test.json").exists():
        print(f"  done   {run.name}", flush=True)
        return run
    set_aside_incomplete(run)
    run.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(ROOT),
           "--run-config", f"{run_config} run-name='{run.name}'"]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    log = run.with_name(f"{run.name}.log")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PATH": path})
    if not (run / "test.json").exists():
        sys.exit(f"{run.name} failed (exit {proc.returncode}); the end of {log}:\n{log.read_text()[-3000:]}")
    print(f"  {time.time() - t0:5.0f}s {run.name}", flush=True)
    return run
