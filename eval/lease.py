"""Leases on evaluation items: one worker at a time per (run, step, metric), taken over when its holder dies.

A lease is a small JSON object `{"worker", "expires", "generation"}` at `<item>.lease.<generation:04d>`; the
newest generation present is the lease in force. Only its holder ever rewrites it (to renew, or to release it
with `expires` 0). Taking a free item is `create_exclusive` of generation 0; taking over an expired lease of
generation g is `create_exclusive` of generation g + 1. Both are decided by the store's atomic create-if-absent,
so of two workers that find the same expired lease, exactly one wins. A holder that finds a newer generation
than its own has lost the lease (it renewed too late) and stops working on the item.

Expiry compares the lease's wall-clock `expires` with this machine's clock: workers on different machines need
clocks within a small fraction of the lease duration of each other (NTP gives milliseconds).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from trainer.store import STORE_ERRORS, Store

SUFFIX = ".lease."


def generations(store: Store, item: str) -> list[int]:
    """The lease generations present for `item` (a key prefix such as run/evals/000000100/fid50k), ascending."""
    keys = store.list(item + SUFFIX)
    return sorted(int(k[len(item + SUFFIX):]) for k in keys if k[len(item + SUFFIX):].isdigit())


def _key(item: str, generation: int) -> str:
    return f"{item}{SUFFIX}{generation:04d}"


def _body(worker: str, generation: int, expires: float) -> bytes:
    return json.dumps({"worker": worker, "generation": generation, "expires": expires}).encode()


@dataclass
class Held:
    """What `holder` of a lease needs to know about it."""
    item: str
    worker: str
    generation: int
    seconds: float


def read(store: Store, item: str) -> dict | None:
    """The lease in force for `item`, or None when the item has never been leased."""
    found = generations(store, item)
    if not found:
        return None
    try:
        return json.loads(store.get(_key(item, found[-1])))
    except FileNotFoundError:  # released and cleaned up between the listing and the read
        return None


def acquire(store: Store, item: str, worker: str, seconds: float) -> Held | None:
    """Take the item's lease if it is free or expired; None when another worker holds it (or won the race)."""
    current = read(store, item)
    if current is None:
        generation = 0
    elif current["expires"] > time.time():
        return None
    else:
        generation = current["generation"] + 1
    if not store.create_exclusive(_key(item, generation), _body(worker, generation, time.time() + seconds)):
        return None
    return Held(item, worker, generation, seconds)


def still_held(store: Store, held: Held) -> bool:
    return generations(store, held.item)[-1:] == [held.generation]


def renew(store: Store, held: Held) -> bool:
    """Extend the lease; False when a newer generation exists (the lease was lost and must not be used)."""
    if not still_held(store, held):
        return False
    store.put(_key(held.item, held.generation), _body(held.worker, held.generation, time.time() + held.seconds))
    return still_held(store, held)  # a takeover may have landed between the check and the write


def release(store: Store, held: Held) -> None:
    """Give the lease up so another worker may take the item at once (it stays pending)."""
    if still_held(store, held):
        store.put(_key(held.item, held.generation), _body(held.worker, held.generation, 0.0))


def clear(store: Store, item: str) -> None:
    """Remove every lease generation of a finished item."""
    for generation in generations(store, item):
        store.delete(_key(item, generation))


class Renewer:
    """Renews a lease from a background thread every third of its duration while an item is evaluated;
    `lost` turns True when the lease was taken over (or could not be renewed in time)."""

    def __init__(self, store: Store, held: Held):
        self.store, self.held = store, held
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)

    def __enter__(self) -> Renewer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._done.wait(self.held.seconds / 3):
            try:
                if not renew(self.store, self.held):
                    self.lost = True
                    return
                last = time.monotonic()
            except STORE_ERRORS:
                # The store may come back; past the lease's own duration another worker may have taken it over.
                if time.monotonic() - last > self.held.seconds:
                    self.lost = True
                    return
