"""Frozen-backbone embeddings: batched preprocessing, the fastest runtime, and a cache.

The backbone is frozen and in eval mode, so an image's embedding never changes during a run:
computing it once per process (memory) and once per machine (disk) instead of once per round and
local epoch removes nearly all of the compute of a federated run.

* Preprocessing is batched tensor work: ``torchvision.io.decode_jpeg`` on a list of encoded
  images (libjpeg-turbo in a thread that runs ahead of the backbone on CPU, nvJPEG on CUDA),
  then resize of the shorter side to ``image_size`` (antialiased) and a centre crop per
  group of same-sized images. ImageNet normalisation is part of the model (``Normalized``).
* Runtime: ONNX Runtime on CPU (exported from the same torchvision module; measured ~5-10x
  faster than eager PyTorch on this project's 2-core machines), PyTorch with channels_last and
  bf16 autocast on CUDA. ``feature-runtime`` forces one. ``onnx-int8`` (opt-in) runs an int8
  copy of the exported model: ~1.6x faster on a 2-core CPU, but its embeddings are an
  approximation (mean cosine ~0.9 to fp32; see ``quantize``), so it is never picked by
  ``auto``.
* Cache: embeddings are kept per row of a split (``FeatureStore``, row_store.py): each row is
  computed once per cache dir, whichever partitioning puts it in whichever client's part. The
  key (``EmbeddingKey``) covers everything that changes an embedding: the data's content
  fingerprint, the split, the weights digest, image size, view (flip), runtime and this
  module's ``EXTRACTOR_VERSION``; a per-row checksum catches a torn or damaged row, which is
  then computed again.
"""

from __future__ import annotations

import functools

import hashlib
import json
import logging
from logging import INFO
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .model import FEATURE_DIM, Backbone
from .row_store import RowStore

log = logging.getLogger(__name__)
#: Flower's logger: its console handler shows progress lines next to the round lines (and
#: nothing breaks where flwr is not installed, e.g. the benchmark on a bare GPU machine).
progress_log = logging.getLogger("flwr")

#: Bump when preprocessing, pooling or the export changes: every cached embedding then misses.
EXTRACTOR_VERSION = "3"  # 2: normalisation inside the model; 3: GPU resize without antialiasing when enlarging
#: Version of the int8 recipe in ``quantize``: part of the int8 model's file name and runtime
#: id, so a change rebuilds the model and misses every int8 embedding.
INT8_RECIPE = "1"  # static QOperator, per-channel int8 weights (reduce_range), MinMax on 32 noise images
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIEWS = ("orig", "hflip")

#: Seconds between progress lines of a long embedding (``Progress``).
PROGRESS_EVERY_S = 15.0


# --------------------------------------------------------------------------- preprocessing
def decode(blobs: Sequence[bytes], device: torch.device | str = "cpu") -> list[tuple[list[int], torch.Tensor]]:
    """Encoded images -> uint8 RGB stacked per image size: [(indices, (k, 3, H, W))].

    JPEGs are decoded by libjpeg-turbo on the CPU, or by nvJPEG as one batch on a CUDA
    ``device``. Measured on H200s (docs/SPEED.md): at full CelebA size (218 x 178) nvJPEG fed
    the GPU faster than libjpeg-turbo in 4-16 threads (11.5k vs at most 9.4k img/s end to
    end); at celeba-10k's halved size the two traded places between machines.
    """
    images = _decode_each(blobs, torch.device(device))
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
    return [(idx, torch.stack([images[i] for i in idx])) for idx in by_shape.values()]


