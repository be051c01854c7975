"""Noise schedules as samplers of logsnr (lambda) with a known density (Kingma & Gao 2023).

A schedule maps t in [0, 1] to logsnr(t), decreasing from logsnr_max (t = 0, almost clean) to logsnr_min
(t = 1, almost pure noise). Under t ~ U(0, 1) it induces the density p(logsnr) = -dt/dlogsnr, and the
weighted loss multiplies by w(logsnr) / p(logsnr): the schedule changes only the Monte-Carlo variance.

Every schedule gives logsnr(t), its derivative, its inverse t(logsnr) and p(logsnr). The fixed ones are
truncations of a base curve f(u): u = u_lo + t (u_hi - u_lo), where f(u_lo) = logsnr_max and
f(u_hi) = logsnr_min, so any two schedules with the same endpoints give the same continuous-time bound.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

ScheduleName = Literal[
    "linear", "cosine", "shifted_cosine", "interpolated_cosine", "edm", "vp", "learned_scalar", "learned_nnet"
]
SCHEDULES = ScheduleName.__args__


@dataclass
class ScheduleConfig:
    name: ScheduleName = "cosine"
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    resolution: int = 64  # shifted / interpolated cosine: image side d (simple diffusion eq. 5)
    base_resolution: int = 64  # the resolution at which the unshifted cosine is right
    low_resolution: int = 32  # interpolated cosine: the noisy end is shifted as for this side (eq. 6)
    edm_mean: float = 2.4  # EDM: lambda ~ N(-2 P_mean, (2 P_std)^2) with P_mean = -1.2, P_std = 1.2
    edm_std: float = 2.4
    vp_beta_min: float = 0.1  # VP-SDE of Song et al. / Huang et al.: beta(t) = b_min + (b_max - b_min) t
    vp_beta_max: float = 20.0
    hidden: int = 1024  # learned_nnet: width of the monotone network (VDM App. H)

    def __post_init__(self):
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"schedule: logsnr_min ({self.logsnr_min}) must be below logsnr_max ({self.logsnr_max})")
        for key in ("resolution", "base_resolution", "low_resolution", "hidden"):
            if getattr(self, key) <= 0:
                raise ValueError(f"schedule.{key} must be positive, found {getattr(self, key)}")


class Schedule(nn.Module, abc.ABC):
    """Base: subclasses give `logsnr_and_rate`, `t_of` and `endpoints`; the rest follows from them."""

    @abc.abstractmethod
    def logsnr_and_rate(self, t: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """logsnr(t), dlogsnr/dt(t) and the per-example tensors through which all gradient reaches the
        schedule's shape parameters (empty unless the schedule learns its shape; see objective.vlb)."""

    def logsnr(self, t: Tensor) -> Tensor:
        return self.logsnr_and_rate(t)[0]

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        return self.logsnr_and_rate(t)[1]

    @abc.abstractmethod
    def t_of(self, logsnr: Tensor) -> Tensor:
        """The inverse of logsnr(t)."""

    @property
    @abc.abstractmethod
    def endpoints(self) -> tuple[Tensor, Tensor]:
        """(logsnr_min, logsnr_max) as tensors; learned schedules carry gradients through them."""

    def sample(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """logsnr(t) and the density p(logsnr) it was drawn with, for the importance weight w / p."""
        logsnr, rate, _ = self.logsnr_and_rate(t)
        return logsnr, 1.0 / (-rate)

    def density(self, logsnr: Tensor) -> Tensor:
        """p(logsnr) = -dt/dlogsnr."""
        return 1.0 / (-self.dlogsnr_dt(self.t_of(logsnr)))

    def check_range(self, logsnr: Tensor) -> None:
        lo, hi = (float(e.detach()) for e in self.endpoints)
        tol = 1e-6 * max(1.0, abs(lo), abs(hi))
        bad = (logsnr < lo - tol) | (logsnr > hi + tol)
        if bool(bad.any()):
            value = float(logsnr[bad].flatten()[0])
            raise ValueError(f"logsnr {value:.4g} is outside the schedule's range [{lo:.4g}, {hi:.4g}]")


class TruncatedSchedule(Schedule):
    """A fixed base curve f(u) decreasing in u, truncated so that logsnr runs over [logsnr_min, logsnr_max]."""

    def __init__(self, logsnr_min: float, logsnr_max: float):
        super().__init__()
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)
        self.u_lo = float(self.base_inverse(torch.tensor(self.logsnr_max, dtype=torch.float64)))
        self.u_hi = float(self.base_inverse(torch.tensor(self.logsnr_min, dtype=torch.float64)))

    @abc.abstractmethod
    def base(self, u: Tensor) -> Tensor:
        """The untruncated curve f(u), decreasing in u."""

    @abc.abstractmethod
    def base_rate(self, u: Tensor) -> Tensor:
        """df/du."""

    @abc.abstractmethod
    def base_inverse(self, logsnr: Tensor) -> Tensor:
        """u = f^-1(logsnr)."""

    @property
    def endpoints(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.logsnr_min), torch.tensor(self.logsnr_max)

    def logsnr_and_rate(self, t):
        u = self.u_lo + t * (self.u_hi - self.u_lo)
        return self.base(u), self.base_rate(u) * (self.u_hi - self.u_lo), ()

    def t_of(self, logsnr):
        self.check_range(logsnr)
        return ((self.base_inverse(logsnr) - self.u_lo) / (self.u_hi - self.u_lo)).clamp(0.0, 1.0)


