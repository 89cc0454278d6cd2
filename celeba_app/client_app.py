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
  ``evaluate_received`` beside the metrics (the messages: protocol.py).
* ``@app.evaluate``: the received head on the node's held-out local part.

The Deployment Engine starts a new ClientApp process for every message, so nothing held in
memory survives between rounds there: the parts and embeddings are read from the node's
cache dir, and the dataset and backbone are loaded only when something is not cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import ConfigError, RunConfig
from .internals import ErrorCode
from . import protocol as P
from .data import LabeledRows, NodeData, client_parts, describe_node, hide_identities
from .features import FeatureStore, feature_store
from .metrics import flatten
from .model import head_for, head_state
from .task import evaluate_stats, group_balance_weights, pick_device, train_head


def client_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: Flower's own client-side clipping on the train messages whose config
    carries the clipping norm (a ``client-*`` DP wrapper sent it): ``adaptiveclipping_mod``
    when the config asks for the norm bit, else ``fixedclipping_mod``; other messages pass."""
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    config = msg.content.config_records.get(P.CONFIG) if msg.metadata.message_type == "train" else None
    if config is None or P.CLIPPING_NORM not in config:
        return call_next(msg, context)
    mod = adaptiveclipping_mod if config.get(P.NORM_BIT, False) else fixedclipping_mod
    return mod(msg, context, call_next)


app = ClientApp(mods=[client_clipping_mod])  # DP: Flower's clipping mods when the server asks


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


@app.query()
@refusals_as_errors
def query(msg: Message, context: Context) -> Message:
    """Describe this node's data: sizes, target and group rates, celeb_ids (salted hashes of
    them when the query sends a salt, as it must with DP on), and how many embeddings it has
    yet to compute (``to_embed``)."""
    cfg, node = _node(context)
    if cfg.weights != "imagenet" and not Path(cfg.weights).expanduser().is_file():
        raise ConfigError(f"weights={cfg.weights!r} (resolved on this node to "
                          f"{str(Path(cfg.weights).expanduser().resolve())!r}): no such file; accepted: "
                          "'imagenet' or a mobilenet_v2 state_dict file this node can read")
    entry = describe_node(cfg, node)
    salt = msg.content[P.CONFIG].get(P.ID_SALT) if P.CONFIG in msg.content.config_records else None
    if salt:
        entry = hide_identities(entry, str(salt))
    elif cfg.dp:
        raise ConfigError(f"dp={cfg.dp!r} is on, yet the server's query asks for this node's celeb_ids in the "
                          "clear (no id-salt); accepted: a server that asks for salted hashes")
    store = feature_store(cfg, pick_device(cfg), node.cache_dir)
    train, val = client_parts(cfg, node)
    to_embed = store.missing(train, cfg.augment_hflip) + store.missing(val)  # the server's plan for round 1
    return Message(content=RecordDict({P.DESCRIPTION: P.describe_record(entry), P.TO_EMBED: P.to_embed_record(to_embed)}),
                   reply_to=msg)


@dataclass
class Setup:
    """What a train or evaluate message works with: the config, the node's partition id, the
    device, the received head, the node's (train, validation) parts and its embedding store."""

    cfg: RunConfig
    partition_id: int
    device: torch.device
    head: torch.nn.Module
    train_part: LabeledRows
    val_part: LabeledRows
    store: FeatureStore


def _setup(msg: Message, context: Context) -> Setup:
    cfg, node = _node(context)
    device = pick_device(cfg)
    head = head_for(cfg, state=msg.content[P.ARRAYS].to_torch_state_dict())
    train_part, val_part = client_parts(cfg, node)
    return Setup(cfg, node.partition_id, device, head, train_part, val_part,
                 feature_store(cfg, device, node.cache_dir))


@app.train()
@refusals_as_errors
def train(msg: Message, context: Context) -> Message:
    """Train the received head on this client's local training part."""
    job = _setup(msg, context)
    cfg, head, train_part, val_part = job.cfg, job.head, job.train_part, job.val_part
    config = msg.content[P.CONFIG]
    server_round = int(config.get(P.SERVER_ROUND, 0))
    feats = job.store.for_part(train_part, hflip=cfg.augment_hflip)
    plain = feats[0] if cfg.augment_hflip else feats
    # The received (global) head on this client's data: q-FedAvg's loss F_k(w_t); with
    # GLOBAL_STATS (FairFed) its slice statistics, sent beside the metrics.
    global_stats = config.get(P.GLOBAL_STATS, False)
    held_out = None
    if config.get(P.EVALUATE_RECEIVED, False):  # evaluate-with-train: the received head on the held-out part
        held_out = {P.NUM_EXAMPLES: len(val_part), P.PARTITION_ID: job.partition_id,
                    **flatten(evaluate_stats(head, job.store.for_part(val_part), val_part.labels,
                                             val_part.attributes, job.device))}
    before_slices = evaluate_stats(head, plain, train_part.labels, train_part.attributes if global_stats else {},
                                   job.device)
    before = before_slices["all"]
    result = train_head(
        head, feats, torch.as_tensor(train_part.labels), epochs=cfg.local_epochs,
        lr=float(config.get(P.LR, cfg.learning_rate)), batch_size=cfg.batch_size,
        seed=cfg.seed + 100_003 * server_round + job.partition_id, device=job.device,
        weight_decay=cfg.weight_decay, proximal_mu=float(config.get(P.PROXIMAL_MU, 0.0)),
        sample_weight=group_balance_weights(train_part.attributes, cfg.balance_groups)
        if cfg.balance_groups else None,
    )
    stats = evaluate_stats(head, plain, train_part.labels, train_part.attributes, job.device)
    metrics = {P.NUM_EXAMPLES: len(train_part), P.LOCAL_STEPS_LOSS: result["loss"],
               P.GLOBAL_LOSS: before.loss_sum / max(1, before.n), P.PARTITION_ID: job.partition_id,
               **flatten(stats)}
    content = RecordDict({P.ARRAYS: ArrayRecord(head_state(head)), P.METRICS: MetricRecord(metrics)})
    if global_stats:
        content[P.GLOBAL_MODEL] = ConfigRecord(flatten(before_slices))
    if held_out is not None:
        content[P.HELD_OUT] = ConfigRecord(held_out)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@refusals_as_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received (global) head on this client's held-out local part."""
    job = _setup(msg, context)
    part = job.val_part
    stats = evaluate_stats(job.head, job.store.for_part(part), part.labels, part.attributes, job.device)
    metrics = {P.NUM_EXAMPLES: len(part), P.PARTITION_ID: job.partition_id, **flatten(stats)}
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
