"""Writing a set of tar shards and their index, in parallel processes, resumably.

The index (`index.json` beside the shards) is what readers plan from: shard names (relative to the index),
sample counts, class counts, sha256 per shard and per member table (`data.members`), the settings that made them,
and the bad-input counts. It is rewritten after every finished shard with `"complete": false`, and a last time
with `true`. A rerun keeps every shard the index lists whose stored files still have their sha256, and rewrites
the rest; files are written to a temporary file and published whole (rename, or one S3 PUT), so an interruption
never leaves half a shard under its name.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
from collections import Counter
from typing import Any, Callable, Sequence

from data import members, storage

INDEX_NAME = "index.json"

# make_shard(payload, tar_path) writes one tar at tar_path and returns its record:
# {"count": int, "class_counts": {label: n}, "skipped": {reason: n}, "converted": {reason: n}}
MakeShard = Callable[[Any, str], dict]


def load_index(url: str) -> dict:
    """The index at `url` (the index file itself, or the folder/prefix holding it)."""
    if not url.endswith(".json"):
        url = storage.join(url, INDEX_NAME)
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard index at {url}: write shards with `elbodiff shards` first") from None


def _check_settings(out: str, old: dict, settings: dict, overwrite: bool) -> bool:
    """True when the existing output can be continued; raises when it differs and overwrite is off."""
    differ = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if not differ:
        return True
    if overwrite:
        return False
    listing = ", ".join(f"{k}={found!r} (asked {asked!r})" for k, (found, asked) in differ.items())
    raise ValueError(f"{out} already holds shards made with different settings: {listing}; "
                     f"pass --overwrite to replace them")


def _sum(records: Sequence[dict], key: str) -> dict:
    total: Counter = Counter()
    for r in records:
        total.update(r.get(key, {}))
    return dict(sorted(total.items()))


def _run(job: tuple[MakeShard, str, str, Any]) -> dict:
    """Write one shard and, for an image shard, its member table; the table goes first, so that a shard is
    never listed without it."""
    make_shard, out, name, payload = job
    url = storage.join(out, name)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar", dir=storage.temp_dir(url))
    os.close(fd)
    try:
        record = make_shard(payload, tmp)
        table = members.build(tmp)
        if table is not None:
            if len(table) != record["count"]:
                raise RuntimeError(f"{name}: {len(table)} samples in the tar, {record['count']} counted")
            table_name = members.table_name(name)
            sha = storage.put_bytes(members.to_bytes(table), storage.join(out, table_name))
            record["members"] = {"name": table_name, "sha256": sha}
        sha = storage.file_sha256(tmp)
        storage.put_file(tmp, url, sha)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"name": name, **record, "sha256": sha}


def _intact(out: str, record: dict) -> bool:
    """The stored shard (and member table) still have the sha256 the index lists."""
    files = [record] + ([record["members"]] if "members" in record else [])
    return all(storage.stored_sha256(storage.join(out, f["name"])) == f["sha256"] for f in files)


def write_shards(
    out: str,
    settings: dict,
    jobs: Sequence[tuple[str, Any]],
    make_shard: MakeShard,
    *,
    processes: int,
    overwrite: bool,
    classes: list[str],
    skipped: dict | None = None,
    initializer: Callable | None = None,
    initargs: tuple = (),
) -> dict:
    """Write shard `name` for each (name, payload) in `jobs` under `out`, skipping finished ones; return the index.

    `settings` (kind, resolution, format, seed, source, ...) head the index and must match for a rerun to keep
    shards; `skipped` adds to the per-shard skip counts (files refused before any shard, e.g. without a label).
    """
    storage.make_dirs(out)
    index_url = storage.join(out, INDEX_NAME)
    done: dict[str, dict] = {}
    if storage.exists(index_url):
        old = load_index(index_url)
        if _check_settings(out, old, settings, overwrite):
            done = {r["name"]: r for r in old["shards"] if _intact(out, r)}
        else:
            storage.delete(index_url)  # no reader may take the old shards for the new ones while they are replaced

    names = [name for name, _ in jobs]

    def publish(complete: bool) -> dict:
        records = [done[n] for n in names if n in done]
        index = {
            **settings,
            "classes": classes,
            "complete": complete,
            "num_samples": sum(r["count"] for r in records),
            "class_counts": _sum(records, "class_counts"),
            "skipped": _sum(records + [{"skipped": skipped or {}}], "skipped"),
            "converted": _sum(records, "converted"),
            "shards": records,
        }
        storage.put_bytes(json.dumps(index, indent=1).encode(), index_url)
        return index

    remaining = [(make_shard, out, name, payload) for name, payload in jobs if name not in done]
    if processes <= 1 or len(remaining) <= 1:
        if initializer is not None and remaining:
            initializer(*initargs)
        for record in map(_run, remaining):
            done[record["name"]] = record
            publish(complete=False)
    else:
        # spawn: safe with CUDA and threads in the parent; each process imports only what its job needs.
        with mp.get_context("spawn").Pool(processes, initializer=initializer, initargs=initargs) as pool:
            for record in pool.imap_unordered(_run, remaining):
                done[record["name"]] = record
                publish(complete=False)
    return publish(complete=True)
