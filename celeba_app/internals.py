"""The one door to private or moved names of Flower, flwr-datasets and datasets.

Two Flower lines are supported (``SUPPORTED_LINES``): flwr 1.25.x with flwr-datasets 0.5 and
datasets 3.1 (the default install), and flwr 1.42.x with flwr-datasets 0.6 and datasets 4
(``requirements/flower-1.42.txt``). ``FLOWER_LINE`` names the installed one. Everything else in
the app uses only their public APIs (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``,
``flwr_datasets.FederatedDataset``, ``datasets.Dataset``); where a name moved between the
lines, the branch is here. ``tests/test_internals.py`` checks each name against the installed
versions, so an upgrade that moves one fails there, by name, before anything else does.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from importlib import metadata as _metadata

#: The supported Flower lines: the version prefix of each package they are tested with.
SUPPORTED_LINES = {
    "1.25": {"flwr": "1.25", "flwr-datasets": "0.5", "datasets": "3.1"},
    "1.42": {"flwr": "1.42", "flwr-datasets": "0.6", "datasets": "4."},
}
#: The installed line: flwr's major.minor ("1.25", "1.42"; another is not supported).
FLOWER_LINE = ".".join(_metadata.version("flwr").split(".")[:2])


#: On flwr 1.25 only (``CLIENTAPP_RUNTIME_AVAILABLE``): flwr 1.42's SuperNode runtime API is
#: HTTP and its ClientApp helpers (``pull_clientappinputs``, ``flwr.proto.appio_pb2``) are gone.
CLIENTAPP_RUNTIME_AVAILABLE = FLOWER_LINE == "1.25"

#: Imported by name from here by long_running_clientapp.py, on first use (``__getattr__``, so
#: that importing this module stays cheap): the steps of flwr-clientapp
#: (flwr/supernode/runtime/run_clientapp.py) and the ClientAppIo API they speak.
CLIENTAPP_RUNTIME = {
    "install_from_fab": "flwr.cli.install",
    "LoadClientAppError": "flwr.clientapp.client_app",
    "get_load_client_app_fn": "flwr.clientapp.utils",
    "RunNotRunningException": "flwr.common.typing",
    "ListAppsToLaunchRequest": "flwr.proto.appio_pb2",
    "RequestTokenRequest": "flwr.proto.appio_pb2",
    "HeartbeatSender": "flwr.supercore.heartbeat",
    "make_app_heartbeat_fn_grpc": "flwr.supercore.heartbeat",
    "pull_clientappinputs": "flwr.supernode.runtime.run_clientapp",
    "push_clientappoutputs": "flwr.supernode.runtime.run_clientapp",
}


def __getattr__(name: str) -> Any:
    if name in CLIENTAPP_RUNTIME:
        import importlib

        return getattr(importlib.import_module(CLIENTAPP_RUNTIME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from flwr.common.constant import ErrorCode  # noqa: E402,F401 - error codes of error replies

if FLOWER_LINE == "1.25":
    from flwr.common.exit import add_exit_handler  # noqa: E402,F401
else:  # flwr 1.42: flwr.supercore.exit
    from flwr.supercore.exit import add_exit_handler  # noqa: E402,F401

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets import FederatedDataset

#: The Simulation Engine's thread that takes messages from the in-memory LinkState: Python
#: names a thread after its target, flwr/server/superlink/fleet/vce/vce_api.py's function.
ENGINE_THREAD_TARGET = "add_messages_to_queue"


# --------------------------------------------------------------------------- the ServerApp's grid
def is_simulation_grid(grid: Any) -> bool:
    """True for the Simulation Engine's grid (flwr's ``InMemoryGrid``, by class name, so a
    wrapper or a moved module does not matter)."""
    return type(grid).__name__ == "InMemoryGrid"


def undelivered_messages(grid: Any, message_ids: Iterable[str]) -> set[str] | None:
    """Of ``message_ids``, those the Simulation Engine has not taken yet, from the in-memory
    LinkState's ``message_ins_store`` (message id -> Message, ``metadata.delivered_at`` empty
    until taken); None where the grid has no such store (Deployment Engine, other Flower)."""
    store = getattr(getattr(grid, "state", None), "message_ins_store", None)
    if not isinstance(store, dict):
        return None
    return {mid for mid in message_ids
            if mid in store and not getattr(store[mid].metadata, "delivered_at", "x")}


def simulation_engine_running() -> bool:
    """True while a thread running ``ENGINE_THREAD_TARGET`` is alive in this process."""
    return any(t.name.endswith(f"({ENGINE_THREAD_TARGET})") and t.is_alive() for t in threading.enumerate())


def set_src_node_id(message: Any, node_id: int) -> None:
    """Name ``node_id`` as a reply's source: ``Metadata.src_node_id`` is read-only, its value
    is the private ``_src_node_id``."""
    message.metadata.__dict__["_src_node_id"] = node_id


def differential_privacy():
    """Flower's DP functions and constants module (``compute_clip_model_update``, ``get_norm``,
    ``KEY_CLIPPING_NORM``, ``KEY_NORM_BIT``, ...): ``flwr.common.differential_privacy`` (and
    ``..._constants``) in 1.25, ``flwr.supercore.differential_privacy`` in 1.42."""
    try:
        from flwr.supercore import differential_privacy as dp
    except ImportError:  # flwr 1.25
        import types

        from flwr.common import differential_privacy as functions
        from flwr.common import differential_privacy_constants as constants

        dp = types.SimpleNamespace(**{k: v for module in (constants, functions) for k, v in vars(module).items()
                                      if not k.startswith("__")})
    return dp


def set_task_identity(run_id: int = 1, node_id: int = 1, task_id: int = 1) -> None:
    """Name the task this process runs, for in-process use of Flower's messages (tests,
    benchmarks): from flwr 1.42 on, ``Message(...)`` outside a running task raises
    ``RuntimeError: TaskIdentity.run_id is not set`` (``flwr.supercore.task_identity``).
    Nothing to do on 1.25, which has no task identity."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # flwr 1.25
        return
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


