"""ClientApp: describes its data, trains and validates the head on cached embeddings.

A node's data comes from its node config (``data.NodeData``): partition ``partition-id`` of
``num-partitions`` (the Simulation Engine sets both; nothing assumes 50), or a ``data-path``
folder holding only this node's rows. Paths in the node config are resolved on the node.

* ``@app.query``: the server's first message. The reply describes the node's data (sizes,
  target and group rates, celeb_ids: a partitions.json entry), so the server never opens the
  clients' data. A node that cannot say what its data is replies with an error, and the
  server refuses the run naming that node.
* ``@app.train``: local training of the received head. With ``evaluate-received`` in its
  config (run config ``evaluate-with-train``), it first evaluates the received head on the
  held-out part, as ``@app.evaluate`` would, and sends those statistics as a ConfigRecord
  ``evaluate_received`` beside the metrics.
* ``@app.evaluate``: the received head on the node's held-out local part.

The Deployment Engine starts a new ClientApp process for every message, so nothing held in
memory survives between rounds there: the parts and embeddings are read from the node's
cache dir, and the dataset and backbone are loaded only when something is not cached.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp

from .config import ConfigError, RunConfig
from .data import NodeData, client_parts, describe_node
from .features import feature_store
from .metrics import flatten
from .model import head_for, head_state
from .task import evaluate_stats, group_balance_weights, pick_device, train_head

app = ClientApp()


def refusals_as_errors(handler):
    """A ConfigError (data or node config this node cannot use) becomes an error reply whose
    reason is its one line, rather than a traceback: the server names the node and the line."""
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except ConfigError as exc:
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"celeba-fl: {exc}")
            return Message(error=error, reply_to=msg)
    return wrapped


def _node(context: Context) -> tuple[RunConfig, NodeData]:
    cfg = RunConfig.from_run_config(context.run_config, check_paths=False)
    return cfg, NodeData.from_node_config(context.node_config, cfg)


def describe_record(entry: dict) -> ConfigRecord:
    """A partitions.json entry as a ConfigRecord (None values left out; group rates flat;
    skipped rows as one JSON string)."""
    record = {k: v for k, v in entry.items() if v is not None and k not in ("group_rates", "skipped_rows")}
    record.update({f"group_rate|{a}": r for a, r in entry["group_rates"].items() if r is not None})
    if "skipped_rows" in entry:
        record["skipped_rows"] = json.dumps(entry["skipped_rows"])
    return ConfigRecord(record)


@app.query()
@refusals_as_errors
def query(msg: Message, context: Context) -> Message:
    """Describe this node's data: sizes, target and group rates, celeb_ids, and how many
    embeddings it has yet to compute (``to_embed``)."""
    cfg, node = _node(context)
    if cfg.weights != "imagenet" and not Path(cfg.weights).expanduser().is_file():
        raise ConfigError(f"weights={cfg.weights!r} (resolved on this node to "
                          f"{str(Path(cfg.weights).expanduser().resolve())!r}): no such file; accepted: "
                          "'imagenet' or a mobilenet_v2 state_dict file this node can read")
    entry = describe_node(cfg, node)
    store = feature_store(cfg, pick_device(cfg), node.cache_dir)
    train, val = client_parts(cfg, node)
    # not a partitions.json field: the server's plan for round 1 (server_app.log_plan)
    entry["to_embed"] = store.missing(train, cfg.augment_hflip) + store.missing(val)
    return Message(content=RecordDict({"partition": describe_record(entry)}), reply_to=msg)


def _setup(msg: Message, context: Context):
    cfg, node = _node(context)
    device = pick_device(cfg)
    head = head_for(cfg, state=msg.content["arrays"].to_torch_state_dict())
    train_part, val_part = client_parts(cfg, node)
    return cfg, node.partition_id, device, head, train_part, val_part, feature_store(cfg, device, node.cache_dir)


@app.train()
@refusals_as_errors
def train(msg: Message, context: Context) -> Message:
    """Train the received head on this client's local training part."""
    cfg, pid, device, head, train_part, val_part, store = _setup(msg, context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    feats = store.for_part(train_part, hflip=cfg.augment_hflip)
    plain = feats[0] if cfg.augment_hflip else feats
    # The received (global) head on this client's data: q-FedAvg's loss F_k(w_t); with
    # "global-stats" (FairFed) its slice statistics, sent beside the metrics.
    global_stats = config.get("global-stats", False)
    held_out = None
    if config.get("evaluate-received", False):  # evaluate-with-train: the received head on the held-out part
        held_out = {"num-examples": len(val_part), "partition_id": pid,
                    **flatten(evaluate_stats(head, store.for_part(val_part), val_part.labels,
                                             val_part.attributes, device))}
    before_slices = evaluate_stats(head, plain, train_part.labels, train_part.attributes if global_stats else {},
                                   device)
    before = before_slices["all"]
    result = train_head(
        head, feats, torch.as_tensor(train_part.labels), epochs=cfg.local_epochs,
        lr=float(config.get("lr", cfg.learning_rate)), batch_size=cfg.batch_size,
        seed=cfg.seed + 100_003 * server_round + pid, device=device,
        weight_decay=cfg.weight_decay, proximal_mu=float(config.get("proximal-mu", 0.0)),
        sample_weight=group_balance_weights(train_part.attributes, cfg.balance_groups)
        if cfg.balance_groups else None,
    )
    stats = evaluate_stats(head, plain, train_part.labels, train_part.attributes, device)
    metrics = {"num-examples": len(train_part), "local_steps_loss": result["loss"],
               "global_loss": before.loss_sum / max(1, before.n),
               "partition_id": pid, **flatten(stats)}
    content = RecordDict({"arrays": ArrayRecord(head_state(head)), "metrics": MetricRecord(metrics)})
    if global_stats:
        content["global_model"] = ConfigRecord(flatten(before_slices))
    if held_out is not None:
        content["evaluate_received"] = ConfigRecord(held_out)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@refusals_as_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received (global) head on this client's held-out local part."""
    cfg, pid, device, head, _, val_part, store = _setup(msg, context)
    feats = store.for_part(val_part)
    stats = evaluate_stats(head, feats, val_part.labels, val_part.attributes, device)
    metrics = {"num-examples": len(val_part), "partition_id": pid, **flatten(stats)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
