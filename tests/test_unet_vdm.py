import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.presets import build_network, preset_config
from models.unet_vdm import GammaEmbedding, encoder_flops_per_forward, flops_per_forward, fourier_features
from overfit import fit, output_moves_with_logsnr


def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def test_base_measure_predicts_eps_hat_equal_z_at_initialisation():
    net = build_network("vdm_tiny")
    z = torch.randn(2, 3, 16, 16)
    assert net.prediction == "eps"
    torch.testing.assert_close(net(z, torch.randn(2), torch.zeros(2, dtype=torch.long)), z, rtol=0, atol=0)


def test_fourier_features_are_sin_and_cos_of_2_to_the_n_times_2_pi_z():
    z = torch.randn(2, 3, 4, 4)
    features = fourier_features(z)
    assert features.shape == (2, 12, 4, 4)
    # VDM's Base2FourierFeatures(6, 8, 1): channel c contributes frequencies n = 6, 7 next to each other.
    for c in range(3):
        for i, n in enumerate((6, 7)):
            w = 2**n * 2 * math.pi
            torch.testing.assert_close(features[:, 2 * c + i], torch.sin(w * z[:, c]), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(features[:, 6 + 2 * c + i], torch.cos(w * z[:, c]), rtol=1e-5, atol=1e-4)


def test_time_embedding_reads_normalised_gamma_times_1000():
    emb = GammaEmbedding(8, gamma_min=-13.3, gamma_max=5.0)

    def through_mlp(sinusoid: torch.Tensor) -> torch.Tensor:
        return F.silu(emb.dense2(F.silu(emb.dense1(sinusoid))))

    freqs = torch.tensor([10000 ** (-k / 3) for k in range(4)])
    # logsnr = 13.3 is gamma_min (t_in = 0); logsnr = -5 is gamma_max (t_in = 1, sinusoid of 1000).
    at_zero = torch.cat([torch.zeros(4), torch.ones(4)])[None]
    at_one = torch.cat([torch.sin(1000 * freqs), torch.cos(1000 * freqs)])[None]
    torch.testing.assert_close(emb(torch.tensor([13.3])), through_mlp(at_zero), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb(torch.tensor([-5.0])), through_mlp(at_one), rtol=1e-4, atol=1e-4)


def test_score_unet_never_resamples_and_has_n_down_n_plus_1_up_blocks():
    net = perturbed(build_network("vdm_tiny"))
    sizes = set()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: sizes.add(tuple(o.shape[2:])))
    net(torch.randn(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert sizes == {(16, 16)}
    assert len(net.down) == 2 and len(net.up) == 3
    assert net.conv_in.in_channels == 15  # z plus sin and cos at two frequencies, for RGB


def test_cifar10_preset_is_the_vdm_cifar10_config():
    c = preset_config("vdm_cifar10")
    assert (c.n_embd, c.n_layer, c.dropout, c.with_attention, c.resolution) == (128, 32, 0.1, False, 32)
    assert (c.gamma_min, c.gamma_max) == (-13.3, 5.0)


@pytest.mark.parametrize("overrides", [{}, {"with_attention": True, "num_classes": 10}])
def test_analytic_flops_match_flop_counter(overrides):
    net = build_network("vdm_tiny", **overrides).eval()
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        net(torch.randn(2, 3, 16, 16), torch.randn(2), torch.zeros(2, dtype=torch.long))
    expected = counter.get_total_flops()
    assert abs(flops_per_forward(net.config, batch=2) - expected) <= 0.05 * expected


def test_analytic_flops_match_flop_counter_on_meta_for_cifar10():
    with torch.device("meta"):
        net = build_network("vdm_cifar10")
        counter = FlopCounterMode(display=False)
        with counter:
            out = net(torch.empty(2, 3, 32, 32), torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 3, 32, 32)
    expected = counter.get_total_flops()
    assert abs(flops_per_forward(net.config, batch=2) - expected) <= 0.05 * expected


def test_unconditional_net_accepts_only_the_null_class_and_conditional_net_uses_labels():
    net = build_network("vdm_tiny")
    with pytest.raises(ValueError, match=r"\[0, 0\]"):
        net(torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.ones(1, dtype=torch.long))
    net = perturbed(build_network("vdm_tiny", num_classes=10)).eval()
    z = torch.randn(2, 3, 16, 16)
    a = net(z, torch.zeros(2), torch.tensor([1, 2]))
    b = net(z, torch.zeros(2), torch.tensor([10, 10]))
    assert (a - b).abs().max() > 1e-4


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = perturbed(build_network("vdm_tiny", checkpointing=checkpointing)).train()
        net(torch.ones(2, 3, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long)).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_diffenc_encoder_starts_at_zero_and_stays_in_minus_one_one():
    encoder = build_network("diffenc_encoder_tiny")
    x = torch.randn(2, 3, 16, 16)
    assert encoder(x, torch.zeros(2)).abs().max() == 0  # x_phi = alpha^2 x at initialisation
    with torch.no_grad():
        encoder.conv_out.weight.normal_(0, 5.0)
    pre = []
    encoder.conv_out.register_forward_hook(lambda m, i, o: pre.append(o))
    y = encoder(x, torch.zeros(2))
    assert pre[0].abs().max() > 2  # large pre-activations, squashed into [-1, 1] by the final tanh
    torch.testing.assert_close(y, torch.tanh(pre[0]), rtol=0, atol=0)
    perturbed(encoder)  # one network for every depth, told apart by logsnr alone
    assert (encoder(x, torch.zeros(2)) - encoder(x, torch.full((2,), 5.0))).abs().max() > 1e-4


def test_diffenc_cifar_encoder_has_two_levels_down_to_8x8_with_attention_in_the_middle():
    encoder = build_network("diffenc_encoder_cifar10")
    shapes = []
    encoder.mid_attn.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    out = encoder(torch.randn(1, 3, 32, 32), torch.zeros(1))
    assert out.shape == (1, 3, 32, 32) and shapes == [(1, 128, 8, 8)]
    assert [len(stage) for stage in encoder.down] == [2, 2]


def test_diffenc_encoder_flops_match_flop_counter():
    encoder = build_network("diffenc_encoder_cifar10").eval()
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        encoder(torch.randn(2, 3, 32, 32), torch.zeros(2))
    expected = counter.get_total_flops()
    assert abs(encoder_flops_per_forward(encoder.config, batch=2) - expected) <= 0.05 * expected


def test_wrong_shapes_raise_errors_naming_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        build_network("vdm_tiny")(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        build_network("diffenc_encoder_tiny")(torch.zeros(1, 1, 16, 16), torch.zeros(1))
    with pytest.raises(ValueError, match="divisible by 2"):
        preset_config("diffenc_encoder_tiny", resolution=18)


@pytest.mark.slow
def test_tiny_score_unet_fits_sixteen_images():
    """200 AdamW steps of the weighted loss (fresh t and eps every step) must cut the loss on a fixed evaluation
    set by 3x, although the base measure already gives eps_hat = z at initialisation. Catches a network that
    ignores its input beyond the base measure, dead gradients and zero-initialised layers that never open; the
    final check catches a network that ignores the gamma embedding."""
    torch.manual_seed(0)
    net = build_network("vdm_tiny")
    before, after, x = fit(net, 0)
    assert after < before / 3, (before, after)
    assert output_moves_with_logsnr(net, x, 0) > 0.01
