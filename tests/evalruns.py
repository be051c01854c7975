"""Runs with real checkpoints of a tiny network in any store, made in milliseconds instead of by training."""
import json

import torch

from launching import DEMO, TINY
from trainer import checkpoint, config
from trainer.ema import EMA, EMAConfig
from trainer.experiment import ExperimentConfig


def run_config(run: str, store_uri: str, *overrides: str) -> ExperimentConfig:
    return config.load(ExperimentConfig, DEMO, [*TINY, f"run={run}", f"store={store_uri}", *overrides])


def make_run(store, run: str, steps, *, seed: int = 0, overrides=()) -> ExperimentConfig:
    """config.yaml and one complete checkpoint per step (images seen = 8 x step) holding the trainer's files: power
    EMAs of weights that drift from step to step, so checkpoints differ."""
    cfg = run_config(run, store.uri, *overrides)
    store.put(f"{run}/config.yaml", config.dump(cfg).encode())
    torch.manual_seed(seed)
    net = cfg.network.build()
    params = [p.detach() for p in net.parameters()]
    names = [name for name, _ in net.named_parameters()]
    ema = EMA(EMAConfig(sigma_rels=(0.05, 0.10)), params)
    for step in steps:
        while ema.t < step:
            with torch.no_grad():
                for p in params:
                    p.add_(0.01 * torch.randn_like(p))
            ema.update(params)
        weights = ema.consolidate(names, lambda i, local: local)
        checkpoint.save(store, run, step, images_seen=8 * step, rank=0, world_size=1, barrier=lambda: None,
                        train_state={"progress": torch.tensor(step)}, data_state={},
                        ema={name: {k: v.clone() for k, v in w.items()} for name, w in weights.items()},
                        ema_metadata={name: ema.metadata(name) for name in weights})
    return cfg


def tamper(store, key: str) -> None:
    """Flip one byte of a stored object."""
    raw = bytearray(store.get(key))
    raw[len(raw) // 2] ^= 0xFF
    store.put(key, bytes(raw))


def rewrite_manifest(store, run: str, step: int, edit) -> None:
    prefix = checkpoint.checkpoint_prefix(run, step)
    manifest = json.loads(store.get(prefix + checkpoint.MANIFEST))
    edit(manifest)
    store.put(prefix + checkpoint.MANIFEST, json.dumps(manifest).encode())
