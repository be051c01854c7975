"""Latent U-ViT of Bao et al. 2022/2023, "All are Worth Words: A ViT Backbone for Diffusion Models".

Everything is a token: the logsnr embedding, the class embedding and the patches of the latent. The (odd) depth
counts every block: (depth - 1) / 2 "in" blocks, one middle block and (depth - 1) / 2 "out" blocks; each out block
first mixes in the output of its mirror in block through a long skip, Linear(concat(h, skip)). After the last
norm the tokens are projected to patches and a 3x3 convolution smooths the seams between patches.
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
    LayerNorm,
    TransformerBlock,
    check_input,
    conv_flops,
    linear_flops,
    run_block,
    sinusoidal_embedding,
    transformer_block_flops,
)


@dataclass
class UViTLatentConfig:
    resolution: int = 32  # latent side: 32 for 256-pixel images, 64 for 512 (f = 8 autoencoder)
    in_channels: int = 4
    patch_size: int = 2
    width: int = 1152
    depth: int = 29
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    label_dropout: float = 0.1
    prediction: Literal["eps", "v", "x", "F"] = "eps"
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.resolution % self.patch_size:
            raise ValueError(f"latent resolution {self.resolution} is not divisible by patch_size {self.patch_size}")
        if self.depth % 2 != 1:
            raise ValueError(f"depth counts in, middle and out blocks and must be odd, found {self.depth}")

    @property
    def num_patches(self) -> int:
        return (self.resolution // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 2  # logsnr and class tokens first


class SkipBlock(nn.Module):
    """An out block: Linear(concat(h, skip)) back to the width, then a transformer block."""

    def __init__(self, c: UViTLatentConfig):
        super().__init__()
        self.skip = nn.Linear(2 * c.width, c.width)
        self.block = TransformerBlock(c.width, c.num_heads, c.mlp_ratio, qkv_bias=False)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(self.skip(torch.cat([x, skip], dim=-1)))


class UViTLatent(nn.Module):
    def __init__(self, config: UViTLatentConfig):
        super().__init__()
        self.config = c = config
        self.prediction = c.prediction
        self.labels = ClassLabels(c.num_classes, c.label_dropout)
        patch_dim = c.in_channels * c.patch_size**2
        self.patch_embed = nn.Conv2d(c.in_channels, c.width, c.patch_size, stride=c.patch_size)
        self.class_emb = nn.Embedding(c.num_classes + 1, c.width)
        self.pos_emb = nn.Parameter(torch.zeros(1, c.num_tokens, c.width))
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        half = c.depth // 2
        self.in_blocks = nn.ModuleList(
            TransformerBlock(c.width, c.num_heads, c.mlp_ratio, qkv_bias=False) for _ in range(half)
        )
        self.mid_block = TransformerBlock(c.width, c.num_heads, c.mlp_ratio, qkv_bias=False)
        self.out_blocks = nn.ModuleList(SkipBlock(c) for _ in range(half))
        self.norm = LayerNorm(c.width)
        self.to_patches = nn.Linear(c.width, patch_dim)
        self.conv_out = nn.Conv2d(c.in_channels, c.in_channels, 3, padding=1)

    def forward(self, z: Tensor, logsnr: Tensor, cond: Tensor) -> Tensor:
        c = self.config
        check_input(z, logsnr, (c.in_channels, c.resolution, c.resolution), "UViTLatent")
        cond = self.labels(cond, z.shape[0])
        ckpt = c.checkpointing and self.training
        patches = self.patch_embed(z).flatten(2).transpose(1, 2)
        logsnr_token = sinusoidal_embedding(logsnr * LOGSNR_EMBED_SCALE, c.width).to(patches.dtype)
        x = torch.cat([logsnr_token[:, None], self.class_emb(cond)[:, None], patches], dim=1) + self.pos_emb
        skips = []
        for block in self.in_blocks:
            x = run_block(block, ckpt, x)
            skips.append(x)
        x = run_block(self.mid_block, ckpt, x)
        for block in self.out_blocks:
            x = run_block(block, ckpt, x, skips.pop())
        x = self.to_patches(self.norm(x[:, 2:]))
        grid = c.resolution // c.patch_size
        x = x.transpose(1, 2).reshape(z.shape[0], -1, grid, grid)
        return self.conv_out(F.pixel_shuffle(x, c.patch_size))


def flops_per_forward(c: UViTLatentConfig, batch: int = 1) -> int:
    """Multiply-adds x 2 of every convolution, linear layer and attention product (norms and pointwise ops excluded)."""
    n, patch_dim = batch * c.num_tokens, c.in_channels * c.patch_size**2
    flops = linear_flops(batch * c.num_patches, patch_dim, c.width)  # patch_embed, a strided convolution
    flops += c.depth * transformer_block_flops(batch, c.num_tokens, c.width, c.mlp_ratio, None)
    flops += (c.depth // 2) * linear_flops(n, 2 * c.width, c.width)
    flops += linear_flops(batch * c.num_patches, c.width, patch_dim)
    return flops + conv_flops(batch * c.resolution**2, c.in_channels, c.in_channels, 3)
