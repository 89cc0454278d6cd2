"""The federation as the server sees it: which nodes take part, and what data each holds.

On the Deployment Engine, SuperNodes connect at their own pace, and the server can read none
of their data. So before round 1 the server

1. waits for the nodes (``wait_for_nodes``): in simulation every node of the federation; on
   the Deployment Engine ``min-nodes`` of them (proceeding as soon as that many are
   connected), or, with ``min-nodes=0``, whoever connected within ``node-wait-timeout``;
2. asks each one to describe its data (``describe_nodes``, a ``query`` message answered by the
   ClientApp's ``@app.query``) and refuses, naming the nodes, when a node cannot say what its
   data is or two nodes claim one partition;
3. runs every round on exactly those nodes (``FederationGrid``): a node that connects later
   takes part only as a described node that restarted (same partition-id and data
   fingerprint, ``FederationGrid.rejoin``).

Every refusal is a ``ConfigError`` with one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Iterable

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from . import protocol as P
from .config import ConfigError, RunConfig
from .internals import (ErrorCode, is_simulation_grid, set_src_node_id, simulation_engine_running,
                        undelivered_messages)


def wait_for_nodes(grid: Grid, cfg: RunConfig, poll_s: float = 1.0) -> list[int]:
    """The connected node ids to federate, after the wait ``min-nodes`` and
    ``node-wait-timeout`` describe; ConfigError when fewer than required connected."""
    simulation = is_simulation_grid(grid)
    deadline = time.monotonic() + cfg.node_wait_timeout
    nodes = sorted(grid.get_node_ids())
    last_log = 0.0
    while time.monotonic() < deadline:
        if cfg.min_nodes and len(nodes) >= cfg.min_nodes:
            break
        if simulation and not cfg.min_nodes and nodes:
            time.sleep(poll_s)  # every node is registered at start: settled once it stops growing
            now = sorted(grid.get_node_ids())
            if now == nodes:
                break
            nodes = now
            continue
        if time.monotonic() - last_log > 10:
            log(INFO, "celeba-fl: %d SuperNode(s) connected; waiting for %s (node-wait-timeout=%gs)",
                len(nodes), f"min-nodes={cfg.min_nodes}" if cfg.min_nodes else "more", cfg.node_wait_timeout)
            last_log = time.monotonic()
        time.sleep(poll_s)
        nodes = sorted(grid.get_node_ids())
    required = cfg.min_nodes or 1
    if len(nodes) < required:
        raise ConfigError(
            f"{len(nodes)} SuperNode(s) connected within node-wait-timeout={cfg.node_wait_timeout:g}s, "
            f"{required} required (min-nodes={cfg.min_nodes}); accepted: start the SuperNodes "
            "(flower-supernode ... --node-config ...), lower min-nodes or raise node-wait-timeout"
        )
    return nodes


@dataclass
class NodeDescriptions:
    """The nodes' replies to ``query``: ``partitions`` (partitions.json's entries, by partition
    id, each with its ``node_id``) and ``to_embed`` (partition id -> images that node has yet to
    embed; None where it did not say)."""

    partitions: list[dict]
    to_embed: dict[int, int | None]


def describe_nodes(grid: Grid, node_ids: list[int], cfg: RunConfig, id_salt: str | None = None) -> NodeDescriptions:
    """Ask every node to describe its data (protocol.py's ``query``).

    Refuses (ConfigError, one line naming the nodes) when a node replies with an error, when
    nodes do not reply within ``round-timeout`` and fewer than ``min-nodes`` (at least one)
    described themselves (else the silent ones are left out, with a warning: a SuperNode
    that stopped stays listed until its heartbeat expires), when two nodes claim one
    partition id, or when nodes of one dataset disagree on ``num-partitions``.
    """
    messages = [Message(content=P.query_content(id_salt), dst_node_id=nid, message_type=P.QUERY) for nid in node_ids]
    # Describing loads each node's data (a first download of the hub dataset included): as
    # long as a round may take.
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    by_node: dict[int, dict] = {}
    to_embed: dict[int, int | None] = {}
    failed: dict[str, list[int]] = {}  # reason -> nodes
    for reply in replies:
        nid = reply.metadata.src_node_id
        if reply.has_error() and int(reply.error.code) == ErrorCode.NODE_UNAVAILABLE:
            continue  # the SuperLink answers for a stopped node: it is not there (counted as silent)
        if reply.has_error():
            failed.setdefault(error_reason(reply), []).append(nid)
        else:
            entry = P.parse_description(reply.content[P.DESCRIPTION])
            entry["node_id"] = nid
            by_node[nid] = entry
            to_embed[int(entry["partition_id"])] = P.parse_to_embed(reply.content)
    answered = set(by_node) | {n for nodes in failed.values() for n in nodes}
    silent = [nid for nid in node_ids if nid not in answered]
    if silent and not failed and len(by_node) >= max(1, cfg.min_nodes):
        # listed by the SuperLink, yet silent: stopped (its heartbeat has not expired yet)
        log(WARNING, "celeba-fl: %s listed as connected did not answer (stopped, or silent within "
            "round-timeout=%gs) and take%s no part; %d SuperNode(s) described (min-nodes=%d)", _nodes(silent),
            cfg.round_timeout,
            "" if len(silent) > 1 else "s", len(by_node), cfg.min_nodes)
    elif silent:
        failed["no reply"] = silent
    if failed:
        count = sum(len(n) for n in failed.values())
        detail = "; ".join(f"{reason} ({_nodes(nodes)})" for reason, nodes in failed.items())
        raise ConfigError(f"{count} of {len(node_ids)} SuperNode(s) could not describe their data: {detail}")
    claims: dict[int, list[int]] = {}
    for nid, entry in by_node.items():
        claims.setdefault(int(entry["partition_id"]), []).append(nid)
    shared = {pid: nids for pid, nids in claims.items() if len(nids) > 1}
    if shared:
        detail = "; ".join(f"partition-id={pid} on nodes {', '.join(map(str, sorted(n)))}"
                           for pid, n in sorted(shared.items()))
        raise ConfigError(f"two or more SuperNodes hold one partition ({detail}); accepted: one "
                          "SuperNode per partition-id")
    counts = {e["num_partitions"] for e in by_node.values() if e["num_partitions"] is not None}
    if len(counts) > 1:
        raise ConfigError(f"SuperNodes disagree on num-partitions ({sorted(counts)}); accepted: one "
                          "partitioning for the whole federation")
    entries = sorted(by_node.values(), key=lambda e: e["partition_id"])
    expected = counts.pop() if counts else None
    if expected is not None and len(entries) < expected:
        missing = sorted(set(range(expected)) - {e["partition_id"] for e in entries})
        log(WARNING, "celeba-fl: %d of %d partitions have a SuperNode; partitions %s take no part",
            len(entries), expected, missing[:20])
    return NodeDescriptions(entries, {e["partition_id"]: to_embed[e["partition_id"]] for e in entries})


def error_reason(reply: Message) -> str:
    """The useful part of an error reply: the app's own one line when it refused
    (client_app.refusals_as_errors), else the exception's text without Ray's wrapping."""
    text = " ".join(str(reply.error.reason).split())
    if "celeba-fl:" in text:
        return text[text.index("celeba-fl:") + len("celeba-fl:"):].strip()[:600]
    return text[-400:]


def _query(grid: Grid, node_ids: list[int], timeout: float, id_salt: str | None = None) -> dict[int, dict]:
    """{node id: its description} of the nodes that answered a ``query`` within ``timeout``."""
    messages = [Message(content=P.query_content(id_salt), dst_node_id=nid, message_type=P.QUERY) for nid in node_ids]
    out = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error() and P.DESCRIPTION in reply.content.config_records:
            out[reply.metadata.src_node_id] = {**P.parse_description(reply.content[P.DESCRIPTION]),
                                               "node_id": reply.metadata.src_node_id}
    return out


def _nodes(nodes: list[int], show: int = 3) -> str:
    more = f" and {len(nodes) - show} more" if len(nodes) > show else ""
    return f"node{'s' if len(nodes) > 1 else ''} {', '.join(map(str, nodes[:show]))}{more}"


ENGINE_PICKUP_S = 120.0
"""Seconds within which a running Simulation Engine takes a message it was sent (it takes every
message within milliseconds once its actors exist; starting Ray and the actors takes seconds)."""


class EngineStopped(Exception):
    """The Simulation Engine took none of the messages sent to it: it is not running.
    Not a RuntimeError: flwr reports those as "Failed to start run"."""


class FederationGrid:
    """A Grid whose ``get_node_ids`` lists only the described nodes still connected, and whose
    ``send_and_receive`` polls for replies every ``poll_s`` seconds; every other call goes to
    the wrapped Grid.

    Strategies sample from it, so a node that joins later (and was never described) receives
    nothing. Flower 1.25's GrpcGrid (the Deployment Engine) sleeps 3 s between polls, which
    puts a floor of 3 s under each of a round's two phases (train, evaluate) whatever the
    clients cost. Under the Simulation Engine, ``send_and_receive`` raises EngineStopped when
    the engine, once seen running, has stopped (``internals.simulation_engine_running``), or when it has taken none
    of the messages within ``engine_pickup_s`` seconds (it never started).
    """

    def __init__(self, grid: Grid, node_ids: Iterable[int], poll_s: float = 0.2,
                 engine_pickup_s: float = ENGINE_PICKUP_S) -> None:
        self._grid = grid
        self.node_ids = set(node_ids)
        self.poll_s = poll_s
        self.engine_pickup_s = engine_pickup_s
        self._engine_seen = False
        self.described: dict[int, dict] = {}  # node id -> its partitions.json entry (``federate``)
        self.query_timeout = 30.0
        self.id_salt: str | None = None
        self._left_out: set[int] = set()  # nodes that connected later and were not taken

    def federate(self, partitions: list[dict], query_timeout: float, id_salt: str | None = None) -> None:
        """From now on the federation is exactly the described nodes of ``partitions``; a node
        that connects later is asked to describe itself (``rejoin``) within ``query_timeout`` s
        (its identities hashed with ``id_salt``, as describe_nodes asked the others)."""
        self.described = {int(e["node_id"]): e for e in partitions}
        self.node_ids = set(self.described)
        self.query_timeout = query_timeout
        self.id_salt = id_salt

    def rejoin(self) -> dict[int, int]:
        """Nodes connected since the start (never described) are asked to describe their data.
        One with the partition id and data fingerprint of a described node takes that node's
        place (the old id is dropped): a SuperNode that restarted gets a new node id.
        Returns {old node id: new node id}; each change is logged, and a node not taken is
        logged once, with the true counts. Nothing is sent while no new node is connected."""
        connected = set(self._grid.get_node_ids())
        new = sorted(connected - self.node_ids - self._left_out)
        if not new:
            return {}
        # Matched whether or not the old id is still listed: a stopped SuperNode stays listed
        # until its heartbeat expires, and a node with a described node's data is that node.
        gone = {(e["partition_id"], e.get("data_fingerprint")): nid for nid, e in self.described.items()}
        entries = _query(self._grid, new, self.query_timeout, self.id_salt)
        moved = {}
        for nid in new:
            entry = entries.get(nid)
            old = gone.pop((entry["partition_id"], entry.get("data_fingerprint")), None) if entry else None
            if old is None:
                self._left_out.add(nid)
                why = ("it did not describe its data" if entry is None else
                       f"its partition-id={entry['partition_id']} and data are not those of a described SuperNode")
                log(WARNING, "celeba-fl: SuperNode %d connected after the start and takes no part (%s); %d of %d "
                    "described SuperNodes are connected", nid, why, len(self.node_ids & connected), len(self.node_ids))
                continue
            self.node_ids.discard(old)
            self.node_ids.add(nid)
            self.described[nid] = {**self.described.pop(old), "node_id": nid}
            moved[old] = nid
            log(INFO, "celeba-fl: SuperNode %d rejoined as partition %s (it was node %d: same partition-id and "
                "data fingerprint)", nid, entry["partition_id"], old)
        return moved

    def get_node_ids(self) -> list[int]:
        """The described nodes that the wrapped Grid still lists as connected."""
        return [nid for nid in self._grid.get_node_ids() if nid in self.node_ids]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``, then pull until every one has a reply or ``timeout`` seconds
        (None: no limit) have passed; returns the replies that came, error replies included
        (``msg.has_error()``), each with the node it was sent to as its source. Raises
        EngineStopped under simulation (class docstring)."""
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        sent_to = dict(zip(ids, (m.metadata.dst_node_id for m in messages)))
        pending = set(ids)
        start = time.monotonic()
        end = None if timeout is None else start + timeout
        simulation = is_simulation_grid(self._grid)
        check_pickup = simulation
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            if simulation and simulation_engine_running():
                self._engine_seen = True
            elif simulation and self._engine_seen:
                raise EngineStopped(f"the Simulation Engine stopped while {len(pending)} repl(ies) were "
                                    "awaited: it was interrupted (Ctrl-C) or crashed (see its log above)")
            if check_pickup and time.monotonic() - start > self.engine_pickup_s:
                check_pickup = False  # once: a running engine took them all at once
                waiting = undelivered_messages(self._grid, ids)
                if not replies and waiting == set(ids):
                    raise EngineStopped(
                        f"the Simulation Engine took none of the {len(ids)} message(s) sent to it "
                        f"within {self.engine_pickup_s:.0f}s: it is not running (see its error "
                        "above, e.g. a backend asking for num-gpus > 0 on a machine without a GPU)")
            got = list(self._grid.pull_messages(pending))
            for reply in got:
                # The SuperLink answers for a node that stopped sending heartbeats (an error
                # reply whose source is not that node): name the node it was sent to.
                node = sent_to.get(reply.metadata.reply_to_message_id)
                if node is not None and reply.metadata.src_node_id != node:
                    set_src_node_id(reply, node)
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                # Under simulation, pulling is a dict lookup, and on Ctrl-C flwr run kills the
                # engine's process 0.25 s after the signal: notice in time to write status.json
                time.sleep(min(self.poll_s, 0.05) if simulation else self.poll_s)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
