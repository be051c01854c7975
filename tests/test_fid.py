import os
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from data import demo
from eval import fid, inception
from eval.fid import Reference, check_compatible, frechet_distance, load_reference, save_reference
from eval.stats import FeatureStats, InceptionScoreStats
from inception_weights import inception_weights  # noqa: F401  (pytest fixture)
from launch import cli
from s3server import free_port

SHAPES = 16  # demo images (the first 16 draws), also written as the shard set of the ref-stats test


def sqrtm_distance(mu1, sigma1, mu2, sigma2):
    """The textbook formula with scipy's general matrix square root, in float64 (pytorch-fid, ADM)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def gaussian_features(n, d, seed, scale=1.0, shift=0.0):
    """Non-Gaussian, correlated, non-negative features like pool activations."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)) ** 2 * scale + shift


def stats_of(features):
    return features.mean(0), np.cov(features, rowvar=False)


@pytest.mark.parametrize("n, d", [(400, 16), (20, 64)])  # full rank, and fewer samples than dimensions
def test_frechet_distance_equals_the_scipy_sqrtm_formula(n, d):
    a, b = gaussian_features(n, d, 0), gaussian_features(n, d, 1, scale=1.3, shift=0.2)
    ours = frechet_distance(*stats_of(a), *stats_of(b))
    assert ours == pytest.approx(sqrtm_distance(*stats_of(a), *stats_of(b)), rel=1e-6)
    assert abs(frechet_distance(*stats_of(a), *stats_of(a))) < 1e-9 * np.trace(np.cov(a, rowvar=False))


@pytest.mark.slow  # two 2048-dim eigendecompositions and scipy's sqrtm: about 40 s on one loaded core
def test_frechet_distance_equals_the_scipy_sqrtm_formula_at_2048_dims_with_500_samples():
    a, b = gaussian_features(500, 2048, 0), gaussian_features(500, 2048, 1, scale=1.1, shift=0.1)
    assert frechet_distance(*stats_of(a), *stats_of(b)) == pytest.approx(sqrtm_distance(*stats_of(a), *stats_of(b)),
                                                                         rel=1e-6)


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="expected"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_over_batches_equal_numpy_mean_and_cov():
    # float32, as the network gives them, with an offset that the sums of outer products must cancel in float64
    x = gaussian_features(137, 24, 3, shift=5.0).astype(np.float32)
    stats = FeatureStats(24)
    for part in np.array_split(x, [1, 40, 41, 100]):
        stats.update(torch.from_numpy(part))
    x = x.astype(np.float64)
    assert stats.n == 137
    np.testing.assert_allclose(stats.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


class Precomputed(nn.Module):
    """A torchmetrics feature extractor whose 'images' are the features themselves."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def test_fid_from_streamed_features_equals_torchmetrics_frechet_inception_distance():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = gaussian_features(300, 64, 4), gaussian_features(250, 64, 5, scale=1.2)
    metric = FrechetInceptionDistance(feature=Precomputed(64))
    ours = {"real": FeatureStats(64), "fake": FeatureStats(64)}
    for name, x in (("real", real), ("fake", fake)):
        for part in np.array_split(x, 7):
            metric.update(torch.from_numpy(part), real=name == "real")
            ours[name].update(torch.from_numpy(part))
    value = frechet_distance(ours["real"].mean(), ours["real"].cov(), ours["fake"].mean(), ours["fake"].cov())
    assert value == pytest.approx(float(metric.compute()), rel=1e-4)


def inception_score_numpy(logits, ids, splits):
    """Salimans et al.'s formula, split by id modulo splits, std with ddof=0 (the original code, torch-fidelity)."""
    scores = []
    for s in range(splits):
        z = logits[ids % splits == s]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0)
        scores.append(np.exp((p * (np.log(p) - np.log(py))).sum(1).mean()))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_the_formula_whatever_the_batches_and_their_order():
    rng = np.random.default_rng(6)
    logits, ids = rng.standard_normal((90, 1008)) * 3, rng.permutation(90)
    expected = inception_score_numpy(logits, ids, 4)
    for order, cuts in ((np.arange(90), [10, 11, 50]), (np.arange(90)[::-1], [45])):
        stats = InceptionScoreStats(splits=4)
        for part in np.array_split(order, cuts):
            stats.update(torch.from_numpy(logits[part]), torch.from_numpy(ids[part]))
        assert stats.score() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="splits needs a sample"):
        InceptionScoreStats(splits=4).score()


