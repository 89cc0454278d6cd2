"""Typed run configuration, read once from ``context.run_config``.

Every knob lives in ``[tool.flwr.app.config]`` of pyproject.toml; ``flwr run . --run-config``
overrides them. ``RunConfig.from_run_config`` turns that flat dict into one validated object so
that a typo or an impossible value stops the run *before* any download or training, with one
line naming the bad value and what is accepted (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import mobilenet_layers
from .mobilenet_layers import LAST

HUB_DATASET = "flwrlabs/celeba"

#: The 40 binary attributes of CelebA, in the hub's column order.
ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)

SPLITS = ("iid", "noniid", "celebrity")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "qfedavg", "fairfed",
              "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
#: Flower's Byzantine-robust aggregators among STRATEGIES
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
#: client-level differential privacy (privacy.py): off, or one of Flower's DP wrappers
DP_MODES = ("", "client-fixed", "server-fixed", "client-adaptive")
#: strategies whose aggregate is the plain mean of the clipped updates, with no server state built
#: from the un-noised mean: Flower's DP wrappers keep their guarantee only for these
DP_STRATEGIES = ("fedavg", "fedprox")
#: why each other strategy would break the guarantee (the refusal's words)
DP_BREAKS = {
    "fedavgm": "its server momentum is built from the un-noised mean, and every later head carries it",
    "fedadam": "its server moments are built from the un-noised mean, and every later head carries them",
    "qfedavg": "it reweights each update by the client's loss, so one client can outweigh 1/m of the mean",
    "fairfed": "it weights each client by its fairness gap, so one client can outweigh 1/m of the mean",
    "fedmedian": "a coordinate-wise median is not the mean the noise is calibrated to",
    "fedtrimmedavg": "a trimmed mean is not the mean the noise is calibrated to",
    "krum": "Krum releases one client's update, whose sensitivity is the whole clipping norm",
    "multikrum": "Multi-Krum averages a data-dependent subset, not the mean the noise is calibrated to",
    "bulyan": "Bulyan averages a data-dependent subset, not the mean the noise is calibrated to",
}
FAIRFED_METRICS = ("equalized_odds_difference", "demographic_parity_difference")
SELECTION_METRICS = {  # name -> True when larger is better
    "loss": False, "accuracy": True, "balanced_accuracy": True, "auroc": True,
    "worst_group_accuracy": True,
}
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
HEADS = ("linear", "conv1x1")
TRACKERS = ("", "tensorboard", "mlflow")
DEVICES = ("auto", "cpu", "cuda")
BAD_IMAGES = ("fail", "skip")
# image-size: the side of the square the aligned faces (178x218) are resized to. Below 32,
# MobileNetV2's five stride-2 stages leave less than one feature cell. Above 1024 nothing is
# gained (that is already ~5x upsampling of the source) and the cost is not survivable: the
# backbone's compute and activation memory grow with the square of the side, so 1024 is ~21x
# the default 224 per image and 10000 would be ~2000x (hours per pass, an extract batch of 64
# far beyond any GPU's memory).
IMAGE_SIZE_MIN, IMAGE_SIZE_MAX = 32, 1024
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """A run-config value that cannot work; the message names it and what is accepted."""


def _attr_list(key: str, raw: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in str(raw).split(",") if s.strip())
    for name in names:
        if name not in ATTRIBUTES:
            raise ConfigError(
                f"{key}={name!r} is not a CelebA attribute; accepted: {', '.join(ATTRIBUTES)}"
            )
    return names


def _toml_kind(value: Any) -> str:
    """How a run-config value reads in TOML terms, for a refusal."""
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    for cls, kind in kinds.items():  # bool first: a bool is an int in Python
        if isinstance(value, cls):
            return kind
    return f"a {type(value).__name__}"


# Run-config values come from TOML (pyproject and ``--run-config``), so each field's Python
# annotation maps to the TOML types that can mean it. A bool is never an int or a float here
# (``seed=true`` is a slip, not 1), and a string is never a bool ('false' would be truthy).
#: Field annotation -> (accepted, in words; test of a value).
_CHECKS: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    bool: ("a boolean (TOML true or false)", lambda v: isinstance(v, bool)),
    int: ("an integer (TOML integer)", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number (TOML float or integer)",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    # tuple-of-attribute fields are written as one comma-separated string: "Male,Young"
    tuple[str, ...]: ("a comma-separated string of CelebA attributes (e.g. 'Male,Young')",
                      lambda v: isinstance(v, str)),
}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> annotation for every run-config field of ``cls`` (all but ``extra``).

    Raises TypeError for an annotation that ``_CHECKS`` cannot check, so that a field added
    later with a new kind of type fails at import instead of going in unchecked.
    """
    hints = typing.get_type_hints(cls)
    types = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "extra"}
    for name, annotation in types.items():
        if annotation not in _CHECKS:
            raise TypeError(f"{cls.__name__}.{name}: {annotation} has no run-config type check "
                            "in config._CHECKS")
    return types


