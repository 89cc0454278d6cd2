"""CelebA through flwr-datasets: who holds which rows, and what each row carries.

Clients train on the official ``train`` split and hold out a local validation part; the
server selects on ``valid`` and tests on ``test``. A node's training data is set by its node
config (``NodeData``): a partition of ``dataset`` (partitioning.py), as in simulation, or a
``data-path`` folder that holds only that node's rows (celeba-partition writes them). The
server never reads ``train``: it learns each client's sizes, rates and identities from the
client's reply to a ``query`` message (``describe_node``), and checks the identities against
its own ``valid``/``test`` (``check_clients_disjoint``).

Data is known by its content (``dataset_fingerprint``), never by its path: the fingerprint
keys the ``datasets`` cache of a local folder, the parts cache and every row identity.

Per-process caches: ``load_federated``, ``load_server`` and ``client_parts`` keep what they
build in ``functools.lru_cache`` keyed by their arguments, the whole frozen ``RunConfig``
(and ``NodeData``) included, so no hand-written key can miss a config field; equal configs
(each message builds its own) share an entry. ``clear_caches`` empties them (tests).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np

from .config import ConfigError, HUB_DATASET, RunConfig, is_local_path

if TYPE_CHECKING:  # datasets and flwr-datasets cost seconds to import: imported where data is read,
    from datasets import Dataset  # so a ClientApp answering from its caches never imports them
    from flwr_datasets import FederatedDataset

SPLIT_NAMES = ("train", "valid", "test")
#: The file celeba-partition writes into each partition folder (partition id, partitioning).
PARTITION_META = "partition.json"
#: Bump when what the parts cache stores, or how parts are made, changes.
PARTS_VERSION = "4"  # 4: data-path rows mapped to their split rows; 3: where each row lives (split, row index); 2: label and attribute values checked (booleans or 0/1), bad images left out or refused
#: Bump when what makes an image undecodable changes: every part's images are checked again.
IMAGES_CHECK_VERSION = "2"  # 2: remembered per row of the split

#: Per-process caches: FederatedDataset objects keyed by what shapes the partitioning, and
#: each client's parts (so a message costs no re-reading of labels or row identities).


@dataclass
class LabeledRows:
    """A set of rows the app computes embeddings for and evaluates on."""

    name: str
    rows: Dataset | None  # None until needed when the part came from the parts cache
    labels: np.ndarray
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    celeb_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    load_rows: Callable[[], Dataset] | None = field(default=None, repr=False)
    #: Rows left out because their image cannot be decoded (``bad-images="skip"``): one dict
    #: per row, {"part", "row" (index in the part before leaving out), "split_row" (index in
    #: the split), "celeb_id", "error"}. The arrays above and ``rows`` no longer hold them.
    skipped_rows: list[dict] = field(default_factory=list)
    #: Where each row lives, the key of the per-row caches (row_store.py): the data's content
    #: fingerprint, the split's name and size, and each row's index in the split (N,) int64.
    data_id: str = ""
    split: str = ""
    split_size: int = 0
    split_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def encoded_images(self, batch_size: int, positions: np.ndarray | None = None) -> Iterator[list[bytes]]:
        """The encoded images, in row order, ``batch_size`` at a time (no decoding here); only
        those at ``positions`` (indices into this part, ascending) when given."""
        from datasets import Image

        if self.rows is None:
            self.rows = self.load_rows()
        rows = self.rows if positions is None else self.rows.select(np.asarray(positions, dtype=np.int64))
        raw = rows.select_columns(["image"]).cast_column("image", Image(decode=False))
        for batch in raw.iter(batch_size=batch_size):
            out = []
            for item in batch["image"]:
                if item.get("bytes") is None:
                    out.append(Path(item["path"]).read_bytes())
                else:
                    out.append(item["bytes"])
            yield out


def clear_caches() -> None:
    """Forget this process's datasets and parts (``functools.lru_cache``s): tests that rewrite
    a dataset in place, and benchmarks that time a cold load."""
    for cached in (_load_federated, _load_server, _cached_client_parts):
        cached.cache_clear()


# --------------------------------------------------------------------------- data identity
def dataset_fingerprint(spec: str, memo_dir: str | Path | None = None) -> str:
    """Identity of a dataset by its content, never by its path.

    A local folder's fingerprint is the sha256 over every file's relative name, size and
    content sha256 (``datasets`` 3.1 caches a local folder under its *name*, so two folders of
    one name would otherwise share data). Content hashes are memoised in ``memo_dir`` under
    (absolute path, size, mtime, inode), so a process that only needs the key (a ClientApp
    answering a later round from its caches) stats the files instead of reading them.
    A hub dataset is known by its name (``hub:<owner/name>``).
    """
    if not is_local_path(spec):
        return f"hub:{spec}"
    root = Path(spec).expanduser().resolve()
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root)):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}|{st.st_size}|{_content_sha(path, st, memo_dir)}\n".encode())
    return h.hexdigest()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _content_sha(path: Path, st: os.stat_result, memo_dir: str | Path | None) -> str:
    memo = None
    if memo_dir is not None:
        key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()
        memo = Path(memo_dir) / "fingerprints" / key
        if memo.is_file():
            return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        try:
            atomic_write_bytes(memo, digest.encode())
        except OSError as exc:  # a memo only: a full or read-only disk costs time
            logging.getLogger("flwr").warning("celeba-fl: could not record a fingerprint (%s); continuing", exc)
    return digest


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_kwargs(spec: str, fingerprint: str) -> dict:
    """``datasets.load_dataset`` arguments: a local folder gets a cache of its own content."""
    from datasets import config as hf_config

    if not fingerprint.startswith("hub:"):
        return {"cache_dir": str(Path(hf_config.HF_DATASETS_CACHE) / "celeba-fl" / fingerprint[:24])}
    return {}


# --------------------------------------------------------------------------- where a node's data is
@dataclass(frozen=True)
class NodeData:
    """Where one node's training data comes from: its node config, resolved on the node.

    * partition ``partition_id`` of ``num_partitions`` of the run config's ``dataset`` (what
      the Simulation Engine gives every node, and ``--node-config "partition-id=0
      num-partitions=3"`` on the Deployment Engine);
    * ``data_path``: a folder whose ``train`` split is this node's whole local data (written
      by ``celeba-partition``, whose ``partition.json`` gives the partition id; a node config
      ``partition-id`` overrides it). No other holder's rows are on such a node.

    ``cache_dir`` (node config ``cache-dir``, else the run config's) is resolved on the node;
    ``None`` when ``feature-cache=false``.
    """

    partition_id: int
    num_partitions: int | None = None
    data_path: str | None = None
    cache_dir: str | None = None
    holdout_by_identity: bool = False

    @classmethod
    def partition(cls, cfg: RunConfig, partition_id: int, num_partitions: int,
                  cache_dir: str | None = None) -> "NodeData":
        """Partition ``partition_id`` of ``num_partitions`` of the run config's dataset;
        ConfigError unless 0 <= partition_id < num_partitions."""
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(f"partition-id={partition_id} is out of range; accepted: 0..{num_partitions - 1} "
                              f"(num-partitions={num_partitions})")
        return cls(partition_id, num_partitions, None, _cache_dir(cfg, cache_dir), cfg.split == "noniid")

    @classmethod
    def from_node_config(cls, node_config: Mapping, cfg: RunConfig) -> "NodeData":
        """Raises ConfigError naming the missing or bad node-config key."""
        cache_dir = node_config.get("cache-dir")
        if "data-path" in node_config:
            path = Path(str(node_config["data-path"])).expanduser().resolve()
            if not path.is_dir():
                raise ConfigError(f"data-path={str(node_config['data-path'])!r} (resolved on this node to "
                                  f"{str(path)!r}): no such folder; accepted: a folder with a train "
                                  "split in the flwrlabs/celeba schema, e.g. one written by celeba-partition")
            meta = _partition_meta(path)
            pid = node_config.get("partition-id", meta.get("partition_id"))
            if pid is None:
                raise ConfigError(f"data-path={str(path)!r} has no partition.json and the node config no "
                                  "partition-id; accepted: a folder written by celeba-partition, or "
                                  "--node-config \"data-path='...' partition-id=<unique integer>\"")
            return cls(int(pid), meta.get("num_partitions"), str(path), _cache_dir(cfg, cache_dir),
                       meta.get("split", cfg.split) == "noniid")
        missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
        if missing:
            raise ConfigError(f"node config lacks {', '.join(missing)} (has: {dict(node_config) or 'nothing'}); "
                              "accepted: --node-config \"partition-id=<i> num-partitions=<n>\" or "
                              "\"data-path='<folder>'\"")
        try:
            pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node config partition-id/num-partitions must be integers ({exc})") from exc
        if num < 1:
            raise ConfigError(f"num-partitions={num} is not valid; accepted: an integer >= 1")
        if is_local_path(cfg.dataset) and not Path(cfg.dataset).expanduser().is_dir():
            raise ConfigError(f"dataset={cfg.dataset!r} (resolved on this node to "
                              f"{str(Path(cfg.dataset).expanduser().resolve())!r}): no such folder; accepted: "
                              "an absolute path, a path from the SuperNode's working directory, or "
                              "--node-config \"data-path='<folder>'\"")
        return cls.partition(cfg, pid, num, cache_dir)

    def describe(self, cfg: RunConfig) -> str:
        """Where the data is, in words, for logs and partitions.json."""
        if self.data_path:
            return f"data-path {self.data_path}"
        return f"partition {self.partition_id} of {self.num_partitions} of {cfg.dataset}"


def _cache_dir(cfg: RunConfig, node_cache_dir: str | None) -> str | None:
    if not cfg.feature_cache:
        return None
    return str(Path(str(node_cache_dir or cfg.cache_dir)).expanduser().resolve())


def _partition_meta(path: Path) -> dict:
    meta = path / PARTITION_META
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except ValueError as exc:
        raise ConfigError(f"{meta} is not valid JSON ({exc}); accepted: the file celeba-partition wrote") from exc


def _new_fds(spec: str, partitioners: dict, shuffle: bool, seed: int, memo_dir: str | None,
             splits: tuple[str, ...] | None = None) -> FederatedDataset:
    """flwr-datasets' FederatedDataset over ``spec``. ``splits``: of a local folder, prepare
    only these (``datasets`` otherwise converts every split it finds, the server's untouched
    ``train`` included: memory and time that grow with the clients' data)."""
    from flwr_datasets import FederatedDataset

    kwargs = _load_kwargs(spec, dataset_fingerprint(spec, memo_dir))
    if splits and is_local_path(spec):
        root = Path(spec).expanduser().resolve()
        files = {s: sorted(str(p) for p in root.rglob(f"{s}-*.parquet") if not _hidden(p, root)) for s in splits}
        if all(files.values()):  # else load as before, and let the schema check name what is missing
            kwargs["data_files"] = files
    with warnings.catch_warnings():
        # flwr-datasets warns about any dataset outside its tested list; ours is known.
        warnings.filterwarnings("ignore", message="The currently tested dataset")
        return FederatedDataset(dataset=spec, partitioners=partitioners, shuffle=shuffle, seed=seed, **kwargs)


def _load_split(cfg: RunConfig, fds: FederatedDataset, spec: str, split: str) -> Dataset:
    """``fds.load_split(split)`` with one clear line when the dataset cannot be loaded."""
    try:
        return fds.load_split(split)
    except ConfigError:
        raise
    except Exception as exc:
        if fds._dataset is not None and split not in fds._dataset:  # noqa: SLF001
            raise ConfigError(f"dataset={spec!r} lacks split {split!r} (has: {sorted(fds._dataset)}); "  # noqa: SLF001
                              f"accepted: a dataset with a {split} split") from exc
        where = "a folder of parquet files" if is_local_path(spec) else "the Hugging Face hub"
        raise ConfigError(
            f"dataset={spec!r} could not be loaded from {where} "
            f"({type(exc).__name__}: {str(exc)[:200]}); accepted: {HUB_DATASET!r} with a "
            "network, or a local folder with train/valid/test parquet files in its schema"
        ) from exc


def load_federated(cfg: RunConfig, num_partitions: int) -> FederatedDataset:
    """The FederatedDataset for this config (cached per process); clear errors on failure."""
    return _load_federated(cfg, num_partitions)


@functools.lru_cache(maxsize=4)  # a long-running process may serve several runs' configs
def _load_federated(cfg: RunConfig, num_partitions: int) -> FederatedDataset:
    from .partitioning import build_partitioner

    fds = _new_fds(cfg.dataset, {"train": build_partitioner(cfg, num_partitions)}, True, cfg.seed,
                   _cache_dir(cfg, None))
    train = _load_split(cfg, fds, cfg.dataset, "train")
    _check_schema(cfg, fds, SPLIT_NAMES)
    if num_partitions > len(train):  # some client would get no row (iid: an IndexError inside flwr-datasets)
        raise ConfigError(f"num-partitions={num_partitions} is more than the {len(train)} rows of "
                          f"dataset={cfg.dataset!r} split 'train'; accepted: at most {len(train)} "
                          "partitions (every client needs at least one row)")
    if cfg.split == "celebrity":  # one partition per identity
        n_ids = len(np.unique(np.asarray(train["celeb_id"])))
        if n_ids != num_partitions:
            raise ConfigError(
                f"split='celebrity' makes one partition per identity: dataset={cfg.dataset!r} has {n_ids} "
                f"identities in train, but num-partitions={num_partitions}; accepted: num-partitions="
                f"{n_ids} (in simulation: --federation-config \"options.num-supernodes={n_ids}\")")
    # The whole split, so every client refuses alike; the noniid partitioner groups by these.
    binary = [cfg.target, *cfg.sensitive_attributes]
    if cfg.split == "noniid":
        binary += [a for a in cfg.noniid_attributes if a not in binary]
    _check_split_values(cfg.dataset, "train", train, binary, _cache_dir(cfg, None))
    return fds


def _check_schema(cfg: RunConfig, fds: FederatedDataset, splits: tuple[str, ...], spec: str | None = None) -> None:
    """Splits and columns the app needs, named in one line if missing."""
    spec = spec or cfg.dataset
    have = set(fds._dataset.keys())  # noqa: SLF001 - prepared by load_split above
    missing = [s for s in splits if s not in have]
    if missing:
        raise ConfigError(
            f"dataset={spec!r} lacks split(s) {missing}; accepted: a dataset with splits "
            f"{', '.join(splits)}"
        )
    need = {"image", "celeb_id", cfg.target, *cfg.sensitive_attributes}
    if cfg.split == "noniid" and "train" in splits:
        need |= set(cfg.noniid_attributes)
    for split in splits:
        lacking = sorted(need - set(fds._dataset[split].column_names))  # noqa: SLF001
        if lacking:
            raise ConfigError(
                f"dataset={spec!r} split {split!r} lacks column(s) {lacking}; accepted: the "
                "flwrlabs/celeba schema (image, celeb_id, 40 attributes)"
            )


def split_rows(ds: Dataset) -> np.ndarray:
    """Each row's index in its split (the row mapping left by shuffle/select). Right only for
    a dataset whose table is the whole split: one with a row mapping (every partition, shuffled
    or from ``local_train_split``), or the split itself."""
    indices = ds._indices  # noqa: SLF001
    return indices.column(0).to_numpy() if indices is not None else np.arange(len(ds))


def check_binary(spec: str, split: str, columns: Mapping[str, np.ndarray]) -> None:
    """Refuse (one line naming the dataset, split, column and the distinct values found) a
    label or attribute column that is not booleans or integers 0/1: e.g. the -1/1 of the
    original list_attr_celeba.txt, which would otherwise train and test on garbage silently."""
    for column, values in columns.items():
        v = np.asarray(values)
        if v.dtype == np.bool_ or v.size == 0:  # an empty part (e.g. no local validation) reads as float
            continue
        if v.dtype.kind in "iu":
            found = np.unique(v).tolist()
            if set(found) <= {0, 1}:
                continue
        else:
            try:
                found = np.unique(v).tolist()
            except TypeError:  # mixed Python objects (e.g. None among booleans)
                found = sorted(set(v.tolist()), key=lambda x: (type(x).__name__, repr(x)))
        shown = ", ".join(repr(x) for x in found[:10]) + (f", ... ({len(found)} in all)" if len(found) > 10 else "")
        raise ConfigError(f"dataset={spec!r} split {split!r} column {column!r} has values [{shown}]; "
                          "accepted: booleans or 0/1")


def _check_split_values(spec: str, split: str, ds: Dataset, columns: list[str], memo_dir: str | None) -> None:
    """``check_binary`` over the named columns of a whole split (no image is read): as a local
    folder's parquet files hold them, then as ``datasets`` reads them. The files first because
    ``datasets`` casts every split of a folder to the first split's column types, so an
    integer -1/1 split next to a boolean train split would read as all True."""
    if is_local_path(spec):
        import pyarrow.parquet as pq
        from datasets import load_dataset_builder

        fingerprint = dataset_fingerprint(spec, memo_dir)
        files = load_dataset_builder(spec, **_load_kwargs(spec, fingerprint)).config.data_files
        for path in files.get(split, []):
            if str(path).endswith(".parquet"):
                have = set(pq.read_schema(path).names)
                raw = pq.read_table(path, columns=[c for c in columns if c in have])
                check_binary(spec, split, {c: raw.column(c).to_numpy(zero_copy_only=False)
                                           for c in raw.column_names})
    table = ds.select_columns(columns).with_format("numpy")[:]
    check_binary(spec, split, {c: table[c] for c in columns})


def make_part(cfg: RunConfig, name: str, rows: Dataset, data_id: str, *, source: str, split: str,
              memo_dir: str | None = None, may_be_empty: bool = False) -> LabeledRows:
    """The LabeledRows of ``rows`` of split ``split`` of ``source`` (a dataset spec or data-path): its
    labels and sensitive attributes, refused unless booleans or 0/1 (``check_binary``), and
    its images, each of which must decode (``bad-images``): ``fail`` refuses the first one
    that cannot (ConfigError naming the part, the row and the celeb_id), ``skip`` leaves such
    rows out of the LabeledRows (``LabeledRows.skipped_rows`` lists them; a warning names each).

    The images are checked once per set of rows: the result is kept under
    ``<memo_dir>/checked`` (the rows' identity names it), so a run whose embeddings are cached
    decodes nothing here. ``may_be_empty``: a part that every row may leave (local validation).
    """
    columns = rows.select_columns(["celeb_id", cfg.target, *cfg.sensitive_attributes])
    table = columns.with_format("numpy")[:]
    check_binary(source, split, {c: table[c] for c in (cfg.target, *cfg.sensitive_attributes)})
    part = LabeledRows(
        name=name,
        rows=rows,
        labels=np.asarray(table[cfg.target], dtype=np.int64),
        attributes={a: np.asarray(table[a], dtype=np.int64) for a in cfg.sensitive_attributes},
        celeb_ids=np.asarray(table["celeb_id"], dtype=np.int64),
        data_id=data_id, split=split, split_size=rows.data.num_rows, split_rows=split_rows(rows),
    )
    bad = _undecodable_rows(part, memo_dir)
    if not bad:
        return part
    in_split = split_rows(rows)
    found = [{"part": name, "row": r, "split_row": int(in_split[r]), "celeb_id": int(part.celeb_ids[r]),
              "error": error} for r, error in bad]
    where = f"dataset={source!r} split {split!r}" + (f" part {name!r}" if name != split else "")
    first = found[0]
    row = f"row {first['row']} (row {first['split_row']} of the split, celeb_id {first['celeb_id']})"
    if cfg.bad_images == "fail":
        more = f" (and {len(found) - 1} more in this part)" if len(found) > 1 else ""
        raise ConfigError(f"{where} {row}: the image cannot be decoded ({first['error']}){more}; accepted: "
                          "decodable images, or bad-images='skip' to leave such rows out")
    keep = np.setdiff1d(np.arange(len(part)), [r for r, _ in bad])
    if len(keep) == 0 and not may_be_empty:
        raise ConfigError(f"{where}: none of its {len(part)} images can be decoded (e.g. {row}: "
                          f"{first['error']}); accepted: a part with at least one decodable image")
    flwr_log = logging.getLogger("flwr")
    for f in found[:10]:
        flwr_log.warning("celeba-fl: bad-images='skip': left out %s row %d (row %d of split %r of %s, celeb_id %d): "
                         "the image cannot be decoded (%s)", name, f["row"], f["split_row"], split, source,
                         f["celeb_id"], f["error"])
    if len(found) > 10:
        flwr_log.warning("celeba-fl: bad-images='skip': and %d more rows of %s left out", len(found) - 10, name)
    kept = rows.select(keep)
    return LabeledRows(name=name, rows=kept, labels=part.labels[keep],
                attributes={a: v[keep] for a, v in part.attributes.items()}, celeb_ids=part.celeb_ids[keep],
                skipped_rows=found, data_id=data_id, split=split, split_size=part.split_size,
                split_rows=part.split_rows[keep])


def _undecodable_rows(part: LabeledRows, memo_dir: str | None) -> list[tuple[int, str]]:
    """(row, reason) of the part's images that cannot be decoded (features.undecodable): one
    decode per image, remembered per row of the split under ``<memo_dir>/checked``
    (row_store.py: 1.0 for a row that cannot be decoded, whose reason goes to ``reasons.json``
    beside it), so another partitioning of the same data decodes nothing again."""
    from .images import undecodable
    from .row_store import RowStore, file_lock

    if len(part) == 0:
        return []
    store = None
    if memo_dir and part.split_size:
        key = {"data": part.data_id, "split": part.split, "version": IMAGES_CHECK_VERSION}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        store = RowStore(Path(memo_dir) / "checked" / digest, key, part.split_size, width=1)
    values, have = store.read(part.split_rows) if store else (np.zeros((len(part), 1), np.float32),
                                                              np.zeros(len(part), bool))
    reasons = _read_reasons(store) if store is not None and (values[have, 0] > 0).any() else {}
    found = {}
    for pos in np.flatnonzero(have & (values[:, 0] > 0)):
        found[int(pos)] = reasons.get(str(int(part.split_rows[pos])), "cannot be decoded")
    todo = np.flatnonzero(~have)
    new = {int(todo[i]): reason for i, reason in undecodable(part.encoded_images(64, todo))} if len(todo) else {}
    found.update(new)
    if store is not None and len(todo):
        try:
            with file_lock(store.lock.with_suffix(".reasons.lock")):
                merged = {**_read_reasons(store), **{str(int(part.split_rows[p])): r for p, r in new.items()}}
                if new:
                    atomic_write_bytes(store.root.with_name(store.root.name + ".reasons.json"),
                                       json.dumps(merged).encode())
            store.write(part.split_rows[todo], np.array([[float(int(t) in new)] for t in todo], np.float32))
        except OSError as exc:  # a memo only: a full or read-only disk costs time
            logging.getLogger("flwr").warning("celeba-fl: could not record the image check (%s); continuing", exc)
    return sorted(found.items())


def _read_reasons(store) -> dict[str, str]:
    """{split row (str): reason} of the rows an image check found undecodable."""
    try:
        return json.loads(store.root.with_name(store.root.name + ".reasons.json").read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- a node's parts
def client_parts(cfg: RunConfig, node: NodeData) -> tuple[LabeledRows, LabeledRows]:
    """A node's local (train, validation) parts: its partition or its ``data-path`` folder,
    with ``val-fraction`` held out (by identity when the partitioning is by identity).

    Cached per process, and on disk under ``<cache-dir>/parts`` (labels, attributes,
    identities and row identities, keyed by the data's content fingerprint and everything
    that shapes the parts): a ClientApp process that starts for one message (the Deployment
    Engine starts one per message) then opens no dataset unless an embedding is missing.
    """
    return _cached_client_parts(cfg, node)


@functools.lru_cache(maxsize=None)  # one simulation actor serves many partitions; parts are small
def _cached_client_parts(cfg: RunConfig, node: NodeData) -> tuple[LabeledRows, LabeledRows]:
    key = _parts_key(cfg, node)  # the on-disk key: the data's content and what shapes the parts
    parts = _load_parts(cfg, node, key) if node.cache_dir else None
    if parts is None:
        parts = _client_parts(cfg, node)
        if node.cache_dir:
            _save_parts(node, key, parts)
    return parts


def _parts_key(cfg: RunConfig, node: NodeData) -> str:
    source = node.data_path or cfg.dataset
    spec = {
        "version": PARTS_VERSION, "data": dataset_fingerprint(source, node.cache_dir),
        "data_path": node.data_path is not None, "partition_id": node.partition_id,
        "num_partitions": node.num_partitions, "by_identity": node.holdout_by_identity,
        "val_fraction": cfg.val_fraction, "seed": cfg.seed, "target": cfg.target,
        "sensitive": cfg.sensitive_attributes, "bad_images": cfg.bad_images,
    }
    if node.data_path is None:
        spec.update(split=cfg.split, alpha=cfg.noniid_alpha, noniid=cfg.noniid_attributes)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _client_parts(cfg: RunConfig, node: NodeData) -> tuple[LabeledRows, LabeledRows]:
    from .partitioning import local_split

    if node.data_path is None:
        try:
            partition = load_federated(cfg, node.num_partitions).load_partition(node.partition_id, "train")
        except ConfigError:
            raise
        except ValueError as exc:  # the partitioner's refusal, e.g. more clients than identities
            raise ConfigError(f"{exc} (num-partitions={node.num_partitions})") from exc
    else:
        partition = local_train_split(cfg, node)
    train_idx, val_idx = local_split(partition, cfg.val_fraction, by_identity=node.holdout_by_identity,
                                     seed=cfg.seed + node.partition_id)
    pid, data_id = node.partition_id, dataset_fingerprint(node.data_path or cfg.dataset, node.cache_dir)
    source, memo = node.data_path or cfg.dataset, node.cache_dir
    return (make_part(cfg, f"client-{pid}/train", partition.select(train_idx), data_id, source=source,
                      split="train", memo_dir=memo),
            make_part(cfg, f"client-{pid}/val", partition.select(val_idx), data_id, source=source,
                      split="train", memo_dir=memo, may_be_empty=True))


def local_train_split(cfg: RunConfig, node: NodeData) -> Dataset:
    """A ``data-path`` node's whole ``train`` split, in the folder's row order (no shuffle:
    celeba-partition wrote the rows in the order the simulation's partition has them)."""
    from flwr_datasets.partitioner import IidPartitioner

    fds = _new_fds(node.data_path, {"train": IidPartitioner(num_partitions=1)}, False, cfg.seed, node.cache_dir)
    train = _load_split(cfg, fds, node.data_path, "train")
    _check_schema(cfg, fds, ("train",), node.data_path)
    _check_split_values(node.data_path, "train", train, [cfg.target, *cfg.sensitive_attributes], node.cache_dir)
    if len(train) == 0:
        raise ConfigError(f"data-path={node.data_path!r} split 'train' has no rows; accepted: a folder "
                          "with this node's training rows, e.g. one written by celeba-partition")
    whole = fds.load_partition(0, "train")
    # An explicit row mapping: datasets turns a contiguous select on a dataset without one into
    # a *slice* of its table, whose rows then restart at 0, and LabeledRows.split_rows (the key of the
    # per-row caches) would name the wrong rows of the split.
    return whole._select_with_indices_mapping(range(len(whole)))  # noqa: SLF001


def _save_parts(node: NodeData, key: str, parts: tuple[LabeledRows, LabeledRows]) -> None:
    arrays = {}
    for tag, part in zip(("train", "val"), parts):
        arrays[f"{tag}|labels"] = part.labels
        arrays[f"{tag}|celeb_ids"] = part.celeb_ids
        arrays[f"{tag}|name"] = np.array(part.name)
        arrays[f"{tag}|skipped"] = np.array(json.dumps(part.skipped_rows))
        arrays[f"{tag}|where"] = np.array(json.dumps([part.data_id, part.split, part.split_size]))
        arrays[f"{tag}|split_rows"] = part.split_rows
        for a, v in part.attributes.items():
            arrays[f"{tag}|attr|{a}"] = v
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(Path(node.cache_dir) / "parts" / f"{key}.npz", buf.getvalue())
    except OSError as exc:  # the cache is optional: a full or read-only disk costs time only
        logging.getLogger("flwr").warning("celeba-fl: could not cache the parts (%s); continuing", exc)


def _load_parts(cfg: RunConfig, node: NodeData, key: str) -> tuple[LabeledRows, LabeledRows] | None:
    path = Path(node.cache_dir) / "parts" / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            out = []
            for tag in ("train", "val"):
                data_id, split, split_size = json.loads(str(z[f"{tag}|where"]))
                out.append(LabeledRows(
                    data_id=data_id, split=split, split_size=split_size, split_rows=z[f"{tag}|split_rows"],
                    name=str(z[f"{tag}|name"]), rows=None,
                    labels=z[f"{tag}|labels"], celeb_ids=z[f"{tag}|celeb_ids"],
                    attributes={a: z[f"{tag}|attr|{a}"] for a in cfg.sensitive_attributes},
                    load_rows=functools.partial(_rows_of, cfg, node, len(out)),
                    skipped_rows=json.loads(str(z[f"{tag}|skipped"])),
                ))
    except Exception as exc:  # unreadable or from another version: rebuilt, never trusted
        logging.getLogger("flwr").warning("celeba-fl: parts cache %s is unusable (%s); rebuilding", path, exc)
        return None
    return out[0], out[1]


def _rows_of(cfg: RunConfig, node: NodeData, which: int) -> Dataset:
    return _client_parts(cfg, node)[which].rows


def describe_node(cfg: RunConfig, node: NodeData) -> dict:
    """What a node tells the server about its data (a partitions.json entry): sizes of its
    local parts, target and group rates, and its celeb_ids (for the server's identity check)."""
    train, val = client_parts(cfg, node)
    labels = np.concatenate([train.labels, val.labels])
    return {
        "partition_id": node.partition_id,
        "num_partitions": node.num_partitions,
        "source": node.describe(cfg),
        "num_train": len(train),
        "num_val": len(val),
        "target_rate": float(labels.mean()) if len(labels) else None,
        "group_rates": {
            a: float(np.concatenate([train.attributes[a], val.attributes[a]]).mean()) if len(labels) else None
            for a in cfg.sensitive_attributes
        },
        "celeb_ids": sorted(set(np.concatenate([train.celeb_ids, val.celeb_ids]).tolist())),
        "skipped_rows": train.skipped_rows + val.skipped_rows,  # bad-images='skip'
    }


# --------------------------------------------------------------------------- the server's data
def load_server(cfg: RunConfig) -> FederatedDataset:
    """The server's own evaluation data: the ``valid`` and ``test`` splits of ``dataset``.
    Its ``train`` split, if any, is never read: the server knows the clients only through
    their replies (a folder with only valid and test, as celeba-partition writes, is enough)."""
    return _load_server(cfg)


@functools.lru_cache(maxsize=4)
def _load_server(cfg: RunConfig) -> FederatedDataset:
    fds = _new_fds(cfg.dataset, {}, True, cfg.seed, _cache_dir(cfg, None), splits=("valid", "test"))
    _load_split(cfg, fds, cfg.dataset, "valid")
    _check_schema(cfg, fds, ("valid", "test"))
    for split in ("valid", "test"):  # refused here, before the server waits for any node
        _check_split_values(cfg.dataset, split, fds.load_split(split), [cfg.target, *cfg.sensitive_attributes],
                            _cache_dir(cfg, None))
    return fds


def server_part(cfg: RunConfig, split: str) -> LabeledRows:
    """The server's ``valid`` or ``test`` split (``split``) as LabeledRows, checked like a
    client's part (labels, attributes, images per ``bad-images``). Raises ConfigError naming the
    problem (e.g. a split that is missing or empty, or an undecodable image with
    ``bad-images='fail'``)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r}; accepted: valid, test")
    memo = _cache_dir(cfg, None)
    data_id = dataset_fingerprint(cfg.dataset, memo)
    return make_part(cfg, split, load_server(cfg).load_split(split), data_id, source=cfg.dataset, split=split,
                     memo_dir=memo)


def server_identities(cfg: RunConfig) -> dict[str, set[int]]:
    """celeb_ids of ``valid`` and ``test``; raises if a celebrity is in both."""
    fds = load_server(cfg)
    ids = {s: set(np.asarray(fds.load_split(s)["celeb_id"]).tolist()) for s in ("valid", "test")}
    _refuse_shared(cfg, ids)
    return ids


def check_clients_disjoint(cfg: RunConfig, server_ids: dict[str, set[int]], partitions: list[dict]) -> dict[str, int]:
    """The clients' celeb_ids (from their replies) against the server's ``valid``/``test``
    identities; returns the number of identities per split (train = union of the clients')."""
    train = set()
    for entry in partitions:
        train |= set(entry["celeb_ids"])
    _refuse_shared(cfg, {"train": train, **server_ids})
    return {"train": len(train), **{s: len(v) for s, v in server_ids.items()}}


def _refuse_shared(cfg: RunConfig, ids: dict[str, set[int]]) -> None:
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = ids[a] & ids[b]
            if shared:
                raise ConfigError(
                    f"dataset={cfg.dataset!r}: {len(shared)} identities are in both {a} and {b} "
                    f"(e.g. {sorted(shared)[:3]}); accepted: identity-disjoint splits"
                )


# --------------------------------------------------------------------------- all partitions at once
def check_identity_disjoint(cfg: RunConfig, num_partitions: int) -> dict[str, int]:
    """Number of identities per split of the whole dataset (train included); raises if any
    celebrity is in two splits. For tools that hold every split (centralized, celeba-partition)."""
    fds = load_federated(cfg, num_partitions)
    ids = {s: set(np.asarray(fds.load_split(s)["celeb_id"]).tolist()) for s in SPLIT_NAMES}
    _refuse_shared(cfg, ids)
    return {s: len(v) for s, v in ids.items()}


def partition_summary(cfg: RunConfig, num_partitions: int) -> list[dict]:
    """``describe_node`` for every partition (tools that hold every split)."""
    return [describe_node(cfg, NodeData.partition(cfg, pid, num_partitions)) for pid in range(num_partitions)]
