"""A real Flower 1.25 in-memory grid (the Simulation Engine's) with no engine behind it, for
tests of what the ServerApp does when the engine stops or takes its messages."""

from __future__ import annotations

from flwr.common.constant import Status
from flwr.common.typing import Run, RunStatus
from flwr.server.grid import InMemoryGrid
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager


def in_memory_grid(num_nodes: int) -> tuple[InMemoryGrid, list[int]]:
    """The grid as flwr's run_simulation builds it (nodes registered, run RUNNING), and the
    node ids; nothing takes its messages unless the test does (``state.get_message_ins``)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = list(_register_nodes(num_nodes=num_nodes, state_factory=factory))
    run = Run.create_empty(run_id=1)
    run.federation = NOOP_FEDERATION
    run.status = RunStatus(Status.RUNNING, "", "")
    factory.state().run_ids[run.run_id] = RunRecord(run=run)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run_id=run.run_id)
    return grid, nodes
