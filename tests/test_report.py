"""report.md and its plots, from a run folder's JSON files."""

import json
import re

import pytest


from celeba_app import report

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_plots_are_pngs_and_tables_hold_the_json_numbers(two_runs):
    run = two_runs[1]
    text = (run / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (run / png).read_bytes()[:8] == PNG, png
    assert {"learning_curves.png", "groups_test.png", "fairness_gaps.png", "partitions.png"} <= set(
        re.findall(r"\]\(([^)]+\.png)\)", text))
    test = json.loads((run / "test.json").read_text())
    assert f"{test['overall']['accuracy']:.4f}" in text
    male = test["groups"]["Male"]["1"]
    assert male["small"] and f"| Male | {male['n']}* |" in text  # under min-group-size: marked; groups in words
    assert f"{male['accuracy']:.3f} [{male['accuracy_ci'][0]:.3f}, {male['accuracy_ci'][1]:.3f}]" in text
    young = test["gaps"]["Young"]
    eo, (lo, hi) = young["equalized_odds_difference"], young["equalized_odds_difference_ci"]
    assert f"{eo:.3f} [{lo:.3f}, {hi:.3f}]" in text


def test_report_can_be_rebuilt_from_the_json_alone(two_runs, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(two_runs[0], copy)
    for png in copy.glob("*.png"):
        png.unlink()
    (copy / "report.md").unlink()
    report.main([str(copy)])
    assert (copy / "report.md").exists() and (copy / "learning_curves.png").read_bytes()[:8] == PNG


def test_a_partial_run_gets_a_report_marked_incomplete_naming_failed_clients(two_runs, tmp_path):
    """A run stopped after round 1 (no test.json yet), whose round 1 lost a client."""
    import shutil

    from celeba_app.results import write_status

    run = tmp_path / "partial"
    shutil.copytree(two_runs[0], run)
    for name in ("test.json", "best.json", "head.pt", "report.md"):
        (run / name).unlink()
    history = json.loads((run / "history.json").read_text())[:2]
    history[1]["train"]["num_clients"] = 3
    history[1]["nodes"] = {"train": {"sampled": [11, 12, 13, 14], "replies": 4, "succeeded": 3, "failures": [
        {"node_id": 12, "partition_id": 1, "code": 2, "reason": "row 7 of client-1/train cannot be decoded"}]}}
    (run / "history.json").write_text(json.dumps(history))
    write_status(run, "failed", 1, "RunFailed: 4 rounds in a row skipped")
    text = (report.write_report(run)).read_text()
    assert "**Incomplete run**: status `failed`, last completed round 1 (RunFailed: 4 rounds in a row skipped)" in text
    assert "resume='partial'" in text
    assert "Training metrics cover fewer clients than the federation's 4 in rounds 1 (3 of 4)." in text
    assert "| 1 | train | 12 | 1 | 2 | row 7 of client-1/train cannot be decoded |" in text
    assert "## Final metrics" not in text and (run / "learning_curves.png").exists()


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    from celeba_app.report import main

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "nope")])
    assert str(info.value) == (f"celeba-report: {str(tmp_path / 'nope')!r}: no such folder; accepted: a run folder, "
                               "e.g. outputs/<run-name>")
    with pytest.raises(SystemExit, match="not a run folder"):
        main([str(tmp_path)])


def test_groups_are_named_in_words():
    assert report.group_label("Male", "1") == "Male" and report.group_label("Male", "0") == "not Male"
    assert report.group_label("Male&Young", "0&1") == "not Male & Young"
