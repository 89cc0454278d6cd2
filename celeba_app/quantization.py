"""The int8 copy of the exported backbone (``feature-runtime="onnx-int8"``), made with ONNX
Runtime's static quantization; see ``quantize`` for the recipe and why it is opt-in."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write

#: Version of the int8 recipe in ``quantize``: part of the int8 model's file name and runtime
#: id, so a change rebuilds the model and misses every int8 embedding.
INT8_RECIPE = "1"  # static QOperator, per-channel int8 weights (reduce_range), MinMax on 32 noise images


def quantize(fp32: Path, image_size: int) -> Path:
    """The int8 copy of an exported fp32 model (``feature-runtime="onnx-int8"``), built once
    per machine next to it (written to a temporary name, then renamed) and reused.

    Static quantization in ONNX Runtime's QOperator format: weights int8 per output channel,
    activations uint8 with ranges from MinMax calibration. The calibration images are 32
    seeded uniform-noise images at the run's size, not data: every client and the server thus
    build the same model from the weights alone (byte-identical on one machine), and no split,
    hence no identity, is touched (noise calibrates as well as real images: docs/SPEED.md,
    "int8"). ``reduce_range`` (7-bit weights) because ONNX Runtime's u8s8 kernels can
    saturate on x86 CPUs without VNNI (AVX2, AVX-512F). Approximate: its embeddings are close
    to fp32's, not equal, which is why ``auto`` never picks it.

    Returns the int8 model's path. Raises ImportError without onnxruntime.
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

    pre = path.with_name(f".{path.name}.{os.getpid()}.pre.tmp")
    ort.set_default_logger_severity(3)  # pre-processing logs every initializer it drops
    try:
        # Constant folding and shape inference first, as ONNX Runtime recommends; it also
        # removes the Identity nodes the exporter puts in front of shared weights, which the
        # quantizer cannot see through.
        quant_pre_process(str(fp32), str(pre))
        atomic_write(path, lambda tmp: quantize_static(
            str(pre), str(tmp), Noise(), quant_format=QuantFormat.QOperator, per_channel=True, reduce_range=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8))
    finally:
        ort.set_default_logger_severity(2)
        pre.unlink(missing_ok=True)
    return path