def _check_type(key: str, value: Any, annotation: Any) -> None:
    """ConfigError naming the key, the value and the accepted type when ``value`` is not one."""
    accepted, ok = _CHECKS[annotation]
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is {_toml_kind(value)}; accepted: {accepted}")
    if annotation is float:  # TOML has inf and nan
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            raise ConfigError(f"{key}={value!r} is not finite; accepted: a finite number")


def is_local_path(spec: str) -> bool:
    """A dataset/weights spec is a local path when it looks like one (not ``owner/name``)."""
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()


MAX_ROUNDS = 10_000  #: num-server-rounds' upper bound: history.json and the checkpoint grow with every round


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; field names mirror the pyproject keys (dashes -> underscores)."""

    num_server_rounds: int = 10
    split: str = "iid"
    noniid_alpha: float = 0.5
    noniid_attributes: tuple[str, ...] = ("Male", "Young")
    val_fraction: float = 0.1
    dataset: str = HUB_DATASET
    weights: str = "imagenet"
    target: str = "Smiling"
    sensitive_attributes: tuple[str, ...] = ("Male", "Young", "Pale_Skin")
    image_size: int = 224
    feature_layer: int = 13
    feature_pool: int = 7
    head: str = "conv1x1"
    batch_size: int = 32
    local_epochs: int = 5
    learning_rate: float = 0.005
    head_dropout: float = 0.0
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    qfedavg_q: float = 0.1
    qfedavg_lipschitz: float = 0.01
    fairfed_beta: float = 1.0
    robust_malicious_nodes: int = 1
    trimmed_avg_beta: float = 0.2
    multikrum_select: int = 5
    fairfed_attribute: str = "Male"
    fairfed_metric: str = "equalized_odds_difference"
    balance_groups: tuple[str, ...] = ()
    selection_metric: str = "loss"
    early_stopping_patience: int = 0
    min_group_size: int = 30
    augment_hflip: bool = False
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    evaluate_with_train: bool = False
    seed: int = 42
    results_dir: str = "outputs"
    run_name: str = ""
    tracking: str = ""
    feature_cache: bool = True
    cache_dir: str = ".cache/celeba-fl"
    feature_runtime: str = "auto"
    extract_batch_size: int = 64
    device: str = "auto"
    min_nodes: int = 0
    node_wait_timeout: float = 30.0
    round_timeout: float = 3600.0
    min_reply_fraction: float = 0.5
    max_skipped_rounds: int = 3
    max_update_norm: float = 100.0
    dp: str = ""
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 0.0
    dp_target_epsilon: float = 0.0
    resume: str = ""
    bad_images: str = "fail"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], check_paths: bool = True) -> "RunConfig":
        """Build and validate from the flat ``context.run_config`` mapping.

        ``check_paths=False`` on a ClientApp: the run config's paths are the server's, and a
        node's data comes from its node config (data.NodeData checks it, on the node).
        """
        types = _field_types(cls)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            attr = key.replace("-", "_")
            if attr in types:  # every type is checked before any value is
                _check_type(attr.replace("_", "-"), value, types[attr])
                kwargs[attr] = value
            else:
                extra[key] = value
        for key in ("noniid_attributes", "sensitive_attributes", "balance_groups"):
            if key in kwargs:
                kwargs[key] = _attr_list(key.replace("_", "-"), kwargs[key])
        cfg = cls(**kwargs, extra=extra)
        cfg.validate(check_paths)  # on the values as written, so a refusal echoes them (lr-decay=0, not 0.0)
        floats = {k: float(v) for k, v in kwargs.items() if types[k] is float and type(v) is not float}
        return dataclasses.replace(cfg, **floats) if floats else cfg

    @property
    def feature_dim(self) -> int:
        """Numbers per image the head reads (``feature-layer``'s channels x ``feature-pool``^2)."""
        return mobilenet_layers.feature_dim(self.feature_layer, self.feature_pool)

    def resolved(self) -> "RunConfig":
        """This config with its local paths (dataset, weights, results-dir, cache-dir) made
        absolute from this process's working directory: what the server logs and records."""
        def absolute(spec: str) -> str:
            return str(Path(spec).expanduser().resolve())
        return dataclasses.replace(
            self, dataset=absolute(self.dataset) if is_local_path(self.dataset) else self.dataset,
            weights=self.weights if self.weights == "imagenet" else absolute(self.weights),
            results_dir=absolute(self.results_dir), cache_dir=absolute(self.cache_dir))

    def validate(self, check_paths: bool = True) -> None:
        """Raise ConfigError for any value that cannot work. Cheap: no I/O beyond stat()."""
        if self.split not in SPLITS:
            raise ConfigError(f"split={self.split!r} is not known; accepted: {', '.join(SPLITS)}")
        if self.target not in ATTRIBUTES:
            raise ConfigError(
                f"target={self.target!r} is not a CelebA attribute; accepted: {', '.join(ATTRIBUTES)}"
            )
        if not self.sensitive_attributes:
            raise ConfigError("sensitive-attributes='' is not valid; accepted: one or more CelebA attributes, "
                              "comma-separated (e.g. 'Male,Young'): the groups every report compares")
        _attr_list("sensitive-attributes", ",".join(self.sensitive_attributes))
        _attr_list("noniid-attributes", ",".join(self.noniid_attributes))
        if self.target in self.sensitive_attributes:
            raise ConfigError(
                f"target={self.target!r} is also in sensitive-attributes; accepted: a target "
                "that is not a sensitive attribute"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"strategy={self.strategy!r} is not known; accepted: {', '.join(STRATEGIES)}"
            )
        if self.strategy == "fairfed" and self.fairfed_attribute not in self.sensitive_attributes:
            raise ConfigError(f"fairfed-attribute={self.fairfed_attribute!r} is not a sensitive attribute; "
                              f"accepted: one of sensitive-attributes ({', '.join(self.sensitive_attributes)})")
        if self.fairfed_metric not in FAIRFED_METRICS:
            raise ConfigError(f"fairfed-metric={self.fairfed_metric!r} is not known; accepted: "
                              f"{', '.join(FAIRFED_METRICS)}")
        if not self.qfedavg_lipschitz > 0:
            raise ConfigError(f"qfedavg-lipschitz={self.qfedavg_lipschitz!r} is not valid; accepted: a number > 0")
        if not self.fairfed_beta >= 0:
            raise ConfigError(f"fairfed-beta={self.fairfed_beta!r} is not valid; accepted: a number >= 0")
        if not isinstance(self.robust_malicious_nodes, int) or isinstance(self.robust_malicious_nodes, bool) \
                or self.robust_malicious_nodes < 0:
            raise ConfigError(f"robust-malicious-nodes={self.robust_malicious_nodes!r} is not valid; "
                              "accepted: an integer >= 0")
        if not 0 <= self.trimmed_avg_beta < 0.5:
            raise ConfigError(f"trimmed-avg-beta={self.trimmed_avg_beta!r} is not valid; accepted: 0 <= x < 0.5")
        if not isinstance(self.multikrum_select, int) or isinstance(self.multikrum_select, bool) \
                or self.multikrum_select < 1:
            raise ConfigError(f"multikrum-select={self.multikrum_select!r} is not valid; accepted: an integer >= 1")
        if self.selection_metric not in SELECTION_METRICS:
            raise ConfigError(
                f"selection-metric={self.selection_metric!r} is not known; accepted: "
                f"{', '.join(SELECTION_METRICS)}"
            )
        if self.proximal_mu and self.strategy != "fedprox":
            raise ConfigError(
                f"proximal-mu={self.proximal_mu} needs strategy='fedprox' (got {self.strategy!r}); "
                "accepted: proximal-mu=0 or strategy='fedprox'"
            )
        stray = [a for a in self.balance_groups if a not in self.sensitive_attributes]
        if stray:
            raise ConfigError(
                f"balance-groups={','.join(stray)!r} is not among sensitive-attributes; accepted: "
                f"attributes of {','.join(self.sensitive_attributes)!r}"
            )
        if self.feature_runtime not in RUNTIMES:
            raise ConfigError(
                f"feature-runtime={self.feature_runtime!r} is not known; accepted: {', '.join(RUNTIMES)}"
            )
        if self.bad_images not in BAD_IMAGES:
            raise ConfigError(f"bad-images={self.bad_images!r} is not known; accepted: {', '.join(BAD_IMAGES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} is not known; accepted: {', '.join(DEVICES)}")
        positive = {
            "num-server-rounds": self.num_server_rounds, "image-size": self.image_size,
            "batch-size": self.batch_size, "local-epochs": self.local_epochs,
            "extract-batch-size": self.extract_batch_size,
        }
        if not isinstance(self.min_group_size, int) or isinstance(self.min_group_size, bool) \
                or self.min_group_size < 1:
            raise ConfigError(f"min-group-size={self.min_group_size!r} is not valid; accepted: an integer >= 1")
        if not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 0:
            raise ConfigError(f"early-stopping-patience={self.early_stopping_patience!r} is not valid; "
                              "accepted: an integer >= 0 (0 = off)")
        for key, value in (("weight-decay", self.weight_decay), ("proximal-mu", self.proximal_mu),
                           ("qfedavg-q", self.qfedavg_q), ("server-momentum", self.server_momentum)):
            if not value >= 0:
                raise ConfigError(f"{key}={value!r} is not valid; accepted: >= 0")
        for key, value in (("lr-decay", self.lr_decay), ("server-learning-rate", self.server_learning_rate)):
            if not value > 0:
                raise ConfigError(f"{key}={value!r} is not valid; accepted: > 0")
        for key, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}={value!r} is not valid; accepted: an integer >= 1")
        if self.num_server_rounds > MAX_ROUNDS:
            raise ConfigError(f"num-server-rounds={self.num_server_rounds!r} is not valid; accepted: an integer "
                              f"from 1 to {MAX_ROUNDS}")
        if not IMAGE_SIZE_MIN <= self.image_size <= IMAGE_SIZE_MAX:
            raise ConfigError(f"image-size={self.image_size!r} is not valid; accepted: an integer "
                              f"{IMAGE_SIZE_MIN} <= x <= {IMAGE_SIZE_MAX}")
        if not 0 <= self.feature_layer <= LAST:
            raise ConfigError(f"feature-layer={self.feature_layer!r} is not known; accepted: an integer 0 <= x "
                              f"<= {LAST} (the output of torchvision's mobilenet_v2().features[x])")
        side = mobilenet_layers.map_size(self.feature_layer, self.image_size)
        if not 1 <= self.feature_pool <= side:
            raise ConfigError(f"feature-pool={self.feature_pool!r} is not valid for features[{self.feature_layer}], "
                              f"whose map is {side}x{side} at image-size={self.image_size}; accepted: an integer "
                              f"1 <= x <= {side}")
        if self.tracking not in TRACKERS:
            raise ConfigError(f"tracking={self.tracking!r} is not known; accepted: \"\" (none), "
                              + ", ".join(TRACKERS[1:]))
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r} is not known; accepted: {', '.join(HEADS)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            # numpy's generators refuse a negative seed; say so here, not from inside the data split
            raise ConfigError(f"seed={self.seed!r} is not valid; accepted: an integer >= 0")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning-rate={self.learning_rate!r} is not valid; accepted: > 0")
        if not self.noniid_alpha > 0:
            raise ConfigError(f"noniid-alpha={self.noniid_alpha!r} is not valid; accepted: > 0")
        ranges = (  # key, value, low, high, low inclusive, high inclusive
            ("val-fraction", self.val_fraction, 0, 1, True, False),
            ("head-dropout", self.head_dropout, 0, 1, True, False),
            ("fraction-train", self.fraction_train, 0, 1, False, True),
            ("fraction-evaluate", self.fraction_evaluate, 0, 1, True, True),
        )
        for key, value, low, high, low_in, high_in in ranges:
            above = value >= low if low_in else value > low
            below = value <= high if high_in else value < high
            if not (above and below):
                accepted = f"{low} {'<=' if low_in else '<'} x {'<=' if high_in else '<'} {high}"
                raise ConfigError(f"{key}={value!r} is not valid; accepted: {accepted}")
        if self.run_name and not _RUN_NAME.match(self.run_name):
            raise ConfigError(
                f"run-name={self.run_name!r} is not valid; accepted: letters, digits, '.', '_', '-'"
            )
        if not isinstance(self.min_nodes, int) or isinstance(self.min_nodes, bool) or self.min_nodes < 0:
            raise ConfigError(f"min-nodes={self.min_nodes!r} is not valid; accepted: an integer >= 0 "
                              "(0 = every node of a simulation, or those connected within node-wait-timeout)")
        if not self.node_wait_timeout > 0:
            raise ConfigError(f"node-wait-timeout={self.node_wait_timeout!r} is not valid; accepted: "
                              "seconds > 0")
        if not self.round_timeout > 0:
            raise ConfigError(f"round-timeout={self.round_timeout!r} is not valid; accepted: seconds > 0")
        if self.evaluate_with_train and self.fraction_evaluate != self.fraction_train:
            raise ConfigError(f"fraction-evaluate={self.fraction_evaluate!r} is not valid with evaluate-with-train="
                              "true, which evaluates on the clients sampled for training; accepted: "
                              f"fraction-evaluate = fraction-train ({self.fraction_train!r})")
        if not 0 < self.min_reply_fraction <= 1:
            raise ConfigError(f"min-reply-fraction={self.min_reply_fraction!r} is not valid; accepted: 0 < x <= 1")
        if self.max_skipped_rounds < 0:
            raise ConfigError(f"max-skipped-rounds={self.max_skipped_rounds!r} is not valid; accepted: an integer >= 0")
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ConfigError(f"max-update-norm={self.max_update_norm!r} is not valid; accepted: a finite number > 0")
        self._validate_dp()
        if self.resume and not _RUN_NAME.match(self.resume):
            raise ConfigError(f"resume={self.resume!r} is not valid; accepted: the run-name of a stopped run")
        if not check_paths:
            return
        if is_local_path(self.dataset):
            path = Path(self.dataset).expanduser()
            if not path.is_dir():
                raise ConfigError(
                    f"dataset={self.dataset!r}: no such folder; accepted: {HUB_DATASET!r} or a "
                    "folder of train/valid/test parquet files in its schema"
                )
        if self.weights != "imagenet" and not Path(self.weights).expanduser().is_file():
            raise ConfigError(
                f"weights={self.weights!r}: no such file; accepted: 'imagenet' (torchvision's "
                "IMAGENET1K_V1) or the path of a mobilenet_v2 state_dict file"
            )

    def _validate_dp(self) -> None:
        if self.dp not in DP_MODES:
            raise ConfigError(f"dp={self.dp!r} is not known; accepted: \"\" (off), " + ", ".join(DP_MODES[1:]))
        if self.dp and self.strategy not in DP_STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r} with dp={self.dp!r} would not keep the privacy guarantee "
                              f"({DP_BREAKS[self.strategy]}); accepted with dp: {', '.join(DP_STRATEGIES)}")
        if not (math.isfinite(self.dp_noise_multiplier) and self.dp_noise_multiplier >= 0):
            raise ConfigError(f"dp-noise-multiplier={self.dp_noise_multiplier!r} is not valid; accepted: a finite "
                              "number >= 0")
        if not (math.isfinite(self.dp_clipping_norm) and self.dp_clipping_norm > 0):
            raise ConfigError(f"dp-clipping-norm={self.dp_clipping_norm!r} is not valid; accepted: a finite number > 0")
        if not (self.dp_delta == 0 or 0 < self.dp_delta < 1):
            raise ConfigError(f"dp-delta={self.dp_delta!r} is not valid; accepted: 0 < x < 1, or 0 for 1 / the "
                              "clients' training images")
        if not (self.dp_target_epsilon == 0 or (math.isfinite(self.dp_target_epsilon) and self.dp_target_epsilon > 0)):
            raise ConfigError(f"dp-target-epsilon={self.dp_target_epsilon!r} is not valid; accepted: a finite number "
                              "> 0, or 0 to use dp-noise-multiplier")
        if self.dp_target_epsilon and not self.dp:
            raise ConfigError(f"dp-target-epsilon={self.dp_target_epsilon!r} needs dp; accepted: dp = "
                              + " | ".join(repr(m) for m in DP_MODES[1:]) + ", or dp-target-epsilon=0")

    def as_dict(self) -> dict[str, Any]:
        """The resolved config, with the pyproject key spelling, for config.json."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = ",".join(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        return out


def load_run_config(project_dir: Path, overrides: list[str]) -> dict:
    """pyproject's ``[tool.flwr.app.config]``, fused with ``--run-config`` strings as ``flwr
    run`` does (for the project's command-line tools)."""
    from .internals import parse_run_config_args, project_run_config

    run_config = project_run_config(project_dir)
    given = parse_run_config_args(overrides)
    unknown = sorted(set(given) - set(run_config))
    if unknown:  # a typo would otherwise be ignored and the default used
        import difflib

        near = difflib.get_close_matches(unknown[0], list(run_config), n=1)
        raise ConfigError(f"run-config key {unknown[0]!r} is not known"
                          + (f" (did you mean {near[0]!r}?)" if near else "")
                          + "; accepted: the keys of [tool.flwr.app.config] in pyproject.toml")
    run_config.update(given)
    return run_config


_field_types(RunConfig)  # every field has a type check (raises at import otherwise)
