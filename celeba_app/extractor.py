"""Embeddings of uint8 image batches by the frozen backbone, on the fastest runtime.

ONNX Runtime on CPU (exported from the same torchvision module; several times faster than
eager PyTorch on CPU, docs/SPEED.md), PyTorch with channels_last and bf16 autocast on CUDA; ``feature-runtime``
forces one, and ``onnx-int8`` (opt-in, quantization.py) runs an int8 copy. ``extract`` embeds
a stream of encoded batches, decoding the next batch while the backbone runs on this one.
Measurements: docs/SPEED.md.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .atomic import atomic_write
from .images import IMAGENET_MEAN, IMAGENET_STD, decode_resize
from .model import Backbone
from .quantization import INT8_RECIPE, quantize

#: Bump when preprocessing, pooling or the export changes: every cached embedding then misses.
EXTRACTOR_VERSION = "4"  # 2: normalisation inside the model; 3: GPU resize without antialiasing when enlarging;
#                           4: any block and pool (pooling as matrix products), ONNX exported per image size


class ImageNetBackbone(nn.Module):
    """uint8 images -> embeddings: ImageNet normalisation, then the frozen backbone.

    Part of the model rather than of the input pipeline, so ONNX Runtime runs it in its own
    threads (on CPU the Python-side float conversion and normalisation cost
    about as much as decoding) and the GPU does it where the backbone runs there.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) in [0, 255] -> float32 (N, backbone.dim)."""
        return self.backbone((x.float() - self.mean) / self.std)


class Extractor:
    """Runs normalisation + the frozen backbone on uint8 batches, with the fastest runtime
    for the device."""

    def __init__(self, backbone: Backbone, runtime: str, device: torch.device,
                 image_size: int, onnx_dir: Path | None = None, weights_id: str = "") -> None:
        self.model = ImageNetBackbone(backbone).to(device).eval()
        self.device = device
        self.image_size = image_size
        #: Numbers per image (model.Backbone.dim).
        self.dim = backbone.dim
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

        backbone = self.model.backbone
        key = hashlib.sha256(f"{weights_id}|{EXTRACTOR_VERSION}|{torch.__version__}|{backbone.layer}|"
                             f"{backbone.pool_size}|{self.image_size}".encode()).hexdigest()[:16]
        directory = Path(onnx_dir) if onnx_dir else Path(tempfile.gettempdir()) / "celeba-fl-onnx"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"mobilenet_v2_features-{key}.onnx"
        if not path.exists():
            atomic_write(path, lambda tmp: export_onnx(self.model.cpu(), self.image_size, tmp))
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
        """uint8 (N, 3, H, W) -> float32 (N, dim), on the CPU for ONNX Runtime, else on the
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


def export_onnx(model: nn.Module, image_size: int, path: Path) -> None:
    """``model`` (uint8 (N, 3, S, S) -> float32 (N, D)) to ONNX at ``path``, for ``image_size``
    = S only: the pooling matrices (model.AdaptiveAvgPool2d) are constants of the map size.
    The exporter's warnings (the TorchScript path's deprecation, the traced shape) are
    silenced: they concern this fixed-size export, not the user."""
    import warnings

    dummy = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, dummy, str(path), input_names=["x"], output_names=["z"],
                          dynamic_axes={"x": {0: "n"}, "z": {0: "n"}}, opset_version=17, dynamo=False)


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


def _has_onnxruntime() -> bool:
    """onnxruntime and onnx (which torch.onnx.export needs) are installed; found, not imported."""
    from importlib.util import find_spec

    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


#: glibc's mallopt parameters (malloc.h) and glibc's own default for both thresholds, in bytes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD = -1, -3, 128 * 1024


@functools.cache
def return_freed_memory() -> bool:
    """Make glibc give back, rather than keep, the large blocks that embedding frees.

    Why: glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
    after the first few batches a decoded batch (uint8 (64, 3, 224, 224): 9.6 MB) and ONNX
    Runtime's buffers come from the heaps of the decoding thread and of the main thread. The
    holes they leave are kept, not returned, and a process's anonymous memory grew with every
    image it embedded. Fixing both thresholds at glibc's default (128 KiB) turns off that
    adjustment: large blocks stay in mmap and go back to the system when freed, so the peak
    stays flat in the number of images, at no measurable cost in speed (docs/SPEED.md, "CelebA
    at scale"). Process-wide, once per process; the same as setting ``MALLOC_MMAP_THRESHOLD_``
    and ``MALLOC_TRIM_THRESHOLD_`` before the process starts.

    Returns False, changing nothing, where the C library is not glibc (macOS, musl).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD))


def extract(extractor: Extractor, encoded: Iterable[Sequence[bytes]], hflip: bool = False,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """float32 (N, extractor.dim) CPU embeddings of every batch of encoded images, in order.

    On the CPU, one thread decodes and resizes the next batch while the backbone runs on the
    current one (libjpeg-turbo and ONNX Runtime release the GIL). On a GPU, each batch is
    decoded (nvJPEG), resized and embedded in turn: CUDA runs that work asynchronously, so
    the host-side stage of the next batch overlaps the GPU's work on this one, and the
    results stay on the GPU until the end (no per-batch synchronisation). Decoding in CPU
    threads instead starves the thread that launches the kernels of the GIL (the
    alternatives, measured: the GPU section of docs/SPEED.md).
    """
    return_freed_memory()
    size, device = extractor.image_size, extractor.decode_device
    outs: list[torch.Tensor] = []

    def done(out: torch.Tensor) -> None:
        outs.append(out)
        if progress is not None:
            progress(len(out))

    if device.type != "cpu":
        for batch in encoded:
            done(extractor(decode_resize(batch, size, hflip, device)))
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for batch in encoded:
                fut = pool.submit(decode_resize, batch, size, hflip)
                if pending is not None:
                    done(extractor(pending.result()))
                pending = fut
            if pending is not None:
                done(extractor(pending.result()))
    return torch.cat(outs).cpu() if outs else torch.empty(0, extractor.dim)
