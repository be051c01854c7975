"""Which samples each (rank, worker) reads, in which order: index arithmetic over the shard index, no I/O.

Sample ids are positions in index order (shard by shard). The *global stream* is epoch 0, epoch 1, ... end to
end, without a break; epoch e is every shard once, in a permutation of the shards seeded by (seed, e). A plan
reads `pending` (ids left over from an earlier plan, see `Plan.continue_with`) and then the global stream from
position `start`.

Rounds. The plan is cut into rounds of Q = R*W*k*B samples, R ranks, W workers per rank (0 workers count
as 1), batch size B, and k = ceil(N / (R*W*B)) batches per (rank, worker) slot and round, so a round is
about one epoch. In round t, slot s = rank*W + worker reads the contiguous samples [t*Q + s*k*B, t*Q + (s+1)*k*B):
- every slot gets exactly k full batches per round, however few or uneven the shards are: no rank runs out
  before another and no batch is short;
- nothing is padded and nothing is dropped: an epoch's last samples and the next epoch's first share a round,
  so every sample of every epoch is read exactly once;
- reads are sequential: a slot reads a run of whole shards, partial at both ends.

Shuffling. Within its range a slot reads blocks of `block` samples in shard order and emits each block in a
permutation seeded by (seed, plan, round, slot, block), which also draws the horizontal flips. Resuming inside a
block costs reading that block again, never more. Writing the shards already shuffled samples across shards.

Order of batches. A rank's batch c comes from worker c % W (its batch c // W): the order in which a PyTorch
DataLoader returns the batches of an IterableDataset, and in which `data.workers` takes them from threads. A
rank's whole position is therefore one number, the batches it has consumed, and every rank has consumed the same
number at any training step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def as_runs(ids) -> list[list[int]]:
    """Sample ids as [first, stop) runs of consecutive ids, in order: how a position stores `Plan.pending`, which
    after a layout change holds up to a round's unread samples, nearly all in runs (an ImageNet round: 1.28M ids)."""
    ids = np.asarray(ids, np.int64)
    if not len(ids):
        return []
    cut = np.flatnonzero(np.diff(ids) != 1) + 1
    firsts = ids[np.concatenate([[0], cut])]
    stops = ids[np.concatenate([cut - 1, [len(ids) - 1]])] + 1
    return np.stack([firsts, stops], 1).tolist()


def from_runs(runs: list[list[int]]) -> np.ndarray:
    if not runs:
        return np.zeros(0, np.int64)
    firsts, stops = np.asarray(runs, np.int64).T
    lengths = stops - firsts
    ends = np.cumsum(lengths)
    return np.arange(ends[-1]) + np.repeat(firsts - (ends - lengths), lengths)


@dataclass(frozen=True)
class Layout:
    """The facts a plan depends on; any change between save and resume re-plans (`Plan.continue_with`)."""

    counts: tuple[int, ...]  # samples per shard, index order
    seed: int
    world_size: int
    workers: int  # slots per rank: max(1, num_workers)
    batch_size: int
    block: int  # shuffle block, in samples

    @cached_property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def num_samples(self) -> int:
        return int(self.starts[-1])

    @property
    def batches_per_round(self) -> int:
        """k: batches per (rank, worker) slot and round."""
        return math.ceil(self.num_samples / (self.world_size * self.workers * self.batch_size))

    @property
    def slot_size(self) -> int:
        return self.batches_per_round * self.batch_size

    @property
    def round_size(self) -> int:
        return self.world_size * self.workers * self.slot_size

    def shard_order(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, 0, epoch).permutation(len(self.counts))

    def epoch_ids(self, epoch: int) -> np.ndarray:
        return np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in self.shard_order(epoch)])


@dataclass(frozen=True)
class Plan:
    layout: Layout
    pending: tuple[int, ...] = ()
    start: int = 0  # position in the global stream where reading continues after `pending`
    _epochs: dict = field(default_factory=dict, compare=False, repr=False)

    def _global(self, a: int, b: int) -> np.ndarray:
        n = self.layout.num_samples
        parts = []
        for epoch in range(a // n, (b - 1) // n + 1):
            ids = self._epochs.get(epoch)
            if ids is None:
                ids = self._epochs[epoch] = self.layout.epoch_ids(epoch)
                # Reading moves forward, and the workers of a rank stay within a round or two of each other: three
                # epochs are the most ever needed at once. Each step is one dict operation, which worker threads
                # sharing this plan cannot interleave.
                for old in sorted(self._epochs)[:-3]:
                    self._epochs.pop(old, None)
            lo, hi = max(a, epoch * n), min(b, (epoch + 1) * n)
            parts.append(ids[lo - epoch * n:hi - epoch * n])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def ids(self, a: int, b: int) -> np.ndarray:
        """Sample ids at plan positions [a, b)."""
        p = len(self.pending)
        head = np.asarray(self.pending[a:min(b, p)], dtype=np.int64)
        tail = self._global(self.start + max(a, p) - p, self.start + b - p) if b > p else np.zeros(0, np.int64)
        return np.concatenate([head, tail])

    def slot_round(self, t: int, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids in read order, emission order as indices into them, flip per emitted sample) of slot in round t."""
        size = self.layout.slot_size
        a = t * self.layout.round_size + slot * size
        read = self.ids(a, a + size)
        order, flips = [], []
        for j, lo in enumerate(range(0, size, self.layout.block)):
            n = min(self.layout.block, size - lo)
            rng = _rng(self.layout.seed, 1, self.start, len(self.pending), t, slot, j)
            order.append(lo + rng.permutation(n))
            flips.append(rng.random(n) < 0.5)
        return read, np.concatenate(order), np.concatenate(flips)

    def continue_with(self, batches: int, layout: Layout) -> "Plan":
        """The plan for `layout` that reads exactly what this plan has not yet read after every rank consumed
        `batches` batches: the unread rest of the rounds in progress (round by round, slot by slot, in read order)
        becomes the new `pending`, then the global stream follows where this plan's rounds would have gone on."""
        old = self.layout
        w_count, k = old.workers, old.batches_per_round
        consumed = [batches // w_count + (w < batches % w_count) for w in range(w_count)]
        first, end = min(consumed) // k, max(-(-c // k) for c in consumed)
        rest = []
        for t in range(first, end):
            for slot in range(old.world_size * w_count):
                read, order, _ = self.slot_round(t, slot)
                done = min(max(consumed[slot % w_count] - t * k, 0), k) * old.batch_size
                unread = np.ones(len(read), bool)
                unread[order[:done]] = False
                rest.append(read[unread])
        boundary = end * old.round_size
        rest.append(np.asarray(self.pending[boundary:], np.int64))
        start = self.start + max(0, boundary - len(self.pending))
        return Plan(layout, tuple(int(i) for i in np.concatenate(rest)), start)
