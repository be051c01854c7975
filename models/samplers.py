"""Samplers over any `net(z, logsnr, cond)` and any schedule: VDM's ancestral sampler and DDIM.

Both walk a grid t_i = i / steps from t = 1 down to t = 0, so they sample from the schedule's
logsnr_min up to logsnr_max, and return x = z_0 / alpha_0 in data space (decode 8-bit pixels with
objective.decode_pixels).

`generator` is one torch.Generator for the whole batch, or a list with one per row: row i's noise (the initial
z and, for the ancestral sampler, every step's) then comes from generator i alone, so a sample does not depend
on the batch it was drawn in (evaluation at scale seeds each sample by its index).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from models.objective import prediction_of
from models.prediction import alpha_sigma, to_x
from models.schedules import Schedule

Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per row


def guided(net: Callable, guidance: float, null_class: int) -> Callable:
    """Classifier-free guidance: out_uncond + guidance (out_cond - out_uncond), in one batched call.

    guidance = 1 is the conditional network, 0 the unconditional one. Every prediction type is affine in
    the output at fixed z and logsnr, so guiding the raw output equals guiding eps_hat or x_hat."""
    if guidance == 1.0:
        return net

    def call(z: Tensor, logsnr: Tensor, cond: Tensor) -> Tensor:
        null = torch.full_like(cond, null_class)
        out = net(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([cond, null]))
        out_cond, out_uncond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    call.prediction = prediction_of(net)
    return call


def _noise(shape: tuple[int, ...], generator: Generators, dtype: torch.dtype) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"one generator per row: found {len(generator)} generators for {shape[0]} rows")
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generator])


def _walk(net: Callable, shape: tuple[int, ...], cond: Tensor | None, schedule: Schedule, steps: int,
          generator: Generators, guidance: float, null_class: int | None, stochastic: bool,
          dtype: torch.dtype, device) -> Tensor:
    if steps < 1:
        raise ValueError(f"a sampler needs at least one step, found {steps}")
    if guidance != 1.0:
        if null_class is None or cond is None:
            raise ValueError("classifier-free guidance needs class labels and the null class id")
        net = guided(net, guidance, null_class)
    prediction = prediction_of(net)
    n = shape[0]
    z = _noise(shape, generator, dtype).to(device)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    with torch.no_grad():
        logsnrs = schedule.logsnr(grid).to(dtype)
        for i in range(steps):
            logsnr_t, logsnr_s = logsnrs[i], logsnrs[i + 1]
            lam = logsnr_t.expand(n).to(device)
            out = net(z, lam, cond)
            x_hat = to_x(out, z, lam, prediction)
            alpha_t, sigma_t = alpha_sigma(logsnr_t)
            alpha_s, sigma_s = alpha_sigma(logsnr_s)
            if stochastic:
                # p(z_s | z_t) = q(z_s | z_t, x = x_hat) (VDM App. A), c = 1 - e^{logsnr_t - logsnr_s}
                c = -torch.expm1(logsnr_t - logsnr_s)
                mean = (1 - c) * (alpha_s / alpha_t) * z + c * alpha_s * x_hat
                noise = _noise(shape, generator, dtype).to(device)
                z = mean + (c.sqrt() * sigma_s) * noise
            else:
                eps_hat = (z - alpha_t * x_hat) / sigma_t
                z = alpha_s * x_hat + sigma_s * eps_hat
        return z / alpha_sigma(logsnrs[-1])[0]


def ancestral(net: Callable, shape: tuple[int, ...], cond: Tensor | None, *, schedule: Schedule, steps: int,
              generator: Generators = None, guidance: float = 1.0, null_class: int | None = None,
              dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """VDM's ancestral sampler (VDM, App. A), for any schedule and prediction type."""
    return _walk(net, shape, cond, schedule, steps, generator, guidance, null_class, True, dtype, device)


def ddim(net: Callable, shape: tuple[int, ...], cond: Tensor | None, *, schedule: Schedule, steps: int,
         generator: Generators = None, guidance: float = 1.0, null_class: int | None = None,
         dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Deterministic DDIM: z_s = alpha_s x_hat + sigma_s eps_hat (the probability-flow ODE's first-order step)."""
    return _walk(net, shape, cond, schedule, steps, generator, guidance, null_class, False, dtype, device)
