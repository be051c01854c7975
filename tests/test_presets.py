from pathlib import Path

import pytest
import torch

from models.prediction import PREDICTIONS
from models.presets import PRESETS, build_network, flops_per_forward
from models.samplers import guided
from models.unet_vdm import DiffEncEncoder
from models.uvit import UViTConfig
from models.objective import ObjectiveConfig
from trainer.config import ConfigError, dump, from_dict, load, to_dict
from trainer.experiment import ExperimentConfig

NETWORKS = [name for name, c in PRESETS.items() if not name.startswith("diffenc_encoder")]


def test_flops_dispatch_covers_every_preset():
    for name, config in PRESETS.items():
        assert flops_per_forward(config, batch=2) == 2 * flops_per_forward(config, batch=1) > 0, name


def test_unknown_preset_error_lists_every_preset():
    with pytest.raises(ValueError) as info:
        build_network("uvit_huge")
    for name in PRESETS:
        assert name in str(info.value)


def test_unknown_override_names_the_nearest_field():
    with pytest.raises(ValueError, match="did you mean 'label_dropout'"):
        build_network("uvit_tiny", label_droput=0.2)


def test_overrides_replace_fields_without_touching_the_registry():
    net = build_network("uvit_tiny", prediction="eps", num_classes=3)
    assert net.prediction == "eps" and net.class_emb.num_embeddings == 4
    assert PRESETS["uvit_tiny"].prediction == "v" and PRESETS["uvit_tiny"].num_classes == 10


@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_preset_declares_a_prediction_and_keeps_the_shape_on_meta(name):
    with torch.device("meta"):
        net = build_network(name)
        c = net.config
        z = torch.empty(2, c.in_channels, c.resolution, c.resolution)
        out = net(z, torch.empty(2), torch.full((2,), c.num_classes, dtype=torch.long))
    assert net.prediction in PREDICTIONS and out.shape == z.shape


def test_encoder_presets_build_on_meta():
    with torch.device("meta"):
        for name in ("diffenc_encoder_cifar10", "diffenc_encoder_tiny"):
            encoder = build_network(name)
            assert isinstance(encoder, DiffEncEncoder)
            x = torch.empty(1, 3, encoder.config.resolution, encoder.config.resolution)
            assert encoder(x, torch.empty(1)).shape == x.shape


@pytest.mark.parametrize("name", ["uvit_tiny", "uvit_latent_tiny"])
def test_guidance_one_is_conditional_zero_is_unconditional(name):
    torch.manual_seed(0)
    net = build_network(name, label_dropout=0.0).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    c = net.config
    z, logsnr, cond = torch.randn(3, c.in_channels, c.resolution, c.resolution), torch.randn(3), torch.tensor([1, 4, 7])
    null = torch.full_like(cond, c.num_classes)
    with torch.no_grad():
        conditional, unconditional = net(z, logsnr, cond), net(z, logsnr, null)
        assert (conditional - unconditional).abs().max() > 1e-4  # the class changes the output at all
        torch.testing.assert_close(guided(net, 1.0, c.num_classes)(z, logsnr, cond), conditional)
        torch.testing.assert_close(guided(net, 0.0, c.num_classes)(z, logsnr, cond), unconditional,
                                   rtol=1e-5, atol=1e-5)
        expected = unconditional + 3.0 * (conditional - unconditional)
        torch.testing.assert_close(guided(net, 3.0, c.num_classes)(z, logsnr, cond), expected,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["uvit_tiny", "uvit_residual_tiny", "uvit_latent_tiny", "vdm_tiny"])
def test_bf16_autocast_stays_within_3_percent_of_fp32(name):
    torch.manual_seed(0)
    net = build_network(name).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    c = net.config
    z, logsnr = torch.randn(2, c.in_channels, c.resolution, c.resolution), torch.tensor([-8.0, 8.0])
    cond = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        reference = net(z, logsnr, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(z, logsnr, cond)
    assert torch.isfinite(out).all()
    assert (out.float() - reference).norm() / reference.norm() < 0.03


def test_network_configs_load_strictly_from_yaml_mappings():
    config = from_dict(UViTConfig, {"resolution": 32, "channels": [64, 128], "skip": "stage", "prediction": "eps"})
    assert config.channels == (64, 128) and config.skip == "stage"
    assert from_dict(type(PRESETS["uvit_tiny"]), to_dict(PRESETS["uvit_tiny"])) == PRESETS["uvit_tiny"]
    with pytest.raises(ConfigError, match="'block', 'stage'"):
        from_dict(UViTConfig, {"skip": "dense"})
    with pytest.raises(ConfigError, match="'eps', 'v', 'x', 'F'"):
        from_dict(UViTConfig, {"prediction": "score"})
    with pytest.raises(ConfigError, match="stages"):
        from_dict(UViTConfig, {"stages": ["resnet", "conv"]})
    for name, preset in PRESETS.items():
        assert from_dict(type(preset), to_dict(preset)) == preset, name


# the ImageNet presets and the global batch each is written for (its comment says which GPU count gives it)
RUN_PRESETS = {"imagenet64_uvit_small": 32, "imagenet128_uvit": 64, "imagenet256_uvit_h2_latent": 8,
               "imagenet512_uvit_h4_latent": 8, "vdm_imagenet32": 8}
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", list(RUN_PRESETS))
def test_each_imagenet_preset_loads_strictly_and_its_intervals_fit_its_global_batch(name, tmp_path):
    cfg = load(ExperimentConfig, CONFIGS / f"{name}.yaml", ["data.index=/data/train"])
    assert cfg.run == name
    cfg.check_intervals(cfg.global_batch(RUN_PRESETS[name]))
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert f"= {cfg.global_batch(RUN_PRESETS[name])}" in text  # the comment states the global batch it sets
    with torch.device("meta"):
        net = cfg.network.build()
    assert net.config == cfg.network.build_config()
    # what the config file and its fragment say, resolved: written to config.yaml, it loads back unchanged
    (tmp_path / "config.yaml").write_text(dump(cfg))
    assert load(ExperimentConfig, tmp_path / "config.yaml") == cfg


def test_presets_take_their_objective_from_the_fragment_and_change_only_what_they_name():
    fragment = load(ObjectiveConfig, CONFIGS / "objectives" / "edm_monotonic_imagenet128.yaml")
    assert load(ExperimentConfig, CONFIGS / "imagenet128_uvit.yaml").objective == fragment
    at64 = load(ExperimentConfig, CONFIGS / "imagenet64_uvit_small.yaml").objective
    assert (at64.schedule.resolution, at64.weighting.resolution, at64.importance) == (64, 64, "adaptive")
    assert (at64.schedule.name, at64.schedule.logsnr_min, at64.weighting.name, at64.time_sampler) == \
           (fragment.schedule.name, fragment.schedule.logsnr_min, fragment.weighting.name, fragment.time_sampler)


def test_includes_that_are_missing_circular_or_not_a_name_are_one_line_naming_the_key(tmp_path):
    (tmp_path / "a.yaml").write_text("objective: {include: missing.yaml}\n")
    (tmp_path / "b.yaml").write_text("include: c.yaml\n")
    (tmp_path / "c.yaml").write_text("include: b.yaml\n")
    (tmp_path / "d.yaml").write_text("objective: {include: [x]}\n")
    for name, message in (("a", "a.yaml: objective.include: config file not found: .*missing.yaml"),
                          ("b", "b.yaml includes itself"), ("d", "d.yaml: objective.include must be a file name")):
        with pytest.raises(ConfigError, match=message) as e:
            load(ExperimentConfig, tmp_path / f"{name}.yaml")
        assert "\n" not in str(e.value)
