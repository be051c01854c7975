"""VDM score U-Net (Kingma et al. 2021) and the DiffEnc encoder network y_phi.

The score U-Net never resamples: n_layer ResNet blocks at full resolution, Res-Attn-Res in the middle, n_layer + 1
up blocks fed by skip concatenations. Its input is z plus Fourier features of z, so the network can resolve the
fine bit-level structure that matters for likelihood; its output is added to z (the "base measure"), so at
initialisation (zero output convolution) it predicts eps_hat = z.

Careful with bf16: run it under autocast with z in fp32. The Fourier features resolve details of z (2^-7) that a
bf16 z has already rounded away, so a bf16 input changes the output by tens of percent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import (
    ClassLabels,
    GroupNorm,
    ResnetBlock,
    attention_flops,
    check_input,
    conv_flops,
    linear_flops,
    resnet_block_flops,
    run_block,
    sinusoidal_embedding,
    zero_init,
)


class GammaEmbedding(nn.Module):
    """Sinusoidal(1000 t_in) -> Dense(4n) swish -> Dense(4n) swish, t_in = (gamma - g_min) / (g_max - g_min).

    gamma = -logsnr; the fixed config bounds are used even when the schedule is learned.
    """

    def __init__(self, n_embd: int, gamma_min: float, gamma_max: float):
        super().__init__()
        self.n_embd, self.gamma_min, self.gamma_max = n_embd, gamma_min, gamma_max
        self.dense1 = nn.Linear(n_embd, 4 * n_embd)
        self.dense2 = nn.Linear(4 * n_embd, 4 * n_embd)

    def forward(self, logsnr: Tensor, extra: Tensor | None = None) -> Tensor:
        t_in = (-logsnr.float() - self.gamma_min) / (self.gamma_max - self.gamma_min)
        t_emb = sinusoidal_embedding(1000.0 * t_in, self.n_embd).to(self.dense1.weight.dtype)
        h = self.dense2(F.silu(self.dense1(t_emb)))
        return F.silu(h if extra is None else h + extra)


def fourier_features(z: Tensor, first: int = 6, last: int = 7) -> Tensor:
    """[sin(w z), cos(w z)] for w = 2^n 2 pi, n = first..last, per channel (VDM Base2FourierFeatures(6, 8, 1))."""
    w = 2.0 ** torch.arange(first, last + 1, device=z.device, dtype=torch.float32) * 2 * math.pi
    h = (z.float()[:, :, None] * w[None, None, :, None, None]).flatten(1, 2)
    return torch.cat([torch.sin(h), torch.cos(h)], dim=1).to(z.dtype)


class SpatialAttention(nn.Module):
    """Single-head self-attention over all H*W positions: GN, q/k/v Dense, softmax(q k^T / sqrt(C)) v, Dense(zero)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(min(groups, channels), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens)[:, None].chunk(3, dim=-1)
        out = self.proj(F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


@dataclass
class ScoreUNetConfig:
    resolution: int = 32
    in_channels: int = 3
    n_embd: int = 128
    n_layer: int = 32
    dropout: float = 0.1
    with_attention: bool = False
    norm_groups: int = 32
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    num_classes: int = 0  # 0: unconditional, every label is the null class 0
    label_dropout: float = 0.0
    prediction: Literal["eps", "v", "x", "F"] = "eps"
    checkpointing: bool = False


class ScoreUNet(nn.Module):
    def __init__(self, config: ScoreUNetConfig):
        super().__init__()
        self.config = c = config
        self.prediction = c.prediction
        self.labels = ClassLabels(c.num_classes, c.label_dropout)
        n, e = c.n_embd, 4 * c.n_embd
        self.embedding = GammaEmbedding(n, c.gamma_min, c.gamma_max)
        self.class_emb = nn.Embedding(c.num_classes + 1, e) if c.num_classes else None

        def resblock(in_ch: int) -> ResnetBlock:
            return ResnetBlock(in_ch, n, e, c.dropout, c.norm_groups, film=False)

        def attn() -> nn.Module:
            return SpatialAttention(n, c.norm_groups) if c.with_attention else nn.Identity()

        self.conv_in = nn.Conv2d(c.in_channels * 5, n, 3, padding=1)  # z, then sin and cos at 2 frequencies
        self.down = nn.ModuleList(resblock(n) for _ in range(c.n_layer))
        self.down_attn = nn.ModuleList(attn() for _ in range(c.n_layer))
        self.mid1, self.mid_attn, self.mid2 = resblock(n), SpatialAttention(n, c.norm_groups), resblock(n)
        self.up = nn.ModuleList(resblock(2 * n) for _ in range(c.n_layer + 1))
        self.up_attn = nn.ModuleList(attn() for _ in range(c.n_layer + 1))
        self.norm_out = GroupNorm(min(c.norm_groups, n), n)
        self.conv_out = zero_init(nn.Conv2d(n, c.in_channels, 3, padding=1))

    def forward(self, z: Tensor, logsnr: Tensor, cond: Tensor) -> Tensor:
        c = self.config
        check_input(z, logsnr, (c.in_channels, c.resolution, c.resolution), "ScoreUNet")
        cond = self.labels(cond, z.shape[0])
        emb = self.embedding(logsnr, None if self.class_emb is None else self.class_emb(cond))
        ckpt = c.checkpointing and self.training
        h = self.conv_in(torch.cat([z, fourier_features(z)], dim=1))
        hs = [h]
        for block, attn in zip(self.down, self.down_attn):
            h = attn(run_block(block, ckpt, h, emb))
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block, attn in zip(self.up, self.up_attn):
            h = attn(run_block(block, ckpt, torch.cat([h, hs.pop()], dim=1), emb))
        return self.conv_out(F.silu(self.norm_out(h))) + z  # base measure: eps_hat = z at initialisation


def _attention_block_flops(batch: int, pixels: int, channels: int) -> int:
    return linear_flops(batch * pixels, channels, 4 * channels) + attention_flops(batch, pixels, channels)


def flops_per_forward(c: ScoreUNetConfig, batch: int = 1) -> int:
    """Multiply-adds x 2 of every convolution, linear layer and attention product (norms and pointwise ops excluded)."""
    n, e, pixels = c.n_embd, 4 * c.n_embd, c.resolution**2
    flops = linear_flops(batch, n, e) + linear_flops(batch, e, e)
    flops += conv_flops(batch * pixels, 5 * c.in_channels, n, 3) + conv_flops(batch * pixels, n, c.in_channels, 3)
    flops += c.n_layer * resnet_block_flops(batch, pixels, n, n, e, film=False)
    flops += 2 * resnet_block_flops(batch, pixels, n, n, e, film=False) + _attention_block_flops(batch, pixels, n)
    flops += (c.n_layer + 1) * resnet_block_flops(batch, pixels, 2 * n, n, e, film=False)
    if c.with_attention:
        flops += (2 * c.n_layer + 1) * _attention_block_flops(batch, pixels, n)
    return flops


@dataclass
class DiffEncEncoderConfig:
    resolution: int = 32
    in_channels: int = 3
    n_embd: int = 64
    levels: int = 2  # each level ends with a 2x2 max pool; channels double per level
    blocks_per_level: int = 2
    dropout: float = 0.1
    norm_groups: int = 16
    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def __post_init__(self) -> None:
        if self.resolution % 2**self.levels:
            raise ValueError(f"resolution {self.resolution} must be divisible by 2^levels = {2 ** self.levels}")


class DiffEncEncoder(nn.Module):
    """y_phi(x, lambda) of DiffEnc: one U-Net shared across depths, zero-initialised output, then tanh.

    The mean function x_phi = alpha^2 x + sigma^2 y_phi belongs to the objective; at initialisation
    y_phi = 0, so x_phi starts as the non-trainable encoder alpha^2 x.
    """

    def __init__(self, config: DiffEncEncoderConfig):
        super().__init__()
        self.config = c = config
        n, e, g = c.n_embd, 4 * c.n_embd, c.norm_groups
        self.embedding = GammaEmbedding(n, c.gamma_min, c.gamma_max)
        widths = [n * 2**i for i in range(c.levels)]

        def stage(in_ch: int, out_ch: int) -> nn.ModuleList:
            return nn.ModuleList(
                ResnetBlock(in_ch if k == 0 else out_ch, out_ch, e, c.dropout, g, film=False)
                for k in range(c.blocks_per_level)
            )

        self.conv_in = nn.Conv2d(c.in_channels, n, 3, padding=1)
        self.down = nn.ModuleList(stage(widths[max(i - 1, 0)], w) for i, w in enumerate(widths))
        top = widths[-1]
        self.mid1 = ResnetBlock(top, top, e, c.dropout, g, film=False)
        self.mid_attn = SpatialAttention(top, g)
        self.mid2 = ResnetBlock(top, top, e, c.dropout, g, film=False)
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        prev = top
        for w in reversed(widths):
            self.upsample.append(nn.ConvTranspose2d(prev, w, 2, stride=2))
            self.up.append(stage(2 * w, w))
            prev = w
        self.norm_out = GroupNorm(min(g, n), n)
        self.conv_out = zero_init(nn.Conv2d(n, c.in_channels, 3, padding=1))

    def forward(self, x: Tensor, logsnr: Tensor) -> Tensor:
        c = self.config
        check_input(x, logsnr, (c.in_channels, c.resolution, c.resolution), "DiffEncEncoder")
        emb = self.embedding(logsnr)
        h = self.conv_in(x)
        skips = []
        for stage in self.down:
            for block in stage:
                h = block(h, emb)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for upsample, stage in zip(self.upsample, self.up):
            h = torch.cat([upsample(h), skips.pop()], dim=1)
            for block in stage:
                h = block(h, emb)
        return torch.tanh(self.conv_out(F.silu(self.norm_out(h))))


def encoder_flops_per_forward(c: DiffEncEncoderConfig, batch: int = 1) -> int:
    """Multiply-adds x 2 of every convolution, linear layer and attention product (norms and pointwise ops excluded)."""
    n, e = c.n_embd, 4 * c.n_embd
    widths = [n * 2**i for i in range(c.levels)]
    flops = linear_flops(batch, n, e) + linear_flops(batch, e, e)
    pixels = c.resolution**2
    flops += conv_flops(batch * pixels, c.in_channels, n, 3) + conv_flops(batch * pixels, n, c.in_channels, 3)
    for i, w in enumerate(widths):
        pixels = (c.resolution // 2**i) ** 2
        for k in range(c.blocks_per_level):
            flops += resnet_block_flops(batch, pixels, widths[max(i - 1, 0)] if k == 0 else w, w, e, film=False)
            flops += resnet_block_flops(batch, pixels, 2 * w if k == 0 else w, w, e, film=False)
        prev = widths[min(i + 1, c.levels - 1)]
        flops += conv_flops(batch * pixels, prev, w, 1)  # 2x2 stride-2 transposed conv: one tap per output pixel
    mid_pixels = (c.resolution // 2**c.levels) ** 2
    flops += 2 * resnet_block_flops(batch, mid_pixels, widths[-1], widths[-1], e, film=False)
    return flops + _attention_block_flops(batch, mid_pixels, widths[-1])