class Linear(TruncatedSchedule):
    """VDM fixed linear gamma: logsnr(t) = logsnr_max - (logsnr_max - logsnr_min) t."""

    def base(self, u):
        return -u

    def base_rate(self, u):
        return -torch.ones_like(u)

    def base_inverse(self, logsnr):
        return -logsnr


class Cosine(TruncatedSchedule):
    """alpha = cos(pi u / 2): logsnr = -2 log tan(a), a = pi u / 2, plus a constant resolution shift."""

    def __init__(self, logsnr_min: float, logsnr_max: float, shift: float = 0.0):
        self.shift = float(shift)
        super().__init__(logsnr_min, logsnr_max)

    def base(self, u):
        return -2.0 * torch.log(torch.tan(u * (math.pi / 2))) + self.shift

    def base_rate(self, u):
        return -2.0 * math.pi / torch.sin(u * math.pi)

    def base_inverse(self, logsnr):
        return torch.atan(torch.exp(-(logsnr - self.shift) / 2)) * (2 / math.pi)


class InterpolatedCosine(Schedule):
    """simple diffusion eq. 6: logsnr(t) = t * shifted_low(t) + (1 - t) * shifted_high(t).

    Both shifted curves share one truncated cosine in t, so the interpolation is that cosine plus a shift
    that moves linearly from 2 log(base/high) at t = 0 to 2 log(base/low) at t = 1. The cosine is truncated
    so that the endpoints are exactly [logsnr_min, logsnr_max]; the inverse is found by bisection."""

    def __init__(self, logsnr_min: float, logsnr_max: float, low: int, high: int, base: int):
        super().__init__()
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)
        self.shift_low = 2 * math.log(base / low)
        self.shift_high = 2 * math.log(base / high)
        self.cosine = Cosine(logsnr_min - self.shift_low, logsnr_max - self.shift_high)
        grid = torch.linspace(0, 1, 4097, dtype=torch.float64)
        if bool((self.logsnr_and_rate(grid)[1] >= 0).any()):
            raise ValueError(
                f"interpolated cosine from resolution {low} to {high} is not monotone on "
                f"[{logsnr_min}, {logsnr_max}]; widen the logsnr range or bring the resolutions closer")

    @property
    def endpoints(self):
        return torch.tensor(self.logsnr_min), torch.tensor(self.logsnr_max)

    def logsnr_and_rate(self, t):
        base, base_rate, _ = self.cosine.logsnr_and_rate(t)
        shift = self.shift_high + t * (self.shift_low - self.shift_high)
        return base + shift, base_rate + (self.shift_low - self.shift_high), ()

    def t_of(self, logsnr):
        self.check_range(logsnr)
        lo = torch.zeros_like(logsnr, dtype=torch.float64)
        hi = torch.ones_like(logsnr, dtype=torch.float64)
        target = logsnr.double()
        for _ in range(60):  # bisection to float64 resolution; logsnr decreases in t
            mid = (lo + hi) / 2
            above = self.logsnr(mid) > target
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return ((lo + hi) / 2).to(logsnr.dtype)


