"""Embeddings are computed once per dataset, not once per partitioning: four partitionings in a
row against one embedding pass.

Run from the project root (figures in docs/SPEED.md, "Embed once per dataset"):

    python benchmarks/bench_embed_once.py --data ../shared/data/celeba-10k \
        --weights ../shared/weights/mobilenet_v2_imagenet.pth

With a fresh cache dir, in one process, as each ClientApp does it (``client_parts`` then the
FeatureStore, for every one of ``--clients`` partitions): iid, then non-IID with alpha 0.1,
0.5 and 1.0 (Dirichlet over Male x Young). The first partitioning embeds every train row (one
embedding pass); the others should read them. Prints, per partitioning, the wall time, rows
computed and rows read from the cache, then the four together over the first alone.
Target (issue #14): at most 1.2. Run nothing else meanwhile: the machine's 2 cores are the clock.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celeba_app import data  # noqa: E402
from celeba_app.config import RunConfig  # noqa: E402
from celeba_app.data import NodeData, client_parts  # noqa: E402
from celeba_app.features import feature_store  # noqa: E402

PARTITIONINGS = [("iid", {"split": "iid"}), ("noniid alpha=0.1", {"split": "noniid", "noniid_alpha": 0.1}),
                 ("noniid alpha=0.5", {"split": "noniid", "noniid_alpha": 0.5}),
                 ("noniid alpha=1.0", {"split": "noniid", "noniid_alpha": 1.0})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="bench-embed-once-"))
    print(f"# {args.clients} clients, data {args.data}, image size {args.image_size}, fresh cache {cache}; "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    try:
        for name, over in PARTITIONINGS:
            cfg = RunConfig(dataset=args.data, weights=args.weights, image_size=args.image_size,
                            cache_dir=str(cache), **over).resolved()
            data.clear_caches()
            t0 = time.perf_counter()
            store = feature_store(cfg, torch.device("cpu"))
            before = dict(store.stats)
            n = 0
            for pid in range(args.clients):
                for part in client_parts(cfg, NodeData.partition(cfg, pid, args.clients)):
                    store.for_part(part)
                    n += len(part)
            dt = time.perf_counter() - t0
            computed = store.stats["rows_computed"] - before["rows_computed"]
            cached = store.stats["rows_cached"] - before["rows_cached"]
            rows.append((name, dt, computed, cached, n))
            print(f"{name:18s} {dt:7.1f}s  rows computed {computed:6d}  read from cache {cached:6d}  "
                  f"(of {n})", flush=True)
        first, total = rows[0][1], sum(r[1] for r in rows)
        print(f"\nfour partitionings {total:.1f}s = {total / first:.2f} x one embedding pass ({first:.1f}s); "
              f"target <= 1.2")
        print(f"embedding cache on disk: {_du(cache / 'features') / 2**20:.0f} MiB")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _du(path: Path) -> int:
    """Bytes a folder takes on disk (its sparse files counted by their allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
