"""Distributed backends: the network and its optimizer wrapped for `ddp`, `fsdp` (FSDP2) or `deepspeed` (ZeRO).

`wrap` returns a `Backend`: what the step calls (`net`), how to run the backward and the optimizer step, the local
parameter tensors the EMA averages, a `gather` that rebuilds full tensors from them, and the per-rank resume state.
The network itself stays plain PyTorch (torchtitan style: parallelism is applied from outside).

Who wraps what, and why:
- `ddp`: accelerate (`Accelerator.prepare_model`).
- `fsdp`: `fully_shard` per block, then the root. accelerate 1.15 with its FSDP plugin silently falls back to DDP on
  a machine without GPUs (the prepared model is a DistributedDataParallel), so a CPU run would train unsharded while
  claiming otherwise; applying `fully_shard` ourselves gives the same sharding on CPU and GPU. accelerate still
  creates the process group.
- `deepspeed`: `deepspeed.initialize` on accelerate's process group. accelerate's DeepSpeed plugin on CPU needs a
  `PartialState(backend="gloo")` made before the Accelerator and the transformers package importable; calling
  DeepSpeed directly needs neither and takes our config as a dict.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from trainer.config import ConfigError
from trainer.ema import gather_full

if TYPE_CHECKING:
    from accelerate import Accelerator

    from trainer.experiment import OptimizerConfig


@dataclass
class ParallelConfig:
    backend: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    fsdp_shard: Literal["full", "hybrid"] = "full"  # hybrid: shard within a group, replicate across groups
    shard_group_size: int = 0  # ranks per shard group of `hybrid` (usually one node's); 0: LOCAL_WORLD_SIZE
    zero_stage: Literal[1, 2, 3] = 2  # 1: optimizer state, 2: + gradients, 3: + parameters partitioned
    offload_optimizer: bool = False  # ZeRO-Offload: the AdamW state and its step in CPU memory

    def __post_init__(self):
        if self.shard_group_size < 0:
            raise ConfigError(f"parallel.shard_group_size must be >= 0, found {self.shard_group_size}")


def build_optimizer(module: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    # Decay pulls weights towards zero; biases and norm gains (the 1-d tensors) set offsets and scales, not capacity.
    decay = [p for p in module.parameters() if p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Backend:
    """Plain PyTorch optimizer on `module`; `net` is what the step calls (the module, or its DDP wrapper).

    An optimizer step is zero_grad, then per micro-batch its forward and `backward` inside `micro_batch(last)`,
    then `step`: gradients are summed over `accumulation` micro-batches and synchronised across ranks once, with
    the last one."""

    replicated = True  # every rank holds the same network and optimizer state: a checkpoint needs one copy

    def __init__(self, module: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer, accumulation: int = 1):
        self.module, self.net, self.optimizer, self.accumulation = module, net, optimizer, accumulation

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: DDP's no_sync for all but the last (DeepSpeed's engine
        counts micro-batches itself and reduces at its accumulation boundary)."""
        if last or not isinstance(self.net, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.net.no_sync()

    def backward(self, loss: Tensor, last: bool = True) -> None:
        """`loss` is a micro-batch's mean: the accumulated gradient is that of the mean over all of them."""
        (loss / self.accumulation).backward()

    def step(self, lr: float, grad_clip: float) -> Tensor:
        """Clip to the global norm and step, unless that norm is non-finite; returns the norm before clipping."""
        grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), grad_clip)
        if torch.isfinite(grad_norm):
            _set_lr(self.optimizer, lr)
            self.optimizer.step()
        return grad_norm

    def local_params(self) -> list[Tensor]:
        return list(self.module.parameters())

    def gather(self) -> Callable[[int, Tensor], Tensor]:
        return lambda i, local: local

    def state_dict(self) -> dict:
        return {"network": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])


def compile_blocks(module: nn.Module, device: torch.device) -> None:
    """torch.compile, in place, every block of `module` that is not inside another block."""
    compiler = os.environ.get("CXX", "g++")  # what inductor runs for CPU kernels
    if device.type == "cpu" and shutil.which(compiler) is None:
        raise ConfigError(f"compile: true on CPU needs a C++ compiler for inductor, and {compiler!r} (the CXX "
                          "environment variable, default g++) is not on PATH: install g++ or set compile=false")
    listed = blocks(module)
    nested = {id(m) for b in listed for m in b.modules() if m is not b}
    for block in listed:
        if id(block) not in nested:
            block.compile(fullgraph=True)


def blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a network: every element of an nn.ModuleList that is not itself a list and has
    parameters, inner blocks before the blocks that hold them (fully_shard must reach a module before its parent)."""
    return [child for m in reversed(list(module.modules())) if isinstance(m, nn.ModuleList)
            for child in m if not isinstance(child, nn.ModuleList) and any(True for _ in child.parameters())]


def _to_local(tree):
    from torch.distributed.tensor import DTensor  # 1.6 s to import: only the FSDP2 backend pays it
    return tree_map(lambda x: x.to_local() if isinstance(x, DTensor) else x, tree)


def _like(template, local):
    """`local` (this rank's shards, as `_to_local` wrote them) as DTensors laid out like `template`."""
    from torch.distributed.tensor import DTensor

    def rebuild(t, x):
        if not isinstance(t, DTensor):
            return x
        return DTensor.from_local(x, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())

    return tree_map(rebuild, template, local)


class FSDP(Backend):
    """FSDP2: each block, then the root, is `fully_shard`ed, so every parameter is a DTensor sharded on dim 0 over
    the mesh's last dimension (and replicated over the first one for hybrid sharding). The EMA averages the local
    shards; the resume state is this rank's shards of the network and of the optimizer state (plain tensors, so
    they load with weights_only), turned back into DTensors on load by the state-dict APIs of
    torch.distributed.checkpoint."""
    replicated = False

    def __init__(self, module: nn.Module, cfg: OptimizerConfig, mesh, precision: str = "fp32"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if precision == "bf16":  # bf16 all-gathers and compute, fp32 gradient reduction and sharded parameters
            inner = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # the network's own input stays fp32 (models/unet_vdm.py: Fourier features of z need it); autocast,
            # around the forward, casts it where a matmul meets the bf16 weights
            root = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
        else:
            inner = root = MixedPrecisionPolicy()
        for block in blocks(module):
            fully_shard(block, mesh=mesh, mp_policy=inner)
        fully_shard(module, mesh=mesh, mp_policy=root)
        super().__init__(module, module, build_optimizer(module, cfg), cfg.accumulation)  # on the local shards

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        self.module.set_requires_gradient_sync(last)  # reduce-scatter (and all-reduce, hybrid) with the last only
        return contextlib.nullcontext()

    def step(self, lr: float, grad_clip: float) -> Tensor:
        # the norm of DTensor gradients is a DTensor: its full value is the global norm, the same on every rank
        grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), grad_clip).full_tensor()
        if torch.isfinite(grad_norm):
            _set_lr(self.optimizer, lr)
            self.optimizer.step()
        return grad_norm

    def local_params(self) -> list[Tensor]:
        return [p.to_local() for p in self.module.parameters()]

    def gather(self) -> Callable[[int, Tensor], Tensor]:
        return gather_full(list(self.module.parameters()))

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        return {"network": _to_local(get_model_state_dict(self.module)),
                "optimizer": _to_local(get_optimizer_state_dict(self.module, self.optimizer))}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)
        set_model_state_dict(self.module, _like(get_model_state_dict(self.module), state["network"]))
        set_optimizer_state_dict(self.module, self.optimizer,
                                 _like(get_optimizer_state_dict(self.module, self.optimizer), state["optimizer"]))


ENGINE_TAG = "engine"  # the one folder name DeepSpeed writes its per-rank files into, in a temporary directory