class EDM(TruncatedSchedule):
    """EDM's training distribution: logsnr ~ N(mean, std^2), as logsnr(u) = mean - std * Phi^-1(u)."""

    def __init__(self, logsnr_min: float, logsnr_max: float, mean: float, std: float):
        self.mean, self.std = float(mean), float(std)
        super().__init__(logsnr_min, logsnr_max)

    def base(self, u):
        return self.mean - self.std * torch.special.ndtri(u)

    def base_rate(self, u):
        x = torch.special.ndtri(u)
        return -self.std * math.sqrt(2 * math.pi) * torch.exp(0.5 * x * x)

    def base_inverse(self, logsnr):
        return torch.special.ndtr((self.mean - logsnr) / self.std)


class VP(TruncatedSchedule):
    """VP-SDE with linear beta (Song et al. 2021; Huang et al. 2021): alpha^2 = exp(-B(u)), B = u^2 (b1 - b0) / 2 + u b0,
    so logsnr = -log(expm1(B)) and dlogsnr/du = -beta(u) / (1 - exp(-B))."""

    def __init__(self, logsnr_min: float, logsnr_max: float, beta_min: float, beta_max: float):
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        super().__init__(logsnr_min, logsnr_max)

    def _integral(self, u):
        return 0.5 * u * u * (self.beta_max - self.beta_min) + u * self.beta_min

    def base(self, u):
        return -torch.log(torch.expm1(self._integral(u)))

    def base_rate(self, u):
        beta = self.beta_min + u * (self.beta_max - self.beta_min)
        return -beta / (-torch.expm1(-self._integral(u)))

    def base_inverse(self, logsnr):
        integral = nn.functional.softplus(-logsnr)
        a, b = self.beta_max - self.beta_min, self.beta_min
        return (-b + torch.sqrt(b * b + 2 * a * integral)) / a


class LearnedScalar(Schedule):
    """VDM's learnable scalar schedule: gamma(t) = b + |w| t, logsnr = -gamma; both endpoints learned."""

    def __init__(self, logsnr_min: float, logsnr_max: float):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(-float(logsnr_max)))
        self.scale = nn.Parameter(torch.tensor(float(logsnr_max - logsnr_min)))

    @property
    def endpoints(self):
        return -(self.bias + self.scale.abs()), -self.bias

    def logsnr_and_rate(self, t):
        return -(self.bias + self.scale.abs() * t), -self.scale.abs().expand_as(t), ()

    def t_of(self, logsnr):
        self.check_range(logsnr)
        return ((-logsnr - self.bias) / self.scale.abs()).clamp(0.0, 1.0)


