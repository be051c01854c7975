"""Weighting functions w(logsnr) of Kingma & Gao 2023, in the eps-MSE convention.

The weighted loss is 1/2 w(logsnr) / p(logsnr) ||eps - eps_hat||^2. A weighting that does not increase with
logsnr makes the objective an ELBO of Gaussian-noise-augmented data (Kingma & Gao 2023); others are a signed mix of
ELBOs, so a config that declares an ELBO-interpretable objective must use a monotone one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

WeightingName = Literal["elbo", "sigmoid", "edm", "edm_monotonic", "v", "iddpm", "min_snr"]
WEIGHTINGS = WeightingName.__args__
Weighting = Callable[[Tensor], Tensor]

EDM_MEAN, EDM_STD, EDM_SIGMA_DATA = 2.4, 2.4, 0.5


@dataclass
class WeightingConfig:
    name: WeightingName = "sigmoid"
    bias: float = 2.0  # sigmoid(bias - logsnr); SiD2-style runs use negative values
    min_snr_gamma: float = 5.0
    resolution: int = 64  # shift the weighting to this image side: w_d(l) = w(l - 2 log(64 / d))
    base_resolution: int = 64

    def __post_init__(self):
        if self.resolution <= 0 or self.base_resolution <= 0:
            raise ValueError("weighting.resolution and weighting.base_resolution must be positive")
        if self.min_snr_gamma <= 0:
            raise ValueError(f"weighting.min_snr_gamma must be positive, found {self.min_snr_gamma}")


def elbo(logsnr: Tensor) -> Tensor:
    return torch.ones_like(logsnr)


def sigmoid(logsnr: Tensor, bias: float) -> Tensor:
    """Kingma & Gao's sigmoid weighting: ELBO-like at high noise, x-MSE-like at low noise."""
    return torch.sigmoid(bias - logsnr)


def edm(logsnr: Tensor) -> Tensor:
    """EDM's p(sigma) times its loss weight, mapped to eps-space: N(l; 2.4, 2.4^2) (e^-l + s_d^2) / s_d^2."""
    density = torch.exp(-0.5 * ((logsnr - EDM_MEAN) / EDM_STD) ** 2) / (EDM_STD * math.sqrt(2 * math.pi))
    return density * (torch.exp(-logsnr) + EDM_SIGMA_DATA**2) / EDM_SIGMA_DATA**2


def _edm_argmax() -> float:
    """The logsnr where w_EDM peaks: the root of d/dl log w = -(l - m)/s^2 - e^-l / (e^-l + s_d^2)."""
    lo, hi = -20.0, EDM_MEAN
    for _ in range(200):
        mid = (lo + hi) / 2
        slope = -(mid - EDM_MEAN) / EDM_STD**2 - math.exp(-mid) / (math.exp(-mid) + EDM_SIGMA_DATA**2)
        lo, hi = (mid, hi) if slope > 0 else (lo, mid)
    return (lo + hi) / 2


EDM_PEAK = _edm_argmax()


def edm_monotonic(logsnr: Tensor) -> Tensor:
    """w_EDM above its peak, the peak value below it (Kingma & Gao's monotone variant of EDM)."""
    return edm(torch.clamp(logsnr, min=EDM_PEAK))


def v(logsnr: Tensor) -> Tensor:
    """v-prediction MSE with the cosine schedule, and flow matching with a linear path: e^{-l/2}."""
    return torch.exp(-logsnr / 2)


def iddpm(logsnr: Tensor) -> Tensor:
    """eps-MSE (L_simple) with the cosine schedule: sech(l / 2)."""
    return 1.0 / torch.cosh(logsnr / 2)


def min_snr(logsnr: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma on eps-MSE with the cosine schedule: sech(l / 2) min(1, gamma e^-l)."""
    return iddpm(logsnr) * torch.clamp(gamma * torch.exp(-logsnr), max=1.0)


def build(cfg: WeightingConfig) -> Weighting:
    shift = 2 * math.log(cfg.base_resolution / cfg.resolution)
    base: Weighting
    if cfg.name == "elbo":
        base = elbo
    elif cfg.name == "sigmoid":
        base = lambda logsnr: sigmoid(logsnr, cfg.bias)  # noqa: E731
    elif cfg.name == "edm":
        base = edm
    elif cfg.name == "edm_monotonic":
        base = edm_monotonic
    elif cfg.name == "v":
        base = v
    elif cfg.name == "iddpm":
        base = iddpm
    elif cfg.name == "min_snr":
        base = lambda logsnr: min_snr(logsnr, cfg.min_snr_gamma)  # noqa: E731
    else:
        raise ValueError(f"unknown weighting {cfg.name!r}; valid weightings: {', '.join(WEIGHTINGS)}")
    if shift == 0.0:
        return base
    return lambda logsnr: base(logsnr - shift)


def is_monotone(weighting: Weighting, logsnr_min: float, logsnr_max: float, points: int = 20001) -> bool:
    """True when w does not increase anywhere on [logsnr_min, logsnr_max] (checked on a dense float64 grid)."""
    grid = torch.linspace(logsnr_min, logsnr_max, points, dtype=torch.float64)
    w = weighting(grid)
    return bool((w[1:] <= w[:-1] * (1 + 1e-9) + 1e-300).all())


def check(cfg: WeightingConfig, logsnr_min: float, logsnr_max: float, elbo_interpretable: bool) -> None:
    """Refuse a non-monotone weighting for an objective declared ELBO-interpretable; otherwise warn once."""
    if is_monotone(build(cfg), logsnr_min, logsnr_max):
        return
    message = (f"weighting {cfg.name!r} is not monotone in logsnr on [{logsnr_min}, {logsnr_max}], so the "
               "objective is not an ELBO of noise-augmented data (Kingma & Gao 2023)")
    if elbo_interpretable:
        raise ValueError(message + "; use a monotone weighting (elbo, sigmoid, edm_monotonic, v) or set "
                         "objective.elbo_interpretable=false")
    log.warning(message)
