"""The server's view of the federation, in-process: waiting for nodes and describing them."""

import time

import pytest
from flwr.app import Context, Message, RecordDict

from celeba_app import client_app
from celeba_app.config import ConfigError, RunConfig
from celeba_app.federation import FederationGrid, describe_nodes, wait_for_nodes
from celeba_app.protocol import describe_record, parse_description
from celeba_app.internals import set_src_node_id


class FakeGrid:
    """Nodes that connect at given times (seconds after creation); query replies built by
    calling the real ClientApp handler with each node's node config."""

    def __init__(self, joins: dict[int, float], node_configs: dict[int, dict] | None = None,
                 run_config: dict | None = None) -> None:
        self.t0, self.joins = time.monotonic(), joins
        self.node_configs, self.run_config = node_configs or {}, run_config or {}

    def get_node_ids(self):
        now = time.monotonic() - self.t0
        return [nid for nid, at in self.joins.items() if at <= now]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=nid, node_config=self.node_configs[nid], state=RecordDict(),
                          run_config=self.run_config)
            reply = client_app.query(msg, ctx)
            set_src_node_id(reply, nid)
            replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def replies_from_messages(monkeypatch):
    """Message(..., reply_to=msg) needs a message that came from a SuperLink; here the reply
    carries the same content or error, addressed back to the node."""
    def reply(content=None, reply_to=None, error=None):
        out = Message(content=content, dst_node_id=reply_to.metadata.dst_node_id, message_type="query") \
            if error is None else Message(content=RecordDict(), dst_node_id=reply_to.metadata.dst_node_id,
                                          message_type="query")
        if error is not None:
            out.content = None
            out.error = error
        return out
    monkeypatch.setattr(client_app, "Message", reply)


def cfg(**kw) -> RunConfig:
    return RunConfig.from_run_config({"node-wait-timeout": 3.0, **kw})


def test_min_nodes_waits_for_staggered_supernodes():
    grid = FakeGrid({1: 0.0, 2: 0.5, 3: 1.0})  # started 0.5 s apart
    assert wait_for_nodes(grid, cfg(**{"min-nodes": 3}), poll_s=0.05) == [1, 2, 3]


def test_without_min_nodes_the_deployment_waits_the_whole_timeout():
    grid = FakeGrid({1: 0.0, 2: 1.5})
    t0 = time.monotonic()
    assert wait_for_nodes(grid, cfg(**{"node-wait-timeout": 2.0}), poll_s=0.05) == [1, 2]
    assert time.monotonic() - t0 >= 2.0


def test_too_few_supernodes_is_one_line():
    with pytest.raises(ConfigError) as info:
        wait_for_nodes(FakeGrid({1: 0.0}), cfg(**{"min-nodes": 3, "node-wait-timeout": 0.3}), poll_s=0.05)
    assert str(info.value).startswith("1 SuperNode(s) connected within node-wait-timeout=0.3s, 3 required")
    with pytest.raises(ConfigError, match="^0 SuperNode.s. connected within node-wait-timeout=0.3s, 1 required"):
        wait_for_nodes(FakeGrid({}), cfg(**{"node-wait-timeout": 0.3}), poll_s=0.05)


def test_describe_builds_partitions_from_the_replies(run_config):
    run_config["split"] = "noniid"
    grid = FakeGrid({7: 0, 8: 0}, {7: {"partition-id": 1, "num-partitions": 2},
                                   8: {"partition-id": 0, "num-partitions": 2}}, run_config)
    described = describe_nodes(grid, [7, 8], RunConfig.from_run_config(run_config))
    entries = described.partitions
    assert set(described.to_embed) == {0, 1} and all(n > 0 for n in described.to_embed.values())  # cold cache
    assert [(e["partition_id"], e["node_id"]) for e in entries] == [(0, 8), (1, 7)]
    for e in entries:
        assert e["num_train"] > 0 and 0 <= e["target_rate"] <= 1 and e["celeb_ids"]
        assert set(e["group_rates"]) == {"Male", "Young", "Pale_Skin"}
    assert not set(entries[0]["celeb_ids"]) & set(entries[1]["celeb_ids"])


