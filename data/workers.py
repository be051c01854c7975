"""Where a stream's batches are made: in the rank's process, in DataLoader worker processes, or in threads.

A stream gives `batches` a function from a worker's number to that worker's batches; whatever runs them, the
batches come back round robin by worker from worker 0 on, the order `data.plan` assumes.

Threads pay nothing to hand a batch over, and JPEG decoding, the bulk of the work, releases the GIL: with JPEG
shards one worker thread took 54-67% of the CPU per image that one worker process took, whose every batch
travels through a new shared-memory file (benchmarks/RESULTS.md, "Data"). Processes run in parallel also what
holds the GIL: PNG or tar parsing in Python, latents' `np.load`, and whatever a user adds.
"""
from __future__ import annotations

import atexit
import contextlib
import queue
import signal
import threading
from typing import Callable, Iterator, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

WorkerType = Literal["process", "thread"]
PREFETCH = 2  # batches made ahead per worker, as the DataLoader's default prefetch_factor
_DONE = object()  # a thread's last item when its batches end


def batches(batches_of: Callable[[int], Iterator[dict]], num_workers: int, worker_type: WorkerType) -> Iterator[dict]:
    """The workers' batches, round robin by worker, label / index / mask as tensors (`arrived`)."""
    if num_workers == 0:
        # in this process a DataLoader would only pass the batches on, at about 30 us each
        made = batches_of(0)
    elif worker_type == "thread":
        made = from_threads(batches_of, num_workers)
    else:
        made = from_processes(batches_of, num_workers)
    return map(arrived, made)


def arrived(batch: dict) -> dict:
    """The numpy arrays of a batch (label, index, mask) as tensors. Made as arrays, they travel from a worker
    process inside its message, while each tensor would take a shared-memory file of its own (about 8 us per
    64x64 image for label and index)."""
    for key in ("label", "index", "mask"):
        if key in batch:
            batch[key] = torch.from_numpy(batch[key])
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """Launchers signal a job's whole process group (scancel, pod eviction): the rank finishes its step and writes
    a checkpoint before it exits, so its DataLoader workers must not die first and fail the fetch in flight."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def as_made(batch: dict) -> dict:
    """The DataLoader's per-batch conversion: none, batches leave the workers ready (saves ~4 us per image)."""
    return batch


class _PerWorker(IterableDataset):
    def __init__(self, batches_of: Callable[[int], Iterator[dict]]):
        self.batches_of = batches_of

    def __iter__(self) -> Iterator[dict]:
        return self.batches_of(get_worker_info().id)


def from_processes(batches_of: Callable[[int], Iterator[dict]], num_workers: int) -> Iterator[dict]:
    """Batches made in `num_workers` DataLoader worker processes.

    The workers are stopped here, not left to the loader's garbage collection: a traceback that holds the
    loader's frame (a worker's exception, stored by a caller) would keep them alive, and since they ignore
    SIGTERM, multiprocessing's exit handler, which ends daemonic children with it and then joins them, would
    wait for them forever. For a stream still open when the process exits (an uncaught exception in the training
    step) the same is registered with atexit, which runs handlers in reverse order of registration: before
    multiprocessing's. `_shutdown_workers` is what the loader's iterator calls when it is collected."""
    loader = iter(DataLoader(_PerWorker(batches_of), batch_size=None, num_workers=num_workers, collate_fn=as_made,
                             worker_init_fn=ignore_stop_signals))
    atexit.register(loader._shutdown_workers)
    try:
        yield from loader
    finally:
        atexit.unregister(loader._shutdown_workers)
        loader._shutdown_workers()


def from_threads(batches_of: Callable[[int], Iterator[dict]], num_workers: int) -> Iterator[dict]:
    """Batches made in `num_workers` threads of this process, each `PREFETCH` ahead. An exception in a worker is
    raised here when its batch is due; closing this iterator stops the threads after their current batch.

    The threads are stopped also when the process exits with the stream open: the interpreter ends daemon
    threads in the middle of whatever they run, and one inside a torch call then aborts the process (C++
    `terminate`) instead of letting it exit with its error. atexit handlers run before that."""
    made = [queue.Queue(maxsize=PREFETCH) for _ in range(num_workers)]
    stop = threading.Event()

    def hand_over(w: int, item) -> bool:
        while not stop.is_set():
            try:
                made[w].put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work(w: int) -> None:
        try:
            with contextlib.closing(batches_of(w)) as own:
                for batch in own:
                    if not hand_over(w, batch):
                        return
            hand_over(w, _DONE)
        except BaseException as e:  # raised in the consumer, in the order of the batches
            hand_over(w, e)

    def shut_down() -> None:
        stop.set()
        for thread in threads:
            thread.join()

    threads = [threading.Thread(target=work, args=(w,), name=f"stream-worker-{w}", daemon=True)
               for w in range(num_workers)]
    for thread in threads:
        thread.start()
    atexit.register(shut_down)
    try:
        active, i = list(range(num_workers)), 0  # a worker whose batches end leaves the rotation
        while active:
            item = made[active[i]].get()
            if item is _DONE:
                del active[i]
                i = i % len(active) if active else 0
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            i = (i + 1) % len(active)
    finally:
        atexit.unregister(shut_down)
        shut_down()