def wire_bytes(content: Any) -> int:
    """A RecordDict's size as Flower's protobuf encodes it (``flwr.common.serde``)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


# --------------------------------------------------------------------------- the project's config
def project_run_config(project_dir: Path) -> dict:
    """pyproject.toml's ``[tool.flwr.app.config]``, flattened as ``flwr run`` does."""
    from flwr.common.config import flatten_dict, get_project_config

    return flatten_dict(get_project_config(project_dir)["tool"]["flwr"]["app"]["config"])


def parse_run_config_args(overrides: list[str]) -> dict:
    """``--run-config`` strings parsed as ``flwr run`` parses them (TOML values)."""
    from flwr.common.config import parse_config_args

    return parse_config_args(overrides)


def write_superlink_connections(project_dir: Path) -> list[str]:
    """flwr >= 1.26: write each ``[tool.flwr.federations]`` entry of ``project_dir``'s
    pyproject.toml into ``$FLWR_HOME/config.toml`` as a SuperLink connection, and its default,
    with the first half of Flower's own migration (``flwr.cli.config_migration``'s
    ``_migrate_pyproject_toml_to_flower_config``: ``options`` without ``address`` become the
    local SuperLink, relative ``root-certificates`` absolute). Its second half, which comments the
    section out of pyproject.toml, is not called. Returns the connection names written."""
    from flwr.cli.config_migration import _migrate_pyproject_toml_to_flower_config

    names, _ = _migrate_pyproject_toml_to_flower_config(project_dir, None)
    return names


# --------------------------------------------------------------------------- the ClientAppIo API
def fab_install_dir(path: str | None) -> Path:
    """Where Flower installs FABs (``flwr.common.config.get_flwr_dir``; ``path`` if given)."""
    from flwr.common.config import get_flwr_dir

    return get_flwr_dir(path)


def clientappio_stub(address: str, unreachable_timeout: float) -> tuple[Any, Any]:
    """(channel, ClientAppIoStub) to a SuperNode's ClientAppIo API without TLS, every call
    retried by Flower's own invoker while the API is unavailable, for at most
    ``unreachable_timeout`` seconds (then ``grpc.RpcError``)."""
    from flwr.common.grpc import create_channel
    from flwr.common.retry_invoker import _make_simple_grpc_retry_invoker, _wrap_stub
    from flwr.proto.clientappio_pb2_grpc import ClientAppIoStub

    channel = create_channel(server_address=address, insecure=True)
    stub = ClientAppIoStub(channel)
    retry = _make_simple_grpc_retry_invoker()
    retry.max_time = unreachable_timeout
    _wrap_stub(stub, retry)
    return channel, stub


# --------------------------------------------------------------------------- flwr-datasets, datasets
def prepared_splits(fds: FederatedDataset) -> dict | None:
    """The DatasetDict a FederatedDataset has prepared (its private ``_dataset``; None before
    the first ``load_split``)."""
    return fds._dataset  # noqa: SLF001


def row_mapping(ds: Dataset):
    """A Dataset's row mapping into its table (``datasets``' private ``_indices``: a pyarrow
    table of one column, or None when the Dataset is its table in order)."""
    return ds._indices  # noqa: SLF001


def select_with_row_mapping(ds: Dataset, indices) -> Dataset:
    """``ds.select(indices)`` that always keeps an explicit row mapping: ``select`` turns a
    contiguous selection into a slice of the table, whose rows then restart at 0."""
    return ds._select_with_indices_mapping(indices)  # noqa: SLF001
