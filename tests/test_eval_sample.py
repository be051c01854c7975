import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch
from evalruns import make_run
from inception_weights import inception_weights  # noqa: F401  (fixture)
from launching import torchrun
from PIL import Image

from data import demo
from eval.bpd import bits_per_dim
from eval.checkpoints import load_network
from eval.sample import Interrupted, SampleSettings, generate, labels_of, rank_slice, sample_batch
from launch.cli import main
from models import samplers, schedules
from models.gaussian import GaussianDenoiser
from trainer.store import open_store

RUN = "tiny"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("store")))
    make_run(store, RUN, [1])
    return store


@pytest.fixture(scope="module")
def loaded(store):
    return load_network(store, RUN, 1)


def images_of(loaded, settings, **kw):
    """All of generate's batches, joined."""
    images, labels, ids = zip(*generate(loaded, settings, **kw))
    return torch.cat(images), torch.cat(labels), torch.cat(ids)


def assert_nearly_equal(a, b):
    """uint8 images that went through float networks in differently composed batches: a rounding boundary may
    flip an odd pixel by one level."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    diff = (a.int() - b.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


@pytest.mark.parametrize("sampler", [samplers.ancestral, samplers.ddim])
def test_per_row_generators_draw_each_row_as_if_it_were_alone(sampler):
    net = GaussianDenoiser(torch.tensor([1.0, -0.5], dtype=torch.float64),
                           torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64))
    schedule = schedules.build(schedules.ScheduleConfig(name="cosine")).double()

    def draw(seeds):
        return sampler(net, (len(seeds), 2), None, schedule=schedule, steps=8, dtype=torch.float64,
                       generator=[torch.Generator().manual_seed(s) for s in seeds])

    together = draw([5, 6, 7, 8])
    torch.testing.assert_close(together, torch.cat([draw([s]) for s in (5, 6, 7, 8)]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(draw([7, 5]), together[[2, 0]], rtol=1e-12, atol=1e-12)
    assert len({tuple(row.tolist()) for row in together}) == 4
    with pytest.raises(ValueError, match="found 3 generators for 4 rows"):
        sampler(net, (4, 2), None, schedule=schedule, steps=2, generator=[torch.Generator()] * 3)


def test_rank_slices_partition_the_indices_without_padding():
    for n in (0, 1, 7, 10, 50000):
        for world in (1, 2, 3, 8):
            slices = [rank_slice(n, r, world) for r in range(world)]
            assert [i for s in slices for i in s] == list(range(n))
            assert max(map(len, slices)) - min(map(len, slices)) <= 1


@pytest.mark.parametrize("sampler, guidance", [("ancestral", 1.0), ("ddim", 2.0)])
def test_samples_do_not_depend_on_the_batch_size(loaded, sampler, guidance):
    settings = SampleSettings(n=10, sampler=sampler, steps=4, guidance=guidance, seed=5)
    ids = torch.arange(10)
    floats = {size: torch.cat([sample_batch(loaded, settings, batch) for batch in ids.split(size)]) for size in (3, 5)}
    torch.testing.assert_close(floats[3], floats[5], rtol=0, atol=1e-5)
    three = images_of(loaded, dataclasses.replace(settings, batch_size=3))
    five = images_of(loaded, dataclasses.replace(settings, batch_size=5))
    assert torch.equal(three[1], five[1]) and torch.equal(three[2], five[2]) and torch.equal(three[2], ids)
    assert_nearly_equal(three[0], five[0])
    other_seed = images_of(loaded, dataclasses.replace(settings, seed=6))[0]
    assert (other_seed != five[0]).float().mean() > 0.5


def test_classes_are_balanced_and_no_sample_repeats(loaded):
    images, labels, ids = images_of(loaded, SampleSettings(n=20, steps=2, batch_size=8))
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert ids.tolist() == list(range(20)) and torch.equal(labels, ids % 10)
    assert Counter(labels.tolist()) == {c: 2 for c in range(10)}
    assert len({image.numpy().tobytes() for image in images}) == 20
    # an unconditional network takes the null class 0 and cannot be guided
    assert labels_of(ids, 0).tolist() == [0] * 20
    with pytest.raises(ValueError, match="guidance 2.0 needs a class-conditional network"):
        next(generate(dataclasses.replace(loaded, null_class=None), SampleSettings(n=2, guidance=2.0)))


def test_should_stop_interrupts_between_batches(loaded):
    batches = generate(loaded, SampleSettings(n=9, steps=1, batch_size=3), should_stop=lambda: stop)
    stop = False
    next(batches)
    stop = True
    with pytest.raises(Interrupted, match="after 3 of this rank's 9 samples"):
        next(batches)


def sample_argv(store, *args):
    return ["sample", f"{store.uri}/{RUN}", "--step", "1", "--steps", "2", "--batch-size", "3", *args]


def test_cli_writes_one_png_per_sample_named_by_its_index(store, loaded, tmp_path, capsys):
    assert main(sample_argv(store, "--n", "8", "--out", str(tmp_path / "png"))) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{i:06d}.png" for i in range(8)]
    written = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "png" / f"{i:06d}.png"))) for i in range(8)])
    # the command samples on a GPU when there is one
    assert_nearly_equal(written.permute(0, 3, 1, 2), images_of(loaded, SampleSettings(n=8, steps=2))[0])
    result = json.loads(capsys.readouterr().out)
    assert (result["run"], result["step"], result["n"], result["ema"], result["sampler"]) == (RUN, 1, 8,
                                                                                              "power-0.050", "ddim")


def test_cli_bad_step_returns_2_naming_the_step_and_the_available_ones(store, tmp_path, capsys):
    assert main(["sample", f"{store.uri}/{RUN}", "--step", "7", "--n", "8", "--out", str(tmp_path / "png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("elbodiff sample: ")
    assert "no complete checkpoint at step 7" in err and "complete steps: 1" in err
    assert not (tmp_path / "png").exists()


@pytest.mark.parametrize("args, message", [(["--ema", "power-0.200"], "no EMA weights 'power-0.200'"),
                                           (["--inception", "random"], "needs both --inception"),
                                           (["--sigma-rel", "0.5"], "sigma_rel must lie in")])
def test_cli_user_mistakes_are_one_line(store, capsys, args, message):
    assert main(sample_argv(store, "--n", "2", *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.slow  # the Inception network at 299 x 299: about 4 images a second
def test_cli_computes_fid_of_its_samples_against_reference_statistics(store, tmp_path, capsys, inception_weights):
    from eval import fid, inception

    g = np.random.default_rng(0)
    spread = g.standard_normal((2048, 64))
    network = inception.load(inception_weights)
    reference = fid.Reference(mu=g.standard_normal(2048), sigma=spread @ spread.T / 64 + np.eye(2048), n=1000,
                              resolution=32, extractor=network.extractor, mode="legacy", source="test")
    fid.save_reference(reference, str(tmp_path / "ref.npz"))
    assert main(sample_argv(store, "--n", "4", "--out", str(tmp_path / "png"), "--inception", inception_weights,
                            "--ref", str(tmp_path / "ref.npz"))) == 0
    result = json.loads(capsys.readouterr().out)
    written = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in sorted((tmp_path / "png").iterdir())])
    features = network(written.permute(0, 3, 1, 2))[0].numpy()
    expected = fid.frechet_distance(features.mean(0), np.cov(features, rowvar=False), reference.mu, reference.sigma)
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert result["extractor"] == "random-inception-seed0/legacy" and result["reference"] == reference.id()
    # a reference of another resolution is refused before any sampling
    fid.save_reference(dataclasses.replace(reference, resolution=64), str(tmp_path / "ref64.npz"))
    assert main(sample_argv(store, "--n", "4", "--inception", inception_weights, "--ref",
                            str(tmp_path / "ref64.npz"))) == 2
    assert "64x64" in capsys.readouterr().err


@pytest.mark.slow  # one 2-rank launch: two processes importing torch, then the work (under a second)
def test_two_ranks_sample_the_same_images_and_bound_as_one_rank(store, loaded, tmp_path):
    demo.write(str(tmp_path / "val"), num_images=12, samples_per_shard=5)
    out = tmp_path / "npz"
    code = torchrun(["tests/sample_worker.py", store.uri, RUN, str(tmp_path / "val"), str(tmp_path / "bpd.json"),
                     json.dumps(sample_argv(store, "--n", "10", "--format", "npz", "--out", str(out)))],
                    tmp_path / "log")
    assert code == 0, (tmp_path / "log").read_text()[-3000:]
    assert [p.name for p in out.iterdir()] == ["samples_10x32x32x3.npz"]  # the ranks' parts are gone
    with np.load(out / "samples_10x32x32x3.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(10)]
    # one rank, in other batches (the two ranks drew batches of 3 and 2)
    expected = images_of(loaded, SampleSettings(n=10, steps=2, batch_size=4))[0]
    assert_nearly_equal(torch.from_numpy(images).permute(0, 3, 1, 2), expected)
    two = json.loads((tmp_path / "bpd.json").read_text())
    one = bits_per_dim(loaded, str(tmp_path / "val"), batch_size=8)
    assert two["world"] == 2 and two["n"] == one["n"] == 12
    assert two["value"] == pytest.approx(one["value"], rel=1e-6)
    assert two["stderr"] == pytest.approx(one["stderr"], rel=1e-4)


@pytest.mark.slow  # importing diffusers takes most of it
def test_latent_run_is_sampled_in_latent_space_and_decoded_by_the_vae(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    from data import encode
    from models.vae import LatentVAE

    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    demo.write(str(tmp_path / "images"), num_images=4, samples_per_shard=4)
    encode.write(str(tmp_path / "images"), str(tmp_path / "latents"), vae=str(tmp_path / "vae"), scale=0.5,
                 shift=0.1)
    store = open_store(str(tmp_path / "store"))
    make_run(store, RUN, [1], overrides=("network.preset=uvit_latent_tiny", "network.overrides={resolution: 16}",
                                         f"data.index={tmp_path / 'latents'}"))
    loaded = load_network(store, RUN, 1)
    assert loaded.latent["scale"] == 0.5 and loaded.latent["shift"] == 0.1 and loaded.resolution == 32
    vae = LatentVAE.from_pretrained(str(tmp_path / "vae"), 0.5, 0.1)
    settings = SampleSettings(n=4, steps=2, batch_size=4)
    images = images_of(loaded, settings, vae=vae)[0]
    latents = sample_batch(loaded, settings, torch.arange(4))
    assert latents.shape == (4, 4, 16, 16)
    decoded = ((vae.decode(latents) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert images.shape == (4, 3, 32, 32) and torch.equal(images, decoded)
    with pytest.raises(ValueError, match="give the autoencoder"):
        next(generate(loaded, settings))
    assert main(["sample", f"{store.uri}/{RUN}", "--step", "1", "--n", "2"]) == 2
    assert "give --vae" in capsys.readouterr().err
    assert main(["sample", f"{store.uri}/{RUN}", "--step", "1", "--n", "2", "--steps", "2", "--vae",
                 str(tmp_path / "vae"), "--out", str(tmp_path / "png")]) == 0
    written = torch.from_numpy(np.array(Image.open(tmp_path / "png" / "000001.png"))).permute(2, 0, 1)
    assert_nearly_equal(written[None], images[1:2])
