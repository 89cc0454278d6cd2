"""A small CelebA-schema dataset of synthetic faces: a run that needs no download.

``celeba-demo-data OUT`` writes ``OUT/{train,valid,test}-00000-of-00001.parquet`` with the hub's
columns (``image`` JPEGs, ``celeb_id``, the 40 boolean attributes) and identity-disjoint splits,
which ``dataset='OUT'`` reads like ``flwrlabs/celeba``. The faces are noise whose lower half is
brighter when ``Smiling``: the pipeline runs end to end and the head learns, but the figures say
nothing about real faces. The tests use the same generator at 36x30 px.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from .config import ATTRIBUTES


def _jpeg(rng: np.random.Generator, smiling: bool, h: int, w: int) -> bytes:
    """A JPEG of noise; a smiling face's lower half is brighter (what a head can learn)."""
    arr = rng.integers(60, 140, size=(h, w, 3), dtype=np.uint8)
    if smiling:
        arr[h // 2:] = np.clip(arr[h // 2:].astype(int) + 90, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_split(rng: np.random.Generator, ids: list[int], per_id: tuple[int, int],
               size: tuple[int, int] = (36, 30)) -> Dataset:
    """Rows of ``ids`` (per_id[0]..per_id[1] images each) in the hub's schema; Male, Young and
    Pale_Skin are constant per identity, Smiling is likelier for non-Male (0.6 against 0.35),
    the other attributes are random."""
    rows: dict[str, list] = {"image": [], "celeb_id": [], **{a: [] for a in ATTRIBUTES}}
    for ident in ids:
        male = bool(rng.random() < 0.45)
        young = bool(rng.random() < 0.7)
        pale = bool(rng.random() < 0.15)
        for _ in range(int(rng.integers(per_id[0], per_id[1] + 1))):
            smiling = bool(rng.random() < (0.35 if male else 0.6))
            rows["image"].append({"bytes": _jpeg(rng, smiling, *size), "path": None})
            rows["celeb_id"].append(ident)
            for a in ATTRIBUTES:
                rows[a].append(bool(rng.random() < 0.3))
            rows["Male"][-1], rows["Young"][-1] = male, young
            rows["Pale_Skin"][-1], rows["Smiling"][-1] = pale, smiling
    features = Features({"image": Image(), "celeb_id": Value("int64"),
                         **{a: Value("bool") for a in ATTRIBUTES}})
    return Dataset.from_dict(rows, features=features)


def make_celeba(root: Path, n_train_ids: int = 60, n_eval_ids: int = 12, seed: int = 0,
                per_id: tuple[int, int] = (1, 6), size: tuple[int, int] = (36, 30)) -> Path:
    """train/valid/test parquet files under ``root`` in the hub's schema, identity-disjoint
    (``n_train_ids`` identities in train, ``n_eval_ids`` in each of valid and test), images of
    ``size`` (height, width) px, and the dataset card that names the splits; returns ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = list(range(1, n_train_ids + 2 * n_eval_ids + 1))
    splits = {"train": ids[:n_train_ids], "valid": ids[n_train_ids:n_train_ids + n_eval_ids],
              "test": ids[n_train_ids + n_eval_ids:]}
    for name, split_ids in splits.items():
        make_split(rng, split_ids, per_id, size).to_parquet(str(root / f"{name}-00000-of-00001.parquet"))
    # Like the hub's card: without it, `datasets` does not recognise a split named "valid".
    configs = "".join(f"  - split: {s}\n    path: {s}-*.parquet\n" for s in splits)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}---\n")
    return root


def main(argv: list[str] | None = None) -> None:
    """``celeba-demo-data OUT [--identities N] [--seed S]``: writes the folder, prints its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--identities", type=int, default=600, help="identities in train (valid, test: a fifth each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.identities < 50:
        raise SystemExit(f"celeba-demo-data: --identities={args.identities} is too few for 50 clients; accepted: >= 50")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"celeba-demo-data: {str(args.out)!r} is not empty; accepted: a new or empty folder")
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per split says nothing here
    print(make_celeba(args.out, args.identities, max(12, args.identities // 5), args.seed, (1, 6), (109, 89)))


if __name__ == "__main__":
    main()