def _all_reduce_worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = gaussian_features(23, 8, 7)
        logits, ids = torch.from_numpy(gaussian_features(23, 1008, 8)), torch.arange(23)
        alone = FeatureStats(8), InceptionScoreStats(splits=3)
        parts = FeatureStats(8), InceptionScoreStats(splits=3)
        alone[0].update(torch.from_numpy(x))
        alone[1].update(logits, ids)
        mine = slice(0, 9) if rank == 0 else slice(9, 23)  # uneven shares, as seed slices are
        for cut in np.array_split(np.arange(23)[mine], 2):
            parts[0].update(torch.from_numpy(x[cut]))
            parts[1].update(logits[cut], ids[cut])
        for s in parts:
            s.all_reduce()
        assert parts[0].n == 23
        np.testing.assert_allclose(parts[0].mean(), alone[0].mean(), rtol=1e-13)
        np.testing.assert_allclose(parts[0].cov(), alone[0].cov(), rtol=1e-10)
        assert parts[1].score() == pytest.approx(alone[1].score(), rel=1e-12)
    finally:
        dist.destroy_process_group()
    cli.exit_now(0)  # passed: skip the interpreter teardown that can abort a gloo process (launch/cli.py)


@pytest.mark.slow  # two spawned processes: about 6 s on a loaded machine
def test_statistics_all_reduced_over_two_gloo_ranks_equal_one_process():
    mp.spawn(_all_reduce_worker, args=(2, free_port()), nprocs=2, join=True)


def shapes():
    return torch.from_numpy(np.stack([demo.draw(0, i)[0] for i in range(SHAPES)])).permute(0, 3, 1, 2).contiguous()


def noise():
    return torch.from_numpy(np.random.default_rng(9).integers(0, 256, (16, 3, 32, 32), dtype=np.uint8))


@pytest.fixture(scope="module")
def network(inception_weights):  # noqa: F811
    return inception.load(inception_weights)


@pytest.fixture(scope="module")
def outputs(network):
    """Pool features and logits of 16 demo shapes and 16 uniform-noise images, 32x32 resized by the network."""
    return {"shapes": network(shapes()), "noise": network(noise())}


def test_random_weights_file_loads_as_the_legacy_network_and_says_it_is_random(network):
    assert (network.mode, network.random, network.num_features) == ("legacy", True, 2048)
    assert network.extractor == "random-inception-seed0/legacy"
    direct = inception.load("random")  # built in memory, through the same loading code
    assert direct.extractor == network.extractor
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), direct.state_dict().values()))


def test_a_weights_file_without_the_random_mark_is_taken_for_the_2015_network(
        inception_weights, tmp_path):  # noqa: F811
    state = torch.load(inception_weights, weights_only=True)
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(state, tmp_path / inception.LEGACY_FILE)
    network = inception.load(str(tmp_path))  # the folder holding the file under its usual name
    assert (network.extractor, network.random) == ("inception-2015-12-05/legacy", False)


def test_random_inception_separates_shapes_from_noise(outputs):
    (f_shapes, logits), (f_noise, _) = outputs["shapes"], outputs["noise"]
    assert f_shapes.dtype == torch.float64 and f_shapes.shape == (16, 2048) and logits.shape == (16, 1008)
    # the default initialisation's features are near 1e-8, all images alike
    assert f_shapes.std(0).mean() > 1e-3 and f_noise.std(0).mean() > 1e-3
    s, n = FeatureStats(2048), FeatureStats(2048)
    s.update(f_shapes)
    n.update(f_noise)
    apart = frechet_distance(s.mean(), s.cov(), n.mean(), n.cov())
    itself = frechet_distance(s.mean(), s.cov(), s.mean(), s.cov())
    halves = FeatureStats(2048), FeatureStats(2048)
    halves[0].update(f_shapes[:8])
    halves[1].update(f_shapes[8:])
    within = frechet_distance(halves[0].mean(), halves[0].cov(), halves[1].mean(), halves[1].cov())
    # shapes and noise lie further apart than two halves of the shapes do, though 8 samples inflate FID
    assert apart > 3 * within > 0, (apart, within)
    assert abs(itself) < 1e-8 * apart, (itself, apart)


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save", "ignore:std\\(\\)")
def test_inception_score_equals_torchmetrics_on_the_network_logits(outputs):
    from torchmetrics.image.inception import InceptionScore

    logits = torch.cat([outputs["shapes"][1], outputs["noise"][1]])
    reference = InceptionScore(feature=Precomputed(1008), splits=1)
    reference.update(logits)
    ours = InceptionScoreStats(splits=1)
    for part, ids in zip(logits.split(12), torch.arange(32).split(12)):
        ours.update(part, ids)
    # IS - 1 is E KL, about 1e-3 with these logits: compared on that, not on 1 + it
    assert ours.score()[0] - 1 == pytest.approx(float(reference.compute()[0]) - 1, rel=1e-6)
    assert ours.score()[0] - 1 > 1e-4


