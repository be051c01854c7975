"""The evaluation's read side of a checkpoint: verify it, rebuild the run's network, load EMA weights.

Only a checkpoint whose manifest verifies is evaluated: every file it lists has the listed size and sha256, no
entry names a file outside the checkpoint's own folder, and it holds EMA weights as safetensors (a checkpoint of
pickles only is refused: nothing read from a store is ever unpickled). The network is rebuilt from the run's
`config.yaml`, the resolved config the trainer writes at start; the training data need not be reachable, except
for latent runs, whose shard index records the latents' scale and shift.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import safetensors
import yaml
from torch import nn

from data import writer
from models.objective import DataKind
from models.uvit_latent import UViTLatentConfig
from trainer import checkpoint, config
from trainer.checkpoint import MANIFEST, checkpoint_prefix
from trainer.config import ConfigError
from trainer.experiment import ExperimentConfig
from trainer.store import Store

EMA_PREFIX, EMA_SUFFIX = "ema-", ".safetensors"


class BadCheckpoint(Exception):
    """A checkpoint that must not be evaluated; str(e) is a one-line reason naming the file."""


@dataclass
class Loaded:
    cfg: ExperimentConfig
    net: nn.Module  # in eval mode, on the requested device
    step: int
    images_seen: int
    ema: str  # the EMA file's name, or posthoc-<sigma_rel> for a synthesised one
    data: DataKind  # "pixels8" for image runs, "continuous" for latent runs
    resolution: int  # of the images: the network's for pixel runs, the encoded images' for latent runs
    channels: int  # of what the network sees
    num_classes: int  # 0: unconditional
    null_class: int | None  # the class id of classifier-free guidance; None for an unconditional network
    latent: dict | None  # latent runs: {"index", "scale", "shift", "resolution"} from the latent shard index


def ema_names(manifest: dict) -> list[str]:
    """The EMA weights a manifest lists, sorted."""
    return sorted(name[len(EMA_PREFIX):-len(EMA_SUFFIX)] for name in manifest["files"]
                  if name.startswith(EMA_PREFIX) and name.endswith(EMA_SUFFIX))


def _check_listing(prefix: str, manifest: dict) -> None:
    """The checks that need no file read: entries stay in the folder, EMA weights are there as safetensors."""
    for name in manifest["files"]:
        if not name or "/" in name or "\\" in name or ".." in name:
            raise BadCheckpoint(f"{prefix}{MANIFEST} lists {name!r}, a file outside the checkpoint's folder")
    if not ema_names(manifest):
        files = sorted(manifest["files"])
        listed = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        raise BadCheckpoint(f"{prefix}{MANIFEST} lists no {EMA_PREFIX}*{EMA_SUFFIX} weights (only {listed or 'nothing'}"
                            "); evaluation loads safetensors only")


def _read_manifest(store: Store, run: str, step: int) -> dict:
    prefix = checkpoint_prefix(run, step)
    try:
        raw = store.get(prefix + MANIFEST)
    except FileNotFoundError:
        steps = ", ".join(map(str, checkpoint.complete_steps(store, run))) or "none"
        raise BadCheckpoint(f"run {run!r} has no complete checkpoint at step {step} ({prefix}{MANIFEST} is "
                            f"missing); complete steps: {steps}") from None
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest["files"], dict) or not isinstance(manifest["images_seen"], int):
            raise ValueError("'files' must be a mapping and 'images_seen' an integer")
    except (ValueError, KeyError, TypeError) as e:
        raise BadCheckpoint(f"{prefix}{MANIFEST} is not a checkpoint manifest: {e}") from None
    _check_listing(prefix, manifest)
    return manifest


def verify(store: Store, run: str, step: int) -> dict:
    """The manifest of checkpoint `step`, once every file it lists has the listed size and sha256; otherwise
    BadCheckpoint naming the first file that does not. Reads the whole checkpoint: call it once, on one rank."""
    prefix = checkpoint_prefix(run, step)
    manifest = _read_manifest(store, run, step)
    for name, want in manifest["files"].items():
        try:
            with store.open(prefix + name) as f:
                got = checkpoint._digest(f)
        except FileNotFoundError:
            raise BadCheckpoint(f"{prefix}{name} is listed in the manifest but missing") from None
        if got != want:
            raise BadCheckpoint(f"{prefix}{name} does not match the manifest: {got['size']} bytes, sha256 "
                                f"{got['sha256'][:16]}..., listed {want}")
    return manifest


def load_run_config(store: Store, run: str) -> ExperimentConfig:
    """The run's `config.yaml`, parsed as strictly as `trainer.config.load` parses a config file."""
    key = f"{run}/config.yaml"
    try:
        data = config.read_yaml(store.get(key))
    except FileNotFoundError:
        raise ConfigError(f"{store.uri}/{key} not found: the trainer writes it when a run starts") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: the top level must be a mapping, found {type(data).__name__}")
    try:
        return config.from_dict(ExperimentConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def _latent_settings(cfg: ExperimentConfig, run: str) -> dict:
    """Scale and shift of a latent run's data, recorded in its latent shard index (data.encode)."""
    try:
        index = writer.load_index(cfg.data.index)
        if index.get("kind") != "latents":
            raise ValueError(f"it holds {index.get('kind')}, not latents")
        return {"index": cfg.data.index, "scale": float(index["scale"]), "shift": float(index["shift"]),
                "resolution": int(index["resolution"])}
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"run {run!r} trains on latents: its latent shard index {cfg.data.index!r} (data.index "
                          f"of config.yaml), which records their scale and shift, cannot be read: {e}") from None


