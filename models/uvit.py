"""Pixel-space U-ViT of "simple diffusion" (Hoogeboom, Heek, Salimans 2023) and SiD2's residual variant.

Layout: optional patching (downsample early), stages of ResNet blocks (or transformer blocks at 32x32, as in
UViT-small) each followed by a 2x2 average pool down to 16x16, a transformer stack at the lowest resolution, and a
mirrored up path. `skip="block"` concatenates every down block's output into the matching up block (the U-Net of
simple diffusion; transformer stages project the concatenation back with a linear layer, as Bao et al. do);
`skip="stage"` adds one residual skip per stage instead (SiD2), which keeps far fewer activations
alive. Dropout is used only at resolutions up to `dropout_resolution` ("dropout, but not on the highest resolution
feature maps").

Conditioning: a sinusoidal embedding of logsnr through an MLP, plus a learned class embedding with a null class;
ResNet blocks take it as a scale and shift, transformer blocks as adaptive LayerNorm with gates. The embedding
width (1280) is not published; it is the one width that gives both published UViT sizes (README, "Networks").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import (
    LOGSNR_EMBED_SCALE,
    ClassLabels,
    GroupNorm,
    ResnetBlock,
    TransformerBlock,
    check_input,
    conv_flops,
    linear_flops,
    resnet_block_flops,
    run_block,
    sinusoidal_embedding,
    transformer_block_flops,
    zero_init,
)


Stage = Literal["resnet", "transformer"]


@dataclass
class UViTConfig:
    resolution: int = 64
    in_channels: int = 3
    patch_size: int = 1
    channels: tuple[int, ...] = (256, 512)  # width of each stage above the transformer, highest resolution first
    blocks: tuple[int, ...] = (3, 3)  # blocks per stage on the down path; the up path mirrors it
    stages: tuple[Stage, ...] = ("resnet", "transformer")
    transformer_channels: int = 1024
    transformer_depth: int = 16
    head_channels: int = 64
    mlp_ratio: float = 4.0
    emb_channels: int = 1280
    dropout: float = 0.2
    dropout_resolution: int = 32
    skip: Literal["block", "stage"] = "block"
    norm_groups: int = 32
    num_classes: int = 1000
    label_dropout: float = 0.1
    prediction: Literal["eps", "v", "x", "F"] = "v"
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if not self.channels or not len(self.channels) == len(self.blocks) == len(self.stages):
            raise ValueError(
                f"channels {self.channels}, blocks {self.blocks} and stages {self.stages} must be non-empty and of "
                f"equal length"
            )
        grid = self.resolution // self.patch_size
        if self.resolution % self.patch_size or grid % 2 ** len(self.channels):
            raise ValueError(
                f"resolution {self.resolution} must be divisible by patch_size {self.patch_size} times "
                f"2^{len(self.channels)} (one 2x2 pool per stage)"
            )
        for width in (*self.channels, self.transformer_channels):
            if width % self.head_channels:
                raise ValueError(f"width {width} is not divisible by head_channels {self.head_channels}")

    @property
    def stage_resolutions(self) -> list[int]:
        grid = self.resolution // self.patch_size
        return [grid // 2**i for i in range(len(self.channels))]

    @property
    def transformer_resolution(self) -> int:
        return self.resolution // self.patch_size // 2 ** len(self.channels)


def position_embedding(width: int, tokens: int) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(1, tokens, width), std=0.02))


class ImageTransformerBlock(nn.Module):
    """A transformer block applied to the pixels of a (B, C, H, W) map as tokens.

    Linear projections change the width on the way in (the first block of a stage, or a concatenated skip) and on
    the way out (the last block of an up stage), so the block itself always runs at the stage width.
    """

    def __init__(self, in_ch: int, width: int, out_ch: int, c: UViTConfig, dropout: float):
        super().__init__()
        self.proj_in = nn.Linear(in_ch, width) if in_ch != width else nn.Identity()
        self.block = TransformerBlock(width, width // c.head_channels, c.mlp_ratio, dropout, cond_dim=c.emb_channels)
        self.proj_out = nn.Linear(width, out_ch) if out_ch != width else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        b, _, h, w = x.shape
        tokens = self.proj_out(self.block(self.proj_in(x.flatten(2).transpose(1, 2)), emb))
        return tokens.transpose(1, 2).reshape(b, -1, h, w)


class UViT(nn.Module):
    def __init__(self, config: UViTConfig):
        super().__init__()
        self.config = c = config
        self.prediction = c.prediction
        self.labels = ClassLabels(c.num_classes, c.label_dropout)
        e = c.emb_channels
        self.logsnr_mlp = nn.Sequential(nn.Linear(c.channels[0], e), nn.SiLU(), nn.Linear(e, e))
        self.class_emb = nn.Embedding(c.num_classes + 1, e)

        def block(stage: int, in_ch: int, out_ch: int) -> nn.Module:
            res, width = c.stage_resolutions[stage], c.channels[stage]
            dropout = c.dropout if res <= c.dropout_resolution else 0.0
            if c.stages[stage] == "resnet":
                return ResnetBlock(in_ch, out_ch, e, dropout, c.norm_groups, film=True)
            return ImageTransformerBlock(in_ch, width, out_ch, c, dropout)

        self.conv_in = nn.Conv2d(c.in_channels * c.patch_size**2, c.channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        # Attention is blind to position, and far from the borders zero padding cannot tell pixels apart either:
        # every attention level gets a learned position embedding where its tokens first appear.
        self.stage_pos = nn.ParameterDict()
        prev = c.channels[0]
        for s, (ch, n) in enumerate(zip(c.channels, c.blocks)):
            if c.stages[s] == "transformer":
                self.stage_pos[str(s)] = position_embedding(prev, c.stage_resolutions[s] ** 2)
            self.down.append(nn.ModuleList(block(s, prev if k == 0 else ch, ch) for k in range(n)))
            prev = ch
        d = c.transformer_channels
        mid_dropout = c.dropout if c.transformer_resolution <= c.dropout_resolution else 0.0
        self.mid_in = nn.Linear(prev, d)
        self.mid_pos = position_embedding(d, c.transformer_resolution**2)
        self.mid = nn.ModuleList(
            TransformerBlock(d, d // c.head_channels, c.mlp_ratio, mid_dropout, cond_dim=e)
            for _ in range(c.transformer_depth)
        )
        self.mid_out = nn.Linear(d, prev)
        # Mirror of the down path: the last block of a stage maps to the next (higher resolution) stage's width.
        self.up = nn.ModuleList()
        for s in reversed(range(len(c.channels))):
            ch, n, out = c.channels[s], c.blocks[s], c.channels[max(s - 1, 0)]
            extra = ch if c.skip == "block" else 0
            self.up.append(nn.ModuleList(block(s, ch + extra, out if k == n - 1 else ch) for k in range(n)))
        self.norm_out = GroupNorm(min(c.norm_groups, c.channels[0]), c.channels[0])
        self.conv_out = zero_init(nn.Conv2d(c.channels[0], c.in_channels * c.patch_size**2, 3, padding=1))

    def embed(self, logsnr: Tensor, cond: Tensor) -> Tensor:
        t = sinusoidal_embedding(logsnr * LOGSNR_EMBED_SCALE, self.config.channels[0]).to(self.conv_in.weight.dtype)
        return F.silu(self.logsnr_mlp(t) + self.class_emb(cond))

    def forward(self, z: Tensor, logsnr: Tensor, cond: Tensor) -> Tensor:
        c = self.config
        check_input(z, logsnr, (c.in_channels, c.resolution, c.resolution), "UViT")
        cond = self.labels(cond, z.shape[0])
        emb = self.embed(logsnr, cond)
        ckpt = c.checkpointing and self.training
        h = self.conv_in(F.pixel_unshuffle(z, c.patch_size))
        skips: list[Tensor] = []
        for s, stage in enumerate(self.down):
            if str(s) in self.stage_pos:
                h = h + self.stage_pos[str(s)].transpose(1, 2).reshape(1, *h.shape[1:])
            for block in stage:
                h = run_block(block, ckpt, h, emb)
                if c.skip == "block":
                    skips.append(h)
            if c.skip == "stage":
                skips.append(h)
            h = F.avg_pool2d(h, 2)
        b, ch, hh, ww = h.shape
        tokens = self.mid_in(h.flatten(2).transpose(1, 2)) + self.mid_pos
        for block in self.mid:
            tokens = run_block(block, ckpt, tokens, emb)
        h = self.mid_out(tokens).transpose(1, 2).reshape(b, ch, hh, ww)
        for stage in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            if c.skip == "stage":
                h = h + skips.pop()
            for block in stage:
                if c.skip == "block":
                    h = torch.cat([h, skips.pop()], dim=1)
                h = run_block(block, ckpt, h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, c.patch_size)


def _block_flops(c: UViTConfig, batch: int, stage: int, in_ch: int, out_ch: int) -> int:
    pixels, width, e = c.stage_resolutions[stage] ** 2, c.channels[stage], c.emb_channels
    if c.stages[stage] == "resnet":
        return resnet_block_flops(batch, pixels, in_ch, out_ch, e, film=True)
    flops = transformer_block_flops(batch, pixels, width, c.mlp_ratio, e)
    flops += linear_flops(batch * pixels, in_ch, width) if in_ch != width else 0
    return flops + (linear_flops(batch * pixels, width, out_ch) if out_ch != width else 0)


def flops_per_forward(c: UViTConfig, batch: int = 1) -> int:
    """Multiply-adds x 2 of every convolution, linear layer and attention product (norms and pointwise ops excluded)."""
    e, grid, patch_ch = c.emb_channels, c.resolution // c.patch_size, c.in_channels * c.patch_size**2
    flops = linear_flops(batch, c.channels[0], e) + linear_flops(batch, e, e)
    flops += 2 * conv_flops(batch * grid**2, patch_ch, c.channels[0], 3)  # conv_in and conv_out
    prev = c.channels[0]
    for s, (ch, n) in enumerate(zip(c.channels, c.blocks)):
        flops += sum(_block_flops(c, batch, s, prev if k == 0 else ch, ch) for k in range(n))
        prev = ch
    tokens, d = c.transformer_resolution**2, c.transformer_channels
    flops += 2 * linear_flops(batch * tokens, prev, d)
    flops += c.transformer_depth * transformer_block_flops(batch, tokens, d, c.mlp_ratio, e)
    for s in reversed(range(len(c.channels))):
        ch, n, out = c.channels[s], c.blocks[s], c.channels[max(s - 1, 0)]
        extra = ch if c.skip == "block" else 0
        flops += sum(_block_flops(c, batch, s, ch + extra, out if k == n - 1 else ch) for k in range(n))
    return flops
