"""Checkpoints in the object store (ARCHITECTURE seam 4).

Layout of `<run>/checkpoints/<step:09d>/`:

    attempt                       random token of the write attempt that produced this checkpoint
    rank-<r>.pt                   rank r's training state (torch.save; loaded with weights_only=True)
    rng-<r>.pt                    rank r's RNG states
    data-<r>.json                 rank r's data-stream position (seam 5)
    files-<r>.json                what rank r wrote: name -> size, sha256, and the attempt token
    ema-<name>.safetensors        consolidated float32 EMA weights, written by rank 0, for evaluation
    manifest.json                 every file above with size and sha256; written LAST, by rank 0

A checkpoint without a manifest does not exist. Writing one takes only a `barrier` callable:

    1. rank 0 removes leftovers of an interrupted attempt at this step and writes a fresh `attempt` token;
    -- barrier --
    2. every rank reads the token, writes and uploads its own files in parallel, then `files-<r>.json`;
    -- barrier --
    3. rank 0 reads every `files-<r>.json`; only if all exist and carry this attempt's token does it write
       `manifest.json`, then `LATEST`, then applies retention.

The token lets rank 0 tell a rank that failed in this attempt from files left by an earlier one, without a
collective. A storage error in any step is logged, the checkpoint is abandoned without a manifest, and `save`
returns False instead of raising, so training goes on. Once the manifest exists the files are never rewritten.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from trainer.config import ConfigError
from trainer.ema import gamma_of_sigma_rel, posthoc_coefficients
from trainer.store import STORE_ERRORS, Store

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REJECTED = MANIFEST + ".rejected"  # a corrupted checkpoint's manifest, set aside at resume
ATTEMPT = "attempt"


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which are kept. All intervals count images seen, not steps, so they
    survive a change of batch size."""
    every_images: int = 8 * 2**20
    keep_last: int = 3  # the newest N complete checkpoints
    keep_every_images: int = 0  # also keep one checkpoint per this many images (post-hoc EMA snapshots); 0: none

    def __post_init__(self):
        if self.every_images <= 0:
            raise ConfigError(f"checkpoint.every_images must be positive, found {self.every_images}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be at least 1 (the newest checkpoint is never deleted), "
                              f"found {self.keep_last}")
        if self.keep_every_images < 0 or self.keep_every_images % self.every_images:
            raise ConfigError(f"checkpoint.keep_every_images must be 0 or a multiple of every_images "
                              f"({self.every_images}), found {self.keep_every_images}")


def checkpoint_prefix(run: str, step: int) -> str:
    return f"{run}/checkpoints/{step:09d}/"


def _rank_files(rank: int) -> tuple[str, str, str, str]:
    return f"rank-{rank:05d}.pt", f"rng-{rank:05d}.pt", f"data-{rank:05d}.json", f"files-{rank:05d}.json"


