"""A full-size rehearsal CelebA: real labels and splits, synthetic pixels, the hub's schema.

    python scripts/make_rehearsal_dataset.py \
        --labels ../shared/data/celeba-labels/labels_full_202599.csv.gz \
        --faces ../shared/data/celeba-10k --out /tmp/celeba-rehearsal-100 [--fraction 0.25]

Why: every figure of this project came from celeba-10k (10,000 images), while the default
``flwr run .`` uses the hub's full CelebA (202,599 images, 10,177 identities), which cannot be
downloaded here. This dataset has CelebA's real shape, so its *costs* are real (partitioning
162,770 rows, embedding 178 x 218 JPEGs, messages, memory, cache size); its *accuracy*
figures mean nothing and are never reported.

* Rows: the official labels file (image_id, celeb_id, official partition 0/1/2 -> train,
  valid, test, 40 attributes as 0/1 -> bool): real identities, attributes and splits.
  ``--fraction f`` keeps a seeded fraction f of each split's identities with all their
  images, so images per identity and attribute rates stay CelebA's.
* Pixels: celeba-10k's real faces (89 x 109), enlarged to CelebA's 178 x 218 and encoded as
  JPEG (quality 90, about CelebA's own file sizes), used cyclically by image number; so
  decoding costs are realistic and labels are unrelated to the pixels.
* Files: ``<out>/{train,valid,test}-0000k-of-0000n.parquet`` in the hub's schema (``image``
  {bytes, path}, ``celeb_id`` int64, the 40 attributes bool, with the ``huggingface`` schema
  metadata of celeba-10k), loadable by ``flwr_datasets.FederatedDataset(dataset=<out>)``;
  ``<out>/README.md`` names the splits (as the hub's card does) and says what it is.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPLITS = {0: "train", 1: "valid", 2: "test"}
ROWS_PER_FILE = 20_000
SIZE = (218, 178)  # CelebA's aligned images: height, width


def read_labels(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(image_ids, celeb_ids (N,), partitions (N,), attributes bool (N, 40), attribute names)."""
    import csv

    with gzip.open(path, "rt") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    if header[:3] != ["image_id", "celeb_id", "partition"] or len(header) != 43:
        sys.exit(f"{path}: expected columns image_id, celeb_id, partition and 40 attributes; got {header[:4]}...")
    table = np.array([r[1:] for r in rows], dtype=np.int64)
    return [r[0] for r in rows], table[:, 0], table[:, 1], table[:, 2:].astype(bool), header[3:]


def face_pool(faces: Path) -> list[bytes]:
    """celeba-10k's faces (all splits), enlarged to 178 x 218 and re-encoded as JPEG q90."""
    import torch
    from torchvision.io import ImageReadMode, decode_image, encode_jpeg
    from torchvision.transforms.v2 import functional as TF

    pool = []
    for file in sorted(faces.glob("*.parquet")):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256, columns=["image"]):
            images = [decode_image(torch.frombuffer(bytearray(b["bytes"]), dtype=torch.uint8), ImageReadMode.RGB)
                      for b in batch.column("image").to_pylist()]
            big = [TF.resize(im, list(SIZE), antialias=True) for im in images]
            pool += [encode_jpeg(im, quality=90).numpy().tobytes() for im in big]
    if not pool:
        sys.exit(f"--faces {faces}: no parquet files with an image column")
    return pool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", required=True, type=Path)
    ap.add_argument("--faces", required=True, type=Path, help="a dataset folder in the hub's schema (celeba-10k)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fraction", type=float, default=1.0, help="share of each split's identities kept, (0, 1]")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 < args.fraction <= 1:
        sys.exit(f"--fraction {args.fraction}: accepted: a number in (0, 1]")
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"--out {args.out}: exists and is not empty; accepted: a new folder")
    template = next(iter(sorted(args.faces.glob("train-*.parquet"))), None)
    if template is None:
        sys.exit(f"--faces {args.faces}: no train-*.parquet; accepted: a folder such as ../shared/data/celeba-10k")
    schema = pq.read_schema(template)

    image_ids, celeb_ids, partitions, attributes, names = read_labels(args.labels)
    missing = [n for n in names if n not in schema.names]
    if missing:
        sys.exit(f"--faces {args.faces}: its schema lacks attributes {missing[:3]}")
    pool = face_pool(args.faces)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for code, split in SPLITS.items():
        rows = np.flatnonzero(partitions == code)
        ids = np.unique(celeb_ids[rows])
        keep = np.sort(rng.choice(ids, size=max(1, round(len(ids) * args.fraction)), replace=False))
        rows = rows[np.isin(celeb_ids[rows], keep)]
        counts[split] = (len(rows), len(keep))
        n_files = max(1, -(-len(rows) // ROWS_PER_FILE))
        for k, chunk in enumerate(np.array_split(rows, n_files)):
            columns = {"image": pa.array([{"bytes": pool[int(r) % len(pool)], "path": image_ids[r]} for r in chunk],
                                         type=schema.field("image").type),
                       "celeb_id": pa.array(celeb_ids[chunk], type=pa.int64())}
            columns.update({n: pa.array(attributes[chunk, j]) for j, n in enumerate(names)})
            table = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
            pq.write_table(table, args.out / f"{split}-{k:05d}-of-{n_files:05d}.parquet")
        print(f"{split}: {len(rows)} images of {len(keep)} identities in {n_files} file(s)", flush=True)
    (args.out / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"  # split names as the hub's
        + "".join(f"  - split: {s}\n    path: {s}-*.parquet\n" for s in SPLITS.values()) + "---\n"
        "# Rehearsal CelebA (synthetic pixels)\n\n"
        f"Made by `scripts/make_rehearsal_dataset.py --fraction {args.fraction} --seed {args.seed}` from "
        f"{args.labels.name} and the faces of {args.faces.name}. Real identities, attributes and official "
        "splits; the pixels are real faces reused cyclically, unrelated to the labels. Costs measured on it "
        "are real; its accuracy figures mean nothing and are never reported.\n\n"
        + "".join(f"- {s}: {n} images, {i} identities\n" for s, (n, i) in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
