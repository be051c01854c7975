"""The objectives: Kingma & Gao's weighted loss and the VDM variational bound, for ANY network.

A network is any callable `net(z, logsnr, cond) -> out` with an attribute `prediction` in
("eps", "v", "x", "F"); its output is converted to eps_hat (prediction.to_eps) before the loss, so the
weighting means the same thing whatever the network predicts. Losses are per example, in nats, summed over
dimensions (VDM's convention); `per_dim` turns them into bits/dim (8-bit pixels) or nats/dim (continuous).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import torch
from torch import Tensor

from models import adaptive, schedules, timesteps, weighting
from models.prediction import PREDICTIONS, diffuse, to_eps

DataKind = Literal["pixels8", "continuous"]
DATA_KINDS = DataKind.__args__
Importance = Literal["schedule", "adaptive"]


class LogSNRSampler(Protocol):
    def sample(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """logsnr for each t in [0, 1] and the density p(logsnr) it was drawn from."""


@dataclass
class ObjectiveConfig:
    schedule: schedules.ScheduleConfig = field(default_factory=schedules.ScheduleConfig)
    weighting: weighting.WeightingConfig = field(default_factory=weighting.WeightingConfig)
    time_sampler: timesteps.TimeSampler = "antithetic"
    importance: Importance = "schedule"  # "adaptive": Kingma & Gao App. F binned sampler over the same range
    adaptive: adaptive.AdaptiveConfig = field(default_factory=adaptive.AdaptiveConfig)
    # Declares the weighted loss an ELBO of noise-augmented data; a non-monotone weighting is then refused.
    elbo_interpretable: bool = True

    def __post_init__(self):
        weighting.check(self.weighting, self.schedule.logsnr_min, self.schedule.logsnr_max,
                        self.elbo_interpretable)


def build_sampler(cfg: ObjectiveConfig) -> LogSNRSampler:
    """The logsnr sampler of the weighted loss: the schedule itself, or the adaptive sampler on its range."""
    if cfg.importance == "adaptive":
        return adaptive.AdaptiveSampler(cfg.schedule.logsnr_min, cfg.schedule.logsnr_max, cfg.adaptive)
    return schedules.build(cfg.schedule)


def check_finite(term: str, value: Tensor) -> Tensor:
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"non-finite values (NaN or inf) in {term}")
    return value


def prediction_of(net: Callable) -> str:
    prediction = getattr(net, "prediction", None)
    if prediction not in PREDICTIONS:
        raise ValueError(f"the network must declare .prediction as one of {', '.join(PREDICTIONS)}; "
                         f"found {prediction!r}")
    return prediction


def eps_mse(net: Callable, x: Tensor, cond: Tensor | None, logsnr: Tensor, eps: Tensor) -> Tensor:
    """||eps - eps_hat(z_logsnr)||^2 per example, summed over dimensions."""
    logsnr = logsnr.to(x.dtype)
    z = diffuse(x, eps, logsnr)
    out = check_finite("the network output", net(z, logsnr, cond))
    if out.shape != x.shape:
        raise ValueError(f"the network output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    eps_hat = to_eps(out, z, logsnr, prediction_of(net))
    return (eps - eps_hat).pow(2).flatten(1).sum(1)


def weighted_loss(net: Callable, x: Tensor, cond: Tensor | None, *, schedule: LogSNRSampler,
                  weighting: weighting.Weighting, t: Tensor | None = None, eps: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Kingma & Gao 2023: 1/2 w(logsnr) / p(logsnr) ||eps - eps_hat||^2 per example, in nats.

    Its expectation depends on the schedule only through the endpoints of its logsnr range."""
    check_finite("the data", x)
    if t is None:
        t = timesteps.uniform(x.shape[0], generator)
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    with torch.no_grad():  # the schedule only samples here; it is never trained by the weighted loss
        logsnr, density = schedule.sample(t.to(x.device))
    multiplier = (weighting(logsnr) / density).to(x.dtype)
    return 0.5 * multiplier * eps_mse(net, x, cond, logsnr, eps)


@dataclass
class VLBTerms:
    """The negative VLB, per example, in nats: prior KL + reconstruction + diffusion (VDM eq. 11)."""
    prior: Tensor
    reconstruction: Tensor
    diffusion: Tensor

    @property
    def total(self) -> Tensor:
        return self.prior + self.reconstruction + self.diffusion