def _digest(f: BinaryIO) -> dict:
    h, size = hashlib.sha256(), 0
    while chunk := f.read(2**22):
        h.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def capture_rng() -> dict:
    """Every RNG a training step may draw from, as tensors and ints (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(store: Store, run: str, step: int, *, images_seen: int, rank: int, world_size: int,
         barrier: Callable[[], None], train_state: Mapping[str, Any], data_state: Mapping[str, Any],
         ema: Mapping[str, Mapping[str, Tensor]] = {}, ema_metadata: Mapping[str, Mapping[str, str]] = {},
         cfg: CheckpointConfig | None = None) -> bool:
    """Write this rank's part of checkpoint `step`; every rank calls it. `ema` (rank 0 only) maps each EMA name to
    its consolidated state dict. `cfg` given: rank 0 applies its retention after the manifest.

    Returns True on rank 0 when the checkpoint is complete, on other ranks when their own files were uploaded.
    """
    prefix = checkpoint_prefix(run, step)
    token = uuid.uuid4().hex
    prepared = rank == 0 and _prepare(store, prefix, token)
    barrier()
    written = (rank != 0 or prepared) and _write_rank_files(
        store, prefix, step, images_seen, rank, train_state, data_state, ema if rank == 0 else {}, ema_metadata)
    barrier()
    if rank != 0:
        return written
    if not (prepared and written):
        log.error("checkpoint %s abandoned: no manifest was written, training goes on", prefix)
        return False
    try:
        _write_manifest(store, run, prefix, step, images_seen, world_size, token)
    except (STORE_ERRORS + (ValueError, KeyError)) as e:  # KeyError, ValueError: a listing that is not ours
        log.error("checkpoint %s abandoned: %s", prefix, e)
        return False
    if cfg is not None:
        apply_retention(store, run, cfg)
    return True


def _prepare(store: Store, prefix: str, token: str) -> bool:
    """Rank 0, before the first barrier: clear an interrupted attempt and announce this one."""
    try:
        if store.exists(prefix + MANIFEST):
            log.error("checkpoint %s is already complete; its files are immutable, not writing it again", prefix)
            return False
        # The old token goes first: if clearing fails halfway, no rank can mistake the leftovers for this attempt.
        store.delete(prefix + ATTEMPT)
        for key in store.list(prefix):
            store.delete(key)
        store.put(prefix + ATTEMPT, token.encode())
        return True
    except STORE_ERRORS as e:
        log.error("checkpoint %s: cannot prepare the directory: %s", prefix, e)
        return False


def _write_rank_files(store: Store, prefix: str, step: int, images_seen: int, rank: int,
                      train_state: Mapping, data_state: Mapping, ema: Mapping[str, Mapping[str, Tensor]],
                      ema_metadata: Mapping[str, Mapping[str, str]]) -> bool:
    model_name, rng_name, data_name, files_name = _rank_files(rank)
    try:
        if store.exists(prefix + MANIFEST):
            return False  # rank 0 refused to rewrite a complete checkpoint (and logged it)
        token = store.get(prefix + ATTEMPT).decode()  # missing: rank 0 could not prepare (and logged it)
        with tempfile.TemporaryDirectory(prefix="elbodiff-ckpt-") as tmp:
            # Serialised to local files first: a multi-GB state uploads as a multipart upload and is hashed once.
            local = {model_name: Path(tmp, model_name), rng_name: Path(tmp, rng_name),
                     data_name: Path(tmp, data_name)}
            torch.save(dict(train_state), local[model_name])
            torch.save(capture_rng(), local[rng_name])
            local[data_name].write_text(json.dumps(data_state))
            for name, tensors in ema.items():
                path = local[f"ema-{name}.safetensors"] = Path(tmp, f"ema-{name}.safetensors")
                meta = {**ema_metadata.get(name, {}), "step": str(step), "images_seen": str(images_seen)}
                safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
            files = {}
            for name, path in local.items():
                with open(path, "rb") as f:
                    files[name] = _digest(f)
                store.put(prefix + name, path)
        listing = {"attempt": token, "rank": rank, "files": files}
        store.put(prefix + files_name, json.dumps(listing, indent=1).encode())
        return True
    except Exception:
        # Any failure, storage or serialisation, must still bring this rank to the next barrier: raising here
        # would leave the other ranks waiting there. Rank 0 then writes no manifest.
        log.exception("checkpoint %s: rank %d could not write its files", prefix, rank)
        return False


def _write_manifest(store: Store, run: str, prefix: str, step: int, images_seen: int, world_size: int,
                    token: str) -> None:
    files = {ATTEMPT: _digest(io.BytesIO(token.encode()))}
    for rank in range(world_size):
        files_name = _rank_files(rank)[3]
        raw = store.get(prefix + files_name)  # missing: that rank failed -> FileNotFoundError, abandon
        listing = json.loads(raw)
        if listing["attempt"] != token:
            raise ValueError(f"rank {rank} did not finish this attempt ({files_name} is from an earlier one)")
        files.update(listing["files"])
        files[files_name] = _digest(io.BytesIO(raw))
    manifest = {"step": step, "images_seen": images_seen, "world_size": world_size,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": dict(sorted(files.items()))}
    store.put(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())
    store.put(f"{run}/checkpoints/LATEST", f"{step:09d}\n".encode())
    log.info("checkpoint %s complete: %d files", prefix, len(files))


def all_steps(store: Store, run: str) -> list[int]:
    """Steps with a checkpoint directory, complete or not, ascending."""
    base = f"{run}/checkpoints/"
    names = {key[len(base):].split("/")[0] for key in store.list(base) if key.count("/") > base.count("/")}
    return sorted(int(n) for n in names if n.isdigit())


def complete_steps(store: Store, run: str) -> list[int]:
    """Steps whose manifest exists (not verified: see `verify`), ascending. This is what the evaluation polls."""
    base = f"{run}/checkpoints/"
    return sorted(int(key[len(base):].split("/")[0]) for key in store.list(base) if key.endswith("/" + MANIFEST))


def read_manifest(store: Store, run: str, step: int) -> dict:
    return json.loads(store.get(checkpoint_prefix(run, step) + MANIFEST))


def _mismatch(store: Store, run: str, step: int, rank: int | None = None) -> str | None:
    """Why checkpoint `step` does not match its manifest (unreadable manifest, a listed file missing or changed),
    None when it matches. `rank` given: only that rank's own files, and for rank 0 also the shared ones (EMA
    weights, the attempt token). Other store errors are raised: they say nothing about the checkpoint."""
    prefix = checkpoint_prefix(run, step)
    try:
        manifest = read_manifest(store, run, step)
        for name, want in manifest["files"].items():
            owner = re.search(r"-(\d{5})\.(?:pt|json)$", name)
            if rank is not None and (int(owner[1]) if owner else 0) != rank:
                continue
            with store.open(prefix + name) as f:
                if _digest(f) != want:
                    return f"{name} does not match its manifest"
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def rank_check(store: Store, run: str, step: int, rank: int) -> tuple[str, str] | None:
    """This rank's part of verifying checkpoint `step` at resume, so that no rank hashes the others' files:
    None when its files match, else ("corrupted" | "unreadable", why)."""
    try:
        reason = _mismatch(store, run, step, rank)
    except STORE_ERRORS as e:
        return "unreadable", str(e)
    return None if reason is None else ("corrupted", reason)


def set_aside(store: Store, run: str, step: int, reason: str) -> None:
    """A corrupted checkpoint's manifest moves to `manifest.json.rejected` (with the reason), so that it no
    longer counts as complete, for retention, evaluation or the next attempt to write that step."""
    prefix = checkpoint_prefix(run, step)
    log.error("checkpoint %s is corrupted (%s); setting it aside as %s", prefix, reason, REJECTED)
    try:
        store.put(prefix + REJECTED, json.dumps({"reason": reason, "manifest": _text(store, prefix + MANIFEST)},
                                                indent=1).encode())
        store.delete(prefix + MANIFEST)
    except STORE_ERRORS as e:
        log.error("checkpoint %s could not be set aside: %s", prefix, e)


def verify(store: Store, run: str, step: int) -> bool:
    """True when the manifest exists and every file it lists has the listed size and sha256."""
    try:
        reason = _mismatch(store, run, step)
    except STORE_ERRORS as e:
        reason = str(e)
    if reason is not None:
        log.warning("checkpoint %s is not complete: %s", checkpoint_prefix(run, step), reason)
    return reason is None


def latest_complete(store: Store, run: str) -> int | None:
    """The newest step whose manifest verifies; half-written and corrupted checkpoints are skipped.

    A corrupted one is set aside (`set_aside`). A checkpoint the store cannot read now (an error other than a
    missing file) is skipped and left as it is."""
    for step in reversed(complete_steps(store, run)):
        try:
            reason = _mismatch(store, run, step)
        except STORE_ERRORS as e:
            log.warning("checkpoint %s cannot be read now, skipped: %s", checkpoint_prefix(run, step), e)
            continue
        if reason is None:
            return step
        set_aside(store, run, step, reason)
    return None


def _text(store: Store, key: str) -> str | None:
    try:
        return store.get(key).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


@dataclass
class RankState:
    step: int
    images_seen: int
    train_state: dict
    data_state: dict
    rng: dict


def _get_verified(store: Store, prefix: str, manifest: dict, name: str) -> bytes:
    raw = store.get(prefix + name)
    if _digest(io.BytesIO(raw)) != manifest["files"].get(name):
        raise ValueError(f"{prefix}{name} does not match the checkpoint's manifest")
    return raw


def load_rank(store: Store, run: str, step: int, rank: int, world_size: int) -> RankState:
    """Rank `rank`'s resume state from complete checkpoint `step`; nothing is unpickled (weights_only). A rank
    that saved an empty train state shares rank 0's: state replicated on every rank (DDP) is written once."""
    prefix = checkpoint_prefix(run, step)
    manifest = read_manifest(store, run, step)
    if manifest["world_size"] != world_size:
        raise ValueError(f"checkpoint {prefix} was written by {manifest['world_size']} ranks, this run has "
                         f"{world_size}; per-rank state cannot be resumed on a different world size")
    model_name, rng_name, data_name, _ = _rank_files(rank)

    def tensors(name: str) -> dict:
        return torch.load(io.BytesIO(_get_verified(store, prefix, manifest, name)), weights_only=True)

    train_state = tensors(model_name) or tensors(_rank_files(0)[0])
    return RankState(step=step, images_seen=manifest["images_seen"], train_state=train_state,
                     rng=tensors(rng_name), data_state=json.loads(_get_verified(store, prefix, manifest, data_name)))