def _decode_each(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """Encoded images -> a list of uint8 (3, H, W) RGB tensors on ``device``. Raises
    RuntimeError when one cannot be decoded (a truncated JPEG included: libjpeg-turbo's
    "Image is incomplete or truncated")."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        # torchvision 0.29 flags its decoders for a future move to torchcodec; they still
        # are the fastest batched JPEG decoders that install everywhere.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        if all(len(b) > 2 and b[0] == 0xFF and b[1] == 0xD8 for b in blobs):
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        return [decode_image(r, mode=ImageReadMode.RGB).to(device) for r in raw]


def undecodable(batches: Iterable[Sequence[bytes]]) -> list[tuple[int, str]]:
    """(index over all batches, reason) of every encoded image that ``decode`` cannot decode,
    checked with the same decoders on the CPU: a batch at a time, image by image only in a
    batch that fails. About one decode per image (~0.4 ms for a CelebA face on one core)."""
    bad: list[tuple[int, str]] = []
    offset = 0
    for batch in batches:
        try:
            _decode_each(batch, torch.device("cpu"))
        except (RuntimeError, ValueError):
            for i, blob in enumerate(batch):
                try:
                    _decode_each([blob], torch.device("cpu"))
                except (RuntimeError, ValueError) as exc:
                    bad.append((offset + i, _decode_reason(exc)))
        offset += len(batch)
    return bad


def _decode_reason(exc: Exception) -> str:
    """torchvision's error without its source location: 'Image is incomplete or truncated'."""
    text = " ".join(str(exc).split())
    return re.sub(r"^.*?\.cpp:\d+,\s*", "", text)[:200] or type(exc).__name__


def resize_crop(groups: list[tuple[list[int], torch.Tensor]], image_size: int, hflip: bool = False,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Decoded groups -> uint8 (N, 3, S, S) on ``device``: shorter side resized to S
    (antialiased where it matters), centre crop, optional mirror.

    On CUDA the images are resized there (uploaded first if decoded on the CPU).
    """
    from torchvision.transforms.v2 import functional as TF

    device = torch.device(device)
    resized = []
    for _, batch in groups:
        if device.type != "cpu":  # antialiased resize of uint8 is a CPU kernel; use float on GPU
            batch = _resize_float(batch.to(device, non_blocking=True), image_size)
        else:
            batch = TF.resize(batch, [image_size], antialias=True)
        resized.append(TF.center_crop(batch, [image_size, image_size]))
    if len(groups) == 1:  # all images of one size (CelebA): already in order
        out = resized[0]
    else:
        order = torch.tensor([i for idx, _ in groups for i in idx]).argsort()
        out = torch.cat(resized)[order.to(device)]
    return out.flip(-1) if hflip else out


def _resize_float(batch: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 -> uint8 resize of the shorter side through float, the GPU's way. Antialiasing
    only when shrinking: when enlarging (CelebA's 178 px faces to 224) it changes nothing
    (1e-3 in float) but its CUDA kernel is several times slower than plain bilinear."""
    from torchvision.transforms.v2 import functional as TF

    antialias = min(batch.shape[-2:]) > image_size
    out = TF.resize(batch.float(), [image_size], antialias=antialias)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def decode_resize(blobs: Sequence[bytes], image_size: int, hflip: bool = False,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Encoded images -> uint8 (N, 3, S, S) on ``device``: ``decode`` then ``resize_crop``."""
    return resize_crop(decode(blobs, device), image_size, hflip, device)


class Normalized(nn.Module):
    """uint8 images -> embeddings: ImageNet normalisation, then the frozen backbone.

    Part of the model rather than of the input pipeline, so ONNX Runtime runs it in its own
    threads (measured on 2 cores: the Python-side float conversion and normalisation cost
    about as much as decoding) and the GPU does it where the backbone runs there.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x.float() - self.mean) / self.std)


# --------------------------------------------------------------------------- runtimes
class Extractor:
    """Runs normalisation + the frozen backbone on uint8 batches, with the fastest runtime
    for the device."""

    def __init__(self, backbone: Backbone, runtime: str, device: torch.device,
                 image_size: int, onnx_dir: Path | None = None, weights_id: str = "") -> None:
        self.model = Normalized(backbone).to(device).eval()
        self.device = device
        self.image_size = image_size
        runtime = resolve_runtime(runtime, device)
        self.runtime = runtime
        self._session = None
        on_gpu = device.type == "cuda" and runtime == "torch"
        #: Where images are decoded and resized: on the GPU when the backbone runs there.
        self.decode_device = device if on_gpu else torch.device("cpu")
        if runtime in ("onnx", "onnx-int8"):
            self._session = self._onnx_session(onnx_dir, weights_id, int8=runtime == "onnx-int8")
        elif device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def runtime_id(self) -> str:
        """Part of the cache key: numerics differ between runtimes (slightly, except int8)."""
        return runtime_id(self.runtime, self.device)

    def _onnx_session(self, onnx_dir: Path | None, weights_id: str, int8: bool = False):
        import onnxruntime as ort

        key = hashlib.sha256(f"{weights_id}|{EXTRACTOR_VERSION}|{torch.__version__}".encode()).hexdigest()[:16]
        directory = Path(onnx_dir) if onnx_dir else Path(tempfile.gettempdir()) / "celeba-fl-onnx"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"mobilenet_v2_features-{key}.onnx"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            dummy = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8)
            torch.onnx.export(
                self.model.cpu(), dummy, str(tmp), input_names=["x"], output_names=["z"],
                dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "z": {0: "n"}},
                opset_version=17, dynamo=False,
            )
            os.replace(tmp, path)
        if int8:
            path = quantize(path, self.image_size)
        opts = ort.SessionOptions()
        # torch's thread count: OMP_NUM_THREADS where set (Ray sets it to an actor's num-cpus),
        # else the machine's cores; never the machine's cores inside a client actor
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, 1280), on the CPU for ONNX Runtime, else on the
        model's device (no synchronisation: ``extract`` moves everything to the CPU once)."""
        if self._session is not None:
            out = self._session.run(None, {"x": x.cpu().contiguous().numpy()})[0]
            return torch.from_numpy(out)
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x)


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``feature-runtime`` with ``auto`` resolved: PyTorch on CUDA, else ONNX Runtime when
    installed (else PyTorch)."""
    if runtime == "auto":
        return "torch" if device.type == "cuda" else ("onnx" if _has_onnxruntime() else "torch")
    return runtime


def runtime_id(runtime: str, device: torch.device) -> str:
    """The cache-key name of a resolved runtime on ``device``: known without building it."""
    if runtime == "onnx":
        return "onnx-cpu-fp32"
    if runtime == "onnx-int8":
        return f"onnx-cpu-int8-r{INT8_RECIPE}"
    return "torch-cuda-bf16" if device.type == "cuda" else "torch-cpu-fp32"


def quantize(fp32: Path, image_size: int) -> Path:
    """The int8 copy of an exported fp32 model (``feature-runtime="onnx-int8"``), built once
    per machine next to it (written to a temporary name, then renamed) and reused.

    Static quantization in ONNX Runtime's QOperator format: weights int8 per output channel,
    activations uint8 with ranges from MinMax calibration. The calibration images are 32
    seeded uniform-noise images at the run's size, not data: every client and the server thus
    build the same model from the weights alone (byte-identical on one machine), and no split,
    hence no identity, is touched. Measured on celeba-10k (docs/SPEED.md): noise, smoothed
    noise and 128 real valid-split images as calibration all gave mean cosine ~0.91 to the
    fp32 embeddings and the same Smiling linear-probe accuracy within 1 point; federated runs
    on int8 embeddings reach the fp32 runs' test accuracy. ``reduce_range`` (7-bit
    weights) because ONNX Runtime's u8s8 kernels can saturate on x86 CPUs without VNNI (AVX2,
    AVX-512F): without it the minimum cosine fell to 0.55 on this project's AMD EPYC. Peak
    memory while calibrating: ~1.5 GB at 224 px.
    """
    path = fp32.with_name(f"{fp32.stem}-int8-r{INT8_RECIPE}-{image_size}px.onnx")
    if path.exists():
        return path
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    noise = torch.randint(0, 256, (32, 3, image_size, image_size),
                          generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()

    class Noise(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.split(noise, 4))

        def get_next(self):
            return {"x": b} if (b := next(self.batches, None)) is not None else None

    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    pre = path.with_suffix(f".{os.getpid()}.pre.tmp")
    ort.set_default_logger_severity(3)  # pre-processing logs every initializer it drops
    try:
        # Constant folding and shape inference first, as ONNX Runtime recommends; it also
        # removes the Identity nodes the exporter puts in front of shared weights, which the
        # quantizer cannot see through.
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(tmp), Noise(), quant_format=QuantFormat.QOperator, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        ort.set_default_logger_severity(2)
        pre.unlink(missing_ok=True)
    os.replace(tmp, path)
    return path


def _has_onnxruntime() -> bool:
    """onnxruntime and onnx (which torch.onnx.export needs) are installed; found, not imported."""
    from importlib.util import find_spec

    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


def extract(extractor: Extractor, blobs: Iterable[Sequence[bytes]], hflip: bool = False,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """float32 (N, 1280) CPU embeddings of every batch of encoded images, in order.

    On the CPU, one thread decodes and resizes the next batch while the backbone runs on the
    current one (libjpeg-turbo and ONNX Runtime release the GIL). On a GPU, each batch is
    decoded (nvJPEG), resized and embedded in turn: CUDA runs that work asynchronously, so
    the host-side stage of the next batch overlaps the GPU's work on this one, and the
    results stay on the GPU until the end (no per-batch synchronisation). Measured on H200s
    (docs/SPEED.md) against libjpeg-turbo in CPU threads (which starve the thread launching
    the kernels of the GIL) and in worker processes: best at full CelebA size, and the best
    single figure at the halved size.
    """
    size, device = extractor.image_size, extractor.decode_device
    outs: list[torch.Tensor] = []

    def done(out: torch.Tensor) -> None:
        outs.append(out)
        if progress is not None:
            progress(len(out))

    if device.type != "cpu":
        for batch in blobs:
            done(extractor(decode_resize(batch, size, hflip, device)))
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for batch in blobs:
                fut = pool.submit(decode_resize, batch, size, hflip)
                if pending is not None:
                    done(extractor(pending.result()))
                pending = fut
            if pending is not None:
                done(extractor(pending.result()))
    return torch.cat(outs).cpu() if outs else torch.empty(0, FEATURE_DIM)


# --------------------------------------------------------------------------- the cache
@dataclass(frozen=True)
class EmbeddingKey:
    """Everything that changes the embeddings of a split's rows: one RowStore each."""

    data: str  # the data's content fingerprint (data.dataset_fingerprint)
    split: str
    weights: str
    image_size: int
    runtime: str
    view: str
    version: str = EXTRACTOR_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:32]


