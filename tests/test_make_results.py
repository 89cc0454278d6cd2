"""scripts/make_results.py: it rewrites only the generated blocks of docs/RESULTS.md, by name."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_results  # noqa: E402


def test_blocks_are_replaced_by_name_and_the_text_around_them_is_kept():
    text = ("# T\n\nprose A\n\n<!-- generated: one -->\nold 1\n<!-- /generated -->\n\nprose B\n\n"
            "<!-- generated: two -->\nold 2\n<!-- /generated -->\n")
    out = make_results.fill_blocks(text, {"two": ["new 2"], "one": ["new 1a", "new 1b"]})
    assert out == ("# T\n\nprose A\n\n<!-- generated: one -->\nnew 1a\nnew 1b\n<!-- /generated -->\n\nprose B\n\n"
                   "<!-- generated: two -->\nnew 2\n<!-- /generated -->\n")
    with pytest.raises(ValueError, match="has no block <!-- generated: three -->"):
        make_results.fill_blocks(text, {"three": ["x"]})


def test_the_document_is_rebuilt_from_run_folders_keyed_by_experiment_name(two_runs, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    for name, run in (("fed-iid", two_runs[0]), ("fed-noniid", two_runs[1]), ("central", two_runs[0])):
        (out / name).symlink_to(run)
    for seed in (1, 2):  # the FedAvg row of the remedies, found by name, two seeds
        (out / make_results.remedy_dir("FedAvg", seed)).symlink_to(two_runs[seed - 1])
    assert make_results.remedy_dir("FedAvg (IID reference)", 1) == "remedy-fedavg-iid-reference-seed1"
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# R\n\nhand-written reading\n\n" + "".join(
        f"<!-- generated: {name} -->\n<!-- /generated -->\n\n" for name in make_results.BLOCKS))
    readme = tmp_path / "README.md"
    readme.write_text("# app\n\n<!-- generated: readme-results -->\n<!-- /generated -->\n")
    before = {p: p.read_bytes() for p in (ROOT / "README.md", ROOT / "docs" / "RESULTS.md")}
    args = Namespace(data="d", weights="w", seeds=[1, 2])
    make_results.write_doc(args, out, doc, tmp_path / "img", readme)
    assert {p: p.read_bytes() for p in before} == before  # the repository's documents are never touched
    assert "| federated, non-IID" in readme.read_text()
    text = doc.read_text()
    assert "hand-written reading" in text
    assert "| federated IID |" in text and "| centralized |" in text
    assert "| FedAvg | noniid |" in text and text.count("| 2 |") >= 1  # two seeds
    assert "### Groups and gaps, federated non-IID (test)" in text
    assert (tmp_path / "img" / "compare_valid.png").exists()
