"""Named network presets, like DiT's `DiT_XL_2`: `build_network("uvit_small_64", num_classes=10)`.

Each preset is a config of one network family; keyword overrides replace config fields (an unknown field is an
error naming the valid ones). Sizes and their references are tabulated in README.md, section "Networks".
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

from torch import nn

from models import unet_vdm, uvit, uvit_latent
from models.unet_vdm import DiffEncEncoder, DiffEncEncoderConfig, ScoreUNet, ScoreUNetConfig
from models.uvit import UViT, UViTConfig
from models.uvit_latent import UViTLatent, UViTLatentConfig

NetworkConfig = UViTConfig | UViTLatentConfig | ScoreUNetConfig | DiffEncEncoderConfig

FAMILIES: dict[type, Callable[..., nn.Module]] = {
    UViTConfig: UViT,
    UViTLatentConfig: UViTLatent,
    ScoreUNetConfig: ScoreUNet,
    DiffEncEncoderConfig: DiffEncEncoder,
}

FLOPS: dict[type, Callable[..., int]] = {
    UViTConfig: uvit.flops_per_forward,
    UViTLatentConfig: uvit_latent.flops_per_forward,
    ScoreUNetConfig: unet_vdm.flops_per_forward,
    DiffEncEncoderConfig: unet_vdm.encoder_flops_per_forward,
}

PRESETS: dict[str, NetworkConfig] = {
    # simple diffusion / Multistep-CT App. A: UViT-small at 64x64, ~394M; "large" doubles the widths.
    "uvit_small_64": UViTConfig(),
    "uvit_large_64": UViTConfig(channels=(512, 1024), transformer_channels=2048),
    # 128 adds a stage of 3 ResNet blocks at 128 channels; 256 and 512 downsample early by patching.
    "uvit_128": UViTConfig(resolution=128, channels=(128, 256, 512), blocks=(3, 3, 3),
                           stages=("resnet", "resnet", "transformer")),
    "uvit_256": UViTConfig(resolution=256, patch_size=2, channels=(128, 256, 512), blocks=(3, 3, 3),
                           stages=("resnet", "resnet", "transformer")),
    "uvit_512": UViTConfig(resolution=512, patch_size=4, channels=(128, 256, 512), blocks=(3, 3, 3),
                           stages=("resnet", "resnet", "transformer")),
    # SiD2: one residual skip per stage, 2x2 patches at 512, more compute at high resolution.
    "uvit_residual_512": UViTConfig(resolution=512, patch_size=2, channels=(128, 256, 256, 512),
                                    blocks=(2, 2, 3, 3), stages=("resnet", "resnet", "resnet", "transformer"),
                                    skip="stage"),
    # Bao et al. Table: U-ViT-S (13 blocks, 512 wide), M (17, 768), L (21, 1024), H (29, 1152); patch 2 on f8 latents.
    "uvit_latent_s2_256": UViTLatentConfig(resolution=32, width=512, depth=13, num_heads=8),
    "uvit_latent_m2_256": UViTLatentConfig(resolution=32, width=768, depth=17, num_heads=12),
    "uvit_latent_l2_256": UViTLatentConfig(resolution=32, width=1024, depth=21, num_heads=16),
    "uvit_latent_h2_256": UViTLatentConfig(resolution=32, width=1152, depth=29, num_heads=16),
    "uvit_latent_h2_512": UViTLatentConfig(resolution=64, width=1152, depth=29, num_heads=16),
    # Bao et al.'s own 512 model: 4x4 patches on 64x64 latents, the same token count as H/2 at 256.
    "uvit_latent_h4_512": UViTLatentConfig(resolution=64, patch_size=4, width=1152, depth=29, num_heads=16),
    # VDM cifar10 config and DiffEnc's CIFAR encoder y_phi.
    "vdm_cifar10": ScoreUNetConfig(),
    "diffenc_encoder_cifar10": DiffEncEncoderConfig(),
    # Tiny networks of each family that train on a laptop CPU in seconds (tests, benchmarks, demo).
    "uvit_tiny": UViTConfig(resolution=16, channels=(32, 64), blocks=(1, 1), transformer_channels=64,
                            transformer_depth=2, head_channels=32, emb_channels=64, dropout=0.0, norm_groups=8,
                            num_classes=10),
    "uvit_residual_tiny": UViTConfig(resolution=16, channels=(32, 64), blocks=(1, 1), transformer_channels=64,
                                     transformer_depth=2, head_channels=32, emb_channels=64, dropout=0.0,
                                     norm_groups=8, num_classes=10, skip="stage"),
    "uvit_latent_tiny": UViTLatentConfig(resolution=8, width=64, depth=5, num_heads=2, num_classes=10),
    "vdm_tiny": ScoreUNetConfig(resolution=16, n_embd=32, n_layer=2, dropout=0.0, norm_groups=8),
    "diffenc_encoder_tiny": DiffEncEncoderConfig(resolution=16, n_embd=16, blocks_per_level=1, dropout=0.0,
                                                 norm_groups=8),
}


def preset_config(name: str, **overrides) -> NetworkConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown network preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    config = PRESETS[name]
    valid = [f.name for f in dataclasses.fields(config)]
    for key in overrides:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"preset {name!r} has no field {key!r}{hint} (fields: {', '.join(valid)})")
    return dataclasses.replace(config, **overrides)


def build(config: NetworkConfig) -> nn.Module:
    return FAMILIES[type(config)](config)


def build_network(name: str, **overrides) -> nn.Module:
    return build(preset_config(name, **overrides))


def flops_per_forward(config: NetworkConfig, batch: int = 1) -> int:
    """Analytic forward FLOPs (2 per multiply-add) of any network family."""
    return FLOPS[type(config)](config, batch)