class DeepSpeed(Backend):
    """DeepSpeed ZeRO with torch's AdamW (DeepSpeed's own Adam is a compiled op on CPU, about a minute to build).

    DeepSpeed clips (`gradient_clipping`) and skips a step whose gradients are not finite by itself. Under ZeRO-3
    each parameter is partitioned and `ds_tensor` holds this rank's flat (padded) partition: the EMA averages those,
    and `gather` reassembles them. The resume state is the files `save_checkpoint` writes for this rank, as bytes:
    they hold pickled DeepSpeed objects, so they are stored opaque (the checkpoint stays weights_only) and unpickled
    by DeepSpeed itself on resume, after the manifest's sha256 has matched."""
    replicated = False  # each rank's engine files hold its own partitions

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: ParallelConfig, micro_batch: int,
                 accumulation: int, grad_clip: float):
        import deepspeed  # 2.5 s to import, and only this backend needs it
        zero = {"stage": cfg.zero_stage}
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
                  "gradient_clipping": grad_clip, "zero_optimization": zero,
                  "zero_allow_untested_optimizer": True,  # torch's AdamW
                  "zero_force_ds_cpu_optimizer": False}  # offload with torch's AdamW too
        self.engine, zero_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.stage = self.engine.zero_optimization_stage()
        super().__init__(self.engine.module, self.engine, zero_optimizer, accumulation)

    def zero_grad(self) -> None:
        """Nothing to do: the engine zeroes the gradients after each optimizer step, applied or skipped."""

    def backward(self, loss: Tensor, last: bool = True) -> None:
        self.engine.backward(loss)  # divided by gradient_accumulation_steps inside
        if not last:
            self.engine.step()  # a micro-step: the engine only counts it

    def step(self, lr: float, grad_clip: float) -> Tensor:
        """`grad_clip` is the engine's `gradient_clipping`, set when it was built."""
        _set_lr(self.optimizer, lr)
        self.engine.step()
        return torch.tensor(float(self.engine.get_global_grad_norm()) if self.engine.was_step_applied() else math.nan)

    def local_params(self) -> list[Tensor]:
        params = list(self.module.parameters())
        return [p.ds_tensor for p in params] if self.stage == 3 else params

    def gather(self) -> Callable[[int, Tensor], Tensor]:
        if self.stage != 3:
            return super().gather()
        params = list(self.module.parameters())

        def gather(i: int, local: Tensor) -> Tensor:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local.contiguous())  # equal-sized partitions; the last one is padded
            return torch.cat(parts)[:params[i].ds_numel].view(params[i].ds_shape)

        return gather

    def state_dict(self) -> dict:
        with tempfile.TemporaryDirectory(prefix="elbodiff-ds-") as tmp:
            Path(tmp, ENGINE_TAG).mkdir()
            self.engine.save_checkpoint(tmp, tag=ENGINE_TAG, save_latest=False)
            return {"engine": {f.name: torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8)
                               for f in sorted(Path(tmp, ENGINE_TAG).iterdir())}}

    def load_state_dict(self, state: dict) -> None:
        files = dict(state["engine"])
        # ZeRO-1/2 write the (replicated) module weights once, on rank 0, and every rank reads them back
        shared = [{n: t for n, t in files.items() if n.startswith("mp_rank_")} if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        with tempfile.TemporaryDirectory(prefix="elbodiff-ds-") as tmp:
            Path(tmp, ENGINE_TAG).mkdir()
            for name, data in {**shared[0], **files}.items():
                Path(tmp, ENGINE_TAG, name).write_bytes(data.numpy().tobytes())
            path, _ = self.engine.load_checkpoint(tmp, tag=ENGINE_TAG, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its state from files {sorted(files)}")


def wrap(module: nn.Module, cfg: ParallelConfig, optimizer: OptimizerConfig, micro_batch: int,
         accelerator: Accelerator | None, precision: str = "fp32") -> Backend:
    """`module` wrapped for `cfg.backend` on accelerate's process group; with one process there is nothing to share
    and every backend is the plain module (`accelerator` None: no process group at all)."""
    if accelerator is None or accelerator.num_processes == 1:
        return Backend(module, module, build_optimizer(module, optimizer), optimizer.accumulation)
    if cfg.backend == "ddp":
        return Backend(module, accelerator.prepare_model(module), build_optimizer(module, optimizer),
                       optimizer.accumulation)
    if cfg.backend == "deepspeed":
        return DeepSpeed(module, build_optimizer(module, optimizer), cfg, micro_batch, optimizer.accumulation,
                         optimizer.grad_clip)
    from torch.distributed.device_mesh import init_device_mesh
    world, device = accelerator.num_processes, accelerator.device.type
    if cfg.fsdp_shard == "full":
        return FSDP(module, optimizer, init_device_mesh(device, (world,)), precision)
    group = cfg.shard_group_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % group:
        raise ConfigError(f"parallel.shard_group_size: {group} ranks per shard group do not divide the world "
                          f"size {world}")
    return FSDP(module, optimizer, init_device_mesh(device, (world // group, group),
                                                    mesh_dim_names=("replicate", "shard")), precision)
