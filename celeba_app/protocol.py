"""The wire protocol between this app's ServerApp and ClientApps, in one place: every message
config key, record name and metric key, each named once with its meaning, and the encoding of
a node's description.

The messages (``RecordDict`` contents; ``?``: only when asked for):

* ``query`` (``QUERY``), server to client: ``{CONFIG: {}}``. Reply: ``{DESCRIPTION: a
  partitions.json entry (describe_record), TO_EMBED: {TO_EMBED_IMAGES: int}}``.
* ``train``: ``{ARRAYS: the global head, CONFIG: {SERVER_ROUND, LR, PROXIMAL_MU?,
  EVALUATE_RECEIVED?, GLOBAL_STATS?}}``. Reply: ``{ARRAYS: the trained head, METRICS:
  {NUM_EXAMPLES, PARTITION_ID, LOCAL_STEPS_LOSS, GLOBAL_LOSS, the slice statistics}, GLOBAL_MODEL?:
  the received head's slice statistics, HELD_OUT?: the received head on the held-out part}``.
* ``evaluate``: ``{ARRAYS, CONFIG: {SERVER_ROUND}}``. Reply: ``{METRICS: {NUM_EXAMPLES,
  PARTITION_ID, the slice statistics}}``.

Slice statistics are metrics.flatten's keys (``<slice>|<field>``). The names Flower's own
strategies use (``arrays``, ``config``, ``num-examples``, ``server-round``, ``proximal-mu``)
are theirs, kept as they spell them.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

# --------------------------------------------------------------------------- message types
QUERY = "query"  #: the server's first message: describe your data

# --------------------------------------------------------------------------- record names
ARRAYS = "arrays"  #: ArrayRecord: a head's state_dict (Flower's strategies' arrayrecord_key)
CONFIG = "config"  #: ConfigRecord: the server's instructions (Flower's configrecord_key)
METRICS = "metrics"  #: MetricRecord: a client's sizes, scalars and slice statistics
DESCRIPTION = "partition"  #: ConfigRecord: a query reply's partitions.json entry
TO_EMBED = "to_embed"  #: ConfigRecord: a query reply's count of images it has yet to embed
GLOBAL_MODEL = "global_model"  #: ConfigRecord: the received head's slice statistics (FairFed)
HELD_OUT = "evaluate_received"  #: ConfigRecord: the received head on the held-out part

# --------------------------------------------------------------------------- CONFIG keys
SERVER_ROUND = "server-round"  #: the round (set by Flower's strategies)
LR = "lr"  #: the clients' learning rate this round
PROXIMAL_MU = "proximal-mu"  #: FedProx's proximal term (set by Flower's FedProx)
EVALUATE_RECEIVED = "evaluate-received"  #: evaluate the received head first (evaluate-with-train)
GLOBAL_STATS = "global-stats"  #: send the received head's statistics too (FairFed)

# --------------------------------------------------------------------------- METRICS keys
NUM_EXAMPLES = "num-examples"  #: images the statistics cover (Flower's weighted_by_key)
PARTITION_ID = "partition_id"  #: the client's partition id
LOCAL_STEPS_LOSS = "local_steps_loss"  #: the running BCE of the local steps
GLOBAL_LOSS = "global_loss"  #: the received head's BCE on the training part (q-FedAvg's loss)
NOT_SUMMED = (NUM_EXAMPLES, PARTITION_ID)  #: identifiers and weights, not quantities to average

# --------------------------------------------------------------------------- TO_EMBED keys
TO_EMBED_IMAGES = "images"  #: images of the node's parts not yet in its embedding cache


def reply_metrics(content: RecordDict) -> MetricRecord:
    """A reply's one MetricRecord (``METRICS``; the first, whatever its name, as Flower's
    strategies read it)."""
    return next(iter(content.metric_records.values()))


def partition_order(reply: Message) -> tuple:
    """Sort key of replies: the successful ones by the partition id in their metrics, then
    errors and replies without metrics, by node id."""
    records = [] if reply.has_error() else list(reply.content.metric_records.values())
    if not records:
        return (1, reply.metadata.src_node_id)
    return (0, int(records[0].get(PARTITION_ID, -1)), reply.metadata.src_node_id)


def reply_arrays(content: RecordDict) -> ArrayRecord:
    """A reply's one ArrayRecord (``ARRAYS``; the first, whatever its name)."""
    return content.array_records[next(iter(content.array_records))]


def describe_record(entry: dict) -> ConfigRecord:
    """A partitions.json entry as a ConfigRecord (None values left out; group rates flat as
    ``group_rate|<attribute>``; skipped rows as one JSON string). ``parse_description`` reads it."""
    record = {k: v for k, v in entry.items() if v is not None and k not in ("group_rates", "skipped_rows")}
    record.update({f"group_rate|{a}": r for a, r in entry["group_rates"].items() if r is not None})
    if "skipped_rows" in entry:
        record["skipped_rows"] = json.dumps(entry["skipped_rows"])
    return ConfigRecord(record)


def parse_description(record: ConfigRecord) -> dict:
    """A ``DESCRIPTION`` record -> its partitions.json entry (``describe_record``'s inverse)."""
    entry: dict[str, Any] = {"group_rates": {}}
    for key, value in record.items():
        if key.startswith("group_rate|"):
            entry["group_rates"][key.split("|", 1)[1]] = value
        elif key == "skipped_rows":
            entry[key] = json.loads(value)
        else:
            entry[key] = list(value) if isinstance(value, list) else value
    entry.setdefault("target_rate", None)
    entry.setdefault("num_partitions", None)
    return entry


def to_embed_record(images: int) -> ConfigRecord:
    """A query reply's ``TO_EMBED`` record."""
    return ConfigRecord({TO_EMBED_IMAGES: int(images)})


def parse_to_embed(content: RecordDict) -> int | None:
    """The images a node has yet to embed, from its query reply; None if it did not say."""
    record = content.config_records.get(TO_EMBED)
    return None if record is None else int(record[TO_EMBED_IMAGES])
