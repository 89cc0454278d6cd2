"""``celeba-flwr``: Flower's CLI with this project's pyproject.toml as the one source of its
federations (SuperLink connections), which it never rewrites.

From flwr 1.26 on, every ``flwr run <app>`` moves ``[tool.flwr.federations]`` of
``<app>/pyproject.toml`` into ``$FLWR_HOME/config.toml`` and comments the section out of
pyproject.toml (flwr/cli/config_migration.py), with no opt-out. On such a Flower (the 1.42
line), ``celeba-flwr``, run in the project folder:

1. sets ``FLWR_HOME`` to the project's ``.flwr/`` (git-ignored), unless ``FLWR_HOME`` is set;
2. regenerates ``$FLWR_HOME/config.toml`` from pyproject.toml's federations, with Flower's own
   migration code (``internals.write_superlink_connections``), so it is never edited by hand;
3. stages the app in ``$FLWR_HOME/app/``: pyproject.toml without its federation sections, and
   the ``celeba_app`` package, so that ``flwr run`` finds nothing to migrate;
4. ``run``: runs ``flwr run $FLWR_HOME/app [CONNECTION] [OPTIONS]`` from the project folder, so
   relative paths in ``--run-config`` stay relative to it, with
   ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` unless set (else the SuperLink installs
   pyproject's dependencies, flwr 1.25 among them, into the run's environment).

``celeba-flwr stop-superlink`` ends the local SuperLink that ``flwr run`` started, detached,
for this FLWR_HOME (found by its ``--log-file`` in /proc; Linux). Any other subcommand
(``ls``, ``log``, ``stop``, ...) runs as ``flwr <subcommand> ...`` with the same FLWR_HOME and
the working directory inside it, where there is no pyproject.toml for Flower to migrate. On
flwr 1.25, which keeps federations in pyproject.toml, every subcommand is ``flwr``'s, unchanged
(``run`` on this folder). Errors: one ``celeba-flwr: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
try:
    import tomllib
except ImportError:  # Python 3.10 (the flwr 1.25 line): tomli, a dependency of flwr
    import tomli as tomllib
from pathlib import Path

from . import internals

#: The project-local FLWR_HOME, relative to the project folder.
FLWR_HOME_DIR = ".flwr"
#: Where the app is staged for ``flwr run``, inside FLWR_HOME.
STAGED_APP_DIR = "app"
#: The package the staged app carries (the FAB's Python code).
PACKAGE = "celeba_app"
#: The local SuperLink's HTTP API port, as Flower reads it (flwr/cli/constant.py).
LOCAL_SUPERLINK_PORT_ENV, LOCAL_SUPERLINK_PORT = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"

_TABLE_HEADER = re.compile(r"^\[\[?\s*([^\]]+?)\s*\]\]?")


class UsageError(Exception):
    """A bad invocation; its message is the one line printed."""


def migrates_federations() -> bool:
    """True on a Flower that moves pyproject's federations on ``flwr run`` (1.26 and later)."""
    major, minor = (int(x) for x in internals.FLOWER_LINE.split("."))
    return (major, minor) >= (1, 26)


def run_command() -> str:
    """How this Flower line runs the app from the project folder: ``flwr run .`` on 1.25,
    ``celeba-flwr run .`` where ``flwr run`` would rewrite pyproject.toml."""
    return "celeba-flwr run ." if migrates_federations() else "flwr run ."


def without_federations(pyproject: str) -> str:
    """``pyproject`` (a pyproject.toml's text) without its ``[tool.flwr.federations...]``
    tables; every other line is kept as it is."""
    out, skipping = [], False
    for line in pyproject.splitlines(keepends=True):
        if match := _TABLE_HEADER.match(line):
            table = match.group(1).strip()
            skipping = table == "tool.flwr.federations" or table.startswith("tool.flwr.federations.")
        if not skipping:
            out.append(line)
    return "".join(out)


