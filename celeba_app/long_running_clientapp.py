"""``celeba-clientapp``: one long-running ClientApp process for a SuperNode in ``process`` isolation.

Why: with its default ``--isolation subprocess``, Flower 1.25's SuperNode has its SuperExec
start a new ``flwr-clientapp`` process for every message. Each one pays Python's, flwr's and
torch's start-up again and loses every in-memory cache (the node's parts, its embedding
store), and the SuperExec looks for new work only once a second. Flower's own long-running
``flwr-clientapp`` (no ``--token``) is deprecated and now just runs that SuperExec.

This process takes the SuperExec's place for a SuperNode started with ``--isolation
process``: it asks the SuperNode's ClientAppIo API for work every ``--poll-interval``
seconds and runs each message through the ClientApp *in this process*, with the same
pull / install-FAB / load / call / push steps as ``flwr.supernode.runtime.run_clientapp``
and the same error reply when the app raises. The app itself is unchanged; only where it
runs differs. Messages are handled one at a time, as the SuperNode hands them out.

Usage (per node)::

    flower-supernode --insecure --superlink 127.0.0.1:9092 --isolation process \\
        --clientappio-api-address 127.0.0.1:9094 --node-config "partition-id=0 num-partitions=3"
    celeba-clientapp --clientappio-api-address 127.0.0.1:9094

On flwr 1.25 only: 1.42's SuperNode speaks HTTP to its ClientApps, and ``main`` refuses there
in one line (``NOT_ON_THIS_LINE``).

Like ``flwr-clientapp``, it speaks to the SuperNode without TLS: run it on the SuperNode's
host, on a loopback address. It exits (code 1, one line) when the SuperNode's API stays
unreachable for ``--unreachable-timeout`` seconds (default 60), e.g. after its SuperNode ended.
"""

from __future__ import annotations

import argparse
import sys
import time
from logging import ERROR, INFO

import grpc
from flwr.app.error import Error
from flwr.common import Message
from flwr.common.logger import log

from . import internals
from .internals import ErrorCode

if internals.CLIENTAPP_RUNTIME_AVAILABLE:  # flwr 1.25: the ClientAppIo gRPC API and its helpers
    from .internals import (HeartbeatSender, ListAppsToLaunchRequest, LoadClientAppError, RequestTokenRequest,
                            RunNotRunningException, clientappio_stub, fab_install_dir, get_load_client_app_fn,
                            install_from_fab, make_app_heartbeat_fn_grpc, pull_clientappinputs, push_clientappoutputs)

#: What celeba-clientapp prints, and exits 2 with, on a Flower line without the ClientAppIo gRPC API.
NOT_ON_THIS_LINE = (f"celeba-clientapp: flwr {internals.FLOWER_LINE} is not supported; accepted: flwr 1.25 "
                    "(on flwr 1.42 start the SuperNode without --isolation process: its default subprocess "
                    "isolation runs each message in a new flwr-clientapp process; README 'On Flower 1.42')")


