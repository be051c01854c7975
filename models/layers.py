"""Pieces shared by the networks: embeddings of logsnr and class, attention, transformer and ResNet blocks.

Every network is called as net(z, logsnr, cond). Normalisation statistics are computed in fp32 so that bf16
activations stay stable; attention goes through scaled_dot_product_attention only, whose fused kernels keep the
softmax statistics in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# U-ViTs embed logsnr (range about [-15, 15]) on the same scale as VDM's 1000 * t in [0, 1000].
LOGSNR_EMBED_SCALE = 1000.0 / 30.0


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[sin(x f_k), cos(x f_k)] with f_k = max_period^(-k / (half - 1)), the fairseq recipe VDM uses."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / (half - 1))
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ClassLabels(nn.Module):
    """Checks class ids and applies label dropout: id `num_classes` is the null class of classifier-free guidance."""

    def __init__(self, num_classes: int, label_dropout: float):
        super().__init__()
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), found {label_dropout}")
        self.num_classes = num_classes
        self.label_dropout = label_dropout

    def forward(self, cond: Tensor, batch: int) -> Tensor:
        if cond.shape != (batch,) or cond.dtype != torch.long:
            raise ValueError(f"cond: expected a LongTensor of shape ({batch},), found {cond.dtype} {tuple(cond.shape)}")
        # The range check reads the values back (a device sync): skipped while tracing and on shape-only meta tensors.
        checkable = not torch.compiler.is_compiling() and cond.device.type != "meta" and cond.numel() > 0
        if checkable and (cond.min() < 0 or cond.max() > self.num_classes):
            raise ValueError(
                f"cond: class ids must be in [0, {self.num_classes}] ({self.num_classes} = null class), "
                f"found values in [{int(cond.min())}, {int(cond.max())}]"
            )
        if self.training and self.label_dropout > 0:
            # Important for guidance: the null class must be seen during training to be usable at sampling.
            drop = torch.rand(cond.shape, device=cond.device) < self.label_dropout
            cond = torch.where(drop, torch.full_like(cond, self.num_classes), cond)
        return cond


def check_input(z: Tensor, logsnr: Tensor, shape: tuple[int, ...], name: str) -> None:
    if z.dim() != len(shape) + 1 or tuple(z.shape[1:]) != shape:
        raise ValueError(f"{name}: expected z of shape (B, {', '.join(map(str, shape))}), found {tuple(z.shape)}")
    if logsnr.shape != z.shape[:1]:
        raise ValueError(f"{name}: expected logsnr of shape ({z.shape[0]},), found {tuple(logsnr.shape)}")


class LayerNorm(nn.LayerNorm):
    """LayerNorm with fp32 statistics whatever the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with fp32 statistics whatever the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, L, D)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.dropout(self.proj(h.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on (B, L, D) tokens.

    With `cond_dim`, the per-example embedding sets a shift, scale and gate for each branch (adaptive LayerNorm,
    zero-initialised so every block starts as the identity); without it the block is the plain ViT block of the
    latent U-ViT, where logsnr and class enter as tokens instead.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0, cond_dim: int | None = None,
                 qkv_bias: bool = True):
        super().__init__()
        adaptive = cond_dim is not None
        self.norm1 = LayerNorm(dim, elementwise_affine=not adaptive)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, dropout=dropout)
        self.norm2 = LayerNorm(dim, elementwise_affine=not adaptive)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout)
        self.modulation = zero_init(nn.Linear(cond_dim, 6 * dim)) if adaptive else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.modulation is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(emb)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class ResnetBlock(nn.Module):
    """GN-swish-conv, conditioning, GN-swish-dropout-conv(zero init), plus a (1x1) shortcut.

    `film=False` is VDM's additive conditioning (a bias-free zero-initialised Dense added after the first conv);
    `film=True` is the scale-and-shift of the second norm used by the U-ViT's convolutional stages.
    """

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, dropout: float, groups: int, film: bool):
        super().__init__()
        self.norm1 = GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = film
        self.cond = zero_init(nn.Linear(cond_dim, 2 * out_ch if film else out_ch, bias=film))
        self.norm2 = GroupNorm(min(groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        c = self.cond(emb)[:, :, None, None]
        if self.film:
            scale, shift = c.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + c)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.shortcut(x) + h


def run_block(block: nn.Module, use_checkpoint: bool, *args: Tensor | None) -> Tensor:
    """Calls a block, recomputing its activations in backward when activation checkpointing is on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """2 multiply-adds per weight per token, the convention of torch.utils.flop_counter."""
    return 2 * tokens * d_in * d_out


def conv_flops(pixels: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * pixels * c_in * c_out * kernel * kernel


def attention_flops(batch: int, tokens: int, dim: int) -> int:
    """q k^T and attention-weighted v: two (L x L x D) products per example."""
    return 4 * batch * tokens * tokens * dim


def transformer_block_flops(batch: int, tokens: int, dim: int, mlp_ratio: float, cond_dim: int | None) -> int:
    n = batch * tokens
    hidden = int(dim * mlp_ratio)
    flops = linear_flops(n, dim, 3 * dim) + attention_flops(batch, tokens, dim) + linear_flops(n, dim, dim)
    flops += linear_flops(n, dim, hidden) + linear_flops(n, hidden, dim)
    if cond_dim is not None:
        flops += linear_flops(batch, cond_dim, 6 * dim)
    return flops


def resnet_block_flops(batch: int, pixels: int, in_ch: int, out_ch: int, cond_dim: int, film: bool) -> int:
    flops = conv_flops(batch * pixels, in_ch, out_ch, 3) + conv_flops(batch * pixels, out_ch, out_ch, 3)
    flops += linear_flops(batch, cond_dim, 2 * out_ch if film else out_ch)
    if in_ch != out_ch:
        flops += conv_flops(batch * pixels, in_ch, out_ch, 1)
    return flops
