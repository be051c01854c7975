"""The training loop: `elbodiff train CONFIG [key=value ...]`, one process per rank (torchrun, srun, a pod).

The clock is images seen (EDM2). Every random draw of a step follows from (seed, images seen, position in the
global batch), and the checkpoint holds the network, optimizer, EMA, adaptive sampler, data-stream position and RNG
states, so a run resumed from a checkpoint produces bitwise the same losses as one that was never interrupted (same world size).

Backends (`parallel.backend`): DDP, FSDP2 and DeepSpeed ZeRO, wrapped by trainer/parallel.py; accelerate creates the
process group (gloo on CPU, NCCL on GPUs) and the step itself is plain PyTorch. The ranks agree where to resume
(`newest_verified`: each rank verifies its own files).

Stopping. SIGTERM (scancel, Kubernetes eviction, torchrun forwarding its own SIGTERM) and SIGUSR1
(`sbatch --signal=USR1@120`) let the current step finish; the ranks agree on it in the per-step all-reduce,
write a checkpoint and exit with EXIT_REQUEUE = 75 (EX_TEMPFAIL of sysexits.h: "try again later"). A launcher
that sees 75 requeues the job (`scontrol requeue $SLURM_JOB_ID`), and the next start resumes from that checkpoint.
When the run's last checkpoint (at the end, or for a stop signal) cannot be written, every rank exits with 1 and
rank 0 logs the newest complete checkpoint: a launcher must not take the run for finished.

Written to the store, under `<run>/`: `config.yaml` (the resolved config, at every start), `logs/metrics.jsonl`
and `tensorboard/` (one record per log interval, from rank 0: trainer/metrics.py),
`samples/<step>.png` (a grid from the EMA weights), `checkpoints/...` (trainer/checkpoint.py).
"""
from __future__ import annotations

import ctypes
import datetime
import io
import logging
import math
import os
import platform
import signal
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from PIL import Image
from torch import Tensor, nn

from data.reader import to_float
from data.stream import Stream
from models import objective, samplers, schedules, timesteps, weighting
from trainer import checkpoint, config, parallel
from trainer.config import ConfigError
from trainer.ema import EMA
from trainer.experiment import ExperimentConfig, OptimizerConfig
from trainer.metrics import BestEffort, MetricsLog
from trainer.store import Store, open_store

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75
EXIT_CHECKPOINT_FAILED = 1
SAMPLE_ROWS = 2  # the grid has one column per class (at most 10) and this many rows


def seed_of(*entropy: int) -> int:
    """A 64-bit seed from a tuple of non-negative integers; nearby tuples give unrelated streams."""
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def seed_step(device: torch.device, seed: int) -> None:
    """Seed the generators the network's own draws use (dropout, label dropout). Not torch.manual_seed: it also
    seeds every other device type and records a stack trace for CUDA's lazy initialisation, 0.2 ms a step."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                      ].manual_seed(seed)


def draw_noise(cfg: ExperimentConfig, images_seen: int, start: int, global_batch: int, shape: Sequence[int],
               device: torch.device) -> tuple[Tensor, Tensor]:
    """t and eps of the examples at positions start, ..., start + shape[0] - 1 of the global batch that begins at
    `images_seen`, drawn on `device`.

    Each example's draws follow from (seed, images seen, its position) alone, so a run's losses and parameters do
    not depend on how the global batch is split over ranks and micro-batches. Antithetic t shares u0 over the
    global batch, whose positions stratify [0, 1] (VDM App. I.1); uniform t is the example's own."""
    n = shape[0]
    # word 0 seeds u0, word 1 + i position i; a prefix of the words is the same however many are generated
    seeds = np.random.SeedSequence((cfg.seed, images_seen)).generate_state(1 + start + n, np.uint64)
    own = [torch.Generator(device).manual_seed(int(s)) for s in seeds[1 + start:1 + start + n]]
    eps = torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device) for g in own])
    if cfg.objective.time_sampler == "antithetic":
        shared = torch.Generator().manual_seed(int(seeds[0]))
        return timesteps.antithetic(n, shared, start, global_batch, device), eps
    return torch.cat([torch.rand(1, generator=g, device=device, dtype=torch.float64) for g in own]), eps