class LongRunningClientApp:
    """Serves one SuperNode's ClientAppIo API from this process.

    ``poll_interval``: seconds between two requests for work when there is none (Flower's
    SuperExec: 1 s). ``flwr_dir``: where FABs are installed (Flower's default if None).
    ``unreachable_timeout``: seconds a call is retried while the SuperNode's API is
    unavailable; then ``grpc.RpcError`` is raised.
    """

    def __init__(self, clientappio_api_address: str, flwr_dir: str | None = None,
                 poll_interval: float = 0.05, unreachable_timeout: float = 60.0) -> None:
        # Flower's retries while the API is unavailable, but not forever: a SuperNode that is gone ends this process
        self.channel, self.stub = clientappio_stub(clientappio_api_address, unreachable_timeout)
        self.flwr_dir = fab_install_dir(flwr_dir)
        self.poll_interval = poll_interval
        self.load_client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True,
                                                      flwr_dir=str(self.flwr_dir))
        self.installed: set[str] = set()  # FAB hashes installed by this process
        self.handled = 0

    def next_token(self) -> str | None:
        """A token for the next message the SuperNode holds for a ClientApp, or None."""
        runs = self.stub.ListAppsToLaunch(ListAppsToLaunchRequest()).run_ids
        if not runs:
            return None
        return self.stub.RequestToken(RequestTokenRequest(run_id=runs[0])).token or None

    def handle(self, token: str) -> None:
        """Pull one message with its context, run the ClientApp on it, push the reply.

        An exception raised by the app becomes an error reply, as in ``flwr-clientapp``; a
        run stopped meanwhile (``RunNotRunningException``) drops the message.
        """
        heartbeat = HeartbeatSender(make_app_heartbeat_fn_grpc(self.stub, token))
        heartbeat.start()
        t0 = time.perf_counter()
        try:
            message, context, run, fab = self._pull(token)
            try:
                if fab and fab.hash_str not in self.installed:
                    install_from_fab(fab.content, flwr_dir=self.flwr_dir, skip_prompt=True)
                    self.installed.add(fab.hash_str)
                client_app = self.load_client_app(run.fab_id, run.fab_version, fab.hash_str if fab else "")
                reply = client_app(message=message, context=context)
            except Exception as ex:  # pylint: disable=broad-exception-caught  # as flwr-clientapp
                log(ERROR, "ClientApp raised an exception", exc_info=ex)
                code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
                if isinstance(ex, LoadClientAppError):
                    code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, \
                        "An exception was raised when attempting to load `ClientApp`"
                reply = Message(Error(code=code, reason=reason), reply_to=message)
            push_clientappoutputs(stub=self.stub, token=token, message=reply, context=context)
            self.handled += 1
            log(INFO, "[celeba-clientapp] %s message of run %s answered in %.2fs%s", message.metadata.message_type,
                context.run_id, time.perf_counter() - t0, " (error reply)" if reply.has_error() else "")
        except RunNotRunningException:
            log(INFO, "[celeba-clientapp] the run ended while its message was handled; dropped")
        except grpc.RpcError as exc:  # this message is lost (the SuperNode sees its heartbeat stop); go on
            log(ERROR, "[celeba-clientapp] a message could not be pulled or its reply pushed: %s", exc)
        finally:
            heartbeat.stop()

    def _pull(self, token: str, attempts: int = 5):
        """``pull_clientappinputs``, tried again after an UNKNOWN error.

        SuperNodes on one host share Flower's FAB store (``~/.flwr/supernode/ffs``), and each
        rewrites the FAB's metadata file when a run starts: a read at that moment fails to
        parse it. Flower's SuperExec rarely meets this because it polls once a second.
        """
        for attempt in range(attempts):
            try:
                return pull_clientappinputs(stub=self.stub, token=token)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNKNOWN or attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def serve(self, max_messages: int | None = None) -> None:
        """Handle messages until ``max_messages`` were handled (forever if None).

        Raises ``grpc.RpcError`` when the SuperNode's API cannot be asked for work (calls
        while it is briefly unavailable are retried); a failure within one message is logged
        and the next message is served.
        """
        log(INFO, "[celeba-clientapp] serving the SuperNode's ClientAppIo API; one process for every message")
        while max_messages is None or self.handled < max_messages:
            token = self.next_token()
            if token is None:
                time.sleep(self.poll_interval)
                continue
            self.handle(token)

    def close(self) -> None:
        """Close the gRPC channel to the SuperNode."""
        self.channel.close()


def main(argv: list[str] | None = None) -> int:
    """``celeba-clientapp --clientappio-api-address HOST:PORT``: serve that SuperNode's
    messages until it is unreachable for ``--unreachable-timeout`` seconds; returns the exit code."""
    parser = argparse.ArgumentParser(prog="celeba-clientapp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clientappio-api-address", required=True,
                        help="the SuperNode's --clientappio-api-address, e.g. 127.0.0.1:9094")
    parser.add_argument("--flwr-dir", default=None, help="where FABs are installed (Flower's default)")
    parser.add_argument("--poll-interval", type=float, default=0.05,
                        help="seconds between requests for work when there is none (default 0.05)")
    parser.add_argument("--unreachable-timeout", type=float, default=60.0,
                        help="seconds to keep retrying an unreachable SuperNode before exiting (default 60)")
    args = parser.parse_args(argv)
    if not internals.CLIENTAPP_RUNTIME_AVAILABLE:
        print(NOT_ON_THIS_LINE, file=sys.stderr)
        return 2
    for flag in ("poll_interval", "unreachable_timeout"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: accepted: a number of seconds > 0")
    app = LongRunningClientApp(args.clientappio_api_address, args.flwr_dir, args.poll_interval,
                               args.unreachable_timeout)
    try:
        app.serve()
    except grpc.RpcError as exc:
        log(ERROR, "[celeba-clientapp] the SuperNode's ClientAppIo API at %s failed: %s",
            args.clientappio_api_address, exc.code() if hasattr(exc, "code") else exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
