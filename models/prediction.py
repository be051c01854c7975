"""What a network predicts (eps, v, x or F) and exact conversions between them (VDM App. A; Salimans & Ho 2022; Karras et al. 2022).

Everything is variance preserving: z = alpha x + sigma eps with alpha^2 = sigmoid(logsnr),
sigma^2 = sigmoid(-logsnr). All functions broadcast a per-example logsnr of shape (B,) over (B, ...).
"""
from __future__ import annotations

import torch
from torch import Tensor

PREDICTIONS = ("eps", "v", "x", "F")
SIGMA_DATA = 0.5  # EDM's sigma_data, used by F-prediction


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid predictions: {', '.join(PREDICTIONS)}")
    return prediction


def expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example (B,) tensor to broadcast against `like` of shape (B, ...)."""
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = sqrt(sigmoid(logsnr)), sigma = sqrt(sigmoid(-logsnr)); never 1 - x, so both stay accurate."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def diffuse(x: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """z_t = alpha_t x + sigma_t eps (VDM eq. 1)."""
    alpha, sigma = alpha_sigma(expand(logsnr, x))
    return alpha * x + sigma * eps


def _edm_coefficients(logsnr: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """c_skip, c_out of EDM preconditioning in VE coordinates, sigma~ = exp(-logsnr / 2)."""
    sigma_ve2 = torch.exp(-logsnr)
    c_skip = sigma_data**2 / (sigma_ve2 + sigma_data**2)
    c_out = sigma_ve2.sqrt() * sigma_data / (sigma_ve2 + sigma_data**2).sqrt()
    return c_skip, c_out


def to_x(out: Tensor, z: Tensor, logsnr: Tensor, prediction: str, sigma_data: float = SIGMA_DATA) -> Tensor:
    """The data estimate x_hat implied by a network output."""
    check_prediction(prediction)
    lam = expand(logsnr, z)
    alpha, sigma = alpha_sigma(lam)
    if prediction == "eps":
        return (z - sigma * out) / alpha
    if prediction == "v":
        return alpha * z - sigma * out
    if prediction == "x":
        return out
    c_skip, c_out = _edm_coefficients(lam, sigma_data)
    return c_skip * (z / alpha) + c_out * out


def to_eps(out: Tensor, z: Tensor, logsnr: Tensor, prediction: str, sigma_data: float = SIGMA_DATA) -> Tensor:
    """The noise estimate eps_hat implied by a network output."""
    check_prediction(prediction)
    lam = expand(logsnr, z)
    alpha, sigma = alpha_sigma(lam)
    if prediction == "eps":
        return out
    if prediction == "v":
        return sigma * z + alpha * out
    return (z - alpha * to_x(out, z, logsnr, prediction, sigma_data)) / sigma


def from_x(x_hat: Tensor, z: Tensor, logsnr: Tensor, prediction: str, sigma_data: float = SIGMA_DATA) -> Tensor:
    """The network output that implies the data estimate x_hat (inverse of `to_x`)."""
    check_prediction(prediction)
    lam = expand(logsnr, z)
    alpha, sigma = alpha_sigma(lam)
    if prediction == "eps":
        return (z - alpha * x_hat) / sigma
    if prediction == "v":
        return (alpha * z - x_hat) / sigma
    if prediction == "x":
        return x_hat
    c_skip, c_out = _edm_coefficients(lam, sigma_data)
    return (x_hat - c_skip * (z / alpha)) / c_out


def from_eps(eps_hat: Tensor, z: Tensor, logsnr: Tensor, prediction: str, sigma_data: float = SIGMA_DATA) -> Tensor:
    """The network output that implies the noise estimate eps_hat (inverse of `to_eps`)."""
    lam = expand(logsnr, z)
    alpha, sigma = alpha_sigma(lam)
    return from_x((z - sigma * eps_hat) / alpha, z, logsnr, prediction, sigma_data)


def target(x: Tensor, eps: Tensor, logsnr: Tensor, prediction: str, sigma_data: float = SIGMA_DATA) -> Tensor:
    """The regression target of each prediction type for a clean x and its noise eps."""
    return from_x(x, diffuse(x, eps, logsnr), logsnr, prediction, sigma_data)
