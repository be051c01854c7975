import math

import pytest
import torch

from models import schedules as S
from models import timesteps
from trainer.config import ConfigError, from_dict

T = torch.linspace(0.001, 0.999, 257, dtype=torch.float64)


def build(name, **kw):
    kw.setdefault("logsnr_min", -10.0)
    kw.setdefault("logsnr_max", 10.0)
    return S.build(S.ScheduleConfig(name=name, resolution=256, **kw)).double()


@pytest.mark.parametrize("name", S.SCHEDULES)
def test_schedule_endpoints_inverse_derivative_and_density(name):
    s = build(name)
    ends = s.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64)).detach()
    torch.testing.assert_close(ends, torch.tensor([10.0, -10.0], dtype=torch.float64), rtol=0, atol=1e-6)
    logsnr, rate, _ = s.logsnr_and_rate(T)
    logsnr, rate = logsnr.detach(), rate.detach()
    assert bool((rate < 0).all()), "logsnr must decrease in t"
    tol = 1e-5 if name == "learned_nnet" else 1e-9  # the learned network runs in its own float32 layers
    torch.testing.assert_close(s.t_of(logsnr), T, rtol=0, atol=tol)
    h = 1e-6
    numeric = (s.logsnr(T + h) - s.logsnr(T - h)).detach() / (2 * h)
    torch.testing.assert_close(rate, numeric, rtol=1e-4 if name != "learned_nnet" else 3e-2, atol=1e-6)
    grid = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    mass = float(torch.trapezoid(s.density(grid).detach(), grid))
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_closed_forms_of_the_fixed_schedules():
    t = T
    lin = build("linear", logsnr_min=-5.0, logsnr_max=13.3)
    torch.testing.assert_close(lin.logsnr(t), 13.3 - 18.3 * t)
    cos = build("cosine", logsnr_min=-40.0, logsnr_max=40.0)
    torch.testing.assert_close(cos.logsnr(t), -2 * torch.log(torch.tan(math.pi * t / 2)), rtol=1e-6, atol=1e-6)
    shifted = build("shifted_cosine", logsnr_min=-40.0, logsnr_max=40.0)  # resolution 256
    torch.testing.assert_close(shifted.logsnr(t), -2 * torch.log(torch.tan(math.pi * t / 2)) + 2 * math.log(64 / 256),
                               rtol=1e-6, atol=1e-6)
    vp = build("vp", logsnr_min=-20.0, logsnr_max=20.0)
    lam = vp.logsnr(t)
    u = vp.u_lo + t * (vp.u_hi - vp.u_lo)
    alpha2 = torch.exp(-(u * u * (20 - 0.1) / 2 + u * 0.1))  # Song et al. 2021, VP-SDE
    torch.testing.assert_close(lam, torch.log(alpha2 / (1 - alpha2)))
    edm = build("edm", logsnr_min=-30.0, logsnr_max=30.0)
    normal = torch.distributions.Normal(2.4, 2.4)
    l = torch.linspace(-5, 10, 31, dtype=torch.float64)
    torch.testing.assert_close(edm.density(l), normal.log_prob(l).exp(), rtol=1e-6, atol=1e-12)


def test_interpolated_cosine_moves_from_high_to_low_resolution_shift():
    s = build("interpolated_cosine", logsnr_min=-15.0, logsnr_max=15.0)
    cosine = S.Cosine(-15.0 - 2 * math.log(64 / 32), 15.0 - 2 * math.log(64 / 256)).double()
    shift = 2 * math.log(64 / 256) + T * (2 * math.log(64 / 32) - 2 * math.log(64 / 256))
    torch.testing.assert_close(s.logsnr(T), cosine.logsnr(T) + shift)


def test_logsnr_outside_range_and_unknown_schedule_are_refused():
    s = build("cosine")
    with pytest.raises(ValueError, match=r"outside the schedule's range \[-10, 10\]"):
        s.t_of(torch.tensor([11.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="'linear', 'cosine'"):
        from_dict(S.ScheduleConfig, {"name": "quadratic"})
    with pytest.raises(ValueError, match="must be below"):
        S.ScheduleConfig(logsnr_min=5.0, logsnr_max=-5.0)


def test_learned_scalar_endpoints_carry_gradients():
    s = S.build(S.ScheduleConfig(name="learned_scalar", logsnr_min=-5.0, logsnr_max=13.3))
    lo, hi = s.endpoints
    (lo + 2 * hi).backward()
    assert s.bias.grad is not None and s.scale.grad is not None


def test_antithetic_times_stratify_the_global_batch_across_ranks():
    g = [torch.Generator().manual_seed(5) for _ in range(2)]
    ranks = [timesteps.antithetic(8, g[r], start=8 * r, total=16) for r in range(2)]
    both = torch.sort(torch.cat(ranks)).values
    gaps = both[1:] - both[:-1]
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 16))
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())


def test_discrete_snapping():
    t, s = timesteps.snap(torch.tensor([0.0, 0.01, 0.5, 0.51, 1.0], dtype=torch.float64), 10)
    torch.testing.assert_close(t, torch.tensor([0.1, 0.1, 0.5, 0.6, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s, t - 0.1)
    with pytest.raises(ValueError, match="positions 12..15 are outside a global batch of 14"):
        timesteps.antithetic(4, start=12, total=14)