def learning_rate(cfg: OptimizerConfig, images_seen: int, total_images: int) -> float:
    """The linear warmup over warmup_images times cfg.schedule (see OptimizerConfig); `images_seen` includes the
    current batch. A function of images seen alone, so a resumed run continues the schedule where it stopped."""
    warmup = min(1.0, images_seen / cfg.warmup_images) if cfg.warmup_images else 1.0
    if cfg.schedule == "inverse_sqrt":
        return warmup * cfg.lr / math.sqrt(max(images_seen / cfg.ref_images, 1.0))
    if cfg.schedule == "cosine":
        span = max(total_images - cfg.warmup_images, 1)
        done = min(max(images_seen - cfg.warmup_images, 0) / span, 1.0)
        return warmup * (cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1 + math.cos(math.pi * done)))
    return warmup * cfg.lr


@dataclass
class Parts:
    cfg: ExperimentConfig
    backend: parallel.Backend  # the network, what the step calls (DDP, FSDP2, DeepSpeed) and its optimizer
    ema: EMA  # of the backend's local parameter tensors
    sampler: objective.LogSNRSampler  # p(logsnr) of the loss: the schedule or the adaptive sampler
    weight: weighting.Weighting
    rank: int
    world_size: int
    device: torch.device

    @property
    def module(self) -> nn.Module:
        return self.backend.module

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x


