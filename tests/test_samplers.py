import pytest
import torch

from models.gaussian import GaussianDenoiser
from models import objective, samplers, schedules

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def schedule():
    return schedules.build(schedules.ScheduleConfig(name="cosine", logsnr_min=-12.0, logsnr_max=12.0)).double()


@pytest.mark.parametrize("sampler", [samplers.ancestral, samplers.ddim])
def test_samples_from_analytic_denoiser_match_data_mean_and_covariance(sampler):
    g = torch.Generator().manual_seed(0)
    x = sampler(GaussianDenoiser(MEAN, COV), (8000, 2), None, schedule=schedule(), steps=250, generator=g,
                dtype=torch.float64)
    scale = float(COV.diagonal().sqrt().max())
    assert float((x.mean(0) - MEAN).abs().max()) < 0.05 * scale
    cov = torch.cov(x.T)
    assert float((cov - COV).abs().max()) < 0.05 * float(COV.abs().max())


class TwoClass(torch.nn.Module):
    """Predicts x = the class mean; class 2 is the null class with mean 0."""

    prediction = "x"

    def forward(self, z, logsnr, cond):
        means = torch.tensor([[1.0, 1.0], [-1.0, 2.0], [0.0, 0.0]], dtype=z.dtype)
        return means[cond]


def test_guidance_one_is_conditional_and_zero_is_unconditional():
    net = TwoClass()
    z = torch.randn(4, 2, dtype=torch.float64)
    logsnr = torch.zeros(4, dtype=torch.float64)
    cond = torch.tensor([0, 1, 0, 1])
    torch.testing.assert_close(samplers.guided(net, 1.0, 2)(z, logsnr, cond), net(z, logsnr, cond))
    torch.testing.assert_close(samplers.guided(net, 0.0, 2)(z, logsnr, cond), torch.zeros(4, 2, dtype=z.dtype))
    guided = samplers.guided(net, 3.0, 2)(z, logsnr, cond)
    torch.testing.assert_close(guided, 3.0 * net(z, logsnr, cond))
    assert samplers.guided(net, 3.0, 2).prediction == "x"


def test_sampling_is_seeded_and_guidance_needs_labels():
    net = GaussianDenoiser(MEAN, COV)
    a = samplers.ancestral(net, (16, 2), None, schedule=schedule(), steps=10,
                           generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = samplers.ancestral(net, (16, 2), None, schedule=schedule(), steps=10,
                           generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="null class"):
        samplers.ddim(net, (16, 2), None, schedule=schedule(), steps=10, guidance=2.0)


def test_decode_pixels_inverts_encode_pixels():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    assert torch.equal(objective.decode_pixels(objective.encode_pixels(pixels)), pixels)