def load_network(store: Store, run: str, step: int, *, ema: str | None = None, sigma_rel: float | None = None,
                 device="cpu") -> Loaded:
    """The network of checkpoint `step` with EMA weights `ema` (default: the first power EMA by name, else the
    first EMA), or with a power EMA of width `sigma_rel` synthesised post hoc (EDM2 Sec. 3.2) from the power-EMA
    snapshots of the run's complete checkpoints up to `step`.

    Checks the manifest's listing and, through trainer.checkpoint.load_ema, the bytes of every weight file it
    reads; the other files are left to `verify`."""
    if ema is not None and sigma_rel is not None:
        raise ValueError(f"give EMA weights by name ({ema}) or a post-hoc sigma_rel ({sigma_rel}), not both")
    prefix = checkpoint_prefix(run, step)
    manifest = _read_manifest(store, run, step)
    cfg = load_run_config(store, run)
    if sigma_rel is not None:
        steps = [s for s in checkpoint.complete_steps(store, run) if s <= step]
        for s in steps:
            _check_listing(checkpoint_prefix(run, s), checkpoint.read_manifest(store, run, s))
        name, weights = f"posthoc-{sigma_rel:.3f}", checkpoint.synthesize_ema(store, run, sigma_rel, steps)
    else:
        names = ema_names(manifest)
        powers = [n for n in names if n.startswith("power-")]
        name = ema if ema is not None else (powers or names)[0]
        if name not in names:
            raise ValueError(f"checkpoint {prefix} has no EMA weights {name!r}; it has: {', '.join(names)}")
        try:
            weights = checkpoint.load_ema(store, run, step, name)
        except (FileNotFoundError, ValueError, safetensors.SafetensorError) as e:
            raise BadCheckpoint(f"{prefix}{EMA_PREFIX}{name}{EMA_SUFFIX}: {e}") from None
    try:
        net = cfg.network.build()
        net.load_state_dict(weights)
    except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError: names or shapes differ from the weights
        raise ConfigError(f"{run}/config.yaml (network {cfg.network.preset}) does not rebuild the network of "
                          f"{prefix}: {' '.join(str(e).split())[:400]}") from None
    c = net.config
    # The latent U-ViT is the family that trains on latents; every other family trains on 8-bit images.
    latent = _latent_settings(cfg, run) if isinstance(c, UViTLatentConfig) else None
    resolution = latent["resolution"] if latent else c.resolution
    return Loaded(cfg=cfg, net=net.to(device).eval(), step=step, images_seen=manifest["images_seen"], ema=name,
                  data="continuous" if latent else "pixels8", resolution=resolution, channels=c.in_channels,
                  num_classes=c.num_classes, null_class=c.num_classes if c.num_classes else None,
                  latent=latent)
