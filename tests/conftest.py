"""Small, generated CelebA-schema data and weights: the tests never touch ../shared.

``make_celeba`` writes train/valid/test parquet files with the hub's schema (an ``image``
column of JPEGs, ``celeb_id``, the 40 boolean attributes). Identities are disjoint across
splits; a few attributes are constant per identity (Male) and ``Smiling`` brightens the lower
half of the face so that a head has something to learn.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The tests' datasets are cached in a Hugging Face home of their own, removed when the test run
# ends, not in the user's ~/.cache/huggingface: every run used to leave ~100 folders there. Set
# before `datasets` is imported (it reads the variable once); `flwr run` subprocesses inherit it.
_HF_HOME = tempfile.mkdtemp(prefix="celeba-fl-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ.pop("HF_DATASETS_CACHE", None)
atexit.register(shutil.rmtree, _HF_HOME, True)

import io  # noqa: E402
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from celeba_app import centralized
from celeba_app.config import ATTRIBUTES, RunConfig
from celeba_app.data import server_part
from celeba_app.model import Backbone, load_mobilenet


def _jpeg(rng: np.random.Generator, smiling: bool, h: int = 36, w: int = 30) -> bytes:
    arr = rng.integers(60, 140, size=(h, w, 3), dtype=np.uint8)
    if smiling:
        arr[h // 2:] = np.clip(arr[h // 2:].astype(int) + 90, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_split(rng: np.random.Generator, ids: list[int], per_id: tuple[int, int]) -> Dataset:
    rows: dict[str, list] = {"image": [], "celeb_id": [], **{a: [] for a in ATTRIBUTES}}
    for ident in ids:
        male = bool(rng.random() < 0.45)
        young = bool(rng.random() < 0.7)
        pale = bool(rng.random() < 0.15)
        for _ in range(int(rng.integers(per_id[0], per_id[1] + 1))):
            smiling = bool(rng.random() < (0.35 if male else 0.6))
            rows["image"].append({"bytes": _jpeg(rng, smiling), "path": None})
            rows["celeb_id"].append(ident)
            for a in ATTRIBUTES:
                rows[a].append(bool(rng.random() < 0.3))
            rows["Male"][-1], rows["Young"][-1] = male, young
            rows["Pale_Skin"][-1], rows["Smiling"][-1] = pale, smiling
    features = Features({"image": Image(), "celeb_id": Value("int64"),
                         **{a: Value("bool") for a in ATTRIBUTES}})
    return Dataset.from_dict(rows, features=features)


def make_celeba(root: Path, n_train_ids: int = 60, n_eval_ids: int = 12, seed: int = 0,
                per_id: tuple[int, int] = (1, 6)) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = list(range(1, n_train_ids + 2 * n_eval_ids + 1))
    splits = {"train": ids[:n_train_ids], "valid": ids[n_train_ids:n_train_ids + n_eval_ids],
              "test": ids[n_train_ids + n_eval_ids:]}
    for name, split_ids in splits.items():
        make_split(rng, split_ids, per_id).to_parquet(str(root / f"{name}-00000-of-00001.parquet"))
    # Like the hub's card: without it, `datasets` does not recognise a split named "valid".
    configs = "".join(f"  - split: {s}\n    path: {s}-*.parquet\n" for s in splits)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}---\n")
    return root


def recode_column(root: Path, split: str, column: str, recode, dtype: str = "int64") -> None:
    """Rewrite one column of a make_celeba split in place: ``recode(values) -> values`` of
    ``dtype`` (the parquet file's features metadata follows, so ``datasets`` reads it as such):
    e.g. the -1/1 integers of the original list_attr_celeba.txt."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / f"{split}-00000-of-00001.parquet"
    table = pq.read_table(path)
    values = recode(table.column(column).to_numpy(zero_copy_only=False))
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, type=pa.type_for_alias(dtype)))
    meta = json.loads(table.schema.metadata[b"huggingface"])
    meta["info"]["features"][column] = {"dtype": dtype, "_type": "Value"}
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()}), path)


def truncate_image(root: Path, split: str, row: int, keep: float = 0.6) -> bytes:
    """Cut the JPEG of one row (index in the split's file) of a make_celeba split to ``keep``
    of its bytes, in place, as a partly copied file would be; returns the whole JPEG."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / f"{split}-00000-of-00001.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    whole = images[row]["bytes"]
    images[row] = {**images[row], "bytes": whole[:int(len(whole) * keep)]}
    column = pa.array(images, type=table.schema.field("image").type)
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", column), path)
    return whole


@pytest.fixture(scope="session")
def celeba_dir(tmp_path_factory) -> Path:
    return make_celeba(tmp_path_factory.mktemp("data") / "celeba-tiny")


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A randomly initialised (seeded) mobilenet_v2 state_dict: the real architecture."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_random.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


@pytest.fixture
def run_config(celeba_dir, weights_file, tmp_path) -> dict:
    """A flat run config (as ``context.run_config``) for the tiny data, fast settings."""
    return {
        "dataset": str(celeba_dir), "weights": str(weights_file), "image-size": 32,
        "num-server-rounds": 2, "local-epochs": 1, "batch-size": 16, "split": "iid",
        "results-dir": str(tmp_path / "outputs"), "cache-dir": str(tmp_path / "cache"),
        "extract-batch-size": 32, "seed": 7,
    }


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, celeba_dir, weights_file):
    """Two finished centralized runs (iid, noniid) on the tiny dataset: run folders for the
    report, compare and centralized tests."""
    out = tmp_path_factory.mktemp("runs")
    base = {"dataset": str(celeba_dir), "weights": str(weights_file), "image-size": 32,
            "num-server-rounds": 2, "local-epochs": 1, "batch-size": 16,
            "results-dir": str(out), "cache-dir": str(out / "cache")}
    runs = []
    for split in ("iid", "noniid"):
        cfg = RunConfig.from_run_config({**base, "split": split, "run-name": f"central-{split}"})
        runs.append(centralized.run(cfg, num_partitions=4))
    return runs


@pytest.fixture
def backbone(weights_file):
    return Backbone(load_mobilenet(str(weights_file)))


@pytest.fixture
def healthy_backbone(backbone):
    """The randomly initialised backbone with batch-norm statistics measured on noise: its
    activations then keep their scale through depth (the untouched random model's vanish to
    ~1e-10, which says nothing about quantization)."""
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    backbone.features.train()  # Backbone.train() refuses by design
    with torch.no_grad():
        for seed in range(4):
            backbone(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    return backbone.eval()


@pytest.fixture
def part(celeba_dir):
    return server_part(RunConfig(dataset=str(celeba_dir)), "valid")
