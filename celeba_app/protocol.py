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

What a valid reply is, is defined here too (``train_reply_problem``, ``evaluate_reply_problem``,
against the node's ``Expected`` description); the round loop refuses any other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from .metrics import stats_problem

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
ID_SALT = "id-salt"  #: a query's: describe your identities as hashes with this salt (DP; data/identities.py)
LR = "lr"  #: the clients' learning rate this round
PROXIMAL_MU = "proximal-mu"  #: FedProx's proximal term (set by Flower's FedProx)
EVALUATE_RECEIVED = "evaluate-received"  #: evaluate the received head first (evaluate-with-train)
GLOBAL_STATS = "global-stats"  #: send the received head's statistics too (FairFed)
CLIPPING_NORM = "clipping_norm"  #: DP, client-side clipping: clip the update to this L2 norm (Flower's KEY_CLIPPING_NORM)
NORM_BIT = "dp-norm-bit"  #: DP, client-adaptive: say in METRICS' ``CLIPPED`` whether the update was clipped

# --------------------------------------------------------------------------- METRICS keys
NUM_EXAMPLES = "num-examples"  #: images the statistics cover (Flower's weighted_by_key)
PARTITION_ID = "partition_id"  #: the client's partition id
LOCAL_STEPS_LOSS = "local_steps_loss"  #: the running BCE of the local steps
GLOBAL_LOSS = "global_loss"  #: the received head's BCE on the training part (q-FedAvg's loss)
CLIPPED = "norm_bit"  #: DP, client-adaptive: 1 if the update was clipped (Flower's KEY_NORM_BIT)
NOT_SUMMED = (NUM_EXAMPLES, PARTITION_ID, CLIPPED)  #: identifiers and weights, not quantities to average
TRAIN_KEYS = (NUM_EXAMPLES, PARTITION_ID, LOCAL_STEPS_LOSS, GLOBAL_LOSS)  #: a train reply's, beside its slices
EVALUATE_KEYS = (NUM_EXAMPLES, PARTITION_ID)  #: an evaluate reply's (and HELD_OUT's), beside its slices

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


def query_content(id_salt: str | None = None) -> RecordDict:
    """A ``QUERY`` message's content: an empty CONFIG, or one with ``ID_SALT`` (DP on)."""
    return RecordDict({CONFIG: ConfigRecord({ID_SALT: id_salt} if id_salt else {})})


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


# --------------------------------------------------------------------------- valid replies
@dataclass(frozen=True)
class Expected:
    """What the server knows of a node before its reply: the partition id, training and
    held-out sizes it described (partitions.json), and the run's sensitive attributes."""

    partition_id: int
    num_train: int
    num_val: int
    attributes: tuple[str, ...]


def train_reply_problem(content: RecordDict, sent: ArrayRecord, expected: Expected, max_update_norm: float,
                        config: ConfigRecord) -> str | None:
    """The first rule a train reply breaks, as one phrase naming the value; None if it is
    valid. A valid reply has the sent head's keys, shapes and dtypes, finite values, an
    update (reply minus sent) of L2 norm <= ``max_update_norm`` (and <= the clipping norm
    when ``config`` has ``CLIPPING_NORM``: DP); exactly ``TRAIN_KEYS`` (and ``CLIPPED``, 0 or
    1, when ``config`` asks for ``NORM_BIT``) and
    the slice statistics in its METRICS, with ``num-examples`` the described training size
    and the described partition id; valid statistics (metrics.stats_problem); and, when
    ``config`` asked for them, GLOBAL_MODEL's statistics of the same rows and HELD_OUT's of the
    described held-out part."""
    try:
        return _train_reply_problem(content, sent, expected, max_update_norm, config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a value of the wrong type
        return f"malformed reply: {type(exc).__name__}: {exc}"[:300]


def _train_reply_problem(content: RecordDict, sent: ArrayRecord, expected: Expected, max_update_norm: float,
                         config: ConfigRecord) -> str | None:
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"{len(content.array_records)} ArrayRecords and {len(content.metric_records)} MetricRecords; "
                "accepted: one of each")
    bound, what = max_update_norm, f"max-update-norm={max_update_norm:g}"
    if CLIPPING_NORM in config and float(config[CLIPPING_NORM]) * (1 + 1e-3) < bound:
        # the client was to clip its update (DP): one that did not is refused
        bound, what = float(config[CLIPPING_NORM]) * (1 + 1e-3), f"the DP clipping norm {float(config[CLIPPING_NORM]):g}"
    problem = _arrays_problem(reply_arrays(content), sent, bound, what)
    keys = TRAIN_KEYS + ((CLIPPED,) if config.get(NORM_BIT, False) else ())
    if problem is None:
        problem = _metrics_problem(reply_metrics(content), keys, expected, expected.num_train, "training")
    if problem is None and CLIPPED in keys and reply_metrics(content)[CLIPPED] not in (0, 1):
        problem = f"{CLIPPED}={reply_metrics(content)[CLIPPED]!r}; accepted: 0 or 1"
    if problem is None:
        for key in (LOCAL_STEPS_LOSS, GLOBAL_LOSS):
            value = float(reply_metrics(content)[key])
            if not math.isfinite(value) or value < 0:
                return f"{key}={value!r} is not a finite loss >= 0"
    extra = set(content.config_records) - {GLOBAL_MODEL, HELD_OUT}
    if problem is None and extra:
        problem = f"unexpected records {sorted(extra)}"
    for name, asked in ((GLOBAL_MODEL, bool(config.get(GLOBAL_STATS, False))),
                        (HELD_OUT, bool(config.get(EVALUATE_RECEIVED, False)))):
        if problem is None and (name in content.config_records) != asked:
            problem = f"record {name!r} {'missing' if asked else 'not asked for'}"
    if problem is None and GLOBAL_MODEL in content.config_records:
        problem = stats_problem(dict(content.config_records[GLOBAL_MODEL]), expected.attributes,
                                n=float(reply_metrics(content)[NUM_EXAMPLES]))
        problem = problem and f"{GLOBAL_MODEL}: {problem}"
    if problem is None and HELD_OUT in content.config_records:
        problem = _metrics_problem(content.config_records[HELD_OUT], EVALUATE_KEYS, expected, expected.num_val,
                                   "held-out")
        problem = problem and f"{HELD_OUT}: {problem}"
    return problem


def evaluate_reply_problem(content: RecordDict, expected: Expected) -> str | None:
    """The first rule an evaluate reply breaks (one MetricRecord of exactly ``EVALUATE_KEYS``
    and the slice statistics, the described held-out size and partition id, valid
    statistics); None if it is valid."""
    if len(content.metric_records) != 1 or content.array_records or content.config_records:
        return "an evaluate reply is one MetricRecord and nothing else"
    try:
        return _metrics_problem(reply_metrics(content), EVALUATE_KEYS, expected, expected.num_val, "held-out")
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        return f"malformed reply: {type(exc).__name__}: {exc}"[:300]


def _arrays_problem(arrays: ArrayRecord, sent: ArrayRecord, max_update_norm: float,
                    bound_name: str) -> str | None:
    if list(arrays.keys()) != list(sent.keys()):
        return f"head arrays {list(arrays.keys())}; sent {list(sent.keys())}"
    squared = 0.0
    for key in sent.keys():
        mine, theirs = arrays[key], sent[key]
        if tuple(mine.shape) != tuple(theirs.shape) or mine.dtype != theirs.dtype:
            return (f"head array {key!r} is {mine.dtype}{list(mine.shape)}; sent "
                    f"{theirs.dtype}{list(theirs.shape)}")
        value = mine.numpy()
        if not np.isfinite(value).all():
            return f"head array {key!r} has {int((~np.isfinite(value)).sum())} non-finite values"
        squared += float(np.sum((value.astype(np.float64) - theirs.numpy().astype(np.float64)) ** 2))
    norm = math.sqrt(squared)
    if not norm <= max_update_norm:
        return f"update norm {norm:.4g} > {bound_name}"
    return None


def _metrics_problem(metrics, keys: tuple[str, ...], expected: Expected, size: int, part: str) -> str | None:
    own = {k for k in metrics.keys() if "|" not in k}
    if own != set(keys):
        return f"metric keys {sorted(own)}; accepted: {sorted(keys)} and the slice statistics"
    pid = metrics[PARTITION_ID]
    if isinstance(pid, list) or float(pid) != expected.partition_id:
        return f"partition_id={pid!r}; this node described partition {expected.partition_id}"
    n = metrics[NUM_EXAMPLES]
    if isinstance(n, list) or not math.isfinite(float(n)) or float(n) != int(float(n)) or int(float(n)) != size:
        return f"num-examples={n!r}; this node described {size} {part} images"
    return stats_problem(dict(metrics), expected.attributes, n=float(n))