def train_step(p: Parts, micro_batches: list[dict], images_seen: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One optimizer step on this rank's share of the global batch starting at `images_seen`: its
    optimizer.accumulation micro-batches, which hold positions rank x share, ..., (rank + 1) x share - 1.

    Returns this rank's mean loss, the global gradient norm, and each example's logsnr and loss (for the loss by
    noise level in the log); a non-finite norm means the step was skipped (the gradients are all-reduced, so
    every rank sees the same norm and skips together)."""
    cfg = p.cfg
    global_batch = cfg.global_batch(p.world_size)
    start = p.rank * global_batch // p.world_size
    p.backend.zero_grad()
    drawn = []  # (logsnr, density, loss) of each micro-batch's examples
    for m, batch in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        with p.backend.micro_batch(last):  # the gradient sync, once per optimizer step
            drawn.append(micro_step(p, batch, images_seen, start, global_batch, last))
        start += len(batch["x"])
    logsnr, density, losses = (torch.cat(parts) for parts in zip(*drawn))
    lr = learning_rate(cfg.optimizer, images_seen + global_batch, cfg.total_images)
    grad_norm = p.backend.step(lr, cfg.optimizer.grad_clip)  # clipped to the global norm; skipped when not finite
    if not torch.isfinite(grad_norm):
        return losses.mean(), grad_norm, logsnr, losses
    p.ema.update(p.backend.local_params())
    if cfg.objective.importance == "adaptive":
        # the loss is 1/2 w / p ||eps - eps_hat||^2; the sampler tracks w ||eps - eps_hat||^2 (Kingma & Gao App. F)
        p.sampler.update(logsnr, 2 * density * losses, all_reduce=p.all_reduce)
    return losses.mean(), grad_norm, logsnr, losses


def micro_step(p: Parts, batch: dict, images_seen: int, start: int, global_batch: int,
               last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Forward and backward of one micro-batch (positions start, ... of the global batch); returns each example's
    logsnr, its density under the sampler and its loss."""
    cfg = p.cfg
    seed_step(p.device, seed_of(cfg.seed, images_seen, start + 1))  # dropout: per micro-batch
    x = batch["x"].to(p.device, non_blocking=True)
    cond = batch["label"].to(p.device, non_blocking=True)
    if x.dtype == torch.uint8:  # images travel as bytes and become [-1, 1] floats here, on the training device
        x = to_float(x)
    # One memory format end to end, the parameters' own (contiguous NCHW). The stream's channels_last images would
    # give 1x1 convolutions channels_last weight gradients that no longer match DDP's bucket views (a warning and a
    # copy per bucket). Measured on the demo network, one CPU thread: 71.7 ms a step in NCHW, 72.3 ms with the
    # network and batch channels_last, 72.0 ms mixed.
    x = x.contiguous()
    t, eps = draw_noise(cfg, images_seen, start, global_batch, x.shape, p.device)
    with torch.no_grad():
        logsnr, density = p.sampler.sample(t)  # as drawn inside the loss
    outputs = []  # what the network returned: a rank whose loss fails still backpropagates through it (below)

    def net(z: Tensor, logsnr: Tensor, c: Tensor) -> Tensor:
        # bf16: autocast casts where a matmul or convolution meets the weights, so z itself stays fp32
        with torch.autocast(p.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = p.backend.net(z, logsnr, c)
        outputs.append(out.float())  # the loss and its weighting in fp32
        return outputs[-1]

    net.prediction = p.module.prediction  # the objective reads it from what it calls; wrappers do not forward it
    try:
        losses = objective.weighted_loss(net, x, cond, schedule=p.sampler, weighting=p.weight, t=t, eps=eps)
        loss = losses.mean()
    except FloatingPointError:
        # The other ranks are on their way to the collectives of the backward (DDP's all-reduce, FSDP's
        # reduce-scatters, ZeRO's partitioned gradients): join them with a backward through the same forward and
        # NaN gradients, which those collectives spread to every rank, so all of them skip this step together.
        if not outputs:  # the data itself was not finite: this rank has not run the forward yet
            net(torch.zeros_like(x), torch.zeros(len(x), device=p.device), cond)
        loss = outputs[-1].sum() * math.nan
        losses = torch.full_like(logsnr, math.nan)
    p.backend.backward(loss, last)
    return logsnr, density, losses.detach()


class StopSignals:
    """Remembers SIGTERM / SIGUSR1 instead of dying, so the loop can finish the step and checkpoint first. The
    previous handlers come back on exit, so `train` can also run inside another program (a test, a notebook)."""

    def __enter__(self) -> StopSignals:
        self.received: str | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


def consolidated_ema(p: Parts) -> dict[str, dict[str, Tensor]]:
    """The full EMA weights {average: {parameter name: tensor}}. Gathering shards (FSDP2, ZeRO-3) is a collective:
    every rank calls it."""
    return p.ema.consolidate([name for name, _ in p.module.named_parameters()], p.backend.gather())


def sample_grid(p: Parts, weights: dict[str, Tensor]) -> bytes:
    """A PNG of DDIM samples from EMA `weights`, one column per class, fixed noise across the run.

    Drawn on rank 0 alone while the other ranks wait in the next step's all-reduce. That is safe because it is
    small (2 x 10 images, `sample_steps` network calls), far inside the process group's timeout; real evaluation
    (FID, bits/dim) belongs to the evaluation service, never to the training ranks."""
    net = p.cfg.network.build().to(p.device).eval()  # a plain network: the trained one may be sharded
    net.load_state_dict(weights)
    c = net.config
    columns = min(max(c.num_classes, 1), 10)  # an unconditional network (num_classes 0) takes the null class 0
    cond = torch.arange(SAMPLE_ROWS * columns, device=p.device) % columns
    shape = (len(cond), c.in_channels, c.resolution, c.resolution)
    guidance = p.cfg.sample_guidance if c.num_classes else 1.0
    x = samplers.ddim(net, shape, cond, schedule=schedules.build(p.cfg.objective.schedule),
                      steps=p.cfg.sample_steps, generator=torch.Generator().manual_seed(p.cfg.seed),
                      guidance=guidance, null_class=c.num_classes, device=p.device)
    pixels = objective.decode_pixels(x.cpu()).reshape(SAMPLE_ROWS, columns, *shape[1:])
    grid = pixels.permute(0, 3, 1, 4, 2).reshape(SAMPLE_ROWS * c.resolution, columns * c.resolution, c.in_channels)
    out = io.BytesIO()
    Image.fromarray(grid.numpy()).save(out, format="png")
    return out.getvalue()


@dataclass
class Progress:
    """Everything the loop counts; all of it is in the checkpoint, so a resumed run counts on exactly."""
    images_seen: int = 0
    skipped: int = 0  # steps skipped for non-finite gradients, in the whole run
    nonfinite_in_a_row: int = 0

    def count(self, finite: bool, limit: int) -> None:
        self.skipped += not finite
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        if self.nonfinite_in_a_row >= limit:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} steps in a row had non-finite gradients (up to {self.images_seen} images "
                "seen); lower optimizer.lr or check the data, then resume from the last checkpoint")


def save_checkpoint(p: Parts, store: Store, stream: Stream, progress: Progress, barrier: Callable[[], None]) -> bool:
    cfg = p.cfg
    ema = consolidated_ema(p)
    train_state = {}  # DDP: network, optimizer, EMAs and sampler are the same on every rank, written by rank 0
    if p.rank == 0 or not p.backend.replicated:
        train_state = {**p.backend.state_dict(), "parallel": config.to_dict(cfg.parallel), "ema": p.ema.state_dict(),
                       "progress": vars(progress).copy()}
        if cfg.objective.importance == "adaptive":
            train_state["sampler"] = p.sampler.state_dict()
    step = progress.images_seen // cfg.global_batch(p.world_size)
    return checkpoint.save(store, cfg.run, step, images_seen=progress.images_seen, rank=p.rank,
                           world_size=p.world_size, barrier=barrier, train_state=train_state,
                           data_state=stream.state_dict(), ema=ema if p.rank == 0 else {},
                           ema_metadata={name: p.ema.metadata(name) for name in ema}, cfg=cfg.checkpoint)


def last_checkpoint_complete(p: Parts, saved: bool) -> bool:
    """Whether the run's last checkpoint is complete, as rank 0 knows it (the others know only their own files),
    so that every rank exits with the same code."""
    if p.world_size == 1:
        return saved
    flag = torch.tensor([float(saved)], device=p.device)
    dist.broadcast(flag, src=0)
    return bool(flag[0] > 0)


def newest_verified(p: Parts, store: Store) -> int | None:
    """The newest complete checkpoint whose files every rank has verified, each rank its own files (rank 0 also
    the shared ones): no rank hashes the others' files while they wait. A corrupted one is set aside by rank 0;
    one the store cannot read now is skipped."""
    steps = [list(reversed(checkpoint.complete_steps(store, p.cfg.run))) if p.rank == 0 else None]
    if p.world_size > 1:
        dist.broadcast_object_list(steps, src=0)
    for step in steps[0]:
        mine = checkpoint.rank_check(store, p.cfg.run, step, p.rank)
        found = [mine]
        if p.world_size > 1:
            found = [None] * p.world_size
            dist.all_gather_object(found, mine)
        problems = [f for f in found if f is not None]
        if not problems:
            return step
        if p.rank == 0:
            corrupted = [why for kind, why in problems if kind == "corrupted"]
            if corrupted:
                checkpoint.set_aside(store, p.cfg.run, step, "; ".join(corrupted))
            else:
                log.warning("checkpoint %09d cannot be read now, skipped: %s", step, problems[0][1])
    return None


def resume(p: Parts, store: Store, stream: Stream) -> Progress:
    """Load the newest verified checkpoint; every rank loads the same one."""
    step = [newest_verified(p, store)]
    if step[0] is None:
        return Progress()
    state = checkpoint.load_rank(store, p.cfg.run, step[0], p.rank, p.world_size)
    # each backend stores its own per-rank layout; checkpoints from before `parallel` existed are DDP's
    written = state.train_state.get("parallel", config.to_dict(parallel.ParallelConfig()))
    if written != config.to_dict(p.cfg.parallel):
        raise ConfigError(f"checkpoint {step[0]:09d} of run {p.cfg.run!r} was written with parallel={written}, "
                          f"this run has parallel={config.to_dict(p.cfg.parallel)}; resume with the settings it "
                          "was written with")
    p.backend.load_state_dict(state.train_state)
    p.ema.load_state_dict(state.train_state["ema"])
    if p.cfg.objective.importance == "adaptive":
        p.sampler.load_state_dict(state.train_state["sampler"])
    stream.load_state_dict(state.data_state)
    checkpoint.restore_rng(state.rng)
    log.info("resumed from checkpoint %09d at %d images seen", step[0], state.images_seen)
    return Progress(**state.train_state["progress"])


def build_parts(cfg: ExperimentConfig, rank: int, world_size: int, device: torch.device,
                accelerator: Accelerator | None = None) -> Parts:
    """The network wrapped for cfg.parallel on accelerator's process group; None: one plain process."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    module = cfg.network.build().to(device)
    if cfg.compile:  # before any wrapper, as torchtitan does: FSDP2 then shards the compiled blocks
        parallel.compile_blocks(module, device)
    backend = parallel.wrap(module, cfg.parallel, cfg.optimizer, cfg.data.batch_size, accelerator, cfg.precision)
    sampler = objective.build_sampler(cfg.objective).to(device)
    return Parts(cfg, backend, EMA(cfg.ema, backend.local_params()), sampler, weighting.build(cfg.objective.weighting),
                 rank, world_size, device)


def train(cfg: ExperimentConfig, store: Store, accelerator: Accelerator) -> int:
    """Train until cfg.total_images; returns 0 when done, EXIT_REQUEUE when stopped by a signal."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    global_batch = cfg.global_batch(world_size)
    cfg.check_intervals(global_batch)
    try:
        stream = Stream(cfg.data, rank, world_size)
    except (FileNotFoundError, ValueError) as e:  # the index is read before anything is trained
        raise ConfigError(f"data.index: {e}") from None
    if cfg.sample_every_images and stream.kind != "images":
        raise ConfigError(f"{cfg.data.index} holds {stream.kind}: sample grids need images (the latent decoder "
                          "belongs to evaluation); set sample_every_images=0")
    if rank == 0:  # once the data is known to be there: a run that cannot start leaves nothing behind
        store.put(f"{cfg.run}/config.yaml", config.dump(cfg).encode())
    p = build_parts(cfg, rank, world_size, accelerator.device, accelerator)
    progress = resume(p, store, stream)
    batches, stop, saved = iter(stream), False, True
    grids = BestEffort("a sample grid")
    with StopSignals() as signals, MetricsLog(store, cfg, progress.images_seen, rank == 0, p.device) as metrics:
        while progress.images_seen < cfg.total_images and not stop:
            micro_batches = [next(batches) for _ in range(cfg.optimizer.accumulation)]
            loss, grad_norm, logsnr, losses = train_step(p, micro_batches, progress.images_seen)
            progress.images_seen += global_batch
            finite = bool(torch.isfinite(grad_norm))
            progress.count(finite, cfg.optimizer.max_nonfinite_steps)
            # one small all-reduce per step: the global loss and loss by logsnr for the log, and whether any rank
            # was asked to stop
            shared = p.all_reduce(torch.cat([
                torch.tensor([float(loss), float(signals.received is not None)], dtype=torch.float64, device=p.device),
                metrics.logsnr_totals(logsnr, losses)]))
            stop = bool(shared[1] > 0)
            metrics.step(float(shared[0]) / world_size if finite else None, shared[2:], float(grad_norm),
                         learning_rate(cfg.optimizer, progress.images_seen, cfg.total_images),
                         progress.images_seen, global_batch, progress.skipped)
            if cfg.sample_every_images and progress.images_seen % cfg.sample_every_images == 0:
                weights = next(iter(consolidated_ema(p).values()))  # on every rank: gathering is a collective
                if rank == 0:
                    key = f"{cfg.run}/samples/{progress.images_seen // global_batch:09d}.png"
                    grids(lambda: store.put(key, sample_grid(p, weights)))
            if (progress.images_seen % cfg.checkpoint.every_images == 0 or stop
                    or progress.images_seen >= cfg.total_images):
                saved = save_checkpoint(p, store, stream, progress, accelerator.wait_for_everyone)
    if not last_checkpoint_complete(p, saved):
        newest = checkpoint.latest_complete(store, cfg.run) if rank == 0 else None
        if rank == 0:
            log.error("the run's last checkpoint (%d images seen) was not written; the newest complete checkpoint is "
                      "%s; exiting with %d", progress.images_seen,
                      f"{newest:09d}" if newest is not None else "none", EXIT_CHECKPOINT_FAILED)
        return EXIT_CHECKPOINT_FAILED
    if stop:
        log.warning("stopped by %s at %d images seen; checkpoint written, exiting with %d to be requeued",
                    signals.received or "another rank's signal", progress.images_seen, EXIT_REQUEUE)
        return EXIT_REQUEUE
    return 0


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for the next step instead of handing it back to the kernel.

    A CPU step frees and reallocates the same large activation buffers. With glibc's default, self-adjusting
    thresholds, some of them go back to the kernel (unmapped, or trimmed off the heap) and are faulted in again,
    zeroed, on the next step: 1,000-2,000 page faults per step of the demo network, about 3% of its step time,
    and more or fewer from one step to the next. Fixed thresholds keep them in the heap. A no-op off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest: larger blocks are mapped whatever this says
    libc.mallopt(m_trim_threshold, 1 << 30)


def check_precision_environment(precision: str) -> None:
    """accelerate reads ACCELERATE_MIXED_PRECISION (set by `accelerate launch` or by hand) and would autocast DDP
    alone; the config decides, so a variable that says otherwise is an error rather than a silent switch."""
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    expected = "no" if precision == "fp32" else precision
    if env is not None and env != expected:
        raise ConfigError(f"environment variable ACCELERATE_MIXED_PRECISION={env} conflicts with precision="
                          f"{precision} in the config, which decides: unset it, or set precision=bf16 / fp32 "
                          f"(ACCELERATE_MIXED_PRECISION={expected} agrees with this config)")


def main(config_path: str, overrides: Sequence[str] = ()) -> int:
    cfg = config.load(ExperimentConfig, config_path, overrides)
    check_precision_environment(cfg.precision)
    try:
        store = open_store(cfg.store)
    except ValueError as e:
        raise ConfigError(f"store: {e}") from None
    store.check_reachable()  # before any process group or network exists: fail in seconds, not at a checkpoint
    # On CPU, cpu=True is what makes accelerate read torchrun's environment; without it every rank believes it
    # is alone and trains its own model. The world size is checked against the launcher's for that reason.
    # mixed_precision="no": the step applies cfg.precision itself, the same way for every backend
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.process_group_timeout_s))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", kwargs_handlers=[timeout])
    if accelerator.device.type == "cpu":  # GPU memory has its own caching allocator
        keep_freed_memory()
    elif cfg.precision == "fp32":  # TF32 matmuls and convolutions: fp32 storage, 10-bit mantissa products
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"the launcher started {launched} ranks but the process group has "
                           f"{accelerator.num_processes}")
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format=f"[rank {accelerator.process_index}] %(message)s")
    return train(cfg, store, accelerator)
