"""FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to Inception features, the reference
statistics it is measured against, and `elbodiff ref-stats`.

Reference statistics are `.npz` files read with allow_pickle=False:
- ours: mu, sigma (float64), extractor, mode, source, and n and resolution when known;
- ADM's `VIRTUAL_imagenet64_labeled.npz` and clean-fid's `{dataset}_{mode}_{split}_{res}.npz`, read directly:
  only mu and sigma are used, the mode and resolution come from the file name;
- EDM2's `img512.pkl` and the like, a pickle of {'fid': {'mu', 'sigma'}, 'fd_dinov2': {...}}: converted once with
  `elbodiff ref-stats --from-edm2 FILE.pkl --out REF.npz`, by an unpickler that builds only dicts and arrays.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist

from eval import inception
from eval.stats import FeatureStats


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    A pivoted Cholesky factorisation (LAPACK ?pstrf) gives sigma1 = F F^T with F of sigma1's rank r; the nonzero
    eigenvalues of sigma1 sigma2 are those of the symmetric positive semi-definite r x r matrix F^T sigma2 F, so
    tr (sigma1 sigma2)^(1/2) is the sum of the roots of its eigenvalues. Symmetric throughout: real, and exact to
    rounding also when sigma1 is singular (fewer samples than dimensions), where a general matrix square root
    goes complex and float32 errs by 1e-2. The same values as sqrt(sigma1) by eigh (to 1e-12) at 2.6x the speed
    with 2048 dimensions, and at 20x with 16 samples, whose eigenproblem is 15 x 15."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Frechet distance of means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, "
                         f"{sigma2.shape}: expected ({d},) and ({d}, {d})")
    # P^T sigma1 P = L L^T; pivots below d * eps * max(diag) end the factorisation: the rank
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma1, lower=1)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf refused argument {-info}")
    factor = np.empty((d, rank))
    factor[piv - 1] = np.tril(c)[:, :rank]
    eigenvalues = scipy.linalg.eigvalsh(factor.T @ sigma2 @ factor)
    # those indistinguishable from 0 (numpy.linalg.matrix_rank's tolerance) are rounding, which the root would
    # blow up from 1e-15 to 3e-8 each
    eigenvalues = np.where(eigenvalues > eigenvalues.max(initial=0.0) * rank * np.finfo(np.float64).eps,
                           eigenvalues, 0.0)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigenvalues).sum())


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    n: int | None  # images the statistics are of (unknown for ADM's and EDM2's files)
    resolution: int | None  # of the images before the network's resize
    extractor: str  # FeatureNetwork.extractor that produced them
    mode: str
    source: str  # where they were computed or read from

    def id(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.mu, np.float64).tobytes())
        digest.update(np.ascontiguousarray(self.sigma, np.float64).tobytes())
        return digest.hexdigest()[:16]


def _check_shapes(mu: np.ndarray, sigma: np.ndarray, path: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")


def _resolution_of(name: str) -> int | None:
    """ADM's VIRTUAL_imagenet64_labeled.npz, EDM2's img512.pkl, clean-fid's cifar10_clean_train_32.npz."""
    found = re.search(r"(?:imagenet|img)(\d+)", name) or re.search(r"_(\d+)\.npz$", name)
    return int(found.group(1)) if found else None


def _mode_of(name: str) -> str:
    """clean-fid names its statistics by mode; ADM's (the TF graph and its resize) are legacy."""
    if "legacy_pytorch" in name:
        raise ValueError(f"{name} holds clean-fid's legacy_pytorch statistics (PyTorch's bilinear resize): "
                         f"neither legacy nor clean mode reproduces them")
    return "clean" if "_clean_" in name else "legacy"


def load_reference(path: str) -> Reference:
    name = os.path.basename(path)
    if name.endswith(".pkl"):
        raise ValueError(f"{path} is a pickle, which is never loaded: convert an EDM2 reference once with "
                         f"`elbodiff ref-stats --from-edm2 {path} --out REF.npz`")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no reference statistics at {path}: write them with `elbodiff ref-stats`")
    with np.load(path, allow_pickle=False) as f:
        if not isinstance(f, np.lib.npyio.NpzFile) or not {"mu", "sigma"} <= set(f.files):
            raise ValueError(f"{path} is not reference statistics: an .npz with mu and sigma is expected")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        _check_shapes(mu, sigma, path)
        if "extractor" in f.files:
            return Reference(mu, sigma, int(f["n"]) if "n" in f.files else None,
                             int(f["resolution"]) if "resolution" in f.files else None,
                             str(f["extractor"]), str(f["mode"]), str(f["source"]))
    mode = _mode_of(name)
    return Reference(mu, sigma, None, _resolution_of(name), f"{inception.GRAPH}/{mode}", mode, f"npz:{name}")


def save_reference(ref: Reference, path: str) -> None:
    """Written to a temporary file beside `path`, then renamed: a reader never sees half a file."""
    arrays = {"mu": np.asarray(ref.mu, np.float64), "sigma": np.asarray(ref.sigma, np.float64),
              "extractor": np.array(ref.extractor), "mode": np.array(ref.mode), "source": np.array(ref.source)}
    if ref.n is not None:
        arrays["n"] = np.array(ref.n)
    if ref.resolution is not None:
        arrays["resolution"] = np.array(ref.resolution)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_compatible(ref: Reference, resolution: int, extractor: str) -> None:
    """FIDs against statistics of another resolution or feature network are not comparable with anything."""
    if ref.resolution is not None and ref.resolution != resolution:
        raise ValueError(f"reference {ref.source} is of {ref.resolution}x{ref.resolution} images, the evaluation of "
                         f"{resolution}x{resolution}")
    if ref.extractor != extractor:
        raise ValueError(f"reference {ref.source} was computed with {ref.extractor}, the evaluation uses {extractor}")


