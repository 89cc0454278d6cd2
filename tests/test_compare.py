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


def test_compare_gives_last_and_best_round_with_intervals(two_runs, tmp_path):
    compare.main([*map(str, two_runs), "--out", str(tmp_path / "cmp")])
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    best = json.loads((two_runs[1] / "best.json").read_text())
    assert "| run | last round: test acc. [95% CI] | best round (by valid): test acc. [95% CI] |" in text
    assert f"{best['overall']['accuracy']:.4f} [" in text and f"(round {best['round']})" in text
    assert "reference" in text and ("intervals overlap" in text or "intervals apart" in text)
