"""The run folder: per-round writes, status.json, and what a resume may change."""

import json

import pytest
import torch

from celeba_app.config import ConfigError, RunConfig
from celeba_app.flwr_home import run_command
from celeba_app.results import (HistoryLog, check_resume, create_run_dir, load_checkpoint, read_history, read_status,
                                run_dir_for,
                                write_round, write_run_start, write_status)

PARTS = [{"partition_id": 0, "num_train": 5, "num_val": 1, "celeb_ids": [1, 2]},
         {"partition_id": 1, "num_train": 4, "num_val": 1, "celeb_ids": [3]}]


@pytest.fixture
def stopped_run(tmp_path):
    cfg = RunConfig(results_dir=str(tmp_path), run_name="r1", learning_rate=0.005)
    run = create_run_dir(run_dir_for(cfg))
    write_run_start(run, cfg, kind="federated", num_clients=2, device="cpu", identities={}, partitions=PARTS,
                    weights_id="w")
    write_round(run, [{"round": 0}, {"round": 1}], {"round": 1, "arrays": {"w": torch.ones(2)}, "server_state": {},
                                                    "best": {}, "skipped_in_row": 0, "random_state": []},
                HistoryLog(run))
    return cfg, run


def test_each_round_leaves_history_checkpoint_and_status(stopped_run):
    _, run = stopped_run
    assert [h["round"] for h in read_history(run)] == [0, 1] and not (run / "history.json").exists()
    assert torch.equal(load_checkpoint(run)["arrays"]["w"], torch.ones(2))
    assert read_status(run)["state"] == "running" and read_status(run)["last_completed_round"] == 1
    assert not list(run.glob("*.tmp"))  # written, then renamed


def test_resume_takes_the_stopped_runs_folder_and_refuses_a_completed_one(stopped_run):
    cfg, run = stopped_run
    resumed = RunConfig(results_dir=cfg.results_dir, resume="r1")
    assert run_dir_for(resumed) == run
    write_status(run, "completed", 1)
    with pytest.raises(ConfigError, match="resume='r1': that run completed"):
        run_dir_for(resumed)
    with pytest.raises(ConfigError, match="resume='nope': no stopped run with a checkpoint"):
        run_dir_for(RunConfig(results_dir=cfg.results_dir, resume="nope"))


def test_resume_refuses_a_config_or_partitions_that_change_results(stopped_run):
    cfg, run = stopped_run
    same = RunConfig(results_dir=cfg.results_dir, resume="r1", learning_rate=0.005, num_server_rounds=20,
                     cache_dir="/elsewhere", round_timeout=60.0)  # none of these changes results
    check_resume(run, same, PARTS)
    with pytest.raises(ConfigError) as info:
        check_resume(run, RunConfig(resume="r1", learning_rate=0.01, seed=1), PARTS)
    assert str(info.value).startswith("resume='r1': the run config differs from the saved one in "
                                      "learning-rate (0.005 saved, 0.01 now), seed (42 saved, 1 now)")
    for key, value in (("feature_layer", 10), ("feature_pool", 2)):
        with pytest.raises(ConfigError) as info:  # another layer or pool is another head
            check_resume(run, RunConfig(resume="r1", learning_rate=0.005, **{key: value}), PARTS)
        name = key.replace("_", "-")
        assert f"{name} ({getattr(cfg, key)!r} saved, {value!r} now)" in str(info.value)
    moved = [PARTS[0], {**PARTS[1], "celeb_ids": [4]}]
    with pytest.raises(ConfigError, match=r"differs from the saved partitions.json \(partitions \[1\]\)"):
        check_resume(run, same, moved)


def test_results_dir_that_is_a_file_or_below_one_is_refused_in_one_line(tmp_path):
    afile = tmp_path / "outputs"
    afile.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        run_dir_for(RunConfig(results_dir=str(afile), run_name="r"))
    assert str(info.value) == (f"results-dir={str(afile)!r} is a file; accepted: a folder this process can "
                               "write (created if missing)")
    with pytest.raises(ConfigError, match=rf"results-dir='{afile}/runs' cannot be created: '{afile}' is a file"):
        run_dir_for(RunConfig(results_dir=str(afile / "runs"), run_name="r"))
    with pytest.raises(ConfigError, match="is a file"):  # before looking for the run to resume
        run_dir_for(RunConfig(results_dir=str(afile), resume="r"))


def test_results_dir_that_cannot_be_written_is_refused(tmp_path):
    import os

    if os.geteuid() == 0:  # root writes through permissions, not into sysfs
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("root without sysfs: no folder root cannot write")
        ro = "/sys/celeba-fl-results"
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        ro = str(tmp_path / "ro" / "outputs")
    with pytest.raises(ConfigError) as info:
        run_dir_for(RunConfig(results_dir=ro, run_name="r"))
    assert str(info.value).startswith(f"results-dir={ro!r} cannot be written (")
    assert str(info.value).endswith("accepted: a folder this process can write (created if missing)")
    assert "\n" not in str(info.value)


