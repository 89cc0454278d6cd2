"""scripts/dp_sweep.py's settings and its summary over seeds (no federation is run here)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import dp_sweep  # noqa: E402


def test_each_epsilon_is_a_target_and_infinity_is_clipping_without_noise():
    settings = dict(dp_sweep.settings(["inf", "3"], clip=0.5))
    assert settings["off"] == {}
    assert settings["inf"] == {"dp": "server-fixed", "dp-clipping-norm": 0.5, "dp-noise-multiplier": 0.0}
    assert settings["3"] == {"dp": "server-fixed", "dp-clipping-norm": 0.5, "dp-target-epsilon": 3.0}


def test_the_interval_over_seeds_is_students_and_is_cut_to_a_rates_range():
    m, h = dp_sweep.mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and h == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert dp_sweep.cell((0.9, 0.3)) == "0.900 [0.60, 1.00]"
    assert dp_sweep.mean_ci([0.4]) == (0.4, 0.0) and math.isnan(dp_sweep.mean_ci([None])[0])


def test_the_summary_groups_seeds_per_setting():
    rows = [{"federation": "iid50", "head": "default", "seed": s, "setting": "8", "clients": 50, "accuracy": a,
             "noise_multiplier": 1.8, "epsilon": 8.0, "delta": 1e-4, "sampling_rate": 1.0, "clipping_norm": 1.0,
             "groups": {"Male=1": {"accuracy": a, "tpr": 0.5}}} for s, a in ((0, 0.8), (1, 0.82), (2, 0.84))]
    [entry] = dp_sweep.summarise(rows, ["8"])
    assert entry["seeds"] == 3 and entry["accuracy"][0] == pytest.approx(0.82)
    assert entry["groups"]["Male=1"]["tpr"] == (pytest.approx(0.5), pytest.approx(0.0))
