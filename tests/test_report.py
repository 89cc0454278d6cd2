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


def test_gaps_that_include_a_small_group_are_marked_and_name_it(two_runs):
    import json

    test = json.loads((two_runs[0] / "test.json").read_text())
    table = report.gap_table(test)
    for attr in test["gaps"]:
        small = report.smallest_group(test, attr)
        row = next(line for line in table.splitlines() if line.startswith(f"| {attr}"))
        assert row.startswith(f"| {attr}{'*' if small['small'] else ''} |")
        assert row.endswith(f"| {small['name']} (n={small['n']}{'*' if small['small'] else ''}) |")


def test_a_post_processing_fit_that_widens_the_gap_is_marked_and_named():
    def summary(acc, eodds):
        return {"accuracy": acc, "gaps": {"equalized_odds_difference": eodds, "equalized_odds_difference_ci": [0, 1]},
                "groups": {"0": {"tpr": 0.9, "fpr": 0.1}, "1": {"tpr": 0.8, "fpr": 0.2}}}

    post = {"attributes": {"Young": {"test_before": summary(0.886, 0.033),
                                     "valid": {"rule": {}, "test_after": summary(0.880, 0.020)},
                                     "clients' held-out": {"rule": {}, "test_after": summary(0.884, 0.133)}}}}
    table = report.postprocessing_table(post)
    assert "| -0.013 / -0.006 |" in table and "| +0.100 **wider** / -0.002 |" in table
    assert report.widened_gaps(post) == ["Young (fitted on clients' held-out: 0.033 -> 0.133)"]


def test_client_accuracy_has_its_size_interval_and_composition(tmp_path):
    history = [{"round": 1, "federated_evaluate": {"clients": {
        "accuracy": {"min": 0.5, "p10": 0.5, "mean": 0.75, "max": 1.0},
        "accuracy_by_partition": {"0": 0.5, "1": 1.0}, "num_examples_by_partition": {"0": 14, "1": 12}}}}]
    partitions = {"split": "noniid", "partitions": [
        {"partition_id": 0, "group_rates": {"Male": 0.9, "Young": 0.5}},
        {"partition_id": 1, "group_rates": {"Male": 0.1, "Young": 0.4}}]}
    last = report.last_client_round(history)
    assert last["clients"][0]["n"] == 14 and last["clients"][0]["accuracy_ci"][0] < 0.5 < last["clients"][0]["accuracy_ci"][1]
    lines = report.clients_section(history, partitions)
    assert "2 clients of 12-14 images (median 13)" in lines[2]
    assert "| 0 | 14 | 0.500 [" in "\n".join(lines) and "| 0.90 | 0.50 |" in "\n".join(lines)
    assert report.plot_client_accuracy(history, tmp_path / "c.png", partitions).read_bytes()[:8] == PNG


def test_a_report_that_cannot_be_written_leaves_the_run_completed_with_the_error(two_runs, tmp_path):
    import shutil

    from celeba_app.results import read_status

    run = tmp_path / "done"
    shutil.copytree(two_runs[0], run)
    (run / "test.json").write_text('{"overall": "not a report"}')
    error = report.write_report_or_record(run)
    status = read_status(run)
    assert error and status["state"] == "completed" and status["report_error"] == error


def test_the_report_says_how_the_figures_are_protected_and_counts_refused_replies(two_runs, tmp_path):
    import shutil

    run = tmp_path / "refused"
    shutil.copytree(two_runs[0], run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "kind": "federated"}))  # a centralized run, as if federated
    history = json.loads((run / "history.json").read_text())
    history[1]["nodes"] = {"train": {"sampled": [1, 2], "replies": 2, "succeeded": 1, "failures": [
        {"node_id": 2, "partition_id": 1, "code": None, "reason": "reply refused: num-examples=1e12; this node "
         "described 20 training images", "refused": True}]}}
    (run / "history.json").write_text(json.dumps(history))
    text = report.write_report(run).read_text()
    assert "Every client reply was checked before aggregation (1 refused;" in text
    assert "| 1 | train | 2 | 1 | None | reply refused: num-examples=1e12" in text