# numpy's array rebuilder, wherever this numpy keeps it: numpy 1 pickles name numpy.core, numpy 2 numpy._core
_RECONSTRUCT = np.empty(0).__reduce__()[0]


class _ArraysOnly(pickle.Unpickler):
    """Builds dicts, lists, numbers, strings and numpy arrays; any other global (a function to call, a class to
    instantiate) is refused before it is looked up, so nothing in the file is ever executed."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ValueError(f"refusing to unpickle {module}.{name}: an EDM2 reference holds only dicts and numpy "
                             f"arrays")
        return _RECONSTRUCT if name == "_reconstruct" else getattr(np, name)


def convert_edm2(path: str) -> Reference:
    """EDM2's reference pickle as our Reference (FD_DINOv2 statistics are not used)."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"no EDM2 reference at {path}") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path} is not a readable pickle: {e}") from None
    fid = data.get("fid") if isinstance(data, dict) else None
    if not (isinstance(fid, dict) and all(isinstance(fid.get(k), np.ndarray) and fid[k].dtype.kind == "f"
                                          for k in ("mu", "sigma"))):
        raise ValueError(f"{path} is not an EDM2 reference: expected {{'fid': {{'mu': array, 'sigma': array}}}}")
    mu, sigma = fid["mu"].astype(np.float64), fid["sigma"].astype(np.float64)
    _check_shapes(mu, sigma, path)
    # EDM2 measures with the TF graph's resize inside the network: legacy mode
    return Reference(mu, sigma, None, _resolution_of(name), f"{inception.GRAPH}/legacy", "legacy", f"edm2:{name}")


def ref_stats(index: str, network: inception.FeatureNetwork, *, n: int = 0, batch_size: int = 64, rank: int = 0,
              world: int = 1) -> Reference:
    """mu and sigma of the network's features of the first n images of a shard index (all when n is 0). Each rank
    reads its part of the index (ValidationStream) and stops past n; the sums are reduced across ranks."""
    from data.stream import StreamConfig
    from data.validation import ValidationStream
    from data.writer import load_index

    meta = load_index(index)
    if meta.get("kind") != "images" or not meta.get("resolution"):
        raise ValueError(f"{index} holds {meta.get('kind')} shards at resolution {meta.get('resolution')}: "
                         f"reference statistics need image shards of one resolution (elbodiff shards --resolution N)")
    if n < 0 or n > meta["num_samples"]:
        raise ValueError(f"--n must be between 0 (all) and the {meta['num_samples']} images of {index}, found {n}")
    n = n or meta["num_samples"]
    stats = FeatureStats(network.num_features, next(network.parameters()).device)
    # one worker: batches arrive in id order, so the pass can stop at the first batch past n
    stream = ValidationStream(StreamConfig(index=index, batch_size=batch_size, num_workers=1, dtype="uint8"), rank,
                              world)
    for batch in stream:
        real = batch["mask"]  # padding and unreadable samples are copies of others
        if not (batch["index"][real] < n).any():
            break
        features, _ = network(batch["x"][real & (batch["index"] < n)])
        stats.update(features)
    stats.all_reduce()
    if stream.bad:
        warnings.warn(f"{sum(stream.bad.values())} unreadable images left out of the statistics: {stream.bad}")
    return Reference(stats.mean(), stats.cov(), stats.n, int(meta["resolution"]), network.extractor, network.mode,
                     f"shards:{index}")


def _start_process_group() -> tuple[int, int, torch.device, bool]:
    """Rank, world size and device under torchrun (or alone), and whether a process group was started here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    started = world > 1 and not dist.is_initialized()
    if started:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device, started


def _reference(args) -> Reference | None:
    """The command's statistics; None on ranks other than 0, which only help compute them."""
    if args.from_edm2:
        return convert_edm2(args.from_edm2)
    if not args.shards or not args.inception:
        raise ValueError("give a shard index and --inception PATH (or 'random'), or --from-edm2 FILE.pkl")
    rank, world, device, started = _start_process_group()
    try:
        network = inception.load(args.inception, args.fid_mode, device)
        ref = ref_stats(args.shards, network, n=args.n, batch_size=args.batch_size, rank=rank, world=world)
    finally:
        if started:
            dist.destroy_process_group()
    return ref if rank == 0 else None


def main(args) -> int:
    """`elbodiff ref-stats SHARDS --out REF.npz --inception PATH` or `elbodiff ref-stats --from-edm2 FILE.pkl`."""
    try:
        ref = _reference(args)
        if ref is not None:
            save_reference(ref, args.out)
            print(f"wrote {args.out}: n={ref.n} resolution={ref.resolution} extractor={ref.extractor} id={ref.id()}")
    except (FileNotFoundError, ValueError) as e:
        print(f"elbodiff ref-stats: {e}", file=sys.stderr)
        return 2
    return 0