def test_two_runs_of_one_run_name_started_at_once_second_is_refused(tmp_path):
    cfg = RunConfig(results_dir=str(tmp_path), run_name="same")
    first, second = run_dir_for(cfg), run_dir_for(cfg)  # both checked before either created it
    create_run_dir(first)
    (first / "status.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        create_run_dir(second)
    assert str(info.value).startswith(f"run-name='same' already exists in results-dir={str(tmp_path)!r} "
                                      "(another run created it after this one started)")
    assert (first / "status.json").read_text() == "{}"


def test_config_json_records_the_datasets_content_and_same_named_folders_are_not_mixed(tmp_path):
    """Two folders of one name (celeba-mini) with different rows: config.json tells them apart,
    and each folder's server parts are its own rows (the datasets cache is per content)."""
    import pyarrow.parquet as pq

    from celeba_app import data
    from celeba_app.demo_data import make_celeba

    folders = [make_celeba(tmp_path / "a" / "celeba-mini", n_train_ids=4, n_eval_ids=3, seed=1),
               make_celeba(tmp_path / "b" / "celeba-mini", n_train_ids=4, n_eval_ids=5, seed=2)]
    recorded, sizes = [], []
    for i, folder in enumerate(folders):
        cfg = RunConfig(dataset=str(folder), results_dir=str(tmp_path / "out"), run_name=f"r{i}",
                        cache_dir=str(tmp_path / "cache"))
        run = create_run_dir(run_dir_for(cfg))
        write_run_start(run, cfg, kind="federated", num_clients=1, device="cpu", identities={}, partitions=[],
                        weights_id="w")
        recorded.append(json.loads((run / "config.json").read_text())["dataset"]["fingerprint"])
        assert recorded[-1] == data.dataset_fingerprint(str(folder))
        data.clear_caches()
        sizes.append(len(data.server_part(cfg, "valid")))
        assert sizes[-1] == pq.read_metadata(folder / "valid-00000-of-00001.parquet").num_rows
    assert recorded[0] != recorded[1] and sizes[0] != sizes[1]
    assert data.datasets_cache_kwargs(str(folders[0]), recorded[0]) != data.datasets_cache_kwargs(str(folders[1]), recorded[1])


def test_skipped_rows_json_lists_the_servers_and_the_clients_rows_left_out(tmp_path):
    from types import SimpleNamespace

    from celeba_app.results import write_skipped_rows

    row = {"part": "test", "row": 3, "split_row": 17, "celeb_id": 42, "error": "Image is incomplete or truncated"}
    client = {**row, "part": "client-1/train", "split_row": 5}
    parts = [SimpleNamespace(skipped_rows=[]), SimpleNamespace(skipped_rows=[row])]
    partitions = [{**PARTS[0], "skipped_rows": []}, {**PARTS[1], "skipped_rows": [client]}]
    write_skipped_rows(tmp_path, RunConfig(bad_images="skip"), parts, partitions)
    assert json.loads((tmp_path / "skipped_rows.json").read_text()) == [row, client]
    write_skipped_rows(tmp_path / "x", RunConfig(), parts, partitions)  # bad-images = "fail": nothing skipped
    assert not (tmp_path / "x").exists()


def test_a_running_status_whose_process_has_ended_is_told_apart(tmp_path):
    import platform
    import subprocess
    import sys

    from celeba_app.results import process_ended, write_status

    write_status(tmp_path, "running", 3)
    status = read_status(tmp_path)
    assert status["pid"] == __import__("os").getpid() and not process_ended(status)  # this process runs
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    assert process_ended({**status, "pid": int(gone)})
    assert not process_ended({**status, "pid": int(gone), "host": platform.node() + "-elsewhere"})
    assert not process_ended({**status, "pid": int(gone), "state": "failed"})


def test_the_resume_command_repeats_what_differs_from_the_defaults():
    from celeba_app.results import resume_command

    cfg = RunConfig.from_run_config({"split": "noniid", "learning-rate": 0.01, "augment-hflip": True,
                                     "run-name": "r7", "resume": "old"})
    run = run_command()  # flwr run . (1.25) | celeba-flwr run . (1.42)
    assert resume_command(cfg, "r7") == (f"{run} --run-config \"split='noniid' learning-rate=0.01 "
                                         "augment-hflip=true resume='r7'\"")
    assert resume_command(RunConfig(), "x") == f"{run} --run-config \"resume='x'\""


@pytest.mark.parametrize("damage", [b"", b"not a torch file at all", "truncated"])
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_file(tmp_path, damage):
    import torch

    from celeba_app.config import ConfigError
    from celeba_app.results import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        torch.save({"round": 1, "arrays": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(damage)
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(tmp_path)
    line = str(caught.value)
    assert str(path) in line and "damaged" in line and "weights_only" not in line and "\n" not in line


def test_a_checkpoint_without_the_apps_keys_is_refused(tmp_path):
    import torch

    from celeba_app.config import ConfigError
    from celeba_app.results import load_checkpoint

    torch.save({"round": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match="is not this app's checkpoint .no arrays, server_state"):
        load_checkpoint(tmp_path)


def test_a_round_costs_the_same_to_write_in_round_1000_as_in_round_1(tmp_path):
    """history.jsonl gets only the records that changed (the last two rounds at most), so
    the bytes written per round do not grow with the rounds; read_history takes the last
    line of each round and skips a torn last line."""
    log = HistoryLog(tmp_path)
    history, sizes = [], []
    for rnd in range(1000):
        history.append({"round": rnd, "train": {"loss": 1.0 / (rnd + 1)}})
        if rnd > 0:
            history[-2]["federated_evaluate"] = {"n": rnd}  # evaluate-with-train amends the previous round
        before = log.path.stat().st_size if log.path.exists() else 0
        log.append(history)
        sizes.append(log.path.stat().st_size - before)
    assert max(sizes[990:]) <= 2 * max(sizes[1:10]) + 20
    with open(log.path, "a") as f:
        f.write('{"round": 1000, "tr')  # a kill mid-line
    got = read_history(tmp_path)
    assert [h["round"] for h in got] == list(range(1000)) and got == json.loads(json.dumps(history))
    log.restart(history[:10])  # a resume after round 9
    assert [h["round"] for h in read_history(tmp_path)] == list(range(10))
