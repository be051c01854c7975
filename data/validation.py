"""The validation stream: every sample exactly once across all ranks, in index order, no augmentation.

Rank r reads the ids [r*P, (r+1)*P) with P = ceil(N / R), in ceil(P / B) batches of B. Every rank yields the
same number of full-size batches, so collective operations after each batch never wait on a rank that has
finished: the positions past N (last ranks only) are padding, a copy of a real sample, with `mask` False; so
are unreadable samples (counted in `ValidationStream.bad`), which the batch holds as copies of readable ones.
Within a rank, worker w reads a contiguous run of the rank's batches; the order of batches is
therefore fixed by the number of workers, the set of (sample, mask) pairs is not.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np

from data import reader, workers
from data.stream import StreamConfig, open_shards


class _RankBatches:
    def __init__(self, urls: list[str], tables: list[str | None], counts: list[int], kind: str,
                 config: StreamConfig, rank: int, world: int):
        self.urls, self.tables, self.kind, self.config, self.rank = urls, tables, kind, config, rank
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_samples = int(self.starts[-1])
        self.per_rank = math.ceil(self.num_samples / world)

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.config.batch_size)

    def batches_of(self, worker: int, workers: int) -> Iterator[dict]:
        """The batches of `worker` of `workers`: a contiguous run of the rank's."""
        size, count = self.config.batch_size, len(self)
        first = self.rank * self.per_rank
        end = min(self.num_samples, first + self.per_rank)
        shards = reader.ShardReader(self.urls, self.starts, self.tables)
        try:
            for b in range(worker * count // workers, (worker + 1) * count // workers):
                real = list(range(first + b * size, min(end, first + (b + 1) * size)))
                # padding repeats a real sample of the batch (or sample 0 when a rank has none left)
                ids = real + [real[0] if real else 0] * (size - len(real))
                samples = [shards.get(i) for i in ids]
                batch = reader.make_batch(ids, samples, [False] * size, self.kind, self.config.dtype)
                # a bad sample comes back as a copy of another one (another index): it must not count twice either
                batch["mask"] = (np.arange(size) < len(real)) & (batch["index"] == ids)
                yield batch
        finally:
            shards.close()


class ValidationStream:
    """`for batch in ValidationStream(config, rank, world_size)`: one pass; batches {"x", "label", "index", "mask"}.
    Only index, batch_size, num_workers, worker_type, dtype and shards of the config are used."""

    def __init__(self, config: StreamConfig, rank: int = 0, world_size: int = 1):
        index, urls, tables = open_shards(config)
        counts = [s["count"] for s in index["shards"]]
        self.batches = _RankBatches(urls, tables, counts, index["kind"], config, rank, world_size)
        self.bad: dict = {}

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        config = self.batches.config
        count = min(config.num_workers, len(self))
        batches_of = functools.partial(self.batches.batches_of, workers=max(count, 1))
        for batch in workers.batches(batches_of, count, config.worker_type):
            for reason, n in batch.pop("bad").items():
                self.bad[reason] = self.bad.get(reason, 0) + n
            yield batch
