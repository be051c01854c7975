"""Kingma & Gao's adaptive noise schedule (App. F): p(logsnr) proportional to an EMA of
w(logsnr) ||eps - eps_hat||^2 per logsnr bin, the variance-minimising choice for a piecewise-constant density.

Sampling and the importance weight use the table as it was before this step's update, so the weight w / p
is exactly the density each sample was drawn from and the estimator stays unbiased.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class AdaptiveConfig:
    bins: int = 100
    ema: float = 0.999
    floor: float = 1e-3  # every bin keeps at least floor * mean mass, so p > 0 everywhere

    def __post_init__(self):
        if self.bins < 1:
            raise ValueError(f"adaptive.bins must be at least 1, found {self.bins}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"adaptive.ema must be in [0, 1), found {self.ema}")
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"adaptive.floor must be in (0, 1], found {self.floor}")


class AdaptiveSampler(nn.Module):
    """Piecewise-constant p(logsnr) on [logsnr_min, logsnr_max], sampled by its inverse CDF."""

    def __init__(self, logsnr_min: float, logsnr_max: float, cfg: AdaptiveConfig = AdaptiveConfig()):
        super().__init__()
        self.logsnr_min, self.logsnr_max, self.cfg = float(logsnr_min), float(logsnr_max), cfg
        self.register_buffer("values", torch.ones(cfg.bins, dtype=torch.float64))

    @property
    def width(self) -> float:
        return (self.logsnr_max - self.logsnr_min) / self.cfg.bins

    def masses(self) -> Tensor:
        v = torch.clamp(self.values, min=self.cfg.floor * float(self.values.mean()))
        return v / v.sum()

    def sample(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """logsnr for each t (t = 0 at logsnr_max, as for the schedules) and its density."""
        mass = self.masses()
        cdf = torch.cat([mass.new_zeros(1), torch.cumsum(mass, 0)])
        # bins counted from logsnr_max down, so logsnr decreases in t like every schedule
        u = t.to(mass)
        k = torch.clamp(torch.searchsorted(cdf, u, right=True) - 1, 0, self.cfg.bins - 1)
        frac = ((u - cdf[k]) / mass[k]).clamp(0.0, 1.0)
        logsnr = self.logsnr_max - (k + frac) * self.width
        return logsnr.to(t.dtype), (mass[k] / self.width).to(t.dtype)

    def density(self, logsnr: Tensor) -> Tensor:
        k = self._bin(logsnr)
        return (self.masses()[k] / self.width).to(logsnr.dtype)

    def _bin(self, logsnr: Tensor) -> Tensor:
        k = torch.floor((self.logsnr_max - logsnr.double()) / self.width).long()
        return k.clamp(0, self.cfg.bins - 1)

    def bin_statistics(self, logsnr: Tensor, values: Tensor) -> Tensor:
        """(2, bins): per-bin sums of `values` and counts; sum these across ranks before `update`."""
        k = self._bin(logsnr.detach())
        stats = torch.zeros(2, self.cfg.bins, dtype=torch.float64, device=logsnr.device)
        stats[0].index_add_(0, k, values.detach().double())
        stats[1].index_add_(0, k, torch.ones_like(k, dtype=torch.float64))
        return stats

    @torch.no_grad()
    def update(self, logsnr: Tensor, values: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None):
        """Move each hit bin towards the mean of w ||eps - eps_hat||^2 seen in it; a bin hit n times in one
        step decays as ema^n, so the rate per sample does not depend on the batch size."""
        stats = self.bin_statistics(logsnr, values)
        if all_reduce is not None:
            stats = all_reduce(stats)
        sums, counts = stats[0].to(self.values.device), stats[1].to(self.values.device)
        hit = counts > 0
        factor = torch.where(hit, self.cfg.ema ** counts, torch.ones_like(counts))
        mean = torch.where(hit, sums / counts.clamp(min=1), self.values)
        self.values.copy_(self.values * factor + (1 - factor) * mean)
