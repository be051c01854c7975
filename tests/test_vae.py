import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from models.vae import LatentVAE


def tiny_autoencoder() -> "diffusers.AutoencoderKL":
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    ).eval()


@pytest.fixture
def saved(tmp_path):
    autoencoder = tiny_autoencoder()
    autoencoder.save_pretrained(tmp_path / "vae")
    return autoencoder, str(tmp_path / "vae")


def test_from_pretrained_round_trips_saved_weights_and_reads_geometry(saved):
    autoencoder, path = saved
    vae = LatentVAE.from_pretrained(path, scale=0.5, shift=0.1)
    assert vae.downsample_factor == 2 and vae.latent_channels == 4
    for name, p in autoencoder.state_dict().items():
        torch.testing.assert_close(vae.autoencoder.state_dict()[name], p, rtol=0, atol=0)


def test_encode_is_shifted_scaled_posterior_mean(saved, generator):
    autoencoder, path = saved
    vae = LatentVAE.from_pretrained(path, scale=0.5, shift=0.1)
    images = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    latents = vae.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        moments = autoencoder.quant_conv(autoencoder.encoder(images))
    mean = moments[:, :4]  # DiagonalGaussian moments are [mean, logvar] along channels
    torch.testing.assert_close(latents, (mean - 0.1) * 0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.encode(images), latents, rtol=0, atol=0)  # deterministic


def test_decode_inverts_the_latent_scaling(saved, generator):
    autoencoder, path = saved
    vae = LatentVAE.from_pretrained(path, scale=4.0, shift=-0.3)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    images = vae.decode(latents)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        expected = autoencoder.decode(latents / 4.0 - 0.3).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


def test_missing_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-vae")
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        LatentVAE.from_pretrained(missing, scale=0.18215)


def test_wrong_shapes_and_scale_are_rejected(saved):
    _, path = saved
    vae = LatentVAE.from_pretrained(path, scale=1.0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible by 2"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="positive"):
        LatentVAE(vae.autoencoder, scale=0.0)
