"""Latent space of the 256/512 runs: a pretrained diffusers AutoencoderKL with an explicit scale and shift.

Latents are (posterior mean - shift) * scale, so that the diffusion model sees data of about unit variance. The
scale and shift belong to the run's config, never to the autoencoder's own config: two runs that disagree on
them would silently train on differently scaled data.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import diffusers


class LatentVAE(nn.Module):
    def __init__(self, autoencoder: "diffusers.AutoencoderKL", scale: float, shift: float = 0.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"latent scale must be positive, found {scale}")
        self.autoencoder = autoencoder
        self.scale = float(scale)
        self.shift = float(shift)
        config = autoencoder.config
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        self.latent_channels = int(config.latent_channels)

    @classmethod
    def from_pretrained(cls, path: str, scale: float, shift: float = 0.0) -> "LatentVAE":
        """Loads from a local directory only; a missing path is an error, never a download."""
        from diffusers import AutoencoderKL

        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(
                f"no AutoencoderKL at {path!r}: expected a directory written by save_pretrained "
                f"(config.json and weights); autoencoders are only loaded from local paths"
            )
        autoencoder = AutoencoderKL.from_pretrained(path, local_files_only=True)
        return cls(autoencoder.eval(), scale=scale, shift=shift)

    def _check(self, x: Tensor, channels: int, factor: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"{what}: expected (B, {channels}, H, W) with H and W divisible by {factor}, found {tuple(x.shape)}"
            )

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> (mean - shift) * scale, (B, C, H/f, W/f)."""
        self._check(images, self.autoencoder.config.in_channels, self.downsample_factor, "encode")
        # The posterior mean, not a sample: pre-encoded latents must not depend on the encoding seed.
        mean = self.autoencoder.encode(images).latent_dist.mean
        return (mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Inverse of `encode`: latents / scale + shift -> images in [-1, 1]."""
        self._check(latents, self.latent_channels, 1, "decode")
        images = self.autoencoder.decode(latents / self.scale + self.shift).sample
        return images.clamp(-1.0, 1.0)
