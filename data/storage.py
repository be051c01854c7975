"""Where shards live: local paths (or file://), S3 (s3://bucket/key through boto3) and, for reading, pipe:CMD.

The endpoint of S3-compatible stores comes from `AWS_ENDPOINT_URL` (boto3 reads it itself). Writes are
atomic: a local file is written under a temporary name and renamed; an S3 object is one PUT of a finished
file, so a reader never sees half a shard under its final name.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from webdataset.gopen import gopen

SCHEMES = "a local path, file://PATH, s3://BUCKET/KEY, pipe:COMMAND"


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    if "://" not in url:
        return "file"
    scheme = url.split("://", 1)[0]
    if scheme not in ("file", "s3"):
        raise ValueError(f"unsupported URL scheme '{scheme}' in {url!r}; supported: {SCHEMES}")
    return scheme


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


_CLIENTS = threading.Lock()


def _s3():
    import boto3

    # Clients are thread-safe, making them from boto3's shared default session is not, and stream workers may be
    # threads opening shards at the same time. A session of each client's own would cost 130 ms instead of 6.
    with _CLIENTS:
        return boto3.client("s3")


def join(base: str, name: str) -> str:
    """`name` relative to the folder or prefix `base` ('s3://b/p' + 'x.tar' -> 's3://b/p/x.tar')."""
    return base.rstrip("/") + "/" + name


def parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def open_read(url: str) -> BinaryIO:
    """A binary stream of the object at `url`; S3 objects stream without being downloaded first."""
    scheme = _scheme(url)
    if scheme == "s3":
        bucket, key = _split_s3(url)
        try:
            return _s3().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            raise FileNotFoundError(f"cannot read {url}: {e}") from e
    if scheme == "file" and not os.path.isfile(_local(url)):
        raise FileNotFoundError(f"no such file: {url}")
    return gopen(_local(url), "rb")


def map_local(url: str) -> mmap.mmap | None:
    """A read-only memory map of a local file, None for other schemes and empty files. Slices of it cost no
    copy; the map stays valid while any of them does."""
    if _scheme(url) != "file":
        return None
    path = _local(url)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {url}")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def exists(url: str) -> bool:
    scheme = _scheme(url)
    if scheme == "s3":
        bucket, key = _split_s3(url)
        try:
            _s3().head_object(Bucket=bucket, Key=key)
            return True
        except Exception:
            return False
    return os.path.exists(_local(url))


def stored_sha256(url: str) -> str | None:
    """sha256 of a stored object: recomputed for local files, the PUT-time metadata for S3 (no download)."""
    scheme = _scheme(url)
    if scheme == "s3":
        bucket, key = _split_s3(url)
        try:
            return _s3().head_object(Bucket=bucket, Key=key)["Metadata"].get("sha256")
        except Exception:
            return None
    path = _local(url)
    return file_sha256(path) if os.path.isfile(path) else None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_dirs(url: str) -> None:
    if _scheme(url) == "file":
        Path(_local(url)).mkdir(parents=True, exist_ok=True)


def put_file(path: str, url: str, sha256: str) -> None:
    """Publish the finished local file `path` at `url` atomically (the file is moved or uploaded)."""
    scheme = _scheme(url)
    if scheme == "s3":
        bucket, key = _split_s3(url)
        with open(path, "rb") as f:
            # put_object is a single PUT: the object appears whole or not at all.
            _s3().put_object(Bucket=bucket, Key=key, Body=f, Metadata={"sha256": sha256})
        os.unlink(path)
    elif scheme == "file":
        shutil.move(path, _local(url))
    else:
        raise ValueError(f"cannot write to {url!r}; writable: a local path, file://PATH, s3://BUCKET/KEY")


def put_bytes(data: bytes, url: str) -> str:
    """Publish `data` at `url` atomically; returns its sha256."""
    sha = hashlib.sha256(data).hexdigest()
    with tempfile.NamedTemporaryFile(dir=temp_dir(url), prefix=".tmp-", delete=False) as f:
        f.write(data)
    put_file(f.name, url, sha)
    return sha


def temp_dir(url: str) -> str | None:
    """Temporary files go beside a local destination, so that the final rename stays on one filesystem."""
    return os.path.dirname(os.path.abspath(_local(url))) if _scheme(url) == "file" else None


def delete(url: str) -> None:
    scheme = _scheme(url)
    if scheme == "s3":
        bucket, key = _split_s3(url)
        _s3().delete_object(Bucket=bucket, Key=key)
    elif os.path.exists(_local(url)):
        os.unlink(_local(url))