def load_ema(store: Store, run: str, step: int, name: str) -> dict[str, Tensor]:
    """EMA weights `name` of complete checkpoint `step`, for evaluation: safetensors only, checked against the
    manifest."""
    prefix = checkpoint_prefix(run, step)
    return safetensors.torch.load(_get_verified(store, prefix, read_manifest(store, run, step),
                                                f"ema-{name}.safetensors"))


def ema_metadata(store: Store, run: str, step: int, name: str) -> dict[str, str]:
    """The header metadata of an EMA file (kind, sigma_rel, gamma, t, step, images_seen) without the weights."""
    with store.open(checkpoint_prefix(run, step) + f"ema-{name}.safetensors") as f:
        # safetensors layout: 8-byte little-endian header length, then the JSON header.
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)).get("__metadata__", {})


def synthesize_ema(store: Store, run: str, sigma_rel: float, steps: list[int] | None = None) -> dict[str, Tensor]:
    """Post-hoc power EMA of width `sigma_rel` at the time of the newest snapshot (EDM2 Sec. 3.2), from the
    power-EMA files of complete checkpoints `steps` (default: all complete ones)."""
    snapshots = []
    for step in complete_steps(store, run) if steps is None else steps:
        for key in read_manifest(store, run, step)["files"]:
            if key.startswith("ema-") and key.endswith(".safetensors"):
                name = key[len("ema-"):-len(".safetensors")]
                meta = ema_metadata(store, run, step, name)
                if meta.get("kind") == "power":
                    snapshots.append((step, name, int(meta["t"]), float(meta["gamma"])))
    if not snapshots:
        raise ValueError(f"run {run!r} has no power-EMA snapshots in complete checkpoints {steps}")
    coefficients = posthoc_coefficients([s[2] for s in snapshots], [s[3] for s in snapshots],
                                        max(s[2] for s in snapshots), gamma_of_sigma_rel(sigma_rel))
    # One snapshot in memory at a time; float64 because the coefficients alternate in sign.
    total: dict[str, Tensor] = {}
    for x, (step, name, _, _) in zip(coefficients.tolist(), snapshots):
        for k, v in load_ema(store, run, step, name).items():
            total[k] = total.get(k, 0) + x * v.double()
    return {k: v.float() for k, v in total.items()}


