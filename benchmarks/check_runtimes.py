"""Every setting of the feature sweep on every CPU runtime, against the PyTorch reference.

    python benchmarks/check_runtimes.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth --images 16

For each ``feature-layer`` x ``feature-pool`` of scripts/feature_sweep.py (the outputs of
features[6], [10], [13], [16], [18]; pools 1, 2, 3, 4, 7 where the block's map at 224 px
allows), embeds the first ``--images`` images of ``valid`` with eager PyTorch, ONNX Runtime
(fp32) and ONNX Runtime int8 (``feature-runtime='onnx-int8'``), and prints per setting: the
largest absolute difference ONNX - PyTorch (the contract: <= 1e-4 relative to the values,
checked as ``allclose(atol=1e-4, rtol=1e-4)``), and for int8 the cosine similarity to the
PyTorch embedding (int8 is not expected to match to 1e-4; it must run and stay close). CUDA
is not covered here: it needs a GPU. Exit code 1 if an ONNX setting misses the contract.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celeba_app import mobilenet_layers  # noqa: E402
from celeba_app.config import RunConfig  # noqa: E402
from celeba_app.data import server_part  # noqa: E402
from celeba_app.extractor import Extractor, extract  # noqa: E402
from celeba_app.model import Backbone, load_mobilenet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 10, 13, 16, 18])
    ap.add_argument("--pools", type=int, nargs="+", default=[1, 2, 3, 4, 7])
    args = ap.parse_args(argv)
    part = server_part(RunConfig(dataset=args.data, weights=args.weights), "valid")
    batches = [b for i, b in enumerate(part.encoded_images(8)) if i * 8 < args.images]
    net = load_mobilenet(args.weights)
    onnx_dir = Path(tempfile.mkdtemp(prefix="celeba-fl-check-runtimes-"))
    failed = 0
    print("| setting | numbers per image | ONNX - PyTorch max abs diff | ONNX allclose(1e-4) | int8 cosine to PyTorch (min over images) |")
    print("|---|---|---|---|---|")
    for layer in args.layers:
        side = mobilenet_layers.map_size(layer, args.image_size)
        for pool in [p for p in args.pools if p <= side]:
            backbone = Backbone(net, layer, pool)
            out = {}
            for runtime in ("torch", "onnx", "onnx-int8"):
                ex = Extractor(backbone, runtime, torch.device("cpu"), args.image_size, onnx_dir=onnx_dir,
                               weights_id=f"check-{layer}-{pool}")
                out[runtime] = extract(ex, iter(batches))
            t, o, q = out["torch"], out["onnx"], out["onnx-int8"]
            ok = torch.allclose(t, o, atol=1e-4, rtol=1e-4)
            failed += not ok
            cos = torch.nn.functional.cosine_similarity(t, q, dim=1).min().item()
            print(f"| {layer}/{pool} | {backbone.dim:,} | {(t - o).abs().max().item():.2e} | {'yes' if ok else 'NO'} "
                  f"| {cos:.4f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