def test_two_nodes_claiming_one_partition_are_refused_by_name(run_config):
    grid = FakeGrid({7: 0, 8: 0, 9: 0}, {n: {"partition-id": 1, "num-partitions": 3} for n in (7, 8)}
                    | {9: {"partition-id": 0, "num-partitions": 3}}, run_config)
    with pytest.raises(ConfigError, match=r"partition-id=1 on nodes 7, 8\); accepted: one SuperNode per"):
        describe_nodes(grid, [7, 8, 9], RunConfig.from_run_config(run_config))


def test_a_node_that_cannot_say_what_its_data_is_is_refused_by_name(run_config, tmp_path):
    grid = FakeGrid({7: 0, 8: 0, 9: 0}, {7: {}, 8: {"partition-id": 0, "num-partitions": 2},
                                         9: {"data-path": str(tmp_path / "nowhere")}}, run_config)
    with pytest.raises(ConfigError) as info:
        describe_nodes(grid, [7, 8, 9], RunConfig.from_run_config(run_config))
    line = str(info.value)
    assert line.startswith("2 of 3 SuperNode(s) could not describe their data: ")
    assert "node config lacks partition-id, num-partitions (has: nothing)" in line and "(node 7)" in line
    assert f"data-path={str(tmp_path / 'nowhere')!r}" in line and "no such folder" in line and "(node 9)" in line
    assert "\n" not in line


def test_description_survives_the_config_record():
    entry = {"partition_id": 2, "num_partitions": 3, "source": "data-path /x", "num_train": 5, "num_val": 1,
             "target_rate": 0.5, "group_rates": {"Male": 0.2, "Young": None}, "celeb_ids": [3, 9]}
    back = parse_description(describe_record(entry))
    assert back == {**entry, "group_rates": {"Male": 0.2}}


def test_federation_grid_hides_nodes_that_were_not_described():
    grid = FederationGrid(FakeGrid({1: 0, 2: 0, 3: 0}), [1, 3])
    assert grid.get_node_ids() == [1, 3]


def _query(node_id: int) -> Message:
    return Message(content=RecordDict(), dst_node_id=node_id, message_type="query")


