"""Start and stop Flower's processes in tests: SuperLink, SuperNodes and ``flwr run``.

Every process is started in its own process group (``start_new_session``) with its output in
a log file, and ``Procs`` ends every group it started when its ``with`` block exits, also when
a test fails. Only loopback addresses and ports chosen free by the test are used.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode of this venv

from celeba_app.flwr_home import migrates_federations  # noqa: E402

#: Flower 1.42 (or any line that moves federations out of pyproject.toml): one SuperLink HTTP
#: API (``--port``), SuperNodes' own API on ``--port``, ``celeba-flwr run`` in a project copy.
ON_1_42 = migrates_federations()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quote(value) -> str:
    """A value as TOML text for ``--run-config`` / ``--node-config``."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"'{value}'" if isinstance(value, str) else str(value)


def overrides(config: dict) -> str:
    return " ".join(f"{k}={quote(v)}" for k, v in config.items())


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default, as for a program started in a
    terminal. A test runner started in the background of a non-interactive shell (``cmd &``)
    inherits SIGINT ignored, and so would every process it starts: Python then installs no
    KeyboardInterrupt handler, and a Ctrl-C test would send a signal nobody receives."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Procs:
    """Processes started by one test; ``with Procs(tmp) as procs:`` ends them all on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def start(self, name: str, cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        """``cmd`` in its own process group, output to ``<name>.log``; ``env``: its environment
        (this one's if None), with this venv first on PATH and unbuffered Python."""
        out = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1",
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.Popen(cmd, cwd=cwd or ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=_default_sigint)
        out.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """Every log, each under its name (for assertion messages)."""
        return "\n".join(f"===== {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def wait_for(self, name: str, text: str, timeout: float) -> bool:
        """True once ``text`` appears in the log of ``name`` (False after ``timeout`` s)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.log(name):
                return True
            if self.procs[name].poll() is not None:
                return text in self.log(name)
            time.sleep(0.2)
        return False

    def stop(self, name: str, grace: float = 10.0) -> None:
        """SIGTERM to the process group, then SIGKILL after ``grace`` seconds."""
        proc = self.procs[name]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:  # children left in the group (e.g. flwr-clientapp, flwr-serverapp)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=max(grace, 10.0))

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # SuperNodes before the SuperLink
            self.stop(name)


class Ports:
    """The SuperLink's three APIs on free loopback ports (flwr 1.42: its one HTTP API on ``control``)."""

    def __init__(self) -> None:
        self.serverappio, self.fleet, self.control = free_port(), free_port(), free_port()

    def superlink_args(self) -> list[str]:
        if ON_1_42:
            return ["--port", str(self.control)]
        return ["--serverappio-api-address", f"127.0.0.1:{self.serverappio}",
                "--fleet-api-address", f"127.0.0.1:{self.fleet}",
                "--control-api-address", f"127.0.0.1:{self.control}"]

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect."""
        return f"127.0.0.1:{self.control if ON_1_42 else self.fleet}"


def project_copy(dest: Path, deployment_port: int | None = None) -> Path:
    """For ``celeba-flwr`` (flwr 1.42): a project folder in ``dest`` (created) with this
    project's pyproject.toml, its ``local-deployment`` at ``deployment_port`` if given, and a
    link to the ``celeba_app`` package."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    text = (ROOT / "pyproject.toml").read_text()
    if deployment_port is not None:
        text = text.replace('address = "127.0.0.1:9093"\ninsecure = true',
                            f'address = "127.0.0.1:{deployment_port}"\ninsecure = true')
    (dest / "pyproject.toml").write_text(text)
    (dest / "celeba_app").symlink_to(ROOT / "celeba_app")
    return dest


def flwr_env(project: Path) -> dict:
    """This environment with ``project``'s own FLWR_HOME and local SuperLink ports, so that
    nothing of the user's Flower is touched."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(project / ".flwr"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}


def start_superlink(procs: Procs, ports: Ports, workdir: Path, extra: list[str] = (),
                    name: str = "superlink") -> subprocess.Popen:
    """``flower-superlink`` (``--insecure`` unless ``extra`` gives TLS files), state in memory.

    ``workdir`` is its working directory, hence the ServerApp's (relative run-config paths).
    """
    args = list(extra) or ["--insecure"]
    proc = procs.start(name, [str(BIN / "flower-superlink"), *args, *ports.superlink_args()],
                       cwd=workdir)
    if ON_1_42:
        assert procs.wait_for(name, "Application startup complete", 60), procs.logs()
        return proc
    assert procs.wait_for(name, "Flower Deployment Runtime: Starting Control API", 60) or \
        procs.wait_for(name, "Starting Control API", 1), procs.logs()
    return proc


def start_supernode(procs: Procs, ports: Ports, name: str, node_config: dict, workdir: Path,
                    extra: list[str] = (), long_running: bool = False) -> subprocess.Popen:
    """``flower-supernode`` with its own ClientAppIo port and ``--node-config``.

    ``long_running``: the SuperNode runs with ``--isolation process`` and one ``celeba-clientapp``
    process (started here as ``<name>-clientapp``) answers all its messages.
    """
    args = list(extra) or ["--insecure"]
    if ON_1_42:  # its own API is HTTP on --port; no celeba-clientapp there
        assert not long_running, "celeba-clientapp is flwr 1.25 only"
        return procs.start(name, [str(BIN / "flower-supernode"), *args, "--superlink", ports.fleet_address,
                                  "--port", str(free_port()), "--node-config", overrides(node_config)], cwd=workdir)
    appio = f"127.0.0.1:{free_port()}"
    cmd = [str(BIN / "flower-supernode"), *args, "--superlink", ports.fleet_address,
           "--clientappio-api-address", appio, "--node-config", overrides(node_config)]
    if long_running:
        cmd += ["--isolation", "process"]
    proc = procs.start(name, cmd, cwd=workdir)
    if long_running:
        procs.start(f"{name}-clientapp", [str(BIN / "celeba-clientapp"), "--clientappio-api-address", appio],
                    cwd=workdir)
    return proc


def flwr_run_command(run_config: dict, federation: str = "local-simulation", *, supernodes: int | None = None,
                     control_port: int | None = None, app: Path = ROOT) -> list[str]:
    """The ``flwr run`` command line of the Flower app in ``app`` (this project unless a test
    made another): a simulation with ``supernodes`` SuperNodes, or (with ``control_port``)
    ``--stream`` against a SuperLink's Control API on loopback."""
    cmd = [str(BIN / "flwr"), "run", str(app), federation]
    if control_port is not None:
        cmd += ["--stream", "--federation-config", f"address='127.0.0.1:{control_port}'"]
    if supernodes is not None:
        cmd += ["--federation-config", f"options.num-supernodes={supernodes}"]
    return cmd + ["--run-config", overrides(run_config)]


def flwr_run_simulation(run_config: dict, supernodes: int, timeout: float = 420,
                        app: Path = ROOT) -> subprocess.CompletedProcess:
    """``flwr run <app> local-simulation`` to its end, output captured. Its process group (flwr,
    flower-simulation, Ray) is ended if it outlives ``timeout`` or the test is interrupted."""
    cmd = flwr_run_command(run_config, supernodes=supernodes, app=app)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (normally nothing)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def flwr_run_deployment(procs: Procs, ports: Ports, run_config: dict, federation: str = "local-deployment",
                        name: str = "flwr-run", timeout: float = 600) -> subprocess.CompletedProcess:
    """``flwr run . <federation> --stream`` against this test's SuperLink; waits for it to end.
    On flwr 1.42: ``celeba-flwr run . local-deployment --stream`` in a project copy (in the
    log folder) whose ``local-deployment`` is this SuperLink."""
    if ON_1_42:
        assert federation == "local-deployment", federation
        project = project_copy(procs.log_dir / f"{name}-project", deployment_port=ports.control)
        cmd = [str(BIN / "celeba-flwr"), "run", ".", federation, "--stream", "--run-config", overrides(run_config)]
        proc = procs.start(name, cmd, cwd=project, env=flwr_env(project))
    else:
        cmd = flwr_run_command(run_config, federation, control_port=ports.control)
        proc = procs.start(name, cmd)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.stop(name)
    return subprocess.CompletedProcess(cmd, proc.returncode, procs.log(name), "")
