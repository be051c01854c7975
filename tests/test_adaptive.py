import torch

from models import timesteps
from models.adaptive import AdaptiveConfig, AdaptiveSampler

LO, HI = -10.0, 10.0


def profile(logsnr):
    """A fixed w * E||eps - eps_hat||^2 profile, peaked and spanning two orders of magnitude."""
    return 0.05 + torch.exp(-0.5 * ((logsnr - 2.0) / 1.5) ** 2)


def learn(sampler, draw, steps, n, seed):
    """Train the sampler's table on the fixed profile; returns the generator for further draws."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        logsnr, _ = sampler.sample(draw(n, g))
        sampler.update(logsnr, profile(logsnr))
    return g


def test_density_converges_to_weighted_loss_profile():
    sampler = AdaptiveSampler(LO, HI, AdaptiveConfig(bins=40, ema=0.99))
    learn(sampler, timesteps.antithetic, 1500, 256, seed=0)
    centres = HI - (torch.arange(40, dtype=torch.float64) + 0.5) * sampler.width
    # the bin mean of the profile, by quadrature inside each bin
    fine = torch.linspace(0, 1, 201, dtype=torch.float64)
    per_bin = torch.stack([profile(c + (0.5 - fine) * sampler.width).mean() for c in centres])
    expected = per_bin / per_bin.sum()
    torch.testing.assert_close(sampler.masses(), expected, rtol=0.03, atol=1e-4)


def test_sampled_density_is_the_table_used_and_integrates_to_one():
    sampler = AdaptiveSampler(LO, HI, AdaptiveConfig(bins=10, ema=0.0))
    sampler.update(torch.linspace(LO, HI, 10, dtype=torch.float64), torch.arange(1.0, 11.0, dtype=torch.float64))
    t = torch.linspace(0, 1, 100001, dtype=torch.float64)[:-1]
    logsnr, density = sampler.sample(t)
    torch.testing.assert_close(density, sampler.density(logsnr))
    # inverse-CDF sampling: the empirical histogram of a uniform grid of t is the table itself
    hist = torch.histc(logsnr, bins=10, min=LO, max=HI).flip(0) / t.numel()
    torch.testing.assert_close(hist, sampler.masses(), rtol=1e-3, atol=1e-5)
    grid = torch.linspace(LO, HI, 100001, dtype=torch.float64)
    assert abs(float(torch.trapezoid(sampler.density(grid), grid)) - 1.0) < 1e-3


def test_floor_keeps_every_bin_reachable():
    sampler = AdaptiveSampler(LO, HI, AdaptiveConfig(bins=4, ema=0.0, floor=0.01))
    sampler.update(torch.tensor([9.0, 4.0, -1.0, -6.0], dtype=torch.float64),
                   torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert bool((sampler.masses() > 0).all())


def test_adaptive_importance_sampling_has_lower_variance_than_uniform():
    """Estimating the integral of the profile: w / p importance weights with the learned p beat p uniform."""
    sampler = AdaptiveSampler(LO, HI, AdaptiveConfig(bins=50, ema=0.9))
    g = learn(sampler, timesteps.uniform, 300, 512, seed=1)
    t = timesteps.uniform(20000, g)
    logsnr, density = sampler.sample(t)
    adaptive = profile(logsnr) / density
    uniform_logsnr = HI - t * (HI - LO)
    uniform = profile(uniform_logsnr) * (HI - LO)
    assert abs(float(adaptive.mean() - uniform.mean())) < 3 * float(uniform.std()) / 141
    assert float(adaptive.var()) < 0.2 * float(uniform.var())


def test_update_accepts_a_cross_rank_reduction():
    """Bin statistics are summed across ranks before the EMA step; with the sum of two halves the result
    equals one process seeing the whole batch."""
    whole = AdaptiveSampler(LO, HI, AdaptiveConfig(bins=8, ema=0.5))
    split = AdaptiveSampler(LO, HI, AdaptiveConfig(bins=8, ema=0.5))
    logsnr = torch.linspace(LO + 0.1, HI - 0.1, 64, dtype=torch.float64)
    values = profile(logsnr)
    whole.update(logsnr, values)
    other_half = split.bin_statistics(logsnr[32:], values[32:])
    split.update(logsnr[:32], values[:32], all_reduce=lambda stats: stats + other_half)
    torch.testing.assert_close(whole.values, split.values)