@pytest.fixture(scope="module")
def clean_weights(tmp_path_factory):
    """A stand-in for clean-fid's TorchScript file: the random legacy network's layers, scripted, under the `layers`
    attribute that clean-fid's InceptionV3W calls on the resized, normalised image."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    class Base(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    net = inception.load("random").net
    assert isinstance(net, NoTrainInceptionV3)
    trunk = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"]
    path = tmp_path_factory.mktemp("clean") / inception.CLEAN_FILE
    torch.jit.script(Base(nn.Sequential(*[getattr(net, name) for name in trunk]))).save(str(path))
    return str(path)


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|load)` is deprecated:FutureWarning")
def test_clean_mode_equals_clean_fid_on_image_files_and_legacy_mode_at_299(clean_weights, network, tmp_path):
    from cleanfid.fid import get_files_features
    from cleanfid.inception_torchscript import InceptionV3W

    clean = inception.load(clean_weights, "clean")
    assert (clean.mode, clean.extractor, clean.random) == ("clean", "inception-2015-12-05/clean", False)
    images = shapes()[:2]
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(files[-1])
    # clean-fid's own pipeline: its file reader, its PIL bicubic resize, its loader of the TorchScript file
    theirs = get_files_features(files, model=InceptionV3W(os.path.dirname(clean_weights), download=False),
                                num_workers=0, batch_size=2, device=torch.device("cpu"), mode="clean", verbose=False)
    features, logits = clean(images)
    assert logits is None
    np.testing.assert_allclose(features.numpy(), theirs, rtol=1e-5, atol=1e-6)
    # at 299x299 neither mode resizes: the same layers give the same features
    native = torch.from_numpy(np.random.default_rng(10).integers(0, 256, (1, 3, 299, 299), dtype=np.uint8))
    torch.testing.assert_close(clean(native)[0], network(native)[0], rtol=1e-5, atol=1e-6)


def test_missing_weights_are_an_error_naming_the_file_to_get(tmp_path):
    with pytest.raises(FileNotFoundError, match=inception.LEGACY_FILE):
        inception.load(str(tmp_path))  # a folder without the file
    with pytest.raises(FileNotFoundError, match=inception.CLEAN_FILE):
        inception.load(str(tmp_path / "nowhere.pt"), "clean")
    with pytest.raises(ValueError, match="legacy mode only"):
        inception.load("random", "clean")


def test_cli_ref_stats_without_weights_prints_one_line_and_returns_2(tmp_path, capsys):
    demo.write(str(tmp_path / "shards"), num_images=4)
    code = cli.main(["ref-stats", str(tmp_path / "shards"), "--out", str(tmp_path / "ref.npz"),
                     "--inception", str(tmp_path / "missing.pth")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("elbodiff ref-stats: ") and err.count("\n") == 1, err
    assert inception.LEGACY_FILE in err and not (tmp_path / "ref.npz").exists()


def test_ref_stats_of_demo_shards_round_trip_with_their_resolution_and_extractor(
        tmp_path, inception_weights, outputs, capsys):  # noqa: F811
    shards, out = tmp_path / "shards", tmp_path / "refs" / "demo32.npz"
    demo.write(str(shards), num_images=SHAPES, samples_per_shard=7)
    # 14 of 16 in batches of 6: the third batch holds two images past --n, the last one padding
    assert cli.main(["ref-stats", str(shards), "--out", str(out), "--inception", inception_weights, "--n", "14",
                     "--batch-size", "6"]) == 0
    assert "n=14 resolution=32 extractor=random-inception-seed0/legacy" in capsys.readouterr().out
    assert os.listdir(out.parent) == [out.name]  # nothing left of the temporary file
    ref = load_reference(str(out))
    assert (ref.n, ref.resolution, ref.extractor, ref.mode) == (14, 32, "random-inception-seed0/legacy", "legacy")
    # the index lists the demo images in the shuffled order the writer drew: its first 14
    first = np.random.default_rng(0).permutation(SHAPES)[:14]
    expected = FeatureStats(2048)
    expected.update(outputs["shapes"][0][torch.from_numpy(first)])
    # equal up to the float32 network's rounding, which differs with the batch size (6 here, 16 there)
    np.testing.assert_allclose(ref.mu, expected.mean(), rtol=0, atol=1e-5 * np.abs(expected.mean()).max())
    np.testing.assert_allclose(ref.sigma, expected.cov(), rtol=0, atol=1e-5 * np.abs(expected.cov()).max())
    check_compatible(ref, 32, "random-inception-seed0/legacy")


def test_adm_and_clean_fid_npz_are_read_with_mode_and_resolution_from_their_names(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    adm = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    np.savez(adm, arr_0=np.zeros((2, 64, 64, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    ref = load_reference(str(adm))
    assert (ref.n, ref.resolution, ref.extractor, ref.mode) == (None, 64, "inception-2015-12-05/legacy", "legacy")
    np.testing.assert_array_equal(ref.sigma, sigma)
    np.savez(tmp_path / "cifar10_clean_train_32.npz", mu=mu, sigma=sigma)
    ref = load_reference(str(tmp_path / "cifar10_clean_train_32.npz"))
    assert (ref.resolution, ref.extractor) == (32, "inception-2015-12-05/clean")
    np.savez(tmp_path / "objects.npz", mu=np.array([{"a": 1}], dtype=object), sigma=sigma)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_reference(str(tmp_path / "objects.npz"))
    with pytest.raises(ValueError, match="--from-edm2"):
        load_reference(str(tmp_path / "img64.pkl"))


def test_edm2_pickle_is_converted_once_and_reads_back(tmp_path, capsys):
    rng = np.random.default_rng(11)
    mu, sigma = rng.standard_normal(5), np.cov(rng.standard_normal((20, 5)), rowvar=False)
    pkl = tmp_path / "img64.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"fid": {"mu": mu, "sigma": sigma}, "fd_dinov2": {"mu": mu[:2], "sigma": sigma[:2, :2]}}, f)
    assert cli.main(["ref-stats", "--from-edm2", str(pkl), "--out", str(tmp_path / "img64.npz")]) == 0
    ref = load_reference(str(tmp_path / "img64.npz"))
    assert (ref.n, ref.resolution, ref.extractor, ref.source) == (None, 64, "inception-2015-12-05/legacy",
                                                                  "edm2:img64.pkl")
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.id() == Reference(mu, sigma, None, None, "", "", "").id()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    marker, pkl = tmp_path / "ran", tmp_path / "img64.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"fid": {"mu": Payload(marker), "sigma": np.eye(2)}}, f)
    with pytest.raises(ValueError, match=r"refusing to unpickle (posix|os)\.system"):
        fid.convert_edm2(str(pkl))
    assert cli.main(["ref-stats", "--from-edm2", str(pkl), "--out", str(tmp_path / "out.npz")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out.npz").exists()


def test_check_compatible_refuses_another_resolution_or_extractor_naming_both():
    ref = Reference(np.zeros(2), np.eye(2), 100, 64, "inception-2015-12-05/legacy", "legacy", "npz:ref.npz")
    check_compatible(ref, 64, "inception-2015-12-05/legacy")
    with pytest.raises(ValueError, match=r"64x64 images, the evaluation of 32x32"):
        check_compatible(ref, 32, "inception-2015-12-05/legacy")
    with pytest.raises(ValueError, match=r"computed with inception-2015-12-05/legacy, the evaluation uses "
                                         r"random-inception-seed0/legacy"):
        check_compatible(ref, 64, "random-inception-seed0/legacy")
    check_compatible(Reference(np.zeros(2), np.eye(2), None, None, "x/legacy", "legacy", "npz:a.npz"), 32, "x/legacy")


def test_save_reference_round_trips_and_leaves_no_temporary_file(tmp_path):
    ref = Reference(np.arange(2.0), np.eye(2), 7, 32, "inception-2015-12-05/clean", "clean", "shards:/data")
    save_reference(ref, str(tmp_path / "ref.npz"))
    back = load_reference(str(tmp_path / "ref.npz"))
    assert (back.n, back.resolution, back.extractor, back.mode, back.source, back.id()) == (
        7, 32, "inception-2015-12-05/clean", "clean", "shards:/data", ref.id())
    assert os.listdir(tmp_path) == ["ref.npz"]
