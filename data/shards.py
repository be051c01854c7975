"""`elbodiff shards SRC OUT`: image folders (ImageNet train or validation layout) to WebDataset tar shards.

Each sample is `<key>.jpg` or `<key>.png` (the image) and `<key>.cls` (the class id as ASCII), the key being the
sample's place in a seeded global shuffle of all source files, so shards are mixed across classes and the same
seed always gives the same shards. Images are centre-cropped to `resolution` by the ADM/EDM convention
(`images.centre_crop`); resolution 0 keeps the original bytes of plain RGB JPEGs and re-encodes only what had to
be converted (CMYK, greyscale, alpha, 16-bit, other formats).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds

from data import images, sources, writer

# Fixed member times make a shard's bytes, and so its sha256, a function of its content only.
MTIME = 0  # an int: a float mtime makes tarfile add a pax header to every member, doubling read cost


def convert(data: bytes, resolution: int, fmt: str) -> tuple[bytes, str, str | None]:
    """Source file bytes -> (member bytes, member extension, conversion made or None); raises images.BadImage."""
    image = images.open_image(data)
    if resolution == 0 and images.is_plain_jpeg(image):
        return data, "jpg", None
    rgb, conversion = images.to_rgb(image)
    if resolution:
        rgb = images.centre_crop(rgb, resolution)
    return images.encode(rgb, fmt), fmt, conversion


def make_image_shard(payload: tuple, tar_path: str) -> dict:
    root, resolution, fmt, first_key, files = payload
    skipped: Counter = Counter()
    converted: Counter = Counter()
    class_counts: Counter = Counter()
    with wds.TarWriter(tar_path, encoder=False, mtime=MTIME) as tar:
        for offset, (rel, label) in enumerate(files):
            try:
                data = Path(root, rel).read_bytes()
            except OSError:  # removed or unreadable since the scan
                skipped["unreadable"] += 1
                continue
            try:
                member, ext, conversion = convert(data, resolution, fmt)
            except images.BadImage as e:
                skipped[e.reason] += 1
                continue
            if conversion:
                converted[conversion] += 1
            class_counts[str(label)] += 1
            tar.write({"__key__": f"{first_key + offset:09d}", ext: member, "cls": str(label).encode()})
    return {"count": sum(class_counts.values()), "class_counts": dict(class_counts),
            "skipped": dict(skipped), "converted": dict(converted)}


def write(src: str, out: str, *, resolution: int, fmt: str = "jpg", samples_per_shard: int = 1000, seed: int = 0,
          processes: int = 1, overwrite: bool = False, labels: str | None = None) -> dict:
    if resolution < 0:
        raise ValueError(f"resolution must be 0 (keep the originals) or a positive size, found {resolution}")
    source = sources.scan(src, labels)
    order = np.random.default_rng(seed).permutation(len(source.files))
    files = [source.files[i] for i in order]
    root = os.path.abspath(src)
    jobs = [(f"shard-{i // samples_per_shard:06d}.tar", (root, resolution, fmt, i, files[i:i + samples_per_shard]))
            for i in range(0, len(files), samples_per_shard)]
    settings = {"kind": "images", "resolution": resolution, "format": fmt, "samples_per_shard": samples_per_shard,
                "seed": seed, "source": root, "source_files": len(files)}
    unlabelled = {"no_label": source.unlabelled} if source.unlabelled else {}
    return writer.write_shards(out, settings, jobs, make_image_shard, processes=processes, overwrite=overwrite,
                               classes=source.classes, skipped=unlabelled)


def report(index: dict) -> str:
    lines = [f"{index['num_samples']} samples in {len(index['shards'])} shards"]
    for what in ("skipped", "converted"):
        if index[what]:
            lines.append(f"{what}: " + ", ".join(f"{k} {v}" for k, v in index[what].items()))
    return "\n".join(lines)
