"""The experiment config: everything one training run needs, composed from each component's own config.

A run is `configs/<name>.yaml` plus `key.sub=value` overrides, loaded strictly by `trainer.config.load`; the
resolved config is written to `<run>/config.yaml` at start, so the evaluation rebuilds the network from it.
Every interval counts images seen (EDM2), so it survives a change of batch size; the loop asserts that each
interval is a whole number of global batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from data.stream import StreamConfig
from models import presets
from models.objective import ObjectiveConfig
from trainer import config
from trainer.checkpoint import CheckpointConfig
from trainer.config import ConfigError
from trainer.ema import EMAConfig
from trainer.parallel import ParallelConfig


@dataclass
class NetworkConfig:
    preset: str = "uvit_tiny"  # a name in models.presets.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # fields of the preset's config, e.g. {resolution: 32}

    def build_config(self) -> presets.NetworkConfig:
        """The preset's config with the overrides, checked field by field like the rest of the YAML."""
        base = presets.preset_config(self.preset)
        return config.from_dict(type(base), {**config.to_dict(base), **self.overrides}, "network.overrides")

    def build(self) -> nn.Module:
        return presets.build(self.build_config())


@dataclass
class OptimizerConfig:
    """AdamW; the learning rate ramps up linearly over warmup_images, times its schedule:
    constant (VDM); inverse_sqrt, EDM2's lr / sqrt(max(images / ref_images, 1)); cosine from lr down to lr_min
    between warmup_images and total_images."""
    lr: float = 1e-4
    schedule: Literal["constant", "inverse_sqrt", "cosine"] = "constant"
    ref_images: int = 0  # inverse_sqrt: images after which the decay starts (EDM2: 70k batches of 2048)
    lr_min: float = 0.0  # cosine: the rate at total_images
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01  # applied to matrices and kernels only, never to biases and norm gains
    warmup_images: int = 0
    grad_clip: float = 1.0  # on the global gradient norm
    # micro-batches of data.batch_size per optimizer step on each rank; global batch = batch x accumulation x ranks
    accumulation: int = 1
    max_nonfinite_steps: int = 8  # consecutive skipped steps (non-finite gradients) before training aborts

    def __post_init__(self):
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError(f"optimizer.lr and optimizer.grad_clip must be positive, found {self.lr}, "
                              f"{self.grad_clip}")
        if self.warmup_images < 0 or self.max_nonfinite_steps < 1 or self.accumulation < 1:
            raise ConfigError(f"optimizer.warmup_images must be >= 0 (found {self.warmup_images}), "
                              f"optimizer.max_nonfinite_steps >= 1 (found {self.max_nonfinite_steps}) and "
                              f"optimizer.accumulation >= 1 (found {self.accumulation})")
        if self.schedule == "inverse_sqrt" and self.ref_images <= 0:
            raise ConfigError(f"optimizer.ref_images must be positive for schedule inverse_sqrt (EDM2 uses "
                              f"70000 x 2048 = 143360000), found {self.ref_images}")
        if not 0 <= self.lr_min <= self.lr:
            raise ConfigError(f"optimizer.lr_min must be in [0, optimizer.lr = {self.lr}], found {self.lr_min}")


@dataclass
class ExperimentConfig:
    run: str = "demo"  # the run's folder in the store
    store: str = "demo-out/runs"  # /path, file:///path or s3://bucket/prefix
    seed: int = 0  # network init, noise and dropout; the data order has its own seed (data.seed)
    total_images: int = 2**20
    network: NetworkConfig = field(default_factory=NetworkConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: StreamConfig = field(default_factory=StreamConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # ddp, fsdp or deepspeed, and their settings
    # bf16: the network's matmuls and convolutions in bf16 (autocast; FSDP2 also gathers bf16 parameters), while
    # master weights, optimizer state, EMAs, gradient reductions and the loss's terms stay fp32
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile each repeated block of the network (as torchtitan does), each as one graph (fullgraph: a graph
    # break is an error); the parameters keep their names, so checkpoints load into an uncompiled network
    compile: bool = False
    # how long a collective may wait for the other ranks before the process group fails (a checkpoint upload or
    # a slow rank's resume sits inside one); not part of `parallel`, so a resumed run may change it
    process_group_timeout_s: int = 1800
    log_every_images: int = 2**14
    sample_every_images: int = 2**18  # a grid from the EMA weights, rank 0; 0: none (latent runs)
    sample_steps: int = 32  # DDIM steps of that grid: a progress picture, not an evaluation
    sample_guidance: float = 1.0  # classifier-free guidance of that grid (conditional networks)

    def __post_init__(self):
        if not self.run or "/" in self.run:
            raise ConfigError(f"run must be a non-empty folder name without '/', found {self.run!r}")
        if self.total_images <= 0 or self.log_every_images <= 0 or self.sample_every_images < 0:
            raise ConfigError("total_images and log_every_images must be positive, sample_every_images >= 0")
        if self.sample_steps < 1:
            raise ConfigError(f"sample_steps must be at least 1, found {self.sample_steps}")
        if self.process_group_timeout_s <= 0:
            raise ConfigError(f"process_group_timeout_s must be a positive number of seconds, found "
                              f"{self.process_group_timeout_s}")
        if self.sample_guidance < 0:
            raise ConfigError(f"sample_guidance must be >= 0, found {self.sample_guidance}")
        self.network.build_config()  # an unknown preset or field fails at load time, not after start-up

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step: data.batch_size x optimizer.accumulation x world size."""
        return self.data.batch_size * self.optimizer.accumulation * world_size

    def check_intervals(self, global_batch: int) -> None:
        """Every interval must be a whole number of global batches, or the clock would step over it."""
        intervals = {"total_images": self.total_images, "log_every_images": self.log_every_images,
                     "sample_every_images": self.sample_every_images,
                     "checkpoint.every_images": self.checkpoint.every_images,
                     "checkpoint.keep_every_images": self.checkpoint.keep_every_images,
                     "optimizer.warmup_images": self.optimizer.warmup_images}
        uneven = {k: v for k, v in intervals.items() if v % global_batch}
        if uneven:
            raise ConfigError(f"intervals must be multiples of the global batch {global_batch} (data.batch_size "
                              f"{self.data.batch_size} x optimizer.accumulation {self.optimizer.accumulation} x "
                              f"{global_batch // (self.data.batch_size * self.optimizer.accumulation)} ranks); "
                              f"found {uneven}")
