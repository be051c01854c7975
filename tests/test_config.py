from dataclasses import dataclass, field
from typing import Literal

import pytest

from models.objective import ObjectiveConfig
from trainer import config


@dataclass
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Outer:
    name: Literal["a", "b"] = "a"
    steps: int = 10
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: b\ninner:\n  lr: 0.001\n")
    cfg = config.load(Outer, path, ["steps=20", "inner.betas=[0.8, 0.9]"])
    assert cfg == Outer(name="b", steps=20, inner=Inner(lr=0.001, betas=(0.8, 0.9)))
    assert config.from_dict(Outer, config.to_dict(cfg)) == cfg


def test_floats_with_an_exponent_and_no_dot_are_numbers_in_files_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("inner:\n  lr: 2e-4\n  betas: [9e-1, 1.5E+0]\n")
    assert config.load(Outer, path).inner == Inner(lr=2e-4, betas=(0.9, 1.5))
    assert config.load(Outer, path, ["inner.lr=1e-4"]).inner.lr == 1e-4
    assert config.load(Outer, path, ["inner.lr=-3E-5"]).inner.lr == -3e-5
    # integers, dotted floats and other strings read as before
    assert config.read_yaml("[10, 1.0e-4, 0x1f, 1e, e5, 1_000, .5]") == [10, 1e-4, 31, "1e", "e5", 1000, 0.5]
    with pytest.raises(config.ConfigError, match="inner.lr: expected a number, found '1e'"):
        config.load(Outer, path, ["inner.lr=1e"])


def test_unknown_key_names_the_key_and_the_closest_valid_one():
    with pytest.raises(config.ConfigError, match=r"unknown key 'inner.lrr'; did you mean 'lr'"):
        config.from_dict(Outer, {"inner": {"lrr": 1.0}})


def test_bad_values_name_the_key_and_allowed_values():
    with pytest.raises(config.ConfigError, match=r"name: 'c' is not allowed; allowed values: 'a', 'b'"):
        config.from_dict(Outer, {"name": "c"})
    with pytest.raises(config.ConfigError, match=r"steps: expected an integer"):
        config.load(Outer, None, ["steps=ten"])
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(Outer, "/nonexistent.yaml")


def test_objective_config_from_yaml_validates_weighting_monotonicity():
    with pytest.raises(config.ConfigError, match="'iddpm' is not monotone"):
        config.from_dict(ObjectiveConfig, {"weighting": {"name": "iddpm"}})
    with pytest.raises(config.ConfigError, match="weighting.name"):
        config.from_dict(ObjectiveConfig, {"weighting": {"name": "p2"}})
    cfg = config.from_dict(ObjectiveConfig, {"schedule": {"name": "shifted_cosine", "resolution": 128},
                                              "weighting": {"name": "sigmoid", "bias": -1.0}})
    assert cfg.schedule.resolution == 128 and cfg.weighting.bias == -1.0


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parent.parent.glob("configs/objectives/*.yaml")))
def test_objective_presets_load(path):
    from models import objective, schedules, weighting as W
    cfg = config.load(ObjectiveConfig, path)
    sampler = objective.build_sampler(cfg)
    assert hasattr(sampler, "sample")
    assert W.is_monotone(W.build(cfg.weighting), cfg.schedule.logsnr_min, cfg.schedule.logsnr_max)
    schedules.build(cfg.schedule)
