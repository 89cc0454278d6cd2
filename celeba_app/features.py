"""The embedding cache: each row of a split embedded once per cache dir, whoever holds it.

The backbone is frozen and in eval mode, so an image's embedding never changes during a run:
computing it once per machine instead of once per round and local epoch removes nearly all
of the compute of a federated run. ``FeatureStore`` keeps embeddings per row of a split
(row_store.py), so every partitioning, client and later run reads the same rows. The key
(``EmbeddingKey``) covers everything that changes an embedding: the data's content
fingerprint, the split, the weights digest, image size, the block the head reads and its pool
(``feature-layer``, ``feature-pool``), view (flip), runtime and
``extractor.EXTRACTOR_VERSION``; a per-row checksum catches a torn or damaged row, which is
then computed again. Images: images.py; the backbone's runtimes: extractor.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from logging import DEBUG, INFO
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .extractor import EXTRACTOR_VERSION, Extractor, extract, resolve_runtime, runtime_id
from .mobilenet_layers import feature_dim
from .model import Backbone
from .row_store import RowStore

log = logging.getLogger(__name__)
#: Flower's logger: its console handler shows progress lines next to the round lines (and
#: nothing breaks where flwr is not installed, e.g. the benchmark on a bare GPU machine).
progress_log = logging.getLogger("flwr")

VIEWS = ("orig", "hflip")

#: Seconds between progress lines of a long embedding (``Progress``).
PROGRESS_EVERY_S = 15.0

@dataclass(frozen=True)
class EmbeddingKey:
    """Everything that changes the embeddings of a split's rows: one RowStore each."""

    data: str  # the data's content fingerprint (data.dataset_fingerprint)
    split: str
    weights: str
    image_size: int
    layer: int  # feature-layer: the output of mobilenet_v2().features[layer]
    pool: int  # feature-pool: that output average-pooled to pool x pool
    runtime: str
    view: str
    version: str = EXTRACTOR_VERSION

    def digest(self) -> str:
        """32 hex characters of sha256 over the key's fields: the RowStore's folder name."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:32]


class FeatureStore:
    """Embeddings of a LabeledRows's rows, each row computed once per cache dir (whichever part,
    partitioning or client holds it), or every time with no cache dir.

    On disk: one RowStore (row_store.py) per ``EmbeddingKey`` under ``<cache-dir>/features``:
    (split size, dim) float32 by the row's index in its split. A part reads the rows it
    holds and computes only those nobody computed before; the OS's page cache, not this
    process, keeps them in memory, shared by every process of the machine.

    ``extractor`` is an ``Extractor`` or a function that builds one: built on the first
    miss only, so a process whose embeddings are all cached never loads the backbone. With a
    function, ``image_size``, ``runtime_id``, ``layer`` and ``pool`` (the cache key's) must be
    given. ``dim``: numbers per embedding (mobilenet_layers.feature_dim(layer, pool)).
    ``stats``: rows read from the cache, rows computed, and the seconds spent computing.
    """

    def __init__(self, extractor: Extractor | Callable[[], Extractor], weights_id: str,
                 cache_dir: str | None, batch_size: int = 64, *, image_size: int | None = None,
                 runtime_id: str | None = None, layer: int | None = None, pool: int | None = None) -> None:
        self._extractor = extractor if isinstance(extractor, Extractor) else None
        self._build = None if isinstance(extractor, Extractor) else extractor
        if self._extractor is not None:
            backbone = self._extractor.model.backbone
            image_size, runtime_id = self._extractor.image_size, self._extractor.runtime_id
            layer, pool = backbone.layer, backbone.pool_size
        if image_size is None or runtime_id is None or layer is None or pool is None:
            raise ValueError("FeatureStore with an extractor factory needs image_size, runtime_id, layer and pool")
        self.image_size, self.runtime_id, self.layer, self.pool = image_size, runtime_id, layer, pool
        self.dim = feature_dim(layer, pool)
        self.weights_id = weights_id
        self.cache_dir = Path(cache_dir) / "features" if cache_dir else None
        self.batch_size = batch_size
        self.stats = {"rows_cached": 0, "rows_computed": 0, "extract_seconds": 0.0}

    @property
    def extractor(self) -> Extractor:
        """The extractor (extractor.Extractor), built on first use (``load_extractor``)."""
        return self.load_extractor()

    def load_extractor(self) -> Extractor:
        """Build the extractor now if it is not built yet, and return it: loading the weights,
        and on CPU exporting the ONNX model, costs seconds, and a run whose embeddings are all
        cached never pays it unless it asks. Called before a run writes anything, so a bad
        weights file is refused first. Raises what loading the weights raises
        (model.load_mobilenet)."""
        if self._extractor is None:
            self._extractor = self._build()
            if self._extractor.runtime_id != self.runtime_id or self._extractor.dim != self.dim:
                raise RuntimeError(f"extractor ({self._extractor.runtime_id}, {self._extractor.dim} numbers) differs "
                                   f"from the cache key's ({self.runtime_id}, {self.dim})")
        return self._extractor

    def key(self, part, view: str) -> EmbeddingKey:
        """The EmbeddingKey of ``part``'s split (data.LabeledRows) for ``view`` on this store."""
        return EmbeddingKey(data=part.data_id, split=part.split, weights=self.weights_id,
                            image_size=self.image_size, layer=self.layer, pool=self.pool,
                            runtime=self.runtime_id, view=view)

    def rows(self, part, view: str) -> RowStore | None:
        """The RowStore of ``part``'s split for ``view``; None without a cache dir."""
        if self.cache_dir is None or not part.split_size:
            return None
        key = self.key(part, view)
        return RowStore(self.cache_dir / key.digest(), key.__dict__, part.split_size, self.dim)

    def get(self, part, view: str = "orig") -> torch.Tensor:
        """float32 (len(part), dim) embeddings of ``part``'s rows for ``view``."""
        if view not in VIEWS:
            raise ValueError(f"view={view!r} is not known; accepted: {', '.join(VIEWS)}")
        n = len(part)
        if n == 0:
            return torch.empty(0, self.dim)
        store = self.rows(part, view)
        values, have = store.read(part.split_rows) if store else (np.zeros((n, self.dim), np.float32),
                                                                  np.zeros(n, bool))
        missing = np.flatnonzero(~have)
        self.stats["rows_cached"] += n - len(missing)
        if len(missing):
            t0 = time.perf_counter()
            feats = extract(self.extractor, part.encoded_images(self.batch_size, None if len(missing) == n else missing),
                            hflip=(view == "hflip"), progress=Progress(len(missing), f"{part.name} ({view})"))
            dt = time.perf_counter() - t0
            self.stats["rows_computed"] += len(missing)
            self.stats["extract_seconds"] += dt
            # DEBUG: fifty clients' lines said nothing the server's plan line and the round lines do not
            progress_log.log(DEBUG, "celeba-fl: embedded %d images of %s (%s) in %.1fs, %.0f img/s, %s, "
                             "%d threads%s", len(missing), part.name, view, dt, len(missing) / max(dt, 1e-9),
                             self.runtime_id, torch.get_num_threads(),
                             f"; {n - len(missing)} more read from the cache" if len(missing) < n else "")
            if len(feats) != len(missing):
                raise RuntimeError(f"expected {len(missing)} embeddings for {part.name}, got {len(feats)}")
            if len(missing) == n:  # nothing was cached: use the new array, not a copy of it
                values = np.ascontiguousarray(feats.numpy(), dtype=np.float32)
            else:
                values[missing] = feats.numpy()
            if store is not None:
                try:
                    store.write(part.split_rows[missing], values[missing])
                except OSError as exc:  # the cache is optional: a full disk costs time, not the run
                    progress_log.warning("celeba-fl: could not write the embedding cache (%s); "
                                         "continuing without it", exc)
        return torch.from_numpy(values)

    def missing(self, part, hflip: bool = False) -> int:
        """How many embeddings ``for_part(part, hflip)`` would compute now (for a plan)."""
        views = VIEWS if hflip else VIEWS[:1]
        stores = [self.rows(part, v) for v in views]
        return sum(len(part) - int(s.filled(part.split_rows).sum()) if s else len(part) for s in stores)

    def for_part(self, part, hflip: bool = False) -> torch.Tensor:
        """Embeddings of a data.LabeledRows: (N, dim), or (2, N, dim) with the flipped view."""
        views = VIEWS if hflip else VIEWS[:1]
        feats = [self.get(part, v) for v in views]
        return torch.stack(feats) if hflip else feats[0]


class Progress:
    """A progress line every ``every_s`` seconds of a long embedding (images done, rate, ETA),
    in Flower's log: the ServerApp's console, and each client's (Ray actor or SuperNode) log."""

    def __init__(self, total: int, label: str, every_s: float = PROGRESS_EVERY_S) -> None:
        self.total, self.label, self.every_s = total, label, every_s
        self.done, self.t0 = 0, time.perf_counter()
        self.next_at = self.t0 + every_s

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now >= self.next_at and self.done < self.total:
            rate = self.done / (now - self.t0)
            progress_log.log(INFO, "celeba-fl: embedding %s: %d/%d images, %.0f img/s, about %.0fs left",
                             self.label, self.done, self.total, rate, (self.total - self.done) / max(rate, 1e-9))
            self.next_at = now + self.every_s


def feature_store(cfg, device: torch.device, cache_dir: str | None = None) -> FeatureStore:
    """The FeatureStore for this run config and device, made once per process.

    ``cache_dir``: where embeddings are kept (a node's own, from its node config); default the
    run config's ``cache-dir``, and none when ``feature-cache=false``. The backbone is loaded
    (and exported to ONNX) only on the first embedding that is not cached. Cached per process
    by ``functools.lru_cache`` over the arguments (the whole frozen RunConfig).
    """
    return _feature_store(cfg, torch.device(device), cache_dir)


@functools.lru_cache(maxsize=4)
def _feature_store(cfg, device: torch.device, cache_dir: str | None) -> FeatureStore:
    from .model import load_mobilenet, weights_digest

    cache_dir = (cache_dir or cfg.cache_dir) if cfg.feature_cache else None
    weights_id = weights_digest(cfg.weights)
    onnx_dir = Path(cache_dir or cfg.cache_dir) / "onnx"

    def build() -> Extractor:
        return Extractor(Backbone(load_mobilenet(cfg.weights), cfg.feature_layer, cfg.feature_pool),
                         cfg.feature_runtime, device,
                         cfg.image_size, onnx_dir=onnx_dir, weights_id=weights_id)

    return FeatureStore(build, weights_id, cache_dir, cfg.extract_batch_size, image_size=cfg.image_size,
                        layer=cfg.feature_layer, pool=cfg.feature_pool,
                        runtime_id=runtime_id(resolve_runtime(cfg.feature_runtime, device), device))
