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
    ({"split": "dirichlet"}, "split='dirichlet' is not known; accepted: iid, noniid, celebrity"),
    ({"target": "Smile"}, "target='Smile' is not a CelebA attribute; accepted: 5_o_Clock_Shadow"),
    ({"sensitive-attributes": "Male,Gender"}, "sensitive-attributes='Gender' is not a CelebA attribute"),
    ({"weights": "/nonexistent/w.pth"}, "weights='/nonexistent/w.pth': no such file; accepted: 'imagenet'"),
    ({"dataset": "./no/such/folder"}, "dataset='./no/such/folder': no such folder; accepted: 'flwrlabs/celeba'"),
    ({"num-server-rounds": 0}, "num-server-rounds=0 is not valid; accepted: an integer >= 1"),
    ({"num-server-rounds": 1000000000}, "num-server-rounds=1000000000 is not valid; accepted: an integer from 1 to 10000"),
    ({"sensitive-attributes": ""}, "sensitive-attributes='' is not valid; accepted: one or more CelebA attributes"),
    ({"max-update-norm": 0.0}, "max-update-norm=0.0 is not valid; accepted: a finite number > 0"),
    ({"fraction-train": 0.0}, "fraction-train=0.0 is not valid; accepted: 0 < x <= 1"),
    ({"feature-runtime": "tensorrt"}, "feature-runtime='tensorrt' is not known; accepted: auto, torch, onnx, onnx-int8"),
    ({"run-name": "../escape"}, "run-name='../escape' is not valid"),
    ({"target": "Male"}, "target='Male' is also in sensitive-attributes"),
    ({"bad-images": "drop"}, "bad-images='drop' is not known; accepted: fail, skip"),
    ({"feature-layer": 19}, "feature-layer=19 is not known; accepted: an integer 0 <= x <= 18 (the output of "
                            "torchvision's mobilenet_v2().features[x])"),
    ({"feature-layer": -1}, "feature-layer=-1 is not known; accepted: an integer 0 <= x <= 18"),
    ({"feature-pool": 0}, "feature-pool=0 is not valid for features["),
    ({"feature-layer": 18, "feature-pool": 7, "image-size": 96},
     "feature-pool=7 is not valid for features[18], whose map is 3x3 at image-size=96; accepted: an integer "
     "1 <= x <= 3"),
    ({"feature-layer": 13, "feature-pool": 15, "image-size": 224},
     "feature-pool=15 is not valid for features[13], whose map is 14x14 at image-size=224; accepted: an integer "
     "1 <= x <= 14"),
    ({"feature-pool": 2.0}, "feature-pool=2.0 is a float; accepted: an integer"),
    ({"evaluate-with-train": True, "fraction-evaluate": 0.5},
     "fraction-evaluate=0.5 is not valid with evaluate-with-train=true, which evaluates on the clients sampled for "
     "training; accepted: fraction-evaluate = fraction-train (1.0)"),
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


# Wrong-typed values per field annotation: the slips TOML lets through (a quoted number, a
# quoted boolean, a boolean where a number goes, a float where an integer goes, an array).
WRONG_TYPED = {
    bool: ["false", 0, 1],
    int: ["1", 3.0, True],
    float: ["0.01", True],
    str: [1, True],
    tuple[str, ...]: [["Male"], 1, True],
}


def _field_cases():
    import dataclasses
    import typing

    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name == "extra":
            continue
        annotation = hints[f.name]
        assert annotation in WRONG_TYPED, f"RunConfig.{f.name}: add wrong values for {annotation}"
        for wrong in WRONG_TYPED[annotation]:
            yield pytest.param(f.name.replace("_", "-"), wrong, id=f"{f.name}={wrong!r}")


@pytest.mark.parametrize("key, wrong", list(_field_cases()))
def test_every_field_refuses_a_wrong_type_naming_its_key(key, wrong):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({key: wrong})
    message = str(info.value)
    assert message.startswith(f"{key}={wrong!r} is "), message
    assert "; accepted: " in message and "\n" not in message


@pytest.mark.parametrize("override, message", [
    ({"augment-hflip": "false"}, "augment-hflip='false' is a string; accepted: a boolean (TOML true or false)"),
    ({"learning-rate": "0.01"}, "learning-rate='0.01' is a string; accepted: a number (TOML float or integer)"),
    ({"seed": True}, "seed=True is a boolean; accepted: an integer (TOML integer)"),
    ({"batch-size": 32.0}, "batch-size=32.0 is a float; accepted: an integer (TOML integer)"),
    ({"noniid-attributes": ["Male"]}, "noniid-attributes=['Male'] is a list; accepted: a comma-separated string of CelebA "
                                        "attributes (e.g. 'Male,Young')"),
    ({"learning-rate": float("inf")}, "learning-rate=inf is not finite; accepted: a finite number"),
    ({"weight-decay": float("nan")}, "weight-decay=nan is not finite; accepted: a finite number"),
])
def test_wrong_types_are_one_line_naming_key_value_and_type(override, message):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(override)
    assert str(info.value) == message


