"""The ServerApp's main, in-process, against a grid whose nodes answer with the real ClientApp's
query handler: what a failing run leaves in its folder."""

import json
from pathlib import Path

import pytest
from flwr.app import Context, Error, RecordDict

from celeba_app import server_app
from celeba_app.flwr_home import run_command
from celeba_app.server_app import RunRefused
from celeba_app.round_loop import NoClientTrained
from celeba_app.internals import set_src_node_id
from test_federation import FakeGrid, replies_from_messages  # noqa: F401 - the fixture is used


class PushPullGrid(FakeGrid):
    """FakeGrid behind Flower's push/pull interface (what FederationGrid calls): query messages
    are answered by the real ClientApp; any other message gets an error reply."""

    def __init__(self, num_nodes: int, run_config):
        super().__init__({n: 0 for n in range(1, num_nodes + 1)},
                         {n: {"partition-id": n - 1, "num-partitions": num_nodes} for n in range(1, num_nodes + 1)},
                         run_config)
        self.replies = []

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            if msg.metadata.message_type == "query":
                [reply] = self.send_and_receive([msg])
            else:
                reply = _error_reply(msg, "<class 'OSError'>:<'disk on fire'>")
            ids.append(f"m{len(self.replies)}")
            reply.metadata.__dict__["_reply_to_message_id"] = ids[-1]
            self.replies.append(reply)
        return ids

    def pull_messages(self, ids):
        out, self.replies = [r for r in self.replies if r.metadata.reply_to_message_id in ids], []
        return out


class FailingTrainGrid(PushPullGrid):
    """Nodes 1-3 describe partitions 0-2 truthfully, then fail every train message, as a
    Flower ClientApp whose handler raised does (an error reply)."""

    def __init__(self, run_config):
        super().__init__(3, run_config)


def _error_reply(msg, reason):
    from flwr.app import Message

    reply = Message(content=RecordDict(), dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)
    reply.content = None
    reply.error = Error(code=2, reason=reason)
    set_src_node_id(reply, msg.metadata.dst_node_id)
    return reply


def test_a_run_that_fails_after_its_folder_exists_says_why_in_status_json(run_config):
    run_config.update({"run-name": "failing", "min-nodes": 3, "round-timeout": 60.0})
    grid = FailingTrainGrid(run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(NoClientTrained, match="node 1: <class 'OSError'>:<'disk on fire'>"):
        server_app.main(grid, context)
    run = Path(run_config["results-dir"]) / "failing"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["last_completed_round"] == 0
    assert status["reason"].startswith("NoClientTrained: no client could train in round 1: node 1: ")
    assert [h["round"] for h in json.loads((run / "history.json").read_text())] == [0]  # kept
    parts = json.loads((run / "partitions.json").read_text())["partitions"]
    assert [p["partition_id"] for p in parts] == [0, 1, 2] and [p["node_id"] for p in parts] == [1, 2, 3]


class InterruptedGrid(FailingTrainGrid):
    """A signal arrives (Flower calls its exit handlers) while round 1's train messages are
    out; the replies that follow are errors, as from an engine that stopped."""

    def __init__(self, run_config, handlers):
        super().__init__(run_config)
        self.handlers = handlers

    def push_messages(self, messages):
        messages = list(messages)
        if any(m.metadata.message_type != "query" for m in messages):
            for handler in self.handlers:
                handler()
        return super().push_messages(messages)


def run_failing(run_config, monkeypatch, name: str, grid_of) -> tuple[list, Path]:
    """server_app.main on ``grid_of(run_config, handlers)`` (every client fails, so the run
    ends with NoClientTrained), with Flower's exit handlers captured: (handlers, status.json)."""
    handlers = []
    monkeypatch.setattr(server_app, "add_exit_handler", handlers.append)
    run_config.update({"run-name": name, "min-nodes": 3, "round-timeout": 60.0})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(NoClientTrained):
        server_app.main(grid_of(run_config, handlers), context)
    return handlers, Path(run_config["results-dir"]) / name / "status.json"


def test_a_signal_during_a_round_leaves_failed_and_why_in_status_json(run_config, monkeypatch):
    handlers, path = run_failing(run_config, monkeypatch, "signalled", InterruptedGrid)
    assert len(handlers) == 1
    status = json.loads(path.read_text())
    assert status["state"] == "failed" and status["last_completed_round"] == 0
    assert status["reason"].startswith("interrupted by a signal (Ctrl-C, SIGTERM or flwr stop) after round 0; "
                                       f"resume with: {run_command()} --run-config \""), status
    command = status["reason"].split("resume with: ", 1)[1]
    assert command.endswith(" resume='signalled'\"") and "run-name=" not in command
    for key in ("dataset", "weights", "image-size", "results-dir", "min-nodes"):  # what differs from pyproject
        assert f" {key}=" in command or f'"{key}=' in command, (key, command)


def test_an_exit_handler_of_a_finished_run_writes_nothing(run_config, monkeypatch):
    handlers, path = run_failing(run_config, monkeypatch, "done", lambda rc, _: FailingTrainGrid(rc))
    before = path.read_text()
    handlers[0]()  # the process exits later, e.g. at the next run's Ctrl-C
    assert path.read_text() == before


def test_more_supernodes_than_identities_is_refused_before_the_run_folder_exists(run_config):
    """61 SuperNodes over the tiny train split's 60 identities (split=noniid): every node says
    why in its query reply, and the server refuses the run in one line, writing nothing."""
    run_config.update({"split": "noniid", "run-name": "too-many", "min-nodes": 61})
    grid = PushPullGrid(61, run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(RunRefused) as info:
        server_app.main(grid, context)
    assert str(info.value).startswith("61 of 61 SuperNode(s) could not describe their data: num_partitions=61 "
                                      "is more than the 60 identities"), info.value
    assert not (Path(run_config["results-dir"]) / "too-many").exists()



def test_a_full_disk_ends_the_run_failed_in_one_line_with_no_temporary_files(run_config, monkeypatch):
    """ENOSPC while round 0 is written: status.json says failed and why (overwritten in place
    when no temporary copy fits), the run ends on its one line (RunRefused: no traceback),
    and no .tmp file is left."""
    import errno

    from celeba_app import atomic, results

    real = atomic.atomic_write
    full = {"on": False}

    def atomic_write(path, write):
        if full["on"]:
            def fill(tmp):
                write(tmp)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, fill)
        return real(path, write)

    def write_round(run_dir, history, checkpoint, log):
        full["on"] = True  # the disk fills up as round 0 is written
        results.write_round(run_dir, history, checkpoint, log)

    monkeypatch.setattr(results, "atomic_write", atomic_write)
    monkeypatch.setattr(server_app, "write_round", write_round)
    run_config.update({"run-name": "full-disk", "min-nodes": 3, "round-timeout": 60.0})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(RunRefused, match=r"run failed before its first round was written: OSError: \[Errno 28\] No space left"):
        server_app.main(FailingTrainGrid(run_config), context)
    run = Path(run_config["results-dir"]) / "full-disk"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "No space left on device" in status["reason"]
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.tmp"))