def test_a_stopped_simulation_engine_is_named_instead_of_waiting_for_round_timeout():
    from sim_grid import in_memory_grid

    from celeba_app.federation import EngineStopped

    grid, nodes = in_memory_grid(2)
    federation = FederationGrid(grid, nodes, poll_s=0.05, engine_pickup_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(EngineStopped, match="took none of the 2 message"):
        federation.send_and_receive([_query(n) for n in nodes], timeout=30)
    assert time.monotonic() - t0 < 5


def test_a_running_engine_that_is_slow_to_reply_is_waited_for():
    """The engine took the messages (as Flower's does at once) but has not replied yet: the
    wait is the round's timeout, not the engine check's."""
    import threading

    from sim_grid import in_memory_grid

    grid, nodes = in_memory_grid(2)
    federation = FederationGrid(grid, nodes, poll_s=0.05, engine_pickup_s=0.3)

    def engine():
        for _ in range(40):
            for n in nodes:
                grid.state.get_message_ins(node_id=n, limit=1)
            time.sleep(0.02)

    threading.Thread(target=engine, daemon=True).start()
    t0 = time.monotonic()
    assert federation.send_and_receive([_query(n) for n in nodes], timeout=1.5) == []
    assert time.monotonic() - t0 >= 1.5


def test_an_engine_that_stops_mid_round_ends_the_wait_at_once():
    """Ctrl-C stops Flower's engine (its ``add_messages_to_queue`` thread ends) while the
    ServerApp thread waits for replies: the wait ends with EngineStopped, not round-timeout."""
    import threading

    from sim_grid import in_memory_grid

    from celeba_app.federation import EngineStopped

    grid, nodes = in_memory_grid(2)
    federation = FederationGrid(grid, nodes, poll_s=0.05, engine_pickup_s=60)
    stop = threading.Event()

    def add_messages_to_queue():  # named as Flower's engine thread
        while not stop.is_set():
            for n in nodes:
                grid.state.get_message_ins(node_id=n, limit=1)
            time.sleep(0.02)

    threading.Thread(target=add_messages_to_queue, daemon=True).start()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(EngineStopped, match="stopped while 2 repl"):
        federation.send_and_receive([_query(n) for n in nodes], timeout=30)
    assert time.monotonic() - t0 < 5


class SilentGrid(FakeGrid):
    """FakeGrid whose nodes in ``silent`` stay listed but never reply (a stopped SuperNode
    whose heartbeat has not expired)."""

    def __init__(self, *args, silent=(), **kw):
        super().__init__(*args, **kw)
        self.silent = set(silent)

    def send_and_receive(self, messages, *, timeout=None):
        return super().send_and_receive([m for m in messages if m.metadata.dst_node_id not in self.silent])


def test_a_listed_node_that_does_not_answer_is_left_out_when_enough_others_describe_themselves(run_config, caplog):
    configs = {n: {"partition-id": n - 1, "num-partitions": 4} for n in range(1, 5)}
    grid = SilentGrid({n: 0.0 for n in range(1, 5)}, configs, run_config, silent={4})
    described = describe_nodes(grid, [1, 2, 3, 4], RunConfig.from_run_config({**run_config, "min-nodes": 3}))
    assert [e["node_id"] for e in described.partitions] == [1, 2, 3]
    assert "node 4 listed as connected did not answer (stopped, or silent within round-timeout" in caplog.text
    with pytest.raises(ConfigError, match="1 of 4 SuperNode.s. could not describe their data: no reply .node 4."):
        describe_nodes(grid, [1, 2, 3, 4], RunConfig.from_run_config({**run_config, "min-nodes": 4}))


def test_a_restarted_supernode_takes_its_old_place_and_a_stranger_takes_none(run_config, caplog):
    configs = {n: {"partition-id": n - 1, "num-partitions": 3} for n in range(1, 4)}
    configs[7] = configs[2]  # node 2 restarted: same data, new node id
    configs[8] = {"partition-id": 1, "num-partitions": 2}  # another partitioning: not a described node's data
    grid = FakeGrid({1: 0.0, 2: 0.0, 3: 0.0}, configs, run_config)
    described = describe_nodes(grid, [1, 2, 3], RunConfig.from_run_config(run_config))
    federation = FederationGrid(grid, [1, 2, 3])
    federation.federate(described.partitions, query_timeout=5.0)
    assert federation.rejoin() == {}  # nobody new: nothing sent
    grid.joins = {1: 0.0, 3: 0.0, 7: 0.0}
    assert federation.rejoin() == {2: 7}
    assert federation.node_ids == {1, 3, 7} and sorted(federation.get_node_ids()) == [1, 3, 7]
    assert "SuperNode 7 rejoined as partition 1 (it was node 2" in caplog.text
    grid.joins[8] = 0.0
    assert federation.rejoin() == {} and federation.rejoin() == {}
    assert caplog.text.count("SuperNode 8 connected after the start and takes no part") == 1
    assert "3 of 3 described SuperNodes are connected" in caplog.text


def test_a_node_the_superlink_reports_unavailable_counts_as_gone_not_as_a_failure(run_config, caplog):
    """A stopped SuperNode whose heartbeat has expired: the SuperLink answers for it with
    NODE_UNAVAILABLE. With min-nodes others described, it is left out like a silent one."""
    from flwr.app import Error

    from test_server_app import _error_reply

    class UnavailableGrid(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            out = super().send_and_receive([m for m in messages if m.metadata.dst_node_id != 4])
            gone = [m for m in messages if m.metadata.dst_node_id == 4]
            for m in gone:
                reply = _error_reply(m, "Node Unavailable")
                reply.error = Error(code=5, reason="Node Unavailable")
                out.append(reply)
            return out

    configs = {n: {"partition-id": n - 1, "num-partitions": 4} for n in range(1, 5)}
    grid = UnavailableGrid({n: 0.0 for n in range(1, 5)}, configs, run_config)
    described = describe_nodes(grid, [1, 2, 3, 4], RunConfig.from_run_config({**run_config, "min-nodes": 3}))
    assert [e["node_id"] for e in described.partitions] == [1, 2, 3]
    assert "node 4 listed as connected did not answer (stopped" in caplog.text
