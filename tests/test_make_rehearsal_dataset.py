"""scripts/make_rehearsal_dataset.py: real labels and splits, synthetic pixels, hub schema."""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from celeba_app.demo_data import make_celeba

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_rehearsal_dataset", ROOT / "scripts" / "make_rehearsal_dataset.py")
rehearsal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rehearsal)


def labels_file(path: Path, names: list[str], rng) -> dict:
    """A labels file in the official layout: 40 identities per split, 1-3 images each."""
    lines, truth = [], {}
    image = 0
    for code in (0, 1, 2):
        for cid in range(code * 100, code * 100 + 40):
            for _ in range(rng.integers(1, 4)):
                image += 1
                attrs = rng.integers(0, 2, len(names))
                truth[f"{image:06d}.jpg"] = (cid, code, attrs)
                lines.append(",".join([f"{image:06d}.jpg", str(cid), str(code), *map(str, attrs)]))
    with gzip.open(path, "wt") as f:
        f.write(",".join(["image_id", "celeb_id", "partition", *names]) + "\n" + "\n".join(lines) + "\n")
    return truth


def test_rehearsal_dataset_has_the_labels_splits_and_shape_of_celeba(tmp_path):
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    faces = make_celeba(tmp_path / "faces", n_train_ids=6, n_eval_ids=3)
    import pyarrow.parquet as pq

    names = [n for n in pq.read_schema(next(faces.glob("train-*.parquet"))).names if n not in ("image", "celeb_id")]
    assert len(names) == 40
    truth = labels_file(tmp_path / "labels.csv.gz", names, np.random.default_rng(0))
    out = tmp_path / "rehearsal"
    assert rehearsal.main(["--labels", str(tmp_path / "labels.csv.gz"), "--faces", str(faces), "--out", str(out),
                           "--fraction", "0.5"]) == 0
    fds = FederatedDataset(dataset=str(out), partitioners={"train": IidPartitioner(2)})
    for code, split in rehearsal.SPLITS.items():
        ds = fds.load_split(split)
        ids = set(ds["celeb_id"])
        assert len(ids) == 20 and all(code * 100 <= c < code * 100 + 40 for c in ids)  # half, of its split
        expected = {k for k, (c, p, _) in truth.items() if p == code and c in ids}  # all their images
        assert {r["path"] for r in ds.cast_column("image", ds.features["image"].__class__(decode=False))["image"]} \
            == expected
        row = ds[0]
        assert row["image"].size == (178, 218)
        cid, _, attrs = truth[ds.cast_column("image", ds.features["image"].__class__(decode=False))[0]["image"]["path"]]
        assert row["celeb_id"] == cid and [row[n] for n in names] == attrs.astype(bool).tolist()
    assert len(fds.load_partition(1)) > 0


def test_a_bad_fraction_or_a_used_folder_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--fraction 0.0: accepted: a number in \(0, 1\]"):
        rehearsal.main(["--labels", "x", "--faces", "y", "--out", str(tmp_path / "o"), "--fraction", "0"])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "f").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        rehearsal.main(["--labels", "x", "--faces", "y", "--out", str(tmp_path / "used")])
