"""ClientApp: local training and local validation of the head, on cached embeddings.

Each simulated client is one partition of the official train split (``partition-id`` of
``num-partitions`` from the node config; nothing assumes 50). The dataset, partitioning,
backbone and embeddings are built once per process and reused across messages and rounds
(data._FDS, features._STORES, features._MEMORY).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import RunConfig
from .data import client_parts
from .features import feature_store
from .metrics import flatten
from .model import head_state, make_head
from .task import evaluate_stats, group_balance_weights, pick_device, train_head

app = ClientApp()


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_run_config(context.run_config)
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    device = pick_device(cfg)
    head = make_head(cfg.head_dropout, state=msg.content["arrays"].to_torch_state_dict())
    train_part, val_part = client_parts(cfg, pid, num)
    return cfg, pid, device, head, train_part, val_part, feature_store(cfg, device)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received head on this client's local training part."""
    cfg, pid, device, head, train_part, _, store = _setup(msg, context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    feats = store.for_part(train_part, hflip=cfg.augment_hflip)
    plain = feats[0] if cfg.augment_hflip else feats
    # The received (global) head's loss on this client's data: q-FedAvg's F_k(w_t).
    before = evaluate_stats(head, plain, train_part.labels, {}, device)["all"]
    result = train_head(
        head, feats, torch.as_tensor(train_part.labels), epochs=cfg.local_epochs,
        lr=float(config.get("lr", cfg.learning_rate)), batch_size=cfg.batch_size,
        seed=cfg.seed + 100_003 * server_round + pid, device=device,
        weight_decay=cfg.weight_decay, proximal_mu=float(config.get("proximal-mu", 0.0)),
        sample_weight=group_balance_weights(train_part.attributes, cfg.balance_groups)
        if cfg.balance_groups else None,
    )
    stats = evaluate_stats(head, plain, train_part.labels, train_part.attributes, device)
    metrics = {"num-examples": len(train_part), "train_loss": result["loss"],
               "global_loss": before.loss_sum / max(1, before.n),
               "partition_id": pid, **flatten(stats)}
    content = RecordDict({"arrays": ArrayRecord(head_state(head)), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received (global) head on this client's held-out local part."""
    cfg, pid, device, head, _, val_part, store = _setup(msg, context)
    feats = store.for_part(val_part)
    stats = evaluate_stats(head, feats, val_part.labels, val_part.attributes, device)
    metrics = {"num-examples": len(val_part), "partition_id": pid, **flatten(stats)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
