"""Drawing t in [0, 1] for a batch (VDM App. I.1)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

TimeSampler = Literal["uniform", "antithetic"]
TIME_SAMPLERS = TimeSampler.__args__


def uniform(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def antithetic(n: int, generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1,
               device=None) -> Tensor:
    """Low-discrepancy t_i = (u0 + i / N) mod 1 over the global batch of N = n * world_size (VDM App. I.1).

    All ranks share u0 (the same seed) and take their own slice, so together they stratify [0, 1] and no two
    ranks draw the same t."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    u0 = torch.rand((), generator=generator, dtype=torch.float64)
    i = torch.arange(rank * n, (rank + 1) * n, dtype=torch.float64)
    return torch.remainder(u0 + i / (n * world_size), 1.0).to(device)


def draw(kind: str, n: int, generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1,
         device=None) -> Tensor:
    if kind == "uniform":
        return uniform(n, generator, device)
    if kind == "antithetic":
        return antithetic(n, generator, rank, world_size, device)
    raise ValueError(f"unknown time sampler {kind!r}; valid time samplers: {', '.join(TIME_SAMPLERS)}")


def snap(t: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Discrete time with T steps: t <- ceil(t T) / T and s = t - 1/T (VDM)."""
    if steps <= 0:
        raise ValueError(f"discrete time needs a positive number of steps, found {steps}")
    t = torch.ceil(t * steps).clamp(min=1) / steps
    return t, t - 1.0 / steps
