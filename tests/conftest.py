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

from pathlib import Path

import pytest

# torch, datasets and the app's modules are imported inside the fixtures that need them, so a
# test that needs none (config, metrics, report) does not pay seconds for them at collection.


#: The tests' images are 32 px, at which features[13]'s map is 2x2: the head (the default,
#: conv1x1) reads it pooled 2x2 (384 numbers), whatever the default feature-pool is.
TINY = {"image-size": 32, "feature-layer": 13, "feature-pool": 2}
TINY_RC = "image-size=32 feature-layer=13 feature-pool=2"


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


@pytest.fixture(autouse=True, scope="session")
def task_identity():
    """Tests build Flower messages outside a running task: flwr >= 1.42 needs a task identity."""
    from celeba_app.internals import set_task_identity

    set_task_identity()


@pytest.fixture(scope="session")
def celeba_dir(tmp_path_factory) -> Path:
    from celeba_app.demo_data import make_celeba

    return make_celeba(tmp_path_factory.mktemp("data") / "celeba-tiny")


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A randomly initialised (seeded) mobilenet_v2 state_dict: the real architecture."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_random.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


@pytest.fixture
def run_config(celeba_dir, weights_file, tmp_path) -> dict:
    """A flat run config (as ``context.run_config``) for the tiny data, fast settings."""
    return {
        "dataset": str(celeba_dir), "weights": str(weights_file), **TINY,
        "num-server-rounds": 2, "local-epochs": 1, "batch-size": 16, "split": "iid",
        "results-dir": str(tmp_path / "outputs"), "cache-dir": str(tmp_path / "cache"),
        "extract-batch-size": 32, "seed": 7,
    }


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, celeba_dir, weights_file):
    """Two finished centralized runs (iid, noniid) on the tiny dataset: run folders for the
    report, compare and centralized tests."""
    from celeba_app import centralized
    from celeba_app.config import RunConfig

    out = tmp_path_factory.mktemp("runs")
    base = {"dataset": str(celeba_dir), "weights": str(weights_file), **TINY,
            "num-server-rounds": 2, "local-epochs": 1, "batch-size": 16,
            "results-dir": str(out), "cache-dir": str(out / "cache")}
    runs = []
    for split in ("iid", "noniid"):
        cfg = RunConfig.from_run_config({**base, "split": split, "run-name": f"central-{split}"})
        runs.append(centralized.run(cfg, num_partitions=4))
    return runs


@pytest.fixture
def backbone(weights_file):
    from celeba_app.model import Backbone, load_mobilenet

    return Backbone(load_mobilenet(str(weights_file)))


@pytest.fixture
def healthy_backbone(backbone):
    """The randomly initialised backbone with batch-norm statistics measured on noise: its
    activations then keep their scale through depth (the untouched random model's vanish to
    ~1e-10, which says nothing about quantization)."""
    import torch

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
    from celeba_app.config import RunConfig
    from celeba_app.data import server_part

    return server_part(RunConfig(dataset=str(celeba_dir)), "valid")
