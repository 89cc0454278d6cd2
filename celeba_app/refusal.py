"""How a refused run ends in simulation: its one line, last, and no tracebacks.

A refusal (bad config, data or federation) is one ``celeba-fl: ...`` line. In a simulation the
ServerApp runs in a thread of ``flower-simulation``, and Flower 1.25 then prints, after that line,
the thread's traceback twice (its own log record and Python's thread excepthook), the main
thread's ``RuntimeError: Exception in ServerApp thread`` traceback, Ray's start-up warnings, and
``flwr run`` adds ``Command [...] returned non-zero exit status 1`` (flwr/simulation/
run_simulation.py, flwr/cli/run/run.py). ``install`` (called when the ServerApp module is
imported) keeps all of that for anything else, and for a refusal (``RunRefused``):

* drops Flower's log records and the thread's traceback that repeat it;
* prints the line again as the process's last output, instead of the main thread's traceback;
* ends ``flower-simulation`` with exit code 2, or 0 when its parent is ``flwr run``, which exits
  0 whatever the run's outcome and would otherwise print its own line after ours.

On the Deployment Engine the ServerApp is ``flwr-serverapp``, whose log records ``flwr run
--stream`` shows: it logs the exception with its traceback and then ``flwr_exit``'s block
(``Exit Code: 200``, "An unhandled exception occurred in the ServerApp.", a help URL), both
dropped for a refusal, so the stream ends on the app's line; the process still exits 1 and the
run is marked failed with the line as its reason.

Nothing of it applies to an exception that is not a refusal: those keep every traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from pathlib import Path


class RunRefused(Exception):
    """The run cannot start (bad config, data or federation): its one-line reason was logged.

    An exception, not SystemExit: Flower's ServerApp runners (simulation and the Deployment
    Engine's flwr-serverapp) catch exceptions, mark the run failed and end the process;
    SystemExit left the Deployment Engine's ServerApp process and run alive.
    """


#: The refusal of this process's run, once there is one.
_refused: str | None = None


def refuse(line: str) -> RunRefused:
    """Record ``line`` (without the ``celeba-fl: `` prefix) as this process's refusal; returns
    the exception to raise."""
    global _refused
    _refused = line
    return RunRefused(line)


class _DropRepeats(logging.Filter):
    """Flower's records that repeat a refusal: its message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _refused is None:
            return True
        if record.exc_info and isinstance(record.exc_info[1], RunRefused):
            return False  # flwr-serverapp's "ServerApp raised an exception" with the traceback
        text = record.getMessage()
        if text.startswith("Exit Code: "):
            return False  # flwr_exit's block ("An unhandled exception occurred in the ServerApp.")
        return text.startswith("celeba-fl:") or not (_refused in text or "RunRefused" in text
                                                     or "Exception in ServerApp thread" in text)


def _parent_is_flwr_run() -> bool:
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"flwr") for a in args[:2]) and b"run" in args


def install() -> None:
    """The hooks of the module docstring; once per process, harmless where nothing is refused."""
    if getattr(install, "done", False):
        return
    install.done = True
    logging.getLogger("flwr").addFilter(_DropRepeats())
    for handler in logging.getLogger("flwr").handlers:
        handler.addFilter(_DropRepeats())
    # Ray's start-up advice about a variable the user cannot act on here (num-gpus=0 actors).
    warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray", category=FutureWarning)
    thread_hook, main_hook = threading.excepthook, sys.excepthook

    def on_thread_exception(args) -> None:
        if isinstance(args.exc_value, RunRefused):
            return
        thread_hook(args)

    def on_exception(kind, value, tb) -> None:
        if _refused is None:
            return main_hook(kind, value, tb)
        sys.stdout.flush()
        print(f"celeba-fl: {_refused}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(0 if _parent_is_flwr_run() else 2)

    threading.excepthook, sys.excepthook = on_thread_exception, on_exception
