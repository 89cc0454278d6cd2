"""celeba-clientapp: every message through the ClientApp in one process, as flwr-clientapp would."""

from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode

from celeba_app import internals
from celeba_app import long_running_clientapp as lr

needs_clientappio_grpc = pytest.mark.skipif(not internals.CLIENTAPP_RUNTIME_AVAILABLE,
                                            reason="celeba-clientapp speaks flwr 1.25's ClientAppIo gRPC API")


class FakeHeartbeat:
    def __init__(self, fn):
        pass

    def start(self):
        pass

    def stop(self):
        pass


@pytest.fixture
def served(monkeypatch):
    """A LongRunningClientApp whose SuperNode hands out tokens t0, t1, ... for messages
    built by ``inbox`` and keeps the replies it pushes; FAB installs are counted."""
    state = SimpleNamespace(pushed=[], installs=[], loads=0)
    inbox = []

    def pull(stub, token):
        msg = Message(RecordDict({"config": ConfigRecord({"x": inbox.pop(0)})}), dst_node_id=1,
                      message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m-{token}"
        ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        return msg, ctx, SimpleNamespace(fab_id="celeba-fl/app", fab_version="1"), SimpleNamespace(
            hash_str="abc", content=b"fab")

    def app(message, context):
        if message.content["config"]["x"] < 0:
            raise ValueError("negative x")
        return Message(RecordDict({"config": ConfigRecord({"y": message.content["config"]["x"] * 2})}),
                       reply_to=message)

    def load(fab_id, fab_version, fab_hash):
        state.loads += 1
        return app

    monkeypatch.setattr(lr, "pull_clientappinputs", pull)
    monkeypatch.setattr(lr, "push_clientappoutputs",
                        lambda stub, token, message, context: state.pushed.append((token, message)))
    monkeypatch.setattr(lr, "install_from_fab", lambda content, flwr_dir, skip_prompt: state.installs.append(content))
    monkeypatch.setattr(lr, "HeartbeatSender", FakeHeartbeat)
    monkeypatch.setattr(lr, "make_app_heartbeat_fn_grpc", lambda stub, token: None)
    server = lr.LongRunningClientApp("127.0.0.1:1", poll_interval=0.001)
    server.load_client_app = load
    tokens = iter(["t0", None, "t1", "t2"])
    server.next_token = lambda: next(tokens)
    yield server, inbox, state
    server.close()


@needs_clientappio_grpc
def test_every_message_is_answered_in_this_process_and_a_raising_app_gives_an_error_reply(served):
    server, inbox, state = served
    inbox += [3, -1, 5]
    server.serve(max_messages=3)
    assert [t for t, _ in state.pushed] == ["t0", "t1", "t2"]
    ok, failed, ok2 = (m for _, m in state.pushed)
    assert ok.content["config"]["y"] == 6 and ok2.content["config"]["y"] == 10
    assert failed.has_error() and failed.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "negative x" in failed.error.reason
    assert state.installs == [b"fab"]  # the FAB once, however many messages
    assert server.handled == 3


@needs_clientappio_grpc
def test_a_poll_interval_that_is_not_positive_is_refused(capsys):
    with pytest.raises(SystemExit):
        lr.main(["--clientappio-api-address", "127.0.0.1:1", "--poll-interval", "0"])
    assert "--poll-interval=0.0: accepted: a number of seconds > 0" in capsys.readouterr().err


@needs_clientappio_grpc
def test_it_exits_with_one_line_when_its_supernode_is_unreachable(caplog):
    from flower_procs import free_port

    code = lr.main(["--clientappio-api-address", f"127.0.0.1:{free_port()}", "--unreachable-timeout", "1"])
    assert code == 1
    assert "the SuperNode's ClientAppIo API at 127.0.0.1:" in caplog.text and "UNAVAILABLE" in caplog.text


@pytest.mark.skipif(internals.CLIENTAPP_RUNTIME_AVAILABLE, reason="flwr 1.25 has the ClientAppIo gRPC API")
def test_on_a_line_without_the_clientappio_grpc_api_it_refuses_in_one_line(capsys):
    assert lr.main(["--clientappio-api-address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [lr.NOT_ON_THIS_LINE] and f"flwr {internals.FLOWER_LINE} is not supported" in err[0]
