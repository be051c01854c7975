"""Bits per dimension of a checkpoint on a validation shard set: VDM's continuous-time bound (VDM eq. 11-17).

Each validation sample is scored once (data.validation: padding masked out) with t, eps and eps_0 drawn from
its own seed (SEED, index), so the value depends on neither the world size nor the batch size. Per-example
values are summed across ranks; the result is their mean and standard error, in bits/dim for 8-bit images and
nats/dim for latents (whose decoder is a Gaussian, not a distribution over pixels).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from data import writer
from data.stream import StreamConfig
from data.validation import ValidationStream
from eval.checkpoints import Loaded
from eval.sample import Interrupted
from models import objective, schedules
from trainer.train import seed_of

UNITS = {"pixels8": "bits/dim", "continuous": "nats/dim"}


def check_shards(loaded: Loaded, val_index: str) -> None:
    """The validation shards must hold what the run trained on: images of its resolution, or its latents."""
    index = writer.load_index(val_index)
    want = {"kind": "latents" if loaded.latent else "images", "resolution": loaded.resolution}
    if loaded.latent:
        want |= {"scale": loaded.latent["scale"], "shift": loaded.latent["shift"]}
    found = {k: index.get(k) for k in want}
    if found != want:
        raise ValueError(f"validation shards {val_index} hold {found}, run {loaded.cfg.run!r} needs {want}")


def noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """t ~ U[0, 1], eps and eps_0 of each example, from its own generator."""
    draws = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        draws.append((torch.rand((), generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)))
    return tuple(torch.stack(d) for d in zip(*draws))


def bits_per_dim(loaded: Loaded, val_index: str, *, rank: int = 0, world: int = 1, batch_size: int = 64,
                 seed: int = 0, device="cpu", should_stop: Callable[[], bool] = lambda: False) -> dict:
    """{"value", "stderr", "n", "unit"}: the mean negative bound per dimension over the validation set, and its
    standard error std / sqrt(n) (std with n - 1). Every rank calls it; every rank gets the totals."""
    check_shards(loaded, val_index)
    stream = ValidationStream(StreamConfig(index=val_index, batch_size=batch_size, num_workers=0, dtype="uint8"),
                              rank, world)
    schedule = schedules.build(loaded.cfg.objective.schedule).to(device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # n, sum, sum of squares
    for batch in stream:
        if should_stop():
            raise Interrupted(f"stopped after {int(totals[0])} validation samples on this rank")
        x, labels = batch["x"], torch.as_tensor(batch["label"])
        # the null class 0 of an unconditional network
        cond = labels if loaded.num_classes else torch.zeros_like(labels)
        t, eps, eps_0 = noise([seed_of(seed, i) for i in batch["index"].tolist()], tuple(x.shape[1:]))
        with torch.no_grad():
            nats = objective.vlb(loaded.net, x.to(device), cond.to(device), schedule=schedule, data=loaded.data,
                                 t=t.to(device), eps=eps.to(device), eps_0=eps_0.to(device)).total
        values = objective.per_dim(nats.double(), x, loaded.data)[torch.as_tensor(batch["mask"]).to(device)]
        totals += torch.stack([totals.new_tensor(len(values)), values.sum(), values.pow(2).sum()])
    if world > 1:
        dist.all_reduce(totals)
    n, total, squares = totals.tolist()
    mean = total / n
    variance = max(squares - n * mean**2, 0.0) / (n - 1) if n > 1 else math.nan
    return {"value": mean, "stderr": math.sqrt(variance / n), "n": int(n), "unit": UNITS[loaded.data]}
