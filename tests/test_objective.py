import math

import pytest
import torch

from models.gaussian import decoder_gap, diagonal, entropy, expected_eps_mse, prior_gap
from models import objective, schedules, timesteps, weighting
from models.prediction import alpha_sigma
from models.adaptive import AdaptiveConfig, AdaptiveSampler

MEAN = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
STD = torch.tensor([1.0, 0.3, 2.0, 0.05], dtype=torch.float64)
VDM_RANGE = (-5.0, 13.3)  # VDM's gamma in [-13.3, 5]


def gaussian_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(n, 4, generator=g, dtype=torch.float64), g


def schedule(name, lo=VDM_RANGE[0], hi=VDM_RANGE[1]):
    return schedules.build(schedules.ScheduleConfig(name=name, logsnr_min=lo, logsnr_max=hi)).double()


def mean_and_stderr(values):
    values = values.detach()
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "learned_nnet"])
def test_continuous_vlb_equals_entropy_for_gaussian_data(name):
    """VDM's bound with the optimal denoiser equals h(x) plus the two tiny endpoint gaps, for any schedule
    with the same endpoints (schedule invariance of the continuous-time bound)."""
    x, g = gaussian_batch(4000, seed=1)
    net = diagonal(MEAN, STD)
    terms = objective.vlb(net, x, None, schedule=schedule(name), data="continuous", generator=g)
    h = entropy(torch.diag(STD**2))
    value, stderr = mean_and_stderr(terms.total)
    assert abs(value - h) < 3 * stderr, (value, h, stderr)
    # with -log q(x) as a control variate only the diffusion term's Monte-Carlo noise is left; compare
    # against the exact endpoint gaps
    log_q = torch.distributions.Normal(MEAN, STD).log_prob(x).sum(1)
    gap, gap_err = mean_and_stderr(terms.total + log_q)
    expected = prior_gap(MEAN, STD**2, VDM_RANGE[0]) + decoder_gap(STD**2, VDM_RANGE[1])
    assert abs(gap - expected) < 3 * gap_err + 1e-6, (gap, expected, gap_err)
    assert gap_err < stderr


def test_discrete_bound_decreases_with_steps_towards_continuous():
    """L_2T <= L_T, and L_T approaches the continuous bound (VDM eq. 13-17, App. F)."""
    x, _ = gaussian_batch(4096, seed=2)
    net = diagonal(MEAN, STD)
    sched = schedule("cosine")
    values = {}
    for steps in (0, 16, 32, 64, 128, 1024):
        g = torch.Generator().manual_seed(3)  # common random numbers across T
        t = timesteps.antithetic(x.shape[0], g)  # 4096 is a multiple of every T: each step equally often
        terms = objective.vlb(net, x, None, schedule=sched, data="continuous", steps=steps, t=t, generator=g)
        values[steps] = mean_and_stderr(terms.diffusion)
    exact = {}
    for steps in (16, 32, 64, 128, 1024, 65536):  # closed form: sum_i 1/2 expm1(l_s - l_t) E||eps - eps_hat||^2(l_t)
        t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        l_t, l_s = sched.logsnr(t), sched.logsnr(t - 1 / steps)
        exact[steps] = float((0.5 * torch.expm1(l_s - l_t) * expected_eps_mse(l_t, STD**2)).sum())
        if steps not in values:
            continue
        value, stderr = values[steps]
        assert abs(value - exact[steps]) < 4 * stderr, (steps, value, exact[steps], stderr)
    grid = torch.linspace(*VDM_RANGE, 100001, dtype=torch.float64)
    continuous = float(torch.trapezoid(0.5 * expected_eps_mse(grid, STD**2), grid))
    assert exact[16] > exact[32] > exact[64] > exact[128] > exact[1024] > exact[65536] > continuous
    assert exact[65536] == pytest.approx(continuous, rel=0.01)
    value, stderr = values[0]
    assert abs(value - continuous) < 4 * stderr


class UniformPixelDenoiser:
    """E[x | z] for pixels uniform over the 256 bin centres: a softmax over the grid, per dimension."""

    prediction = "x"

    def __call__(self, z, logsnr, cond):
        grid = 2 * (torch.arange(256, dtype=z.dtype) + 0.5) / 256 - 1
        alpha, sigma = (v.reshape(-1, *[1] * (z.dim() - 1), 1) for v in alpha_sigma(logsnr))
        logits = -0.5 * ((z.unsqueeze(-1) - alpha * grid) / sigma).pow(2)
        return (torch.softmax(logits, -1) * grid).sum(-1)


def test_pixel_bound_of_uniform_8bit_data_is_8_bits_per_dim():
    """With the optimal denoiser the 8-bit bound is a code length just above the data's entropy, 8 bits/dim."""
    g = torch.Generator().manual_seed(4)
    pixels = torch.randint(0, 256, (1024, 3, 2, 2), generator=g, dtype=torch.uint8)
    terms = objective.vlb(UniformPixelDenoiser(), pixels, None, schedule=schedule("linear"), data="pixels8",
                          generator=g)
    value, stderr = mean_and_stderr(objective.per_dim(terms.total, pixels, "pixels8"))
    assert abs(value - 8.0) < 3 * stderr + 0.01, (value, stderr)


