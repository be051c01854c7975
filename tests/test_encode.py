import io

import numpy as np
import pytest
import torch

from data import demo, encode, writer
from data.reader import iterate_shard
from data.stream import Stream, StreamConfig
from launch.cli import main
from models.vae import LatentVAE


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(path)
    return str(path)


def test_latents_are_the_vae_encoding_of_each_image_and_its_mirror(tmp_path, vae_path):
    demo.write(str(tmp_path / "images"), num_images=40, samples_per_shard=16)
    index = encode.write(str(tmp_path / "images"), str(tmp_path / "latents"), vae=vae_path, scale=0.5, shift=0.1)
    assert index["kind"] == "latents" and index["num_samples"] == 40 and len(index["shards"]) == 3
    vae = LatentVAE.from_pretrained(vae_path, 0.5, 0.1)
    sample = next(iterate_shard(str(tmp_path / "latents" / index["shards"][0]["name"])))
    key = int(sample["__key__"])
    image, label = demo.draw(0, int(np.random.default_rng(0).permutation(40)[key]))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    for member, view in (("latent.npy", x), ("latent_flip.npy", x.flip(3))):
        stored = np.load(io.BytesIO(sample[member]))
        assert stored.dtype == np.float16 and stored.shape == (4, 16, 16)
        torch.testing.assert_close(torch.from_numpy(stored).float(), vae.encode(view)[0], atol=2e-3, rtol=2e-3)
    assert int(sample["cls"]) == label


def test_latent_stream_flips_by_choosing_the_stored_mirror_latent_and_is_float_whatever_the_dtype(tmp_path, vae_path):
    demo.write(str(tmp_path / "images"), num_images=24, samples_per_shard=24)
    encode.write(str(tmp_path / "images"), str(tmp_path / "latents"), vae=vae_path, scale=1.0)
    config = dict(index=str(tmp_path / "latents"), batch_size=24, num_workers=0)
    plain = next(iter(Stream(StreamConfig(**config, flip=False))))
    flipped = next(iter(Stream(StreamConfig(**config, flip=True))))
    assert plain["x"].shape == (24, 4, 16, 16) and plain["x"].dtype == torch.float32
    same = [torch.equal(a, b) for a, b in zip(plain["x"], flipped["x"])]
    assert 0 < sum(same) < 24
    as_float = next(iter(Stream(StreamConfig(**config, flip=False, dtype="float"))))
    assert torch.equal(as_float["x"], plain["x"])


def test_encode_resumes_and_refuses_other_settings(tmp_path, vae_path, capsys):
    demo.write(str(tmp_path / "images"), num_images=20, samples_per_shard=10)
    args = ["encode", str(tmp_path / "images"), str(tmp_path / "latents"), "--vae", vae_path, "--scale", "0.5"]
    assert main(args) == 0
    first = writer.load_index(str(tmp_path / "latents"))
    (tmp_path / "latents" / first["shards"][1]["name"]).unlink()
    assert main(args) == 0
    assert writer.load_index(str(tmp_path / "latents")) == first
    with pytest.raises(ValueError, match="scale=0.5 \\(asked 0.25\\)"):
        main(args[:-1] + ["0.25"])


@pytest.mark.slow
def test_parallel_encoding_gives_the_same_shards(tmp_path, vae_path):
    demo.write(str(tmp_path / "images"), num_images=30, samples_per_shard=10)
    serial = encode.write(str(tmp_path / "images"), str(tmp_path / "a"), vae=vae_path, scale=0.5)
    parallel = encode.write(str(tmp_path / "images"), str(tmp_path / "b"), vae=vae_path, scale=0.5, processes=2)
    assert [s["sha256"] for s in serial["shards"]] == [s["sha256"] for s in parallel["shards"]]
