"""Drawing t in [0, 1] for a batch (VDM App. I.1)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

TimeSampler = Literal["uniform", "antithetic"]


def uniform(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def antithetic(n: int, generator: torch.Generator | None = None, start: int = 0, total: int | None = None,
               device=None) -> Tensor:
    """Low-discrepancy t_i = (u0 + i / N) mod 1 for positions i = start, ..., start + n - 1 of a global batch of
    N = total (default n) examples (VDM App. I.1).

    Every part of the global batch (ranks, micro-batches) shares u0 (the same seed) and takes its own positions, so
    together they stratify [0, 1] and no two parts draw the same t."""
    total = n if total is None else total
    if not 0 <= start <= total - n:
        raise ValueError(f"positions {start}..{start + n - 1} are outside a global batch of {total}")
    u0 = torch.rand((), generator=generator, dtype=torch.float64)
    i = torch.arange(start, start + n, dtype=torch.float64)
    return torch.remainder(u0 + i / total, 1.0).to(device)


def snap(t: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Discrete time with T steps: t <- ceil(t T) / T and s = t - 1/T (VDM)."""
    if steps <= 0:
        raise ValueError(f"discrete time needs a positive number of steps, found {steps}")
    t = torch.ceil(t * steps).clamp(min=1) / steps
    return t, t - 1.0 / steps
