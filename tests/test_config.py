import pytest

from celeba_app.config import ATTRIBUTES, ConfigError, RunConfig
from celeba_app.results import create_run_dir, run_dir_for


def test_defaults_are_the_users_real_path():
    cfg = RunConfig.from_run_config({})
    assert cfg.dataset == "flwrlabs/celeba" and cfg.weights == "imagenet"
    assert cfg.split == "iid" and cfg.num_server_rounds == 10 and cfg.target == "Smiling"
    assert cfg.sensitive_attributes == ("Male", "Young", "Pale_Skin")


def test_pyproject_keys_all_parse(tmp_path):
    import tomllib
    from pathlib import Path

    conf = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    run_config = conf["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_run_config(run_config)
    assert cfg.extra == {}, f"pyproject keys RunConfig does not know: {cfg.extra}"
    assert cfg.as_dict()["sensitive-attributes"] == "Male,Young,Pale_Skin"
    assert conf["tool"]["flwr"]["federations"]["local-simulation"]["options"]["num-supernodes"] == 50


@pytest.mark.parametrize("override, message", [
    ({"split": "dirichlet"}, "split='dirichlet' is not known; accepted: iid, noniid"),
    ({"target": "Smile"}, "target='Smile' is not a CelebA attribute; accepted: 5_o_Clock_Shadow"),
    ({"sensitive-attributes": "Male,Gender"}, "sensitive-attributes='Gender' is not a CelebA attribute"),
    ({"weights": "/nonexistent/w.pth"}, "weights='/nonexistent/w.pth': no such file; accepted: 'imagenet'"),
    ({"dataset": "./no/such/folder"}, "dataset='./no/such/folder': no such folder; accepted: 'flwrlabs/celeba'"),
    ({"num-server-rounds": 0}, "num-server-rounds=0 is not valid; accepted: an integer >= 1"),
    ({"fraction-train": 0.0}, "fraction-train=0.0 is not valid; accepted: 0 < x <= 1"),
    ({"feature-runtime": "tensorrt"}, "feature-runtime='tensorrt' is not known; accepted: auto, torch, onnx, onnx-int8"),
    ({"run-name": "../escape"}, "run-name='../escape' is not valid"),
    ({"target": "Male"}, "target='Male' is also in sensitive-attributes"),
])
def test_bad_values_are_named_with_what_is_accepted(override, message):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_all_40_attributes_are_known():
    assert len(ATTRIBUTES) == 40 == len(set(ATTRIBUTES))


def test_clashing_run_name_is_refused_and_nothing_is_lost(tmp_path):
    cfg = RunConfig(results_dir=str(tmp_path), run_name="mine")
    run = create_run_dir(run_dir_for(cfg))
    (run / "test.json").write_text("{}")
    with pytest.raises(ConfigError, match="run-name='mine' already exists"):
        run_dir_for(cfg)
    assert (run / "test.json").read_text() == "{}"


@pytest.mark.parametrize("override, message", [
    ({"strategy": "scaffold"}, "strategy='scaffold' is not known; accepted: fedavg, fedprox, fedavgm, fedadam, qfedavg"),
    ({"selection-metric": "f1"}, "selection-metric='f1' is not known; accepted: loss, accuracy"),
    ({"proximal-mu": 0.1}, "proximal-mu=0.1 needs strategy='fedprox'"),
    ({"balance-groups": "Male,Bald"}, "balance-groups='Bald' is not among sensitive-attributes"),
    ({"early-stopping-patience": -1}, "early-stopping-patience=-1 is not valid"),
    ({"lr-decay": 0}, "lr-decay=0 is not valid; accepted: > 0"),
])
def test_remedy_switches_are_validated(override, message):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(override)
    assert message in str(info.value)
