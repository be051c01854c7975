"""The validation stream: every sample exactly once across all ranks, in index order, no augmentation.

Rank r reads the ids [r*P, (r+1)*P) with P = ceil(N / R), in ceil(P / B) batches of B. Every rank yields the
same number of full-size batches, so collective operations after each batch never wait on a rank that has
finished: the positions past N (last ranks only) are padding, a copy of a real sample, with `mask` False.
Within a rank, DataLoader worker w reads a contiguous run of the rank's batches; the order of batches is
therefore fixed by the number of workers, the set of (sample, mask) pairs is not.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import reader
from data.plan import Layout
from data.stream import StreamConfig, as_made, open_shards


class _RankBatches(IterableDataset):
    def __init__(self, urls: list[str], layout: Layout, kind: str, config: StreamConfig, rank: int, world: int):
        self.urls, self.layout, self.kind, self.config, self.rank, self.world = urls, layout, kind, config, rank, world

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.config.batch_size)

    @property
    def per_rank(self) -> int:
        return math.ceil(self.layout.num_samples / self.world)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n, size, count = self.layout.num_samples, self.config.batch_size, len(self)
        first = self.rank * self.per_rank
        shards = reader.ShardReader(self.urls, self.layout.starts)
        for b in range(worker * count // workers, (worker + 1) * count // workers):
            positions = range(first + b * size, first + (b + 1) * size)
            real = [p for p in positions if p < min(n, first + self.per_rank)]
            # padding repeats a real sample of the batch (or sample 0 when a rank has none left)
            ids = real + [real[0] if real else 0] * (size - len(real))
            batch = reader.make_batch([(i, shards.get(i), False) for i in ids], self.kind, self.config.dtype)
            batch["mask"] = torch.arange(size) < len(real)
            yield batch


class ValidationStream:
    """`for batch in ValidationStream(config, rank, world_size)`: one pass; batches {"x", "label", "index", "mask"}.
    Only index, batch_size, num_workers, dtype and shards of the config are used."""

    def __init__(self, config: StreamConfig, rank: int = 0, world_size: int = 1):
        index, urls = open_shards(config)
        layout = Layout(tuple(s["count"] for s in index["shards"]), config.seed, world_size, 1, config.batch_size, 1)
        self.batches = _RankBatches(urls, layout, index["kind"], config, rank, world_size)
        self.bad: dict = {}

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        workers = min(self.batches.config.num_workers, len(self))
        for batch in DataLoader(self.batches, batch_size=None, num_workers=workers, collate_fn=as_made):
            for reason, count in batch.pop("bad").items():
                self.bad[reason] = self.bad.get(reason, 0) + count
            yield batch
