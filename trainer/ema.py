"""Exponential moving averages of the weights: classic constant decay and the power-function EMA of EDM2.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), Sec. 3: a
power-function EMA averages the weights seen up to step t with the profile

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 < tau <= t,

whose width relative to t is sigma_rel. Its update is the usual lerp with beta_t = (1 - 1/t)^(gamma + 1). Because
the profile scales with t, snapshots of two such averages taken at several times span other profiles, and an
average with any sigma_rel can be synthesised after training by least squares (Sec. 3.2).

Each rank averages only its own local parameter tensors (for FSDP2 the DTensor `.to_local()` shards), so an update
is purely local; full tensors are gathered only when a checkpoint is written (`EMA.consolidate`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from trainer.config import ConfigError

# sigma_rel at gamma = 0 (a uniform average of the whole run); narrower profiles have gamma > 0.
MAX_SIGMA_REL = 1 / math.sqrt(12)


@dataclass
class EMAConfig:
    """Averages tracked during training; each is written as ema-<name>.safetensors in every checkpoint."""
    sigma_rels: tuple[float, ...] = (0.05, 0.10)  # power-function EMAs; EDM2 tracks these two for post-hoc synthesis
    decays: tuple[float, ...] = ()  # classic EMAs with a constant decay (VDM uses 0.9999)

    def __post_init__(self):
        if not self.sigma_rels and not self.decays:
            raise ConfigError("ema: give at least one of sigma_rels or decays")
        for s in self.sigma_rels:
            if not 0 < s < MAX_SIGMA_REL:
                raise ConfigError(f"ema.sigma_rels: {s} is outside (0, {MAX_SIGMA_REL:.4f})")
        for d in self.decays:
            if not 0 <= d < 1:
                raise ConfigError(f"ema.decays: {d} is outside [0, 1)")


def sigma_rel_of_gamma(gamma: float) -> float:
    """Standard deviation of the power profile relative to its length t (EDM2 Sec. 3.1)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """Inverse of `sigma_rel_of_gamma` on gamma > 0.

    Squaring sigma_rel^2 (gamma+2)^2 (gamma+3) = gamma+1 gives the cubic
    s^2 gamma^3 + 7 s^2 gamma^2 + (16 s^2 - 1) gamma + (12 s^2 - 1) = 0. sigma_rel falls monotonically from
    1/sqrt(12) at gamma = 0 to 0, so for sigma_rel in (0, 1/sqrt(12)) exactly one root is positive.
    """
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}), found {sigma_rel}")
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0))


def power_beta(t: int, gamma: float) -> float:
    """Decay of the power EMA at update t >= 1 (EDM2 Sec. 3.1). beta_1 = 0: the first update copies the weights.

    Unrolled, weight i of t receives (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1): exactly the profile's mass on
    (i-1, i]. The discrete average is the continuous profile applied to the step-wise constant weight trajectory,
    so post-hoc synthesis can work with the continuous profiles and their closed-form inner products.
    """
    return (1 - 1 / t) ** (gamma + 1)


