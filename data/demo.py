"""The embedded demo dataset: 10 classes of coloured shapes and textures, drawn from a seed, no downloads.

Image i has class i % 10 and is drawn by its own generator seeded by (seed, i): random colours, size, position
and phase, so classes differ in shape, not in colour. It goes through the same writer as ImageNet (PNG members,
lossless, so bits/dim on it are exact), shuffled across shards like any other source.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import webdataset as wds
from PIL import Image

from data import images, writer
from data.shards import MTIME

CLASSES = ["disc", "square", "triangle", "ring", "cross", "horizontal_stripes", "vertical_stripes",
           "diagonal_stripes", "checkerboard", "dots"]


def draw(seed: int, i: int, size: int = 32) -> tuple[np.ndarray, int]:
    """Image i as (size, size, 3) uint8, and its class."""
    rng = np.random.default_rng([seed, i])
    label = i % len(CLASSES)
    background, foreground = rng.integers(0, 256, (2, 3))
    while np.abs(foreground - background).sum() < 150:  # keep the shape visible
        foreground = rng.integers(0, 256, 3)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r = rng.uniform(0.2, 0.35)
    period = rng.uniform(0.12, 0.25)
    phase = rng.uniform(0, 1)
    dy, dx = y - cy, x - cx
    masks = {
        "disc": dy**2 + dx**2 < r**2,
        "square": np.maximum(abs(dy), abs(dx)) < r * 0.85,
        "triangle": (dy < r * 0.8) & (abs(dx) < (dy + r) * 0.6),
        "ring": abs(np.sqrt(dy**2 + dx**2) - r) < r * 0.3,
        "cross": (np.minimum(abs(dy), abs(dx)) < r * 0.3) & (np.maximum(abs(dy), abs(dx)) < r),
        "horizontal_stripes": (y / period + phase) % 1 < 0.5,
        "vertical_stripes": (x / period + phase) % 1 < 0.5,
        "diagonal_stripes": ((x + y) / period + phase) % 1 < 0.5,
        "checkerboard": ((x / period + phase) // 1 + (y / period + phase) // 1) % 2 == 0,
        "dots": ((x / period + phase) % 1 - 0.5) ** 2 + ((y / period + phase) % 1 - 0.5) ** 2 < 0.09,
    }
    image = np.where(masks[CLASSES[label]][..., None], foreground, background).astype(np.uint8)
    return image, label


def make_demo_shard(payload: tuple, tar_path: str) -> dict:
    seed, ids = payload
    class_counts: Counter = Counter()
    with wds.TarWriter(tar_path, encoder=False, mtime=MTIME) as tar:
        for key, i in ids:
            image, label = draw(seed, i)
            class_counts[str(label)] += 1
            tar.write({"__key__": f"{key:09d}", "png": images.encode(Image.fromarray(image), "png"),
                       "cls": str(label).encode()})
    return {"count": len(ids), "class_counts": dict(class_counts), "skipped": {}, "converted": {}}


def write(out: str, *, num_images: int = 5000, samples_per_shard: int = 500, seed: int = 0,
          overwrite: bool = False) -> dict:
    order = np.random.default_rng(seed).permutation(num_images)
    keyed = [(key, int(i)) for key, i in enumerate(order)]
    jobs = [(f"shard-{s // samples_per_shard:06d}.tar", (seed, keyed[s:s + samples_per_shard]))
            for s in range(0, num_images, samples_per_shard)]
    settings = {"kind": "images", "resolution": 32, "format": "png", "samples_per_shard": samples_per_shard,
                "seed": seed, "source": "demo", "source_files": num_images}
    return writer.write_shards(out, settings, jobs, make_demo_shard, processes=1, overwrite=overwrite,
                               classes=CLASSES)
