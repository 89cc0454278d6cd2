"""A real in-memory grid (the Simulation Engine's) with no engine behind it, for tests of
what the ServerApp does when the engine stops or takes its messages. Built as each Flower
line's ``run_simulation`` builds it: flwr 1.25 (flwr/simulation/run_simulation.py) and 1.42
(the same file; ``Run`` moved to flwr.supercore.run, ``InMemoryGrid`` to flwr.superlink.grid,
the run needs a primary task, ``set_run`` takes the Run)."""

from __future__ import annotations

from flwr.common.constant import Status
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager

from celeba_app import internals


def in_memory_grid(num_nodes: int):
    """The grid as flwr's run_simulation builds it (nodes registered, run RUNNING), and the
    node ids; nothing takes its messages unless the test does (``state.get_message_ins``)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = list(_register_nodes(num_nodes=num_nodes, state_factory=factory))
    state = factory.state()
    if internals.FLOWER_LINE == "1.25":
        from flwr.common.typing import Run, RunStatus
        from flwr.server.grid import InMemoryGrid
        from flwr.supercore.constant import NOOP_FEDERATION

        run = Run.create_empty(run_id=1)
        run.federation = NOOP_FEDERATION
        run.status = RunStatus(Status.RUNNING, "", "")
        state.run_ids[run.run_id] = RunRecord(run=run)
        grid = InMemoryGrid(state_factory=factory)
        grid.set_run(run_id=run.run_id)
        return grid, nodes
    from flwr.proto.task_pb2 import Task
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run, RunStatus
    from flwr.superlink.grid import InMemoryGrid

    run = Run.create_empty(run_id=1)
    run.federation_id = NOOP_FEDERATION_ID
    run.status = RunStatus(Status.RUNNING, "", "")
    run.primary_task_id = 1
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, nodes
