"""Each private or moved name of internals.py still means what the app relies on, in the
installed flwr, flwr-datasets and datasets: an upgrade that moves one fails here, by name."""

import inspect
import threading
from importlib import metadata

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from celeba_app import internals


ON_1_25 = internals.FLOWER_LINE == "1.25"
needs_clientappio_grpc = pytest.mark.skipif(not internals.CLIENTAPP_RUNTIME_AVAILABLE,
                                            reason="flwr 1.25's ClientAppIo gRPC API")


def test_the_installed_versions_are_one_supported_flower_line():
    assert internals.FLOWER_LINE in internals.SUPPORTED_LINES
    for package, version in internals.SUPPORTED_LINES[internals.FLOWER_LINE].items():
        assert metadata.version(package).startswith(version), package


def test_the_simulation_grid_is_known_by_its_class_name():
    if ON_1_25:
        from flwr.server.grid.grpc_grid import GrpcGrid
        from flwr.server.grid.inmemory_grid import InMemoryGrid
    else:  # flwr 1.42
        from flwr.superlink.grid import HttpGrid as GrpcGrid  # the Deployment Engine's grid
        from flwr.superlink.grid import InMemoryGrid

    assert internals.is_simulation_grid(InMemoryGrid.__new__(InMemoryGrid))
    assert not internals.is_simulation_grid(GrpcGrid.__new__(GrpcGrid))


def test_undelivered_messages_reads_the_in_memory_linkstate():
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    assert "self.message_ins_store: dict[str, Message] = {}" in inspect.getsource(InMemoryLinkState.__init__)
    state = type("State", (), {"message_ins_store": {}})()
    waiting, taken = Message(RecordDict(), dst_node_id=1, message_type="train"), \
        Message(RecordDict(), dst_node_id=2, message_type="train")
    taken.metadata.delivered_at = "2026-12-01T00:00:00"
    state.message_ins_store.update({"a": waiting, "b": taken})
    grid = type("G", (), {"state": state})()
    assert internals.undelivered_messages(grid, ["a", "b", "c"]) == {"a"}
    assert internals.undelivered_messages(object(), ["a"]) is None  # the Deployment Engine's grid


def test_the_engine_thread_is_named_after_flowers_function():
    from flwr.server.superlink.fleet.vce import vce_api

    assert callable(getattr(vce_api, internals.ENGINE_THREAD_TARGET))
    assert f"target={internals.ENGINE_THREAD_TARGET}" in inspect.getsource(vce_api)
    assert not internals.simulation_engine_running()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name=f"Thread-9 ({internals.ENGINE_THREAD_TARGET})")
    t.start()
    try:
        assert internals.simulation_engine_running()
    finally:
        stop.set()
        t.join()


def test_a_replys_source_can_be_renamed():
    reply = Message(RecordDict(), dst_node_id=5, message_type="train")
    internals.set_src_node_id(reply, 1234)
    assert reply.metadata.src_node_id == 1234


def test_wire_bytes_grow_with_the_content():
    small = RecordDict({"a": ArrayRecord([np.zeros(1, np.float32)])})
    large = RecordDict({"a": ArrayRecord([np.zeros(1000, np.float32)]), "c": ConfigRecord({"k": 1})})
    assert 0 < internals.wire_bytes(small) < internals.wire_bytes(large)
    assert internals.wire_bytes(large) > 4000


def test_the_project_config_and_overrides_parse_as_flwr_run_does(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1.0.0"\n'
                                            '[tool.flwr.app]\npublisher = "p"\n'
                                            '[tool.flwr.app.components]\nserverapp = "a:b"\nclientapp = "a:c"\n'
                                            '[tool.flwr.app.config]\nsplit = "iid"\nlr = 0.1\n')
    assert internals.project_run_config(tmp_path) == {"split": "iid", "lr": 0.1}
    assert internals.parse_run_config_args(["split='noniid' lr=0.5"]) == {"split": "noniid", "lr": 0.5}


@needs_clientappio_grpc
def test_the_clientapp_runtime_names_resolve_with_the_arguments_used():
    for name in internals.CLIENTAPP_RUNTIME:
        assert getattr(internals, name) is not None, name
    params = {n: set(inspect.signature(getattr(internals, n)).parameters) for n in
              ("pull_clientappinputs", "push_clientappoutputs", "install_from_fab", "get_load_client_app_fn")}
    assert {"stub", "token"} <= params["pull_clientappinputs"]
    assert {"stub", "token", "message", "context"} <= params["push_clientappoutputs"]
    assert {"flwr_dir", "skip_prompt"} <= params["install_from_fab"]
    assert {"default_app_ref", "app_path", "multi_app", "flwr_dir"} <= params["get_load_client_app_fn"]
    with pytest.raises(AttributeError):
        internals.no_such_name  # noqa: B018


@needs_clientappio_grpc
def test_the_clientappio_stub_retries_for_the_given_time(tmp_path):
    channel, stub = internals.clientappio_stub("127.0.0.1:1", unreachable_timeout=0.5)
    try:
        assert hasattr(stub, "ListAppsToLaunch") and hasattr(stub, "PullClientAppInputs")
        assert stub.ListAppsToLaunch is not type(stub).__dict__.get("ListAppsToLaunch")  # wrapped
    finally:
        channel.close()
    assert internals.fab_install_dir(str(tmp_path)) == tmp_path


def test_add_exit_handler_is_flowers():
    if ON_1_25:
        from flwr.common import exit as flwr_exit
    else:  # flwr 1.42
        from flwr.supercore import exit as flwr_exit

    assert internals.add_exit_handler is flwr_exit.add_exit_handler


def test_datasets_row_mapping_and_prepared_splits(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"x": list(range(10))})
    assert internals.row_mapping(ds) is None
    shuffled = ds.shuffle(seed=1)
    assert sorted(internals.row_mapping(shuffled).column(0).to_pylist()) == list(range(10))
    sliced = ds.select(range(3, 6))  # contiguous: a slice of the table, no mapping
    kept = internals.select_with_row_mapping(ds, range(3, 6))
    assert internals.row_mapping(kept).column(0).to_pylist() == [3, 4, 5]
    assert sliced["x"] == kept["x"] == [3, 4, 5]

    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner
    import pandas as pd

    folder = tmp_path / "d"
    folder.mkdir()
    pd.DataFrame({"x": list(range(8))}).to_parquet(folder / "train-0.parquet")
    fds = FederatedDataset(dataset=str(folder), partitioners={"train": IidPartitioner(2)})
    assert internals.prepared_splits(fds) is None
    fds.load_split("train")
    assert "train" in internals.prepared_splits(fds)
