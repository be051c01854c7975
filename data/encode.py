"""`elbodiff encode SHARDS OUT --vae PATH --scale S [--shift F]`: image shards to latent shards.

Each latent shard has the name and sample keys of its image shard, and per sample `latent.npy` (the image),
`latent_flip.npy` (its horizontal mirror: the latent of a flipped image is not the flipped latent) as float16
arrays, and `cls`. Latents are `models.vae.LatentVAE.encode` outputs: (posterior mean - shift) * scale. Shards are
spread over processes, one GPU each when there are GPUs, and the run resumes like `elbodiff shards`.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
from collections import Counter

import numpy as np
import torch
import webdataset as wds

from data import images, reader, writer
from data.shards import MTIME

CHUNK = 32  # images per VAE call
_vae = None  # this process's LatentVAE, set by _load


def _load(path: str, scale: float, shift: float, processes: int, counter) -> None:
    global _vae
    from models.vae import LatentVAE

    with counter.get_lock():
        number = counter.value
        counter.value += 1
    vae = LatentVAE.from_pretrained(path, scale, shift)
    if torch.cuda.is_available():
        vae = vae.to(f"cuda:{number % torch.cuda.device_count()}")
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    _vae = vae


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _encode(batch: list[tuple[str, np.ndarray, int]], tar: wds.TarWriter) -> None:
    device = next(_vae.parameters()).device
    x = torch.from_numpy(np.stack([a for _, a, _ in batch])).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    latents = _vae.encode(torch.cat([x, x.flip(3)])).half().cpu().numpy()
    n = len(batch)
    for j, (key, _, label) in enumerate(batch):
        tar.write({"__key__": key, "latent.npy": _npy(latents[j]), "latent_flip.npy": _npy(latents[n + j]),
                   "cls": str(label).encode()})


def make_latent_shard(url: str, tar_path: str) -> dict:
    skipped: Counter = Counter()
    class_counts: Counter = Counter()
    pending: list = []
    with wds.TarWriter(tar_path, encoder=False, mtime=MTIME) as tar:
        for sample in reader.iterate_shard(url):
            try:
                image, label = reader.decode(sample, "images", flip=False)
            except images.BadImage as e:
                skipped[e.reason] += 1
                continue
            class_counts[str(label)] += 1
            pending.append((sample["__key__"], image, label))
            if len(pending) == CHUNK:
                _encode(pending, tar)
                pending = []
        if pending:
            _encode(pending, tar)
    return {"count": sum(class_counts.values()), "class_counts": dict(class_counts), "skipped": dict(skipped),
            "converted": {}}


def write(shards: str, out: str, *, vae: str, scale: float, shift: float = 0.0, processes: int = 0,
          overwrite: bool = False) -> dict:
    """`processes` 0 means one per GPU, or one on a machine without GPUs."""
    index, urls, _ = reader.open_index(shards)
    if index["kind"] != "images":
        raise ValueError(f"{shards} holds {index['kind']}, not images: encode image shards")
    if not os.path.isdir(vae):
        raise FileNotFoundError(f"no autoencoder folder at {vae}")
    processes = processes or max(1, torch.cuda.device_count())
    jobs = [(s["name"], url) for s, url in zip(index["shards"], urls)]
    settings = {"kind": "latents", "resolution": index["resolution"], "format": "npy", "source": shards,
                "source_shards": [s["sha256"] for s in index["shards"]], "vae": os.path.abspath(vae),
                "scale": scale, "shift": shift}
    counter = mp.get_context("spawn").Value("i", 0)
    return writer.write_shards(out, settings, jobs, make_latent_shard, processes=processes, overwrite=overwrite,
                               classes=index["classes"], initializer=_load,
                               initargs=(vae, scale, shift, processes, counter))
