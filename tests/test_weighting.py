import math

import pytest
import torch

from models import schedules
from models import weighting as W

GRID = torch.linspace(-20, 20, 4001, dtype=torch.float64)


def normal_pdf(x, mean, std):
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("name, closed_form", [
    ("elbo", lambda l: torch.ones_like(l)),
    ("sigmoid", lambda l: 1 / (1 + torch.exp(l - 2.0))),
    ("v", lambda l: torch.exp(-l / 2)),
    ("iddpm", lambda l: 2 / (torch.exp(l / 2) + torch.exp(-l / 2))),
    ("min_snr", lambda l: 2 / (torch.exp(l / 2) + torch.exp(-l / 2)) * torch.minimum(
        torch.ones_like(l), 5.0 / torch.exp(l))),
    ("edm", lambda l: normal_pdf(l, 2.4, 2.4) * (torch.exp(-l) + 0.25) / 0.25),
])
def test_weighting_matches_closed_form(name, closed_form):
    w = W.build(W.WeightingConfig(name=name))
    torch.testing.assert_close(w(GRID), closed_form(GRID), rtol=1e-12, atol=1e-300)


def test_edm_monotonic_is_monotone_and_equals_edm_above_its_peak():
    w = W.build(W.WeightingConfig(name="edm_monotonic"))
    assert W.is_monotone(w, -20, 20)
    edm = W.edm(GRID)
    peak = float(GRID[torch.argmax(edm)])
    assert W.EDM_PEAK == pytest.approx(peak, abs=0.02)
    above = GRID >= W.EDM_PEAK
    torch.testing.assert_close(w(GRID)[above], edm[above])
    torch.testing.assert_close(w(GRID)[~above], torch.full_like(GRID[~above], float(edm.max())), rtol=1e-6,
                               atol=0)


def test_resolution_shift_moves_the_weighting_to_lower_logsnr():
    """w_d(l) = w_64(l - 2 log(64 / d)): at 256 pixels the sigmoid's midpoint moves from b to b - 2 log 4."""
    w = W.build(W.WeightingConfig(name="sigmoid", bias=1.0, resolution=256))
    midpoint = 1.0 - 2 * math.log(4)
    assert float(w(torch.tensor(midpoint, dtype=torch.float64))) == pytest.approx(0.5)


def test_iddpm_and_v_weightings_are_the_cosine_schedules_density():
    """Kingma & Gao 2023: eps-MSE under the cosine schedule has w = sech(l/2) because p(l) = sech(l/2) / (2 pi); v-MSE
    adds a factor (1 + e^-l), giving w proportional to e^-l/2. Checks weightings and schedule density together."""
    cosine = schedules.build(schedules.ScheduleConfig(name="cosine", logsnr_min=-30, logsnr_max=30)).double()
    l = torch.linspace(-10, 10, 101, dtype=torch.float64)
    density = cosine.density(l)
    # truncation at +-30 renormalises by 1 - O(e^-15)
    torch.testing.assert_close(density, W.iddpm(l) / (2 * math.pi), rtol=1e-6, atol=0)
    ratio = density * (1 + torch.exp(-l)) / W.v(l)
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-9, atol=0)


def test_monotonicity_check_rejects_iddpm_and_edm():
    for name in ("iddpm", "edm"):
        assert not W.is_monotone(W.build(W.WeightingConfig(name=name)), -15, 15)
        with pytest.raises(ValueError, match=name):
            W.check(W.WeightingConfig(name=name), -15, 15, elbo_interpretable=True)
    for name in ("elbo", "sigmoid", "edm_monotonic", "v"):
        W.check(W.WeightingConfig(name=name), -15, 15, elbo_interpretable=True)
