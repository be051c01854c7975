"""Closed forms for Gaussian data x ~ N(mean, cov): the optimal denoiser, its error and the entropy.

The Bayes-optimal denoiser is a valid `net(z, logsnr, cond)`: with it the bound and the samplers can be
checked against exact answers (tests, and the demo).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from models.prediction import alpha_sigma, expand


class GaussianDenoiser:
    """E[x | z] for x ~ N(mean, cov), z = alpha x + sigma eps: mean + alpha cov (alpha^2 cov + sigma^2 I)^-1 (z - alpha mean)."""

    prediction = "x"

    def __init__(self, mean: Tensor, cov: Tensor):
        self.mean, self.cov = mean, cov

    def __call__(self, z: Tensor, logsnr: Tensor, cond) -> Tensor:
        alpha, sigma = alpha_sigma(logsnr.to(z.dtype))
        eye = torch.eye(self.cov.shape[0], dtype=z.dtype)
        a = alpha[:, None, None]
        gain = a * self.cov @ torch.linalg.inv(a * a * self.cov + (sigma * sigma)[:, None, None] * eye)
        return self.mean + (gain @ (z - alpha[:, None] * self.mean).unsqueeze(-1)).squeeze(-1)


def diagonal(mean: Tensor, std: Tensor) -> GaussianDenoiser:
    return GaussianDenoiser(mean, torch.diag(std**2))


def entropy(cov: Tensor) -> float:
    """Differential entropy in nats: 1/2 log det(2 pi e cov)."""
    d = cov.shape[0]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + float(torch.logdet(cov)))


def expected_eps_mse(logsnr: Tensor, var: Tensor) -> Tensor:
    """E ||eps - eps_hat||^2 of the optimal denoiser for diagonal variances var: sum alpha^2 v / (alpha^2 v + sigma^2)."""
    alpha2, sigma2 = torch.sigmoid(logsnr), torch.sigmoid(-logsnr)
    a = expand(alpha2, logsnr.unsqueeze(-1))
    s = expand(sigma2, logsnr.unsqueeze(-1))
    return (a * var / (a * var + s)).sum(-1)


def prior_gap(mean: Tensor, var: Tensor, logsnr_min: float) -> float:
    """KL(q(z_1) || N(0, I)) for diagonal Gaussian data: the bound's excess over the entropy at the noisy end."""
    alpha2, sigma2 = torch.sigmoid(torch.tensor(logsnr_min, dtype=torch.float64)), torch.sigmoid(
        torch.tensor(-logsnr_min, dtype=torch.float64))
    v = alpha2 * var + sigma2
    return float(0.5 * (v + alpha2 * mean**2 - 1 - torch.log(v)).sum())


def decoder_gap(var: Tensor, logsnr_max: float) -> float:
    """E KL(q(x | z_0) || N(z_0 / alpha_0, sigma_0^2 / alpha_0^2)): the excess at the clean end."""
    s2 = math.exp(-logsnr_max)  # (sigma_0 / alpha_0)^2
    post_var = var * s2 / (var + s2)
    # q(x|z0) = N(m, post_var) with m - z0/alpha0 having variance s2^2 / (var + s2) under q(z0)
    shift_var = s2 * s2 / (var + s2)
    return float(0.5 * (post_var / s2 + shift_var / s2 - 1 - torch.log(post_var / s2)).sum())
