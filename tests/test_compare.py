"""celeba-compare: finished runs side by side; unfinished ones refused."""

import json

import pytest

from celeba_app import compare

PNG = b"\x89PNG\r\n\x1a\n"


def test_compare_puts_runs_side_by_side(two_runs, tmp_path):
    compare.main([*map(str, two_runs), "--out", str(tmp_path / "cmp")])
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    for run in two_runs:
        acc = json.loads((run / "test.json").read_text())["overall"]["accuracy"]
        assert run.name in text and f"{acc:.4f}" in text
    assert (tmp_path / "cmp" / "compare_valid.png").read_bytes()[:8] == PNG
    assert (tmp_path / "cmp" / "compare_gaps.png").read_bytes()[:8] == PNG


def test_compare_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(SystemExit, match="no test.json"):
        compare.main([str(tmp_path / "half"), "--out", str(tmp_path / "cmp")])