def flwr_home(project_dir: Path) -> Path:
    """``$FLWR_HOME`` if set (made absolute), else ``project_dir/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or project_dir / FLWR_HOME_DIR).resolve()


def prepare(project_dir: Path, home: Path) -> Path:
    """Regenerate ``home/config.toml`` from ``project_dir``'s pyproject.toml and stage the app
    in ``home/app``; returns the staged app's folder. pyproject.toml is only read."""
    pyproject = project_dir / "pyproject.toml"
    if not pyproject.is_file() or not (project_dir / PACKAGE).is_dir():
        raise UsageError(f"{project_dir} is not the celeba-fl project folder (no pyproject.toml and {PACKAGE}/ "
                         "there); accepted: run celeba-flwr in the folder that holds them")
    text = pyproject.read_text(encoding="utf-8")
    try:
        federations = tomllib.loads(text).get("tool", {}).get("flwr", {}).get("federations")
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{pyproject} is not valid TOML ({exc}); accepted: a pyproject.toml that parses") from None
    if not federations:
        raise UsageError(f"{pyproject} has no [tool.flwr.federations]; accepted: a pyproject.toml with its federations")
    home.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(home)
    (home / "config.toml").unlink(missing_ok=True)  # generated: nothing in it outlives pyproject.toml
    with contextlib.redirect_stdout(io.StringIO()):  # Flower's "Created default configuration" on every run
        internals.write_superlink_connections(project_dir)

    app = home / STAGED_APP_DIR
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(project_dir / PACKAGE, app / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    staged = without_federations(text)
    assert "federations" not in tomllib.loads(staged)["tool"]["flwr"], "a federation table was left in"
    (app / "pyproject.toml").write_text(staged, encoding="utf-8")
    return app


def _connection(args: list[str], project_dir: Path) -> str:
    """The SuperLink connection ``flwr run args`` uses: its first positional argument, else
    pyproject's default federation."""
    value_options = {"--run-config", "-c", "--federation-config", "--federation", "--format"}
    i = 0
    while i < len(args):
        if args[i] in value_options:
            i += 2
            continue
        if not args[i].startswith("-"):
            return args[i]
        i += 1
    with open(project_dir / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["federations"].get("default", "")


def local_superlinks() -> dict[int, tuple[Path | None, str]]:
    """The running ``flower-superlink --simulation`` processes, from /proc: pid -> (their
    ``--log-file`` or None, their ``--port``)."""
    found: dict[int, tuple[Path | None, str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if "--simulation" in argv and any(Path(a).name == "flower-superlink" for a in argv[:2]):
            value = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag in ("--log-file", "--port")}
            found[int(proc.name)] = (Path(value["--log-file"]) if "--log-file" in value else None,
                                     value.get("--port", ""))
    return found


def _log_file(home: Path) -> Path:
    """The log file Flower gives the local SuperLink it starts for FLWR_HOME ``home``."""
    return home / "local-superlink" / "superlink.log"


def own_superlink(home: Path) -> int | None:
    """The pid of the local SuperLink Flower started for FLWR_HOME ``home``, or None."""
    return next((pid for pid, (log, _) in local_superlinks().items() if log == _log_file(home)), None)


def check_local_superlink(home: Path) -> None:
    """Refuse when a local SuperLink of another FLWR_HOME holds the local port: ``flwr run``
    would send the run there, whose working directory and FLWR_HOME are not this project's."""
    port = os.environ.get(LOCAL_SUPERLINK_PORT_ENV, LOCAL_SUPERLINK_PORT)
    for pid, (log, its_port) in local_superlinks().items():
        if its_port == port and log != _log_file(home):
            raise UsageError(f"a local SuperLink of another FLWR_HOME (pid {pid}, log {log}) serves 127.0.0.1:{port}; "
                             f"accepted: end it (celeba-flwr stop-superlink in its project, or kill {pid}) and run "
                             f"again, or set {LOCAL_SUPERLINK_PORT_ENV} to a free port")


def stop_superlink(home: Path, timeout: float = 10.0) -> int | None:
    """End (SIGTERM to its process group, SIGKILL after ``timeout`` s) the local SuperLink of
    ``home``; returns its pid, or None when none runs."""
    pid = own_superlink(home)
    if pid is None:
        return None
    os.killpg(pid, signal.SIGTERM)  # Flower starts it in a new session: its group is its pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid in local_superlinks():
        time.sleep(0.2)
    if pid in local_superlinks():
        os.killpg(pid, signal.SIGKILL)
    return pid


def main(argv: list[str] | None = None) -> int:
    """``celeba-flwr SUBCOMMAND [ARGS...]``; returns the exit code (flwr's for its subcommands)."""
    args = list(sys.argv[1:] if argv is None else argv)
    project_dir = Path.cwd()
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run" and rest[:1] in (["."], [str(project_dir)]):
        rest = rest[1:]  # the app is this folder (1.25) or its staged copy (1.42)
    if not migrates_federations():
        if command in ("config", "stop-superlink"):
            print(f"celeba-flwr: flwr {internals.FLOWER_LINE} keeps federations in pyproject.toml; "
                  f"'{command}' is not needed: use flwr directly")
            return 0
        return subprocess.call(["flwr", command, *(["."] if command == "run" else []), *rest])
    home = flwr_home(project_dir)
    try:
        if command == "stop-superlink":
            pid = stop_superlink(home)
            print(f"celeba-flwr: ended the local SuperLink (pid {pid})" if pid else
                  f"celeba-flwr: no local SuperLink runs for FLWR_HOME={home}")
            return 0
        app = prepare(project_dir, home)
        if command == "config":
            print(f"celeba-flwr: wrote {home / 'config.toml'} and staged the app in {app}")
            return 0
        if command != "run":
            return subprocess.call(["flwr", command, *rest], cwd=home)
        from flwr.cli.flower_config import read_superlink_connection  # noqa: PLC0415 - flwr >= 1.26 only

        name = _connection(rest, project_dir)
        with open(home / "config.toml", "rb") as f:
            known = sorted(k for k, v in tomllib.load(f)["superlink"].items() if isinstance(v, dict))
        if name not in known:
            raise UsageError(f"federation {name!r} is not known; accepted: {', '.join(known)} "
                             "(pyproject.toml's [tool.flwr.federations] and Flower's own)")
        connection = read_superlink_connection(name)
        if str(connection.address).startswith(":local"):
            check_local_superlink(home)
    except UsageError as exc:
        print(f"celeba-flwr: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return subprocess.call(["flwr", "run", str(app), *rest])


if __name__ == "__main__":
    raise SystemExit(main())
