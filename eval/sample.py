"""Sampling at scale: `elbodiff sample RUN_URI --step S [--ema NAME | --sigma-rel X] --n N [--out DIR]`.

Sample i is drawn from its own seed (SEED, i) with class i % num_classes, so the classes are balanced and the
images do not depend on the world size or the batch size. Under torchrun each rank draws a contiguous slice of
the indices, none twice, without padding. `generate` yields the images batch by batch, so that a metric consumes
its features as they come and nothing holds all the images; the command writes them as one PNG per sample
(named by its index) or as one npz in ADM's layout (`arr_0` N x H x W x 3 uint8, `arr_1` labels), which ADM's
evaluator reads, and computes FID against reference statistics when given Inception weights.

With several ranks, --out must be one folder every rank can write (one machine, or a shared file system): for
npz each rank writes its part there, and rank 0 joins the parts in index order once all are written.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor

from eval.checkpoints import BadCheckpoint, Loaded, load_network, verify
from models import objective, samplers, schedules
from trainer.config import ConfigError
from trainer.store import open_store
from trainer.train import seed_of

SAMPLERS = {"ancestral": samplers.ancestral, "ddim": samplers.ddim}


class Interrupted(Exception):
    """`should_stop` returned True between two batches."""


@dataclass
class SampleSettings:
    n: int
    sampler: Literal["ancestral", "ddim"] = "ddim"
    steps: int = 32
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 64  # per rank; the images do not depend on it

    def __post_init__(self):
        if self.n < 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"n must be at least 0, steps and batch size at least 1; found {self.n}, {self.steps}, "
                             f"{self.batch_size}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; samplers: {', '.join(SAMPLERS)}")

    def as_dict(self) -> dict:
        """What the images depend on besides the weights (not n, not the batch size)."""
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance, "seed": self.seed}


def rank_slice(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of the indices 0..n-1; the shares of all ranks partition them exactly."""
    return range(n * rank // world, n * (rank + 1) // world)


def labels_of(ids: Tensor, num_classes: int) -> Tensor:
    """Class i % num_classes for sample i (balanced); an unconditional network takes the null class 0."""
    return ids % num_classes if num_classes else torch.zeros_like(ids)


def to_uint8(x: Tensor, loaded: Loaded, vae=None) -> Tensor:
    """The sampler's output in data space -> uint8 (B, 3, H, W) images on the CPU."""
    if loaded.latent is None:
        return objective.decode_pixels(x.cpu())
    # the inverse of the [-1, 1] scaling that data.encode applies to the images before encoding them
    return ((vae.decode(x) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def generate(loaded: Loaded, settings: SampleSettings, *, rank: int = 0, world: int = 1, device="cpu", vae=None,
             should_stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(uint8 images (B, 3, H, W), labels, sample ids) for this rank's slice, batch by batch, on the CPU.
    Latent runs need `vae` (a models.vae.LatentVAE on `device`) to decode. Raises Interrupted when
    `should_stop()` is True before a batch."""
    if settings.guidance != 1.0 and loaded.null_class is None:
        raise ValueError(f"guidance {settings.guidance} needs a class-conditional network; run "
                         f"{loaded.cfg.run!r} is unconditional")
    if loaded.latent is not None and vae is None:
        raise ValueError(f"run {loaded.cfg.run!r} samples latents: give the autoencoder to decode them (--vae)")
    share = rank_slice(settings.n, rank, world)
    ids = torch.arange(share.start, share.stop)
    for batch in ids.split(settings.batch_size) if len(ids) else ():
        if should_stop():
            raise Interrupted(f"stopped after {int(batch[0] - ids[0])} of this rank's {len(ids)} samples")
        images = to_uint8(sample_batch(loaded, settings, batch, device), loaded, vae)
        yield images, labels_of(batch, loaded.num_classes), batch


def sample_batch(loaded: Loaded, settings: SampleSettings, ids: Tensor, device="cpu") -> Tensor:
    """Samples `ids` in data space (pixels in [-1, 1], or latents): row i from seed (settings.seed, ids[i])."""
    c = loaded.net.config
    generators = [torch.Generator().manual_seed(seed_of(settings.seed, i)) for i in ids.tolist()]
    return SAMPLERS[settings.sampler](loaded.net, (len(ids), loaded.channels, c.resolution, c.resolution),
                                      labels_of(ids, loaded.num_classes).to(device),
                                      schedule=schedules.build(loaded.cfg.objective.schedule), steps=settings.steps,
                                      generator=generators, guidance=settings.guidance,
                                      null_class=loaded.null_class, device=device)


# ---- outputs -------------------------------------------------------------------------------------------------

def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class PNGFolder:
    """One PNG per sample, named by its index (000123.png), each written whole or not at all."""

    def __init__(self, out: Path, n: int):
        self.out, self.width = out, max(6, len(str(n - 1)))
        out.mkdir(parents=True, exist_ok=True)

    def write(self, images: Tensor, labels: Tensor, ids: Tensor) -> None:
        for image, i in zip(images.permute(0, 2, 3, 1).numpy(), ids.tolist()):
            _atomic(self.out / f"{i:0{self.width}d}.png", lambda p: Image.fromarray(image).save(p, format="png"))

    def finish(self, rank: int, world: int) -> Path:
        return self.out


class NpzFile:
    """ADM's sample layout, `samples_NxHxWx3.npz` with arr_0 (N, H, W, 3) uint8 and arr_1 labels (N,) int64.

    Each rank fills memory-mapped .npy parts in the output folder; rank 0 then streams them into the npz (stored,
    not compressed, as np.savez writes it), so no process holds more than a chunk of the images in memory."""

    CHUNK = 256  # images copied at a time

    def __init__(self, out: Path, n: int, resolution: int, rank: int, world: int):
        self.out, self.n, self.resolution = out, n, resolution
        self.slice = rank_slice(n, rank, world)
        out.mkdir(parents=True, exist_ok=True)
        shape = (len(self.slice), resolution, resolution, 3)
        self.images = np.lib.format.open_memmap(self._part(rank, world, "images"), "w+", np.uint8, shape)
        self.labels = np.lib.format.open_memmap(self._part(rank, world, "labels"), "w+", np.int64, shape[:1])

    def _part(self, rank: int, world: int, what: str) -> Path:
        return self.out / f".part-{rank:05d}-of-{world:05d}.{what}.npy"

    def write(self, images: Tensor, labels: Tensor, ids: Tensor) -> None:
        rows = slice(int(ids[0]) - self.slice.start, int(ids[-1]) + 1 - self.slice.start)
        self.images[rows] = images.permute(0, 2, 3, 1).numpy()
        self.labels[rows] = labels.numpy()

    def finish(self, rank: int, world: int) -> Path:
        """Every rank calls it once all ranks have written their parts; rank 0 joins them."""
        self.images.flush()
        self.labels.flush()
        del self.images, self.labels
        _barrier(world)
        r = self.resolution
        path = self.out / f"samples_{self.n}x{r}x{r}x3.npz"
        if rank == 0:
            _atomic(path, lambda tmp: self._join(tmp, world))
            for part in range(world):
                for what in ("images", "labels"):
                    self._part(part, world, what).unlink()
        _barrier(world)
        return path

    def _join(self, tmp: Path, world: int) -> None:
        r = self.resolution
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": "|u1", "fortran_order": False, "shape": (self.n, r, r, 3)})
                for part in range(world):
                    images = np.load(self._part(part, world, "images"), mmap_mode="r")
                    for start in range(0, len(images), self.CHUNK):
                        f.write(np.ascontiguousarray(images[start:start + self.CHUNK]).tobytes())
            labels = np.concatenate([np.load(self._part(part, world, "labels")) for part in range(world)])
            with z.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, labels)


# ---- the command ---------------------------------------------------------------------------------------------

def distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device from torchrun's environment. With more than one rank the process group (gloo
    on CPU, NCCL on GPUs) is created, unless the process already has one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, torch.device("cuda", local) if cuda else torch.device("cpu")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _split_run_uri(uri: str) -> tuple[str, str]:
    store, _, run = uri.rstrip("/").rpartition("/")
    if not store or not run or store.endswith(":/"):
        raise ValueError(f"RUN_URI {uri!r} must be the store and the run's name, e.g. demo-out/runs/demo or "
                         "s3://bucket/prefix/demo")
    return store, run


def _rank_zero_error(rank: int, world: int, check: Callable[[], None]) -> str | None:
    """Rank 0 runs `check` (it reads the whole checkpoint: once is enough); every rank gets its error, if any."""
    error = [None]
    if rank == 0:
        try:
            check()
        except BadCheckpoint as e:
            error = [str(e)]
    if world > 1:
        dist.broadcast_object_list(error, src=0)
    return error[0]


def _sample(args, rank: int, world: int, device: torch.device) -> dict:
    store_uri, run = _split_run_uri(args.run_uri)
    store = open_store(store_uri)
    settings = SampleSettings(n=args.n, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                              seed=args.seed, batch_size=args.batch_size)
    if bool(args.inception) != bool(args.ref):
        raise ValueError("FID needs both --inception (the feature network's weights) and --ref (reference "
                         "statistics)")
    error = _rank_zero_error(rank, world, lambda: verify(store, run, args.step))
    if error:
        raise BadCheckpoint(error)
    start = time.monotonic()
    loaded = load_network(store, run, args.step, ema=args.ema, sigma_rel=args.sigma_rel, device=device)
    vae = None
    if loaded.latent is not None:
        if not args.vae:
            raise ValueError(f"run {run!r} samples latents: give --vae, the AutoencoderKL folder they were encoded "
                             f"with (index {loaded.latent['index']})")
        from models.vae import LatentVAE
        vae = LatentVAE.from_pretrained(args.vae, loaded.latent["scale"], loaded.latent["shift"]).to(device)
    features = None
    if args.inception:
        from eval import fid, inception, stats
        reference = fid.load_reference(args.ref)
        features = inception.load(args.inception, args.fid_mode, device)
        fid.check_compatible(reference, loaded.resolution, features.extractor)
        accumulated = stats.FeatureStats(features.num_features, device=device)
    output = None
    if args.out:
        output = (PNGFolder(Path(args.out), args.n) if args.format == "png" else
                  NpzFile(Path(args.out), args.n, loaded.resolution, rank, world))
    for images, labels, ids in generate(loaded, settings, rank=rank, world=world, device=device, vae=vae):
        if output is not None:
            output.write(images, labels, ids)
        if features is not None:
            with torch.no_grad():
                accumulated.update(features(images.to(device))[0])
    result = {"run": run, "step": loaded.step, "images_seen": loaded.images_seen, "ema": loaded.ema, "n": args.n,
              **settings.as_dict()}
    if output is not None:
        result["out"] = str(output.finish(rank, world))
    if features is not None:
        accumulated.all_reduce()
        result["fid"] = fid.frechet_distance(accumulated.mean(), accumulated.cov(), reference.mu, reference.sigma)
        result["extractor"], result["reference"] = features.extractor, reference.id()
    _barrier(world)
    result["seconds"] = round(time.monotonic() - start, 3)
    return result


def main(args) -> int:
    """The `elbodiff sample` command: prints one JSON line with what was sampled (and FID), from rank 0."""
    rank, world, device = distributed()
    try:
        result = _sample(args, rank, world, device)
    except (BadCheckpoint, ConfigError, ValueError, FileNotFoundError) as e:
        # These follow from the arguments and the store alone, so every rank meets the same one: rank 0 says it.
        if rank == 0:
            print(f"elbodiff sample: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result))
    return 0