class FeatureStore:
    """Embeddings of a Part's rows, each row computed once per cache dir (whichever part,
    partitioning or client holds it), or every time with no cache dir.

    On disk: one RowStore (row_store.py) per ``EmbeddingKey`` under ``<cache-dir>/features``:
    (split size, 1280) float32 by the row's index in its split. A part reads the rows it
    holds and computes only those nobody computed before; the OS's page cache, not this
    process, keeps them in memory, shared by every process of the machine.

    ``extractor`` is an ``Extractor`` or a function that builds one: built on the first
    miss only, so a process whose embeddings are all cached never loads the backbone. With a
    function, ``image_size`` and ``runtime_id`` (the cache key's) must be given.
    ``stats``: rows read from the cache, rows computed, and the seconds spent computing.
    """

    def __init__(self, extractor: Extractor | Callable[[], Extractor], weights_id: str,
                 cache_dir: str | None, batch_size: int = 64, *, image_size: int | None = None,
                 runtime_id: str | None = None) -> None:
        self._extractor = extractor if isinstance(extractor, Extractor) else None
        self._build = None if isinstance(extractor, Extractor) else extractor
        self.image_size = image_size if self._extractor is None else self._extractor.image_size
        self.runtime_id = runtime_id if self._extractor is None else self._extractor.runtime_id
        if self.image_size is None or self.runtime_id is None:
            raise ValueError("FeatureStore with an extractor factory needs image_size and runtime_id")
        self.weights_id = weights_id
        self.cache_dir = Path(cache_dir) / "features" if cache_dir else None
        self.batch_size = batch_size
        self.stats = {"rows_cached": 0, "rows_computed": 0, "extract_seconds": 0.0}

    @property
    def extractor(self) -> Extractor:
        """The extractor, built now if it was not yet."""
        if self._extractor is None:
            self._extractor = self._build()
            if self._extractor.runtime_id != self.runtime_id:
                raise RuntimeError(f"runtime {self._extractor.runtime_id} != {self.runtime_id} of the cache key")
        return self._extractor

    def key(self, part, view: str) -> EmbeddingKey:
        return EmbeddingKey(data=part.data_id, split=part.split, weights=self.weights_id,
                            image_size=self.image_size, runtime=self.runtime_id, view=view)

    def rows(self, part, view: str) -> RowStore | None:
        """The RowStore of ``part``'s split for ``view``; None without a cache dir."""
        if self.cache_dir is None or not part.split_size:
            return None
        key = self.key(part, view)
        return RowStore(self.cache_dir / key.digest(), key.__dict__, part.split_size, FEATURE_DIM)

    def get(self, part, view: str = "orig") -> torch.Tensor:
        """float32 (len(part), 1280) embeddings of ``part``'s rows for ``view``."""
        if view not in VIEWS:
            raise ValueError(f"view={view!r} is not known; accepted: {', '.join(VIEWS)}")
        n = len(part)
        if n == 0:
            return torch.empty(0, FEATURE_DIM)
        store = self.rows(part, view)
        values, have = store.read(part.split_rows) if store else (np.zeros((n, FEATURE_DIM), np.float32),
                                                                  np.zeros(n, bool))
        missing = np.flatnonzero(~have)
        self.stats["rows_cached"] += n - len(missing)
        if len(missing):
            t0 = time.perf_counter()
            feats = extract(self.extractor, part.blobs(self.batch_size, None if len(missing) == n else missing),
                            hflip=(view == "hflip"), progress=Progress(len(missing), f"{part.name} ({view})"))
            dt = time.perf_counter() - t0
            self.stats["rows_computed"] += len(missing)
            self.stats["extract_seconds"] += dt
            progress_log.log(INFO, "celeba-fl: embedded %d images of %s (%s) in %.1fs, %.0f img/s, %s, "
                             "%d threads%s", len(missing), part.name, view, dt, len(missing) / max(dt, 1e-9),
                             self.runtime_id, torch.get_num_threads(),
                             f"; {n - len(missing)} more read from the cache" if len(missing) < n else "")
            if len(feats) != len(missing):
                raise RuntimeError(f"expected {len(missing)} embeddings for {part.name}, got {len(feats)}")
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
        """Embeddings of a data.Part: (N, 1280), or (2, N, 1280) with the flipped view."""
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
        return Extractor(Backbone(load_mobilenet(cfg.weights)), cfg.feature_runtime, device,
                         cfg.image_size, onnx_dir=onnx_dir, weights_id=weights_id)

    return FeatureStore(build, weights_id, cache_dir, cfg.extract_batch_size, image_size=cfg.image_size,
                        runtime_id=runtime_id(resolve_runtime(cfg.feature_runtime, device), device))