def apply_retention(store: Store, run: str, cfg: CheckpointConfig) -> list[int]:
    """Delete checkpoints outside the policy and abandoned attempts older than the newest complete checkpoint.
    Returns the deleted steps. Errors are logged, never raised: retention must not stop training.

    Kept: the newest `keep_last` complete checkpoints, and when `keep_every_images` > 0 the first complete
    checkpoint at or after each positive multiple of it (by images seen): exactly the checkpoints at those
    multiples when the intervals divide evenly, and still one per interval when they do not. Completeness here
    is the manifest's presence; a manifest is only written after every file was uploaded, so verification is
    left to resume.
    """
    deleted = []
    try:
        complete = complete_steps(store, run)
        if not complete:
            return deleted
        keep = set(complete[-cfg.keep_last:])
        if cfg.keep_every_images:
            windows = set()
            for step in complete:
                window = read_manifest(store, run, step)["images_seen"] // cfg.keep_every_images
                if window > 0 and window not in windows:
                    windows.add(window)
                    keep.add(step)
        for step in all_steps(store, run):
            if step in keep or (step not in complete and step > complete[-1]):
                continue
            prefix = checkpoint_prefix(run, step)
            keys = store.list(prefix)
            # The manifest goes first so that the checkpoint stops existing before any of its files disappear.
            for key in sorted(keys, key=lambda k: not k.endswith("/" + MANIFEST)):
                store.delete(key)
            deleted.append(step)
    except (STORE_ERRORS + (ValueError, KeyError)) as e:
        log.error("checkpoint retention for run %s stopped: %s", run, e)
    return deleted