def test_types_are_checked_before_any_value():
    # split and target are wrong too, but the wrong-typed key is what the user hears about first
    with pytest.raises(ConfigError, match=r"^learning-rate='0.01' is a string"):
        RunConfig.from_run_config({"split": "dirichlet", "target": "Smile", "learning-rate": "0.01"})


def test_right_types_are_accepted_and_numbers_become_floats():
    cfg = RunConfig.from_run_config({"augment-hflip": True, "learning-rate": 1, "lr-decay": 0.5,
                                     "seed": 0, "noniid-attributes": "Male"})
    assert cfg.augment_hflip is True
    assert type(cfg.learning_rate) is float and cfg.learning_rate == 1.0
    assert type(cfg.lr_decay) is float and cfg.seed == 0 and cfg.noniid_attributes == ("Male",)
    assert RunConfig.from_run_config({"augment-hflip": False}).augment_hflip is False


def test_defaults_round_trip_through_the_type_checks():
    # every default has the type its annotation promises (as_dict is what config.json holds)
    assert RunConfig.from_run_config(RunConfig().as_dict()) == RunConfig()


@pytest.mark.parametrize("override, message", [
    ({"seed": -1}, "seed=-1 is not valid; accepted: an integer >= 0"),
    ({"image-size": 10000}, "image-size=10000 is not valid; accepted: an integer 32 <= x <= 1024"),
    ({"image-size": 1025}, "image-size=1025 is not valid; accepted: an integer 32 <= x <= 1024"),
    ({"image-size": 31}, "image-size=31 is not valid; accepted: an integer 32 <= x <= 1024"),
])
def test_seed_and_image_size_ranges_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(override)
    assert str(info.value) == message


@pytest.mark.parametrize("override", [{"seed": 0}, {"image-size": 32, "feature-pool": 2}, {"image-size": 1024}])
def test_seed_and_image_size_bounds_are_accepted(override):
    RunConfig.from_run_config(override)


def test_a_directly_built_config_is_range_checked_too():
    with pytest.raises(ConfigError, match="^seed=-1 is not valid"):
        RunConfig(seed=-1).validate()


def test_a_mistyped_key_for_the_projects_command_line_tools_is_refused_in_one_line():
    """celeba-centralized and celeba-partition fuse --run-config into pyproject's config as flwr
    run does; an unknown key is refused, not ignored (the default would silently be used)."""
    from pathlib import Path

    from celeba_app.config import load_run_config

    root = Path(__file__).resolve().parents[1]
    assert load_run_config(root, ["learning-rate=0.1"])["learning-rate"] == 0.1
    with pytest.raises(ConfigError, match=r"run-config key 'learning-rat' is not known \(did you mean "
                                          r"'learning-rate'\?\); accepted: the keys of \[tool.flwr.app.config\]"):
        load_run_config(root, ["learning-rat=0.1"])


def test_the_head_width_follows_feature_layer_and_feature_pool():
    assert RunConfig(feature_layer=18, feature_pool=1).feature_dim == 1280  # the global average of the last layer
    assert RunConfig(feature_layer=13, feature_pool=7).feature_dim == 96 * 49
    assert RunConfig(feature_layer=6, feature_pool=3).feature_dim == 32 * 9


def _doc_defaults() -> dict[str, str]:
    """docs/CONFIG.md's table: key -> the default as written (rows may name several keys,
    ``| `a`, `b` | 1, 2 | ... |``)."""
    import re
    from pathlib import Path

    out = {}
    for line in (Path(__file__).parents[1] / "docs" / "CONFIG.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([a-z0-9-]+)`", cells[0])
        values = [v.strip().strip("`") for v in cells[1].split(",")] if len(keys) > 1 else [cells[1].strip("`")]
        assert len(keys) == len(values), line
        out.update(zip(keys, values))
    return out


def test_the_config_reference_pyproject_and_runconfig_agree():
    """docs/CONFIG.md lists every key of [tool.flwr.app.config] once, with pyproject's default,
    and pyproject's defaults are RunConfig's."""
    import dataclasses
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    doc = _doc_defaults()
    assert sorted(doc) == sorted(pyproject)
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig) if f.name != "extra"}
    assert sorted(fields) == sorted(pyproject)
    as_dict = RunConfig().as_dict()
    for key, value in pyproject.items():
        assert as_dict[key] == value, f"{key}: RunConfig {as_dict[key]!r}, pyproject {value!r}"
        written = doc[key]
        if isinstance(value, bool):
            assert written == str(value).lower(), key
        elif isinstance(value, (int, float)):
            assert float(written) == value, f"{key}: docs/CONFIG.md {written}, pyproject {value!r}"
        else:
            assert written == (value or '""'), f"{key}: docs/CONFIG.md {written!r}, pyproject {value!r}"
