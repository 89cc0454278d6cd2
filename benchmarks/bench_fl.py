"""Speed benchmark: backbone, extraction pipeline, and whole federated runs with/without cache.

Run from the project root (figures in docs/SPEED.md):

    python benchmarks/bench_fl.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth            # everything
    python benchmarks/bench_fl.py --data ... --weights ... --skip-runs   # throughput only

Prints, on one machine in one process:
  1. raw backbone throughput on random tensors of the run's shape (batch, 3, S, S), for every
     runtime available on this device (PyTorch fp32, channels_last, bf16 autocast on CUDA,
     ONNX Runtime fp32 and int8 on CPU, whose models also normalise their uint8 input);
  2. the app's end-to-end extraction throughput on real JPEGs (decode, resize, normalise,
     backbone: celeba_app.extractor.extract with the runtime the app picks, or ``--runtime``),
     and its ratio to the fastest raw backbone, overall and at the same precision; decoding +
     resizing alone; on CUDA also decoding alone (one CPU thread, nvJPEG), the alternative
     of decoding in CPU threads, and how far GPU embeddings are from the CPU fp32 ones
     (``--source-size 218x178`` re-encodes the images at full CelebA size first);
  3. with ``--settings 18/1 13/7 ...``: the same end-to-end throughput for each
     feature-layer/feature-pool (the backbone run only up to that block), as ratios to the first;
  4. (unless --skip-runs) wall time of `flwr run .` with the feature cache on (fresh cache)
     and off: total, round 1, rounds 2..R, and bytes sent per round;
  5. projections for full CelebA from the measured per-image costs.
Throughput parts need only torch/torchvision/pyarrow (they run on a bare GPU machine);
part 3 needs the installed app.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celeba_app.config import RUNTIMES  # noqa: E402
from celeba_app.extractor import Extractor, extract  # noqa: E402
from celeba_app.images import decode, decode_resize, resize_crop  # noqa: E402
from celeba_app.mobilenet_layers import describe  # noqa: E402
from celeba_app.model import Backbone, load_mobilenet  # noqa: E402

FULL_TRAIN, FULL_VALID, FULL_TEST = 162_770, 19_867, 19_962


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n_items: int, device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median items/s over ``repeats`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        rates.append(n_items / (time.perf_counter() - t0))
    return float(np.median(rates))


def raw_backbone(backbone: Backbone, device: torch.device, batch: int, size: int, onnx_dir: Path) -> dict:
    x = torch.randn(batch, 3, size, size)
    out = {}
    bb = backbone.to(device)
    xd = x.to(device)
    with torch.inference_mode():
        out["torch fp32"] = timed(lambda: bb(xd), batch, device)
        bb_cl = bb.to(memory_format=torch.channels_last)
        xcl = xd.contiguous(memory_format=torch.channels_last)
        out["torch fp32 channels_last"] = timed(lambda: bb_cl(xcl), batch, device)
        if device.type == "cuda":
            def bf16():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return bb_cl(xcl)
            out["torch bf16 channels_last"] = timed(bf16, batch, device, repeats=10, warmup=3)
    bb.to(memory_format=torch.contiguous_format)
    if device.type == "cpu":
        try:
            ex = Extractor(backbone.cpu(), "onnx", torch.device("cpu"), size, onnx_dir=onnx_dir, weights_id="bench")
            u8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
            out["onnxruntime (with normalisation)"] = timed(lambda: ex(u8), batch, device)
            out["onnxruntime (backbone only)"] = timed(bare_onnx(backbone, x, onnx_dir), batch, device)
            ex8 = Extractor(backbone.cpu(), "onnx-int8", torch.device("cpu"), size, onnx_dir=onnx_dir,
                            weights_id="bench")
            out["onnxruntime int8 (with normalisation)"] = timed(lambda: ex8(u8), batch, device)
        except ImportError:
            out["onnxruntime"] = None
    return out


def bare_onnx(backbone: Backbone, x: torch.Tensor, onnx_dir: Path):
    """The backbone alone (float input, no normalisation) in ONNX Runtime, for reference."""
    import onnxruntime as ort

    path = onnx_dir / "bare.onnx"
    if not path.exists():
        onnx_dir.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(backbone.cpu(), x[:1], str(path), input_names=["x"], output_names=["z"],
                          dynamic_axes={"x": {0: "n"}, "z": {0: "n"}}, opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def read_blobs(data: Path, split: str, n: int) -> list[bytes]:
    import pyarrow.parquet as pq

    files = sorted(Path(data).glob(f"{split}-*.parquet"))
    table = pq.read_table(files[0], columns=["image"])
    col = table.column("image").to_pylist()[:n]
    return [c["bytes"] for c in col]


def rescale_jpegs(blobs: list[bytes], height: int, width: int) -> list[bytes]:
    """The same images re-encoded at ``height`` x ``width`` (e.g. 218 x 178, full CelebA's
    aligned size, from celeba-10k's halved copies): decoding cost grows with pixels."""
    from torchvision.io import encode_jpeg
    from torchvision.transforms.v2 import functional as TF

    out = []
    for _, group in decode(blobs):  # CelebA: one size, so the order is kept
        big = TF.resize(group, [height, width], antialias=True)
        out += [encode_jpeg(im, quality=90).numpy().tobytes() for im in big]
    return out


def preprocessing_only(ex: Extractor) -> Extractor:
    """The extractor with a trivial model: ``extract`` then times decoding and resizing alone,
    with the same threads and overlap as the real pipeline."""
    noop = copy.copy(ex)
    noop._session = None
    noop.model = lambda x: x[:, 0, 0, :1].float()
    return noop


def pipeline(backbone: Backbone, device: torch.device, blobs: list[bytes], batch: int, size: int,
             onnx_dir: Path, runtime: str) -> dict:
    ex = Extractor(backbone, runtime, device, size, onnx_dir=onnx_dir, weights_id="bench")
    batches = [blobs[i:i + batch] for i in range(0, len(blobs), batch)]
    n = len(blobs)
    out = {"runtime": ex.runtime_id, "images": n}
    if device.type == "cuda":
        out["decode only, 1 CPU thread"] = timed(lambda: [decode(b) for b in batches], n, device, repeats=2)
        out["decode only, nvJPEG"] = timed(lambda: [decode(b, device) for b in batches], n, device, repeats=2)
    out["decode+resize only"] = timed(lambda: extract(preprocessing_only(ex), iter(batches)), n, device, repeats=2)
    out["end-to-end extraction"] = timed(lambda: extract(ex, iter(batches)), n, device, repeats=3)
    if device.type == "cuda":
        out["end-to-end, decoding in 4 CPU threads"] = timed(
            lambda: extract_cpu_threads(ex, batches, 4), n, device, repeats=3)
        out["agreement"] = agreement(ex, backbone, blobs[:256])
    return out


def agreement(ex: Extractor, backbone: Backbone, blobs: list[bytes]) -> str:
    """How far the GPU path's inputs and embeddings are from the CPU fp32 reference, and how
    much of that is bf16."""
    cos = torch.nn.functional.cosine_similarity
    x_gpu = decode_resize(blobs, ex.image_size, device=ex.device)
    x_cpu = decode_resize(blobs, ex.image_size)
    ref = Extractor(copy.deepcopy(backbone).cpu(), "torch", torch.device("cpu"), ex.image_size)
    cpu = ref(x_cpu)
    gpu = ex(x_gpu).cpu()
    with torch.inference_mode():
        fp32 = ex.model(x_gpu.contiguous(memory_format=torch.channels_last)).float().cpu()
        fp32_same_input = ex.model(x_cpu.to(ex.device)).float().cpu()
    return (f"pixels vs the CPU path: max diff {(x_gpu.cpu().int() - x_cpu.int()).abs().max().item()}; "
            f"min cosine vs CPU fp32: app (bf16) {cos(gpu, cpu).min():.5f}, GPU fp32 {cos(fp32, cpu).min():.5f}, "
            f"GPU fp32 on the CPU path's pixels {cos(fp32_same_input, cpu).min():.5f}")


def extract_cpu_threads(ex: Extractor, batches: list, workers: int) -> torch.Tensor:
    """The alternative to the app's GPU path, kept to compare on each new GPU machine:
    libjpeg-turbo in ``workers`` CPU threads running ahead, upload (page-locked) and resize on
    the GPU in the main thread."""
    from collections import deque

    outs, pending = [], deque()

    def run(groups):
        groups = [(idx, g.pin_memory()) for idx, g in groups]
        return ex(resize_crop(groups, ex.image_size, device=ex.device))

    with ThreadPoolExecutor(workers) as pool:
        for b in batches:
            pending.append(pool.submit(decode, b))
            if len(pending) > workers:
                outs.append(run(pending.popleft().result()))
        while pending:
            outs.append(run(pending.popleft().result()))
    return torch.cat(outs).cpu()


def venv_env() -> dict:
    """The environment with this interpreter's bin folder first on PATH: `flwr run` starts
    `flower-simulation` by name, which a venv's python run without activating would not find."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def flwr_run(args, cache: bool, cache_dir: Path, results: Path, name: str) -> dict:
    rc = (f"dataset='{args.data}' weights='{args.weights}' num-server-rounds={args.rounds} "
          f"feature-cache={'true' if cache else 'false'} cache-dir='{cache_dir}' "
          f"results-dir='{results}' run-name='{name}' image-size={args.size} split='{args.split}' "
          f"feature-runtime='{args.runtime}'")
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", ".", "local-simulation",
           "--federation-config", f"options.num-supernodes={args.clients}", "--run-config", rc]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=venv_env())
    wall = time.perf_counter() - t0
    run = results / name
    if not (run / "history.json").exists():
        raise SystemExit(f"flwr run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    hist = json.loads((run / "history.json").read_text())
    secs = {h["round"]: h["seconds"] for h in hist}
    test = json.loads((run / "test.json").read_text())
    return {"wall_s": wall, "round0_s": secs.get(0), "round1_s": secs.get(1),
            "rounds_2_to_R_s": sum(v for r, v in secs.items() if r >= 2),
            "bytes_sent_per_round": hist[-1]["bytes_sent"], "test_accuracy": test["overall"]["accuracy"],
            "cache": test.get("feature_cache")}


def source_size(text: str) -> str:
    """``--source-size``: 'HxW' with positive integers, e.g. 218x178."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW; accepted: two positive integers, e.g. 218x178")
    return "x".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder of CelebA-schema parquet files")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=1024, help="real images for the pipeline part")
    p.add_argument("--source-size", default=None, metavar="HxW", type=source_size,
                   help="re-encode those images at HxW first (218x178: full CelebA's aligned size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="feature-runtime of the pipeline and of the flwr runs (auto: the app's default)")
    p.add_argument("--skip-runs", action="store_true")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--split", default="iid")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--settings", nargs="*", default=[], metavar="LAYER/POOL",
                   help="also time the pipeline for these feature-layer/feature-pool settings, e.g. 18/1 13/7 "
                        "(each as a ratio to the first)")
    args = p.parse_args()
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="celeba-bench-"))
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{os.cpu_count()}",
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
                    "size": args.size}
    backbone = Backbone(load_mobilenet(args.weights))
    print(f"# device {report['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.size}px", flush=True)

    raw = raw_backbone(backbone, device, args.batch, args.size, tmp / "onnx")
    report["raw_backbone_img_s"] = raw
    for k, v in raw.items():
        print(f"raw backbone  {k:38s} {v:8.1f} img/s" if v else f"raw backbone  {k:38s}      n/a", flush=True)
    blobs = read_blobs(args.data, "train", args.images)
    if args.source_size:
        blobs = rescale_jpegs(blobs, *(int(v) for v in args.source_size.split("x")))
    pipe = pipeline(backbone, device, blobs, args.batch, args.size, tmp / "onnx", args.runtime)
    report["pipeline"] = pipe
    print(f"pipeline      runtime {pipe['runtime']}, {pipe['images']} real JPEGs"
          f"{' re-encoded at ' + args.source_size if args.source_size else ''}", flush=True)
    for k, v in pipe.items():
        if isinstance(v, float):
            print(f"pipeline      {k:38s} {v:8.1f} img/s", flush=True)
    if "agreement" in pipe:
        print(f"pipeline      {pipe['agreement']}", flush=True)
    best_raw = max(v for v in raw.values() if v)
    int8 = "int8" in pipe["runtime"]
    # None where no raw row has the pipeline's precision (int8 is measured on the CPU only)
    same_precision = max((v for k, v in raw.items() if v and ("int8" in k) == int8), default=None)
    ratio = pipe["end-to-end extraction"] / best_raw
    report["pipeline_over_best_raw"] = ratio
    report["pipeline_over_best_raw_same_precision"] = (
        pipe["end-to-end extraction"] / same_precision if same_precision else None)
    same = report["pipeline_over_best_raw_same_precision"]
    print(f"pipeline / fastest raw backbone = {ratio:.2f}; at the same precision "
          f"({'int8' if int8 else 'float'}) = {f'{same:.2f}' if same else 'n/a'}", flush=True)

    if args.settings:
        # The same real images through the app's pipeline for each feature-layer/feature-pool,
        # the backbone run only up to the block; one process, one after another.
        report["settings_img_s"] = {}
        for setting in args.settings:
            layer, pool = (int(v) for v in setting.split("/"))
            bb = Backbone(load_mobilenet(args.weights), layer, pool)
            rate = pipeline(bb, device, blobs, args.batch, args.size, tmp / "onnx", args.runtime)["end-to-end extraction"]
            report["settings_img_s"][setting] = rate
            print(f"setting       {describe(layer, pool):38s} {rate:8.1f} img/s end-to-end", flush=True)
        rates = report["settings_img_s"]
        first = args.settings[0]
        for setting in args.settings[1:]:
            print(f"setting       {setting} / {first} = {rates[setting] / rates[first]:.2f}", flush=True)

    if not args.skip_runs:
        on = flwr_run(args, True, tmp / "cache", tmp / "runs", "cache-on")
        off = flwr_run(args, False, tmp / "cache-unused", tmp / "runs", "cache-off")
        report["runs"] = {"cache_on": on, "cache_off": off}
        for name, r in (("cache on ", on), ("cache off", off)):
            print(f"flwr run {args.clients} clients x {args.rounds} rounds, {name}: wall {r['wall_s']:.0f}s | "
                  f"round 0 (server valid) {r['round0_s']:.1f}s | round 1 {r['round1_s']:.1f}s | rounds 2-"
                  f"{args.rounds} {r['rounds_2_to_R_s']:.1f}s | {r['bytes_sent_per_round']} B sent/round | "
                  f"test acc {r['test_accuracy']:.4f}", flush=True)
        print(f"speed-up of the cache over {args.rounds} rounds: {off['wall_s'] / on['wall_s']:.1f}x "
              f"(wall time of the whole command)", flush=True)

    per_img = 1.0 / pipe["end-to-end extraction"]
    total_imgs = FULL_TRAIN + FULL_VALID + FULL_TEST
    report["projection_full_celeba_s"] = {"extract_once": total_imgs * per_img,
                                          "extract_every_round_10": (FULL_TRAIN * 10 + FULL_VALID * 11 + FULL_TEST) * per_img}
    print(f"full CelebA ({total_imgs} images) at {pipe['end-to-end extraction']:.0f} img/s: embeddings once "
          f"{total_imgs * per_img / 60:.1f} min; recomputed every round of 10 "
          f"{report['projection_full_celeba_s']['extract_every_round_10'] / 60:.1f} min", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
