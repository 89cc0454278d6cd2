"""TLS and CLI-managed SuperNode authentication on the Deployment Engine (flwr 1.25), offline.

scripts/make_certs.sh makes a CA, the SuperLink's certificate and two SuperNode key pairs; a
SuperLink runs with TLS and ``--enable-supernode-auth``; ``flwr supernode register`` registers
the first SuperNode's public key; then the registered SuperNode must come online and the
unregistered one (the second key) must be refused, and so must a SuperNode without a key (it
would register itself without ``--enable-supernode-auth``). Loopback only, ports chosen free here.

``flwr supernode register`` / ``ls`` take no ``--federation-config`` in flwr 1.25, so they run
against a copy of the project's ``local-deployment-tls`` federation in ``tmp_path/project``
(only ``address`` changed): its ``root-certificates = "certificates/ca.crt"`` is resolved, as
flwr does, relative to the project folder, where the certificates are made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli  # flwr's own dependencies (as tomli_w): also on Python 3.10
import tomli_w

from flower_procs import BIN, ROOT, Ports, Procs, start_superlink, start_supernode

FEDERATION = "local-deployment-tls"
MAKE_CERTS = ROOT / "scripts" / "make_certs.sh"
# What a SuperNode whose key is not registered gets (SuperNode log, in the gRPC error's details)
# and what the SuperLink logs: "[Fleet.ActivateNode] Activation failed: <REFUSED>".
REFUSED = "No SuperNode found with the given public key."
# A SuperNode without --auth-supernode-private-key makes its own key and registers itself
# through the Fleet API (flwr's automatic authentication); --enable-supernode-auth refuses that.
# (The SuperNode with an unregistered key above is refused with or without the flag, as a
# SuperNode given a key never registers itself: this third one is what shows the flag works.)
SELF_REGISTRATION_REFUSED = "SuperNode authentication is enabled. All SuperNodes must be registered via the CLI."
SELF_REGISTRATION_REFUSED_LINK = "SuperNode registration is disabled through Fleet API."

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")]


def write_project(project: Path, control_port: int) -> dict:
    """A minimal Flower project whose federation is the real one with this test's address."""
    real = tomli.loads((ROOT / "pyproject.toml").read_text())
    app = real["tool"]["flwr"]["app"]
    federation = dict(real["tool"]["flwr"]["federations"][FEDERATION])
    assert not federation.get("insecure", False), federation
    assert federation.get("root-certificates"), federation
    federation["address"] = f"127.0.0.1:{control_port}"
    config = {"project": {"name": real["project"]["name"], "version": real["project"]["version"]},
              "tool": {"flwr": {"app": {"publisher": app["publisher"], "components": app["components"]},
                                "federations": {FEDERATION: federation}}}}
    (project / "pyproject.toml").write_text(tomli_w.dumps(config))
    return federation


def flwr_json(project: Path, *args: str) -> dict:
    """``flwr <args> . local-deployment-tls --format json`` in ``project``, its JSON answer.

    flwr 1.25's ``supernode register`` exits 0 also when it fails: only its JSON says.
    """
    cmd = [str(BIN / "flwr"), *args, ".", FEDERATION, "--format", "json"]
    out = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"{cmd}: rc={out.returncode}\n{out.stdout}\n{out.stderr}") from None


def node_status(project: Path, node_id: int) -> str | None:
    nodes = flwr_json(project, "supernode", "ls").get("nodes", [])
    return next((n["status"] for n in nodes if int(n["node-id"]) == node_id), None)


def test_registered_supernode_joins_and_unregistered_one_is_refused(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "PYTHON": sys.executable}  # make_certs.sh's fallback without ssh-keygen
    made = subprocess.run(["bash", str(MAKE_CERTS), "certificates", "2"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stdout + made.stderr
    certs = project / "certificates"
    again = subprocess.run(["bash", str(MAKE_CERTS), "certificates", "2"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "not overwriting" in again.stderr, again.stderr

    ports = Ports()
    federation = write_project(project, ports.control)
    assert (project / federation["root-certificates"]).resolve() == (certs / "ca.crt").resolve()

    with Procs(tmp_path / "logs") as procs:
        start_superlink(procs, ports, project, extra=[
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth"])

        registered = flwr_json(project, "supernode", "register", str(certs / "supernode_0.pub"))
        assert registered.get("success") is True, (registered, procs.logs())
        node_id = int(registered["node-id"])

        def supernode(name: str, key: str | None, partition: int):
            auth = ["--auth-supernode-private-key", str(certs / key)] if key else []
            return start_supernode(procs, ports, name, {"partition-id": partition, "num-partitions": 3},
                                   project, extra=["--root-certificates", str(certs / "ca.crt"), *auth])

        good = supernode("supernode-registered", "supernode_0", 0)
        bad = supernode("supernode-unregistered", "supernode_1", 1)
        keyless = supernode("supernode-keyless", None, 2)

        # The unregistered SuperNode is refused and exits.
        assert procs.wait_for("supernode-unregistered", REFUSED, 40), procs.logs()
        assert bad.wait(timeout=20) != 0, procs.logs()
        assert f"[Fleet.ActivateNode] Activation failed: {REFUSED}" in procs.log("superlink"), \
            procs.logs()
        # So is the one without a key, that tries to register itself.
        assert procs.wait_for("supernode-keyless", SELF_REGISTRATION_REFUSED, 40), procs.logs()
        assert keyless.wait(timeout=20) != 0, procs.logs()
        assert SELF_REGISTRATION_REFUSED_LINK in procs.log("superlink"), procs.logs()

        # The registered one is activated under the registered ID and shows as online.
        assert procs.wait_for("supernode-registered", f"SuperNode ID: {node_id}", 40), procs.logs()
        deadline = time.time() + 20
        while (status := node_status(project, node_id)) != "online" and time.time() < deadline:
            time.sleep(0.5)
        assert status == "online", (status, procs.logs())
        nodes = flwr_json(project, "supernode", "ls")["nodes"]
        assert [int(n["node-id"]) for n in nodes] == [node_id], nodes  # nothing for the other key
        assert good.poll() is None, procs.logs()