@pytest.mark.parametrize("weighting_name", ["sigmoid", "edm_monotonic", "v"])
def test_weighted_loss_is_schedule_invariant_and_matches_quadrature(weighting_name):
    x, _ = gaussian_batch(4000, seed=5)
    net = diagonal(MEAN, STD)
    w = weighting.build(weighting.WeightingConfig(name=weighting_name))
    lo, hi = -10.0, 10.0
    grid = torch.linspace(lo, hi, 200001, dtype=torch.float64)
    exact = float(torch.trapezoid(0.5 * w(grid) * expected_eps_mse(grid, STD**2), grid))
    adaptive = AdaptiveSampler(lo, hi, AdaptiveConfig(bins=50, ema=0.0))
    adaptive.update(torch.linspace(lo, hi, 50, dtype=torch.float64),
                    torch.linspace(1.0, 5.0, 50, dtype=torch.float64))  # a deliberately non-uniform table
    for sampler in (schedule("cosine", lo, hi), schedule("linear", lo, hi), schedule("edm", lo, hi), adaptive):
        g = torch.Generator().manual_seed(6)
        loss = objective.weighted_loss(net, x, None, schedule=sampler, weighting=w,
                                       t=timesteps.antithetic(x.shape[0], g), generator=g)
        value, stderr = mean_and_stderr(loss)
        assert abs(value - exact) < 3 * stderr + 1e-9, (type(sampler).__name__, value, exact, stderr)


def test_variance_minimising_gradient_matches_finite_differences():
    """Endpoints get d E[L] (the bound), the monotone network gets d E[L^2] (the estimator's second moment)."""
    torch.manual_seed(0)
    x, _ = gaussian_batch(64, seed=7)
    net = diagonal(MEAN, STD)
    sched = schedules.LearnedNNet(*VDM_RANGE, hidden=16).double()
    with torch.no_grad():  # move away from the near-linear init so the shape matters
        sched.l3.weight.mul_(50.0)
    g = torch.Generator().manual_seed(8)
    t = timesteps.antithetic(64, g)
    eps = torch.randn(64, 4, generator=g, dtype=torch.float64)
    eps_0 = torch.randn(64, 4, generator=g, dtype=torch.float64)

    def losses():
        return objective.vlb(net, x, None, schedule=sched, data="continuous", t=t, eps=eps, eps_0=eps_0,
                             variance_minimising=True).total

    sched.zero_grad()
    losses().mean().backward()
    params = dict(sched.named_parameters())
    for name, param in params.items():
        direction = torch.randn_like(param)
        analytic = float((param.grad * direction).sum())
        moment = (lambda L: L.pow(2).mean()) if not name.startswith("gamma") else (lambda L: L.mean())
        h = 1e-5
        with torch.no_grad():
            param.add_(h * direction)
            plus = float(moment(losses()))
            param.sub_(2 * h * direction)
            minus = float(moment(losses()))
            param.add_(h * direction)
        numeric = (plus - minus) / (2 * h)
        assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-7), name


def test_shape_parameters_do_not_change_the_bound():
    """With fixed endpoints, the continuous bound's expectation does not depend on the shape (VDM eq. 59)."""
    x, _ = gaussian_batch(4000, seed=9)
    net = diagonal(MEAN, STD)
    sched = schedules.LearnedNNet(*VDM_RANGE, hidden=16).double()
    values = []
    for scale in (1.0, 80.0):
        with torch.no_grad():
            sched.l3.weight.mul_(scale)
        g = torch.Generator().manual_seed(10)
        with torch.no_grad():
            values.append(mean_and_stderr(objective.vlb(net, x, None, schedule=sched, data="continuous",
                                                        generator=g).diffusion))
    (a, ea), (b, eb) = values
    assert abs(a - b) < 3 * math.hypot(ea, eb)


def test_nan_in_data_or_network_output_names_the_term():
    net = diagonal(MEAN, STD)
    x, g = gaussian_batch(8, seed=11)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="the data"):
        objective.vlb(net, bad, None, schedule=schedule("cosine"), data="continuous", generator=g)
    w = weighting.build(weighting.WeightingConfig(name="elbo"))
    with pytest.raises(FloatingPointError, match="the data"):
        objective.weighted_loss(net, bad, None, schedule=schedule("cosine"), weighting=w, generator=g)

    class Broken(torch.nn.Module):
        prediction = "eps"

        def forward(self, z, logsnr, cond):
            return z * float("inf")

    with pytest.raises(FloatingPointError, match="the network output"):
        objective.weighted_loss(Broken(), x, None, schedule=schedule("cosine"), weighting=w, generator=g)


def test_bad_pixels_and_unknown_names_are_refused_with_the_valid_values():
    net = diagonal(MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        objective.vlb(net, torch.rand(2, 4), None, schedule=schedule("cosine"), data="pixels8")
    with pytest.raises(ValueError, match="floating-point"):
        objective.vlb(net, torch.zeros(2, 4, dtype=torch.uint8), None, schedule=schedule("cosine"),
                      data="continuous")
    with pytest.raises(ValueError, match="pixels8, continuous"):
        objective.vlb(net, torch.zeros(2, 4), None, schedule=schedule("cosine"), data="latent")

    class NoPrediction(torch.nn.Module):
        def forward(self, z, logsnr, cond):
            return z

    with pytest.raises(ValueError, match="eps, v, x, F"):
        objective.weighted_loss(NoPrediction(), torch.zeros(2, 4), None, schedule=schedule("cosine"),
                                weighting=weighting.elbo)


def test_elbo_interpretable_objective_refuses_non_monotone_weighting(caplog):
    for name in ("iddpm", "edm", "min_snr"):
        with pytest.raises(ValueError, match=repr(name)):
            objective.ObjectiveConfig(weighting=weighting.WeightingConfig(name=name), elbo_interpretable=True)
    with caplog.at_level("WARNING"):
        objective.ObjectiveConfig(weighting=weighting.WeightingConfig(name="edm"), elbo_interpretable=False)
    assert sum("not monotone" in r.message for r in caplog.records) == 1
    objective.ObjectiveConfig(weighting=weighting.WeightingConfig(name="edm_monotonic"))