def encode_pixels(pixels: Tensor) -> Tensor:
    """8-bit integers k to x = 2 (k + 1/2) / 256 - 1, the centres of 256 bins in [-1, 1] (VDM)."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"8-bit pixel data must be a torch.uint8 tensor with values 0..255, found {pixels.dtype}")
    return (2 * (pixels.double() + 0.5) / 256 - 1).float()


def decode_pixels(x: Tensor) -> Tensor:
    """The nearest of the 256 bin centres (the argmax of VDM's decoder), as uint8."""
    return torch.clamp(torch.round((x + 1) * 128 - 0.5), 0, 255).to(torch.uint8)


def _prior_kl(f: Tensor, logsnr_min: Tensor) -> Tensor:
    """KL(q(z_1 | x) || N(0, I)) = 1/2 sum(sigma_1^2 + alpha_1^2 x^2 - log sigma_1^2 - 1)."""
    alpha2, sigma2 = torch.sigmoid(logsnr_min), torch.sigmoid(-logsnr_min)
    log_sigma2 = torch.nn.functional.logsigmoid(-logsnr_min)
    return 0.5 * (sigma2 + alpha2 * f.pow(2) - log_sigma2 - 1).flatten(1).sum(1)


def _reconstruction(f: Tensor, pixels: Tensor | None, logsnr_max: Tensor, eps_0: Tensor) -> Tensor:
    """-log p(x | z_0), with z_0 / alpha_0 = x + e^{-logsnr_max / 2} eps_0 drawn directly (VDM)."""
    scale = torch.exp(-logsnr_max / 2)  # sigma_0 / alpha_0
    z0_rescaled = f + scale * eps_0
    if pixels is None:  # Gaussian decoder N(x; z_0 / alpha_0, sigma_0^2 / alpha_0^2) for continuous data
        nll = 0.5 * eps_0.pow(2) + torch.log(scale) + 0.5 * math.log(2 * math.pi)
        return nll.flatten(1).sum(1)
    grid = (2 * (torch.arange(256, device=f.device, dtype=f.dtype) + 0.5) / 256 - 1)
    logits = -0.5 * ((z0_rescaled.unsqueeze(-1) - grid) / scale).pow(2)
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -torch.gather(log_probs, -1, pixels.long().unsqueeze(-1)).squeeze(-1)
    return nll.flatten(1).sum(1)


def vlb(net: Callable, x: Tensor, cond: Tensor | None, *, schedule: schedules.Schedule, data: DataKind,
        steps: int = 0, t: Tensor | None = None, eps: Tensor | None = None, eps_0: Tensor | None = None,
        generator: torch.Generator | None = None, variance_minimising: bool = False) -> VLBTerms:
    """VDM's variational bound, per example, in nats (VDM eq. 11-17).

    data="pixels8": x is uint8 in 0..255 and the reconstruction uses the 256-way discrete decoder.
    data="continuous": x is a float tensor (e.g. VAE latents) with a Gaussian decoder.
    steps=0 is continuous time, 1/2 (-dlogsnr/dt) ||eps - eps_hat||^2 with the derivative from the schedule
    (autograd for learned ones); steps=T > 0 is VDM's discrete-time L_T (eq. 13).
    variance_minimising: for a schedule with learned shape (LearnedNNet), the gradient reaching its shape
    parameters becomes that of E[L^2] instead of E[L] (VDM App. I.2), while the network and the endpoints
    still receive the bound's gradient."""
    if data not in DATA_KINDS:
        raise ValueError(f"unknown data kind {data!r}; valid kinds: {', '.join(DATA_KINDS)}")
    pixels = x if data == "pixels8" else None
    if pixels is not None:
        f = encode_pixels(pixels).to(x.device)
    else:
        if not x.is_floating_point():
            raise ValueError(f"continuous data must be a floating-point tensor, found {x.dtype}; "
                             "use data='pixels8' for 8-bit images")
        f = x
    check_finite("the data", f)
    n = f.shape[0]
    if t is None:
        t = timesteps.antithetic(n, generator)
    t = t.to(f.device)
    if eps is None:
        eps = torch.randn(f.shape, generator=generator, dtype=f.dtype).to(f.device)
    if eps_0 is None:
        eps_0 = torch.randn(f.shape, generator=generator, dtype=f.dtype).to(f.device)
    logsnr_min, logsnr_max = schedule.endpoints
    logsnr_min, logsnr_max = logsnr_min.to(f), logsnr_max.to(f)

    prior = check_finite("the prior term", _prior_kl(f, logsnr_min))
    reconstruction = check_finite("the reconstruction term", _reconstruction(f, pixels, logsnr_max, eps_0))

    if steps > 0:
        t, s = timesteps.snap(t, steps)
        logsnr_t, _, shape = schedule.logsnr_and_rate(t)
        logsnr_s = schedule.logsnr(s)
        mse = eps_mse(net, f, cond, logsnr_t, eps)
        diffusion = 0.5 * steps * torch.expm1(logsnr_s - logsnr_t).to(f.dtype) * mse
    else:
        logsnr_t, rate, shape = schedule.logsnr_and_rate(t)
        mse = eps_mse(net, f, cond, logsnr_t, eps)
        diffusion = 0.5 * (-rate).to(f.dtype) * mse
    diffusion = check_finite("the diffusion term", diffusion)
    terms = VLBTerms(prior, reconstruction, diffusion)
    if variance_minimising and shape:
        factor = 2 * terms.total.detach()
        for tensor in (s for s in shape if s.requires_grad):
            tensor.register_hook(lambda grad, factor=factor: grad * factor.to(grad))
    return terms


def per_dim(nats: Tensor, x: Tensor, data: DataKind) -> Tensor:
    """Bits per dimension for 8-bit pixels, nats per dimension for continuous data."""
    dims = x[0].numel()
    return nats / (dims * math.log(2)) if data == "pixels8" else nats / dims

