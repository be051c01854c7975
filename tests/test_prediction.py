import pytest
import torch

from models import prediction as P


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    logsnr = torch.linspace(-12, 12, 64, dtype=torch.float64)
    return x, eps, logsnr


@pytest.mark.parametrize("kind", P.PREDICTIONS)
def test_conversions_round_trip_to_float64_precision(batch, kind):
    x, eps, logsnr = batch
    z = P.diffuse(x, eps, logsnr)
    out = P.target(x, eps, logsnr, kind)
    torch.testing.assert_close(P.to_x(out, z, logsnr, kind), x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(P.to_eps(out, z, logsnr, kind), eps, rtol=1e-9, atol=1e-9)
    other = torch.randn_like(out)
    torch.testing.assert_close(P.from_x(P.to_x(other, z, logsnr, kind), z, logsnr, kind), other,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(P.from_eps(P.to_eps(other, z, logsnr, kind), z, logsnr, kind), other,
                               rtol=1e-8, atol=1e-8)


def test_targets_and_error_identities_match_spec(batch):
    """v = alpha eps - sigma x, ||x - x_hat||^2 = e^-l ||eps - eps_hat||^2,
    ||v - v_hat||^2 = (1 + e^-l) ||eps - eps_hat||^2, F target by EDM's preconditioning."""
    x, eps, logsnr = batch
    lam = logsnr[:, None, None, None]
    alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    torch.testing.assert_close(P.target(x, eps, logsnr, "v"), alpha * eps - sigma * x)
    z = P.diffuse(x, eps, logsnr)
    eps_hat = eps + 0.1 * torch.randn_like(eps)
    x_err = (x - P.to_x(eps_hat, z, logsnr, "eps")).pow(2).flatten(1).sum(1)
    eps_err = (eps - eps_hat).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(x_err, torch.exp(-logsnr) * eps_err)
    v_hat = P.from_eps(eps_hat, z, logsnr, "v")
    v_err = (P.target(x, eps, logsnr, "v") - v_hat).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(v_err, (1 + torch.exp(-logsnr)) * eps_err)
    sigma_ve = torch.exp(-lam / 2)
    sd = P.SIGMA_DATA
    c_skip = sd**2 / (sigma_ve**2 + sd**2)
    c_out = sigma_ve * sd / (sigma_ve**2 + sd**2).sqrt()
    torch.testing.assert_close(P.target(x, eps, logsnr, "F"), (x - c_skip * z / alpha) / c_out)


def test_unknown_prediction_lists_the_valid_ones():
    with pytest.raises(ValueError, match="eps, v, x, F"):
        P.to_x(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), "score")