class MonotoneLinear(nn.Module):
    """Dense layer with |W| so the map is non-decreasing in every input (VDM's DenseMonotone)."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.reshape(fan_out, fan_in).clone())
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None

    def forward(self, x):
        return nn.functional.linear(x, self.weight.abs(), self.bias)


class LearnedNNet(Schedule):
    """VDM's learned monotone schedule gamma_eta(t) with the endpoint/shape split of VDM App. I.2, eq. 59:

        gamma(t) = gamma_0 + (gamma_1 - gamma_0) * u(t),  u(t) = (g(t) - g(0)) / (g(1) - g(0)),
        g(t) = l1(t) + l3(2 (sigmoid(l2(2 (t - 1/2))) - 1/2)) / hidden

    The endpoints gamma_0 = -logsnr_max and gamma_1 = -logsnr_min are parameters of their own, trained on
    the bound; the network (the shape eta) only moves u, which is pinned to 0 and 1 at the ends, so the
    bound does not depend on eta and eta is trained to minimise the estimator's variance (VDM App. I.2).
    Feeding l2 with 2(t - 1/2) instead of the paper's l1(t) is the same family (both affine and increasing
    in t, absorbed by l2's positive weights), and keeps the public code's initialisation."""

    def __init__(self, logsnr_min: float, logsnr_max: float, hidden: int = 1024, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.gamma_0 = nn.Parameter(torch.tensor(-float(logsnr_max)))
        self.gamma_span = nn.Parameter(torch.tensor(float(logsnr_max - logsnr_min)))
        self.hidden = hidden
        self.l1 = MonotoneLinear(1, 1, True, torch.tensor([logsnr_max - logsnr_min]))
        self.l2 = MonotoneLinear(1, hidden, True, torch.randn(hidden, generator=gen))
        self.l3 = MonotoneLinear(hidden, 1, False, torch.randn(hidden, generator=gen))
        with torch.no_grad():
            self.l1.bias.fill_(-logsnr_max)

    def shape_parameters(self) -> list[nn.Parameter]:
        return [*self.l1.parameters(), *self.l2.parameters(), *self.l3.parameters()]

    def endpoint_parameters(self) -> list[nn.Parameter]:
        return [self.gamma_0, self.gamma_span]

    @property
    def endpoints(self):
        return -(self.gamma_0 + self.gamma_span.abs()), -self.gamma_0

    def _g(self, t: Tensor) -> Tensor:
        x = t.reshape(-1, 1).to(self.l1.weight.dtype)
        h = 2 * (torch.sigmoid(self.l2(2 * (x - 0.5))) - 0.5)
        return (self.l1(x) + self.l3(h) / self.hidden).reshape(t.shape)

    def shape(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """u(t) and du/dt, with graphs to the shape parameters (du/dt by double backward)."""
        with torch.enable_grad():
            t_in = t.detach().requires_grad_(True)
            g = self._g(t_in)
            (dg,) = torch.autograd.grad(g.sum(), t_in, create_graph=True)
        ends = self._g(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        span = ends[1] - ends[0]
        return (g - ends[0]) / span, dg / span

    def logsnr_and_rate(self, t):
        u, du = self.shape(t)
        span = self.gamma_span.abs()
        return -(self.gamma_0 + span * u), -span * du, (u, du)

    def logsnr(self, t):
        """Without the derivative: bisection and samplers call this many times."""
        ends = self._g(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        u = (self._g(t) - ends[0]) / (ends[1] - ends[0])
        return -(self.gamma_0 + self.gamma_span.abs() * u)

    def t_of(self, logsnr):
        self.check_range(logsnr)
        with torch.no_grad():
            lo, hi = torch.zeros_like(logsnr), torch.ones_like(logsnr)
            for _ in range(50):
                mid = (lo + hi) / 2
                above = self.logsnr(mid) > logsnr
                lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2


def build(cfg: ScheduleConfig) -> Schedule:
    lo, hi = cfg.logsnr_min, cfg.logsnr_max
    if cfg.name == "linear":
        return Linear(lo, hi)
    if cfg.name == "cosine":
        return Cosine(lo, hi)
    if cfg.name == "shifted_cosine":
        return Cosine(lo, hi, shift=2 * math.log(cfg.base_resolution / cfg.resolution))
    if cfg.name == "interpolated_cosine":
        return InterpolatedCosine(lo, hi, cfg.low_resolution, cfg.resolution, cfg.base_resolution)
    if cfg.name == "edm":
        return EDM(lo, hi, cfg.edm_mean, cfg.edm_std)
    if cfg.name == "vp":
        return VP(lo, hi, cfg.vp_beta_min, cfg.vp_beta_max)
    if cfg.name == "learned_scalar":
        return LearnedScalar(lo, hi)
    if cfg.name == "learned_nnet":
        return LearnedNNet(lo, hi, cfg.hidden)
    raise ValueError(f"unknown schedule {cfg.name!r}; valid schedules: {', '.join(SCHEDULES)}")