def power_profile_dot(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_a, p_b> = integral over tau of p(tau; t_a, gamma_a) p(tau; t_b, gamma_b), elementwise with broadcasting.

    Both profiles are nonzero on (0, min(t_a, t_b)], where the integrand is
    (ga+1)(gb+1) tau^(ga+gb) / (t_a^(ga+1) t_b^(gb+1)); integrating gives
    (ga+1)(gb+1) / (ga+gb+1) * m^(ga+gb+1) / (t_a^(ga+1) t_b^(gb+1)),  m = min(t_a, t_b).
    Evaluated in log space: t^gamma overflows float64 for long runs and narrow profiles.
    """
    m = torch.minimum(t_a, t_b)
    log_scale = (gamma_a + gamma_b + 1) * m.log() - (gamma_a + 1) * t_a.log() - (gamma_b + 1) * t_b.log()
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * log_scale.exp()


def posthoc_coefficients(ts: Sequence[float], gammas: Sequence[float], t_target: float, gamma_target: float) -> Tensor:
    """Coefficients x of the snapshots whose combination sum_i x_i p_i best matches the target profile in L2.

    EDM2 Sec. 3.2: minimise ||p_target - sum_i x_i p_i||^2, i.e. solve the normal equations A x = b with
    A_ij = <p_i, p_j> and b_i = <p_i, p_target>. Snapshots that are nearly collinear make A ill-conditioned, so
    a least-squares solver (minimum norm on the numerically null part) is used rather than an inverse.

    The solution is then divided by its sum, as EDM2's solver does: every profile integrates to 1, so an average of
    the weights must have coefficients summing to 1. The L2 fit alone does not ensure it for a target outside the
    snapshots' profiles (sums of 0.73-1.48 for sigma_rel 0.02 or 0.20 from snapshots of 0.05 and 0.10), which would
    scale the synthesised weights by that factor.
    """
    t = torch.tensor(ts, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    a = power_profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = power_profile_dot(t, g, torch.tensor(float(t_target), dtype=torch.float64),
                          torch.tensor(float(gamma_target), dtype=torch.float64))
    x = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]
    return x / x.sum()


def posthoc_combine(snapshots: Sequence[Mapping[str, Tensor]], coefficients: Tensor) -> dict[str, Tensor]:
    """sum_i x_i snapshot_i, accumulated in float64 because the coefficients alternate in sign and grow large."""
    out = {}
    for name in snapshots[0]:
        acc = sum(float(x) * s[name].double() for x, s in zip(coefficients, snapshots))
        out[name] = acc.to(snapshots[0][name].dtype)
    return out


def power_name(sigma_rel: float) -> str:
    return f"power-{sigma_rel:.3f}"


def decay_name(decay: float) -> str:
    return f"decay-{decay:g}"


class EMA:
    """Float32 averages of one rank's local parameter tensors, several at once; `update` never communicates."""

    def __init__(self, cfg: EMAConfig, params: Sequence[Tensor]):
        self.gammas = {power_name(s): gamma_of_sigma_rel(s) for s in cfg.sigma_rels}
        self.decays = {decay_name(d): d for d in cfg.decays}
        self.sigma_rels = {power_name(s): s for s in cfg.sigma_rels}
        self.t = 0  # updates so far; the power profiles are measured in this unit
        self.averages = {name: [p.detach().float().clone() for p in params] for name in [*self.gammas, *self.decays]}

    def beta(self, name: str) -> float:
        return power_beta(self.t, self.gammas[name]) if name in self.gammas else self.decays[name]

    @torch.no_grad()
    def update(self, params: Sequence[Tensor]) -> None:
        """Fold in the local parameters after one more optimizer step: avg <- beta avg + (1 - beta) param."""
        self.t += 1
        new = [p.detach().float() for p in params]  # a no-op for float32 parameters
        for name, avg in self.averages.items():
            torch._foreach_lerp_(avg, new, 1 - self.beta(name))

    def metadata(self, name: str) -> dict[str, str]:
        """What post-hoc synthesis needs to know about average `name`, stored in the safetensors header."""
        if name in self.gammas:
            return {"kind": "power", "sigma_rel": repr(self.sigma_rels[name]),
                    "gamma": repr(self.gammas[name]), "t": str(self.t)}
        return {"kind": "decay", "decay": repr(self.decays[name]), "t": str(self.t)}

    def state_dict(self) -> dict:
        """Per-rank resume state: tensors, lists and ints only, so it loads with torch.load(weights_only=True)."""
        return {"t": self.t, "averages": {name: list(avg) for name, avg in self.averages.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        if sorted(state["averages"]) != sorted(self.averages):
            raise ValueError(f"EMA state holds averages {sorted(state['averages'])}, "
                             f"the config asks for {sorted(self.averages)}")
        for name, avg in self.averages.items():
            saved = state["averages"][name]
            shapes, expected = [tuple(s.shape) for s in saved], [tuple(a.shape) for a in avg]
            if shapes != expected:
                raise ValueError(f"EMA '{name}': saved local shapes {shapes} differ from this rank's {expected}; "
                                 f"resume with the world size and sharding the checkpoint was written with")
            for a, s in zip(avg, saved):
                a.copy_(s)
        self.t = int(state["t"])

    def consolidate(self, param_names: Sequence[str], gather: Callable[[int, Tensor], Tensor]
                    ) -> dict[str, dict[str, Tensor]]:
        """Full float32 state dicts {average name: {parameter name: tensor}}, on the CPU.

        `gather(i, local)` turns the local part of parameter i into the full tensor (a collective for sharded
        parameters, so every rank must call this); see `gather_full`. Unsharded CPU averages are returned without
        a copy: write them out before the next `update`.
        """
        return {name: {pname: gather(i, local).cpu() for i, (pname, local) in enumerate(zip(param_names, avg))}
                for name, avg in self.averages.items()}


def gather_full(params: Sequence[Tensor]) -> Callable[[int, Tensor], Tensor]:
    """A `gather` for `EMA.consolidate` laid out like `params`: DTensors (FSDP2) are reassembled from their local
    shards with the parameter's own mesh and placements; plain tensors (DDP, one process) are already full."""
    from torch.distributed.tensor import DTensor

    def gather(i: int, local: Tensor) -> Tensor:
        p = params[i]
        if not isinstance(p, DTensor):
            return local
        full = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
        return full.full_tensor()

    return gather
