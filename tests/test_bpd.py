import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import webdataset as wds
from evalruns import make_run
from PIL import Image

from data import demo, reader, writer
from data.shards import MTIME
from eval.bpd import bits_per_dim
from eval.checkpoints import load_network
from eval.sample import Interrupted
from models import objective, schedules
from trainer.store import open_store
from trainer.train import seed_of

RUN = "tiny"
SCALE, SHIFT = 0.5, 0.1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 validation images in shards of 5: batches of 8 end in 4 padding positions, batches of 5 in 3."""
    out = tmp_path_factory.mktemp("data")
    demo.write(str(out), num_images=12, samples_per_shard=5)
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    store = open_store(str(tmp_path_factory.mktemp("store")))
    make_run(store, RUN, [1])
    return load_network(store, RUN, 1)


def by_hand(loaded, index, seed, data):
    """Each example's bound, one at a time, read straight from the shards with noise drawn from seed (seed, i)."""
    _, urls, _ = reader.open_index(str(index))
    samples = [s for url in urls for s in reader.iterate_shard(url)]
    schedule = schedules.build(loaded.cfg.objective.schedule)
    values = []
    for i, sample in enumerate(samples):
        if data == "pixels8":
            x = torch.from_numpy(np.array(Image.open(io.BytesIO(sample["png"])))).permute(2, 0, 1)
        else:
            x = torch.from_numpy(np.load(io.BytesIO(sample["latent.npy"])).astype(np.float32))
        label = torch.tensor([int(sample["cls"])])
        g = torch.Generator().manual_seed(seed_of(seed, i))
        t, eps, eps_0 = torch.rand((), generator=g), torch.randn(x.shape, generator=g), torch.randn(x.shape,
                                                                                                   generator=g)
        with torch.no_grad():
            nats = objective.vlb(loaded.net, x[None], label, schedule=schedule, data=data, t=t[None], eps=eps[None],
                                 eps_0=eps_0[None]).total
        dims = x.numel() * (math.log(2) if data == "pixels8" else 1.0)
        values.append(float(nats) / dims)
    return np.array(values)


def test_bits_per_dim_is_the_mean_of_each_examples_bound_with_its_standard_error(loaded, data):
    result = bits_per_dim(loaded, str(data), batch_size=8, seed=3)
    values = by_hand(loaded, data, 3, "pixels8")
    assert result["n"] == len(values) == 12 and result["unit"] == "bits/dim"
    assert result["value"] == pytest.approx(values.mean(), rel=1e-6)
    assert result["stderr"] == pytest.approx(values.std(ddof=1) / math.sqrt(12), rel=1e-4)
    assert 0 < result["stderr"] < result["value"]


def test_bits_per_dim_does_not_depend_on_the_batch_size_and_skips_padding(loaded, data):
    a = bits_per_dim(loaded, str(data), batch_size=8)
    b = bits_per_dim(loaded, str(data), batch_size=5)
    assert a["n"] == b["n"] == 12
    assert a["value"] == pytest.approx(b["value"], rel=1e-6) and a["stderr"] == pytest.approx(b["stderr"], rel=1e-4)
    assert bits_per_dim(loaded, str(data), batch_size=8, seed=1)["value"] != a["value"]


def test_shards_of_another_kind_or_resolution_are_refused(loaded, data, tmp_path):
    with pytest.raises(ValueError, match=r"hold \{'kind': 'images', 'resolution': 32\}, run 'tiny' needs "
                                         r"\{'kind': 'images', 'resolution': 64\}"):
        bits_per_dim(dataclasses.replace(loaded, resolution=64), str(data))
    latents = write_latent_shards(tmp_path / "latents", 4)
    with pytest.raises(ValueError, match="'kind': 'latents'.*needs.*'kind': 'images'"):
        bits_per_dim(loaded, str(latents))


def test_should_stop_interrupts_between_batches(loaded, data):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Interrupted, match="after 8 validation samples"):
        bits_per_dim(loaded, str(data), batch_size=4, should_stop=should_stop)


def _latent_shard(payload, tar_path):
    seed, ids = payload
    with wds.TarWriter(tar_path, encoder=False, mtime=MTIME) as tar:
        for i in ids:
            latent, flipped = np.random.default_rng([seed, i]).standard_normal((2, 4, 16, 16)).astype(np.float16)
            tar.write({"__key__": f"{i:09d}", "latent.npy": _npy(latent), "latent_flip.npy": _npy(flipped),
                       "cls": str(i % 10).encode()})
    return {"count": len(ids), "class_counts": {}, "skipped": {}, "converted": {}}


def _npy(x):
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def write_latent_shards(out, n, scale=SCALE, shift=SHIFT):
    """Latent shards as data.encode lays them out (of 32x32 images, 4 x 16 x 16), with random latents."""
    settings = {"kind": "latents", "resolution": 32, "format": "npy", "source": "random", "scale": scale,
                "shift": shift}
    jobs = [(f"shard-{s:06d}.tar", (0, list(range(s, min(n, s + 8))))) for s in range(0, n, 8)]
    writer.write_shards(str(out), settings, jobs, _latent_shard, processes=1, overwrite=False,
                        classes=[str(c) for c in range(10)])
    return out


def test_latent_run_reports_nats_per_dim_on_its_own_latents(tmp_path):
    index = write_latent_shards(tmp_path / "latents", 20)
    store = open_store(str(tmp_path / "store"))
    make_run(store, RUN, [1], overrides=("network.preset=uvit_latent_tiny", "network.overrides={resolution: 16}",
                                         f"data.index={index}"))
    latent = load_network(store, RUN, 1)
    assert latent.data == "continuous" and latent.latent["scale"] == SCALE and latent.resolution == 32
    result = bits_per_dim(latent, str(index), batch_size=8)
    values = by_hand(latent, index, 0, "continuous")
    assert result["n"] == 20 and result["unit"] == "nats/dim"
    assert result["value"] == pytest.approx(values.mean(), rel=1e-6)
    assert result["stderr"] == pytest.approx(values.std(ddof=1) / math.sqrt(20), rel=1e-4)
    other = write_latent_shards(tmp_path / "rescaled", 4, scale=1.0)
    with pytest.raises(ValueError, match="'scale': 1.0.*needs.*'scale': 0.5"):
        bits_per_dim(latent, str(other))
