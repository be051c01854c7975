"""Shared training check: a tiny network fitted with the weighted loss to 16 fixed images on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import schedules, weighting
from models.objective import weighted_loss

STEPS = 200
EVAL_DRAWS = 4


def sixteen_images(channels: int, resolution: int) -> torch.Tensor:
    """Smooth, high-contrast images: random 4x4 fields upsampled and pushed towards +-1."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(16, channels, 4, 4, generator=g) * 2 - 1
    return torch.tanh(4 * F.interpolate(coarse, size=resolution, mode="bilinear"))


def fit(net: torch.nn.Module, num_classes: int) -> tuple[float, float, torch.Tensor]:
    """Trains for STEPS AdamW steps with fresh t and eps; returns the mean weighted loss before and after training
    on one fixed set of (t, eps) draws per image, and the fixed batch the loss was evaluated on (x, cond, logsnr).

    Fresh noise at every step means the network must learn to denoise, not memorise 16 (t, eps) pairs.
    """
    c = net.config
    x = sixteen_images(c.in_channels, c.resolution)
    cond = torch.arange(16) % max(num_classes, 1)
    schedule = schedules.build(schedules.ScheduleConfig(name="cosine", logsnr_min=-15.0, logsnr_max=15.0))
    w = weighting.build(weighting.WeightingConfig(name="sigmoid", bias=2.0))
    g = torch.Generator().manual_seed(2)
    x_eval, cond_eval = x.repeat(EVAL_DRAWS, 1, 1, 1), cond.repeat(EVAL_DRAWS)
    t_eval, eps_eval = torch.rand(len(x_eval), generator=g), torch.randn(x_eval.shape, generator=g)

    def evaluate() -> float:
        net.eval()
        with torch.no_grad():
            return weighted_loss(net, x_eval, cond_eval, schedule=schedule, weighting=w, t=t_eval,
                                 eps=eps_eval).mean().item()

    before = evaluate()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    train_generator = torch.Generator().manual_seed(3)
    net.train()
    for _ in range(STEPS):
        loss = weighted_loss(net, x, cond, schedule=schedule, weighting=w, generator=train_generator).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return before, evaluate(), x


def output_moves_with_logsnr(net: torch.nn.Module, x: torch.Tensor, num_classes: int) -> float:
    """Relative change of the raw output when only logsnr changes (0 for a network that ignores logsnr)."""
    net.eval()
    z = 0.8 * x + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    cond = torch.arange(len(x)) % max(num_classes, 1)
    with torch.no_grad():
        a = net(z, torch.full((len(x),), 1.0), cond)
        b = net(z, torch.full((len(x),), 4.0), cond)
    return ((a - b).norm() / a.norm()).item()
