"""The training stream: batches from shards, infinite, with an exact and cheap resume position.

`Stream(config, rank, world_size)` yields {"x", "label", "index"} batches forever: x is (B, 3, H, W) images
(uint8 by default, or float in [-1, 1] as k/127.5 - 1) in channels_last memory format, or (B, C, h, w) float
latents; index holds the sample ids. Which sample goes where is `data.plan`: every (rank, worker) slot gets the same
number of full batches per round (about an epoch), nothing padded and nothing dropped, each epoch in a new seeded
shard order. The workers are DataLoader worker processes or threads (`data.workers`); both give the same batches.

Resume. `state_dict()` holds the layout (seed, world size, workers, batch size, shuffle block), the batches this
rank has consumed, and per worker the shard order of its epoch and the samples it has consumed. With the same
layout, `load_state_dict()` continues exactly: the batches after a resume are those an uninterrupted run would
have produced. With a different layout (world size, workers or batch size changed), the samples the saved run had
not yet read in its current round are read first, spread over the new ranks, and the epochs then go on where
that round ended: no sample is repeated or skipped (`plan.Plan.continue_with`). Every rank may load the state of
any saved rank: the position is the same on all of them.

Bad samples are replaced within their batch (`reader.make_batch`) and counted in `Stream.bad`; a worker fails
when more than `max_bad_fraction` of the samples it reads in one round are bad.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Literal

from data import reader, workers
from data.plan import Layout, Plan, as_runs, from_runs


@dataclass
class StreamConfig:
    index: str = ""  # the shard index: index.json, or the folder / s3 prefix holding it
    shards: str = ""  # shard URL template with {name}, e.g. "pipe:curl -s https://host/{name}"; default: beside index
    batch_size: int = 64  # per rank
    num_workers: int = 2  # workers per rank (0: batches are made in the rank's own thread)
    worker_type: workers.WorkerType = "thread"  # threads of the rank's process, or DataLoader worker processes
    shuffle_buffer: int = 1000  # block shuffle size, in samples
    seed: int = 0
    flip: bool = True  # random horizontal flip (images: mirrored pixels; latents: the stored flipped latent)
    # images as uint8, for the trainer to convert on its device (a quarter of the bytes from the workers and to a
    # GPU), or as floats in [-1, 1]; latents are float32 either way
    dtype: Literal["uint8", "float"] = "uint8"
    max_bad_fraction: float = 0.001

    def __post_init__(self):
        for name in ("batch_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, found {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, found {self.num_workers}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], found {self.max_bad_fraction}")


def open_shards(config: StreamConfig) -> tuple[dict, list[str], list[str | None]]:
    if not config.index:
        raise ValueError("StreamConfig.index is empty: give the shard index (index.json or its folder)")
    return reader.open_index(config.index, config.shards)


class _Slots:
    """One rank's batches from the rank's batch `first` on; each worker emits those of one slot."""

    def __init__(self, plan: Plan, urls: list[str], tables: list[str | None], kind: str, config: StreamConfig,
                 rank: int, first: int):
        self.plan, self.urls, self.tables, self.kind = plan, urls, tables, kind
        self.config, self.rank, self.first = config, rank, first

    def batches_of(self, started: int) -> Iterator[dict]:
        """The batches of the worker started as number `started`."""
        w_count = self.plan.layout.workers
        # Workers are asked for batches from the one started first, but the rank's next batch belongs to plan
        # worker first % W.
        worker = (started + self.first) % w_count
        shards = reader.ShardReader(self.urls, self.plan.layout.starts, self.tables)
        try:
            yield from self._batches(shards, worker, self.first // w_count + (worker < self.first % w_count))
        finally:
            shards.close()

    def _batches(self, shards: reader.ShardReader, worker: int, b: int) -> Iterator[dict]:
        """The batches of `worker` from its batch b on."""
        layout = self.plan.layout
        k, size, block = layout.batches_per_round, layout.batch_size, layout.block
        slot = self.rank * layout.workers + worker
        limit = self.config.max_bad_fraction * k * size
        while True:
            t = b // k
            read, order, flips = (a.tolist() for a in self.plan.slot_round(t, slot))
            if not self.config.flip:
                flips = [False] * len(flips)
            held, lo = [], 0  # the samples at read positions [lo, lo + len(held))
            bad = 0
            for e in range(b % k * size, k * size, size):
                # order permutes within blocks: the batch needs every block that its positions overlap
                first, end = e // block * block, min(-(-(e + size) // block) * block, k * size)
                if lo + len(held) <= first:
                    held, lo = [], first
                elif lo < first:
                    del held[:first - lo]
                    lo = first
                held += [shards.get(i) for i in read[lo + len(held):end]]
                positions = order[e:e + size]
                batch = reader.make_batch([read[p] for p in positions], [held[p - lo] for p in positions],
                                          flips[e:e + size], self.kind, self.config.dtype)
                bad += sum(batch["bad"].values())
                if bad > limit:
                    raise RuntimeError(
                        f"rank {self.rank} worker {worker}: {bad} of the {k * size} samples it reads in round {t} "
                        f"are bad so far, over max_bad_fraction={self.config.max_bad_fraction} "
                        f"(latest reasons: {batch['bad']}); check the shards or raise max_bad_fraction")
                yield batch
                b += 1


class Stream:
    def __init__(self, config: StreamConfig, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), found {rank}")
        self.config, self.rank = config, rank
        index, self.urls, self.tables = open_shards(config)
        self.kind = index["kind"]
        self.plan = Plan(self._layout(config.seed, world_size, config.num_workers, config.batch_size,
                                      config.shuffle_buffer, [s["count"] for s in index["shards"]]))
        self.batches = 0  # consumed by this rank since the plan began: the whole position
        self.bad: Counter = Counter()

    @staticmethod
    def _layout(seed, world_size, num_workers, batch_size, block, counts) -> Layout:
        return Layout(tuple(counts), seed, world_size, max(1, num_workers), batch_size, block)

    @property
    def batches_per_round(self) -> int:
        """Batches every rank yields per round (about an epoch)."""
        return self.plan.layout.workers * self.plan.layout.batches_per_round

    def __iter__(self) -> Iterator[dict]:
        slots = _Slots(self.plan, self.urls, self.tables, self.kind, self.config, self.rank, self.batches)
        for batch in workers.batches(slots.batches_of, self.config.num_workers, self.config.worker_type):
            self.batches += 1
            self.bad.update(batch.pop("bad"))
            yield batch

    def state_dict(self) -> dict:
        layout = self.plan.layout
        workers = []
        for w in range(layout.workers):
            consumed = self.batches // layout.workers + (w < self.batches % layout.workers)
            rounds, within = divmod(consumed, layout.batches_per_round)
            position = (rounds * layout.round_size + (self.rank * layout.workers + w) * layout.slot_size
                        + within * layout.batch_size) - len(self.plan.pending)
            # a negative position is still inside the samples left over from an earlier layout
            epoch = (self.plan.start + position) // layout.num_samples if position >= 0 else None
            workers.append({"worker": w, "epoch": epoch,
                            "shard_order": layout.shard_order(epoch).tolist() if epoch is not None else None,
                            "samples_consumed": consumed * layout.batch_size})
        return {
            "seed": layout.seed, "world_size": layout.world_size, "num_workers": self.config.num_workers,
            "batch_size": layout.batch_size, "shuffle_buffer": layout.block, "rank": self.rank,
            "num_samples": layout.num_samples, "num_shards": len(layout.counts),
            "pending": as_runs(self.plan.pending), "start": self.plan.start, "batches": self.batches,
            "workers": workers, "bad": dict(self.bad),
        }

    def load_state_dict(self, state: dict) -> None:
        layout = self.plan.layout
        if (state["num_samples"], state["num_shards"]) != (layout.num_samples, len(layout.counts)):
            raise ValueError(
                f"the saved stream position is for {state['num_samples']} samples in {state['num_shards']} shards; "
                f"{self.config.index} has {layout.num_samples} in {len(layout.counts)}: not the same shards")
        # runs of ids; positions saved before runs were used hold the ids themselves
        saved_pending = state["pending"]
        if saved_pending and isinstance(saved_pending[0], list):
            saved_pending = from_runs(saved_pending).tolist()
        pending = tuple(saved_pending)
        saved = Plan(self._layout(state["seed"], state["world_size"], state["num_workers"], state["batch_size"],
                                  state["shuffle_buffer"], layout.counts), pending, state["start"])
        if saved.layout == layout:
            self.plan, self.batches = saved, state["batches"]
        else:
            self.plan, self.batches = saved.continue_with(state["batches"], layout), 0
        self.bad = Counter(state["bad"])
