"""Member tables: where each sample's image lies in its shard, so that a reader can skip the tar headers.

Beside every image shard the writer stores `<shard>.members`: little-endian int64, four per sample in shard
order: byte offset of the image data in the tar, its size, class id, image format (0 jpg, 1 png); raw, so that
loading one is a read and a `frombuffer`. It is the idea of the index files of WebDataset's `wids`, made when the
shard is written (with Python's `tarfile`, where speed does not matter) instead of by the reader. Reading with
it, a 64x64 sample costs about 2 us with the reader's lookup by id, against 5-9 us for parsing its three tar
headers (benchmarks/RESULTS.md, "Data"). Shards without a table (latents, shards written elsewhere) are read by
`data.tar`.

A table is checked when loaded (whole rows, offsets in order without overlap, known formats); the index stores
its sha256 next to the shard's.
"""
from __future__ import annotations

import tarfile
from typing import BinaryIO

import numpy as np

from data import storage, tar

FORMATS = ("jpg", "png")
SUFFIX = ".members"
ROW = np.dtype("<i8"), 4
CHUNK = 1 << 18  # bytes per read; chunks end on a sample boundary, so a sample is one slice of one chunk


def table_name(shard_name: str) -> str:
    return shard_name.removesuffix(".tar") + SUFFIX


def build(tar_path: str) -> np.ndarray | None:
    """The member table of a finished tar, or None when a sample has no image or no integer class id (such a
    shard is read through `data.tar`, which counts those samples as bad)."""
    rows: list[list[int]] = []
    key, image, label = None, None, None

    def close_sample() -> bool:
        if key is not None:
            if image is None or label is None:
                return False
            offset, size, image_format = image
            rows.append([offset, size, label, image_format])
        return True

    with tarfile.open(tar_path) as archive:
        for member in archive:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            dot = base.find(".")
            if dot < 0:
                continue
            name_key, ext = member.name[:len(member.name) - len(base) + dot], base[dot + 1:].lower()
            if name_key != key:
                if not close_sample():
                    return None
                key, image, label = name_key, None, None
            if ext in FORMATS:
                image = (member.offset_data, member.size, FORMATS.index(ext))
            elif ext == "cls":
                try:
                    label = int(archive.extractfile(member).read())
                except ValueError:
                    return None
    if not close_sample():
        return None
    return np.array(rows, np.int64).reshape(-1, 4)


def to_bytes(table: np.ndarray) -> bytes:
    return table.astype(ROW[0]).tobytes()


def load(url: str) -> np.ndarray:
    """The table at `url`; raises ValueError when it is not one."""
    data = storage.read_bytes(url)
    width = ROW[0].itemsize * ROW[1]
    if len(data) % width:
        raise ValueError(f"{url} is not a member table: {len(data)} bytes is not a whole number of {width}-byte rows")
    table = np.frombuffer(data, ROW[0]).reshape(-1, ROW[1])
    offsets, sizes, formats = table[:, 0], table[:, 1], table[:, 3]
    if len(table) and (offsets[0] < 0 or sizes.min() < 0 or formats.min() < 0 or formats.max() >= len(FORMATS)
                       or np.any(offsets[1:] < offsets[:-1] + sizes[:-1])):
        raise ValueError(f"{url} is not a member table: negative or overlapping members, or unknown formats")
    return table


class Chunks:
    """The samples of one shard by position, read forward: each read takes the stream up to the end of the last
    sample that fits in CHUNK bytes after the one asked for, so a sample is a zero-copy slice of one chunk
    (samples already handed out keep their chunk alive). A local shard is one chunk, its memory map, which no
    read copies."""

    def __init__(self, stream: BinaryIO | None, table: np.ndarray, mapped: memoryview | None = None):
        self.stream = stream
        self.offsets, self.sizes, self.labels = (table[:, c].tolist() for c in range(3))
        self.formats = [FORMATS[f] for f in table[:, 3].tolist()]
        self.ends = table[:, 0] + table[:, 1]
        # the chunk holds the shard's bytes [start, start + len(chunk))
        self.chunk, self.start = (mapped if mapped is not None else memoryview(b"")), 0
        self.truncated = mapped is not None  # a map is the whole shard: what it lacks, it was cut off before

    def sample(self, k: int) -> dict | str:
        """{"jpg" or "png": bytes (a memoryview), "cls": label} of the shard's sample k, or the reason it is
        missing: fewer samples in the table than asked for, or a stream that ends before the sample does."""
        if k >= len(self.offsets):
            return "missing_sample"
        at = self.offsets[k] - self.start
        size = self.sizes[k]
        if at + size > len(self.chunk):
            if self.truncated:  # what the chunk lacks, the stream no longer has
                return "truncated_shard"
            position = self.start + len(self.chunk)
            last = max(k, int(np.searchsorted(self.ends, self.offsets[k] + CHUNK, side="right")) - 1)
            self.chunk = memoryview(tar.read_at_least(self.stream, b"", int(self.ends[last]) - position))
            self.start = position
            at = self.offsets[k] - position
            if at + size > len(self.chunk):
                self.truncated = True
                return "truncated_shard"
        return {self.formats[k]: self.chunk[at:at + size], "cls": self.labels[k]}
