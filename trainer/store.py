"""Object store (ARCHITECTURE seam 3): a local directory or an S3 bucket behind one small interface.

Keys are '/'-separated relative paths ("run/checkpoints/000001000/manifest.json"). Every write is atomic: a
reader sees the whole old object, the whole new one, or nothing. A store moves bytes only; it never unpickles.

    store = open_store("s3://bucket/prefix")        # or "/path", "file:///path"
    store.check_reachable()                         # fail before training starts, not at the first checkpoint
    store.put("a/b.json", b"{}"); store.get("a/b.json")
"""
from __future__ import annotations

import io
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

SCHEMES = "/path, file:///path, s3://bucket/prefix"
# What a store operation raises when the storage itself fails (disk full, network down, access denied).
STORE_ERRORS = (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                boto3.exceptions.Boto3Error)
# S3 refuses parts under 5 MiB; 64 MiB keeps a multi-GB rank file at a few hundred parts (the limit is 10,000).
DEFAULT_PART_SIZE = 64 * 2**20
_TMP = ".tmp-"  # prefix of local temporary files; never a key


class StoreUnreachable(RuntimeError):
    """The store cannot be used at all (no such bucket, endpoint down, directory not writable)."""


class Store(Protocol):
    uri: str

    def put(self, key: str, data: bytes | str | os.PathLike) -> None: ...
    def get(self, key: str) -> bytes: ...
    def open(self, key: str) -> BinaryIO: ...
    def download(self, key: str, path: str | os.PathLike) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def create_exclusive(self, key: str, data: bytes) -> bool: ...
    def check_reachable(self) -> None: ...


def open_store(uri: str, *, endpoint_url: str | None = None, part_size: int = DEFAULT_PART_SIZE) -> Store:
    """A store for `uri`. For S3 the endpoint is `endpoint_url`, else $AWS_ENDPOINT_URL, else AWS itself."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"store URI {uri!r} names no bucket; expected s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url, part_size=part_size)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"store URI {uri!r}: file URIs must be file:///absolute/path")
        return LocalStore(parsed.path)
    if "://" not in uri:
        return LocalStore(uri)
    raise ValueError(f"store URI {uri!r} has unknown scheme '{parsed.scheme}'; supported: {SCHEMES}")


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") or p.startswith(_TMP) for p in parts):
        raise ValueError(f"invalid store key {key!r}: expected a relative a/b/c path without '.', '..', "
                         f"empty parts or parts starting with '{_TMP}'")
    return key


class LocalStore:
    """A directory. Atomicity comes from writing a temporary file beside the target, fsync, then rename."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _write_temp(self, path: Path, data: bytes | str | os.PathLike) -> Path:
        """A complete, fsynced temporary file beside `path`."""
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{_TMP}{uuid.uuid4().hex}"
            try:
                f = open(tmp, "xb")
                break
            except FileNotFoundError:
                continue  # a concurrent delete() removed the directory, now empty, between mkdir and open
        with f:
            try:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    f.write(data)
                else:
                    with open(data, "rb") as src:
                        shutil.copyfileobj(src, f, 2**22)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return tmp

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        # The rename is only durable once the directory entry itself reaches the disk.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes | str | os.PathLike) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._fsync_dir(path.parent)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # link() fails if the target exists and publishes a file that is already complete, so a reader never
        # sees a half-written lease and exactly one of several concurrent creators succeeds.
        path = self._path(key)
        tmp = self._write_temp(path, bytes(data))
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._fsync_dir(path.parent)
        return True

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def download(self, key: str, path: str | os.PathLike) -> None:
        shutil.copyfile(self._path(key), path)

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the deepest directory the prefix names, not the whole store.
        base = prefix.rpartition("/")[0]
        start = self._path(base) if base else self.root
        if not start.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(_TMP) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop directories left empty so that listing a run stays cheap; stop at the store root.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone): a concurrent put may be using it
                break
            parent = parent.parent

    def check_reachable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_TMP}probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreUnreachable(f"store {self.uri} is not a writable directory: {e}") from e


def _s3_code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class S3Store:
    """A bucket and key prefix. Uploads are a single PUT or a completed multipart upload: both are atomic."""

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None, part_size: int):
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self.client = boto3.client(
            "s3", endpoint_url=self.endpoint_url,
            config=botocore.config.Config(connect_timeout=10, retries={"max_attempts": 3, "mode": "standard"}))
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def put(self, key: str, data: bytes | str | os.PathLike) -> None:
        # S3 serves an object with the type it was stored with: a page (the run's report) must say text/html, or a
        # browser downloads it instead of showing it.
        extra = {"ContentType": "text/html; charset=utf-8"} if key.endswith(".html") else None
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), ExtraArgs=extra,
                                       Config=self.transfer)
        else:
            self.client.upload_file(os.fspath(data), self.bucket, self._key(key), ExtraArgs=extra, Config=self.transfer)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # S3 answers 412 when the key exists, and 409 while a concurrent conditional write to the same key is in
        # flight; after a 409 the retry settles it (412 if the other writer won, success if it failed).
        attempt = 0
        while True:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return True
            except botocore.exceptions.ClientError as e:
                if _s3_code(e) == "PreconditionFailed":
                    return False
                attempt += 1
                if _s3_code(e) != "ConditionalRequestConflict" or attempt == 5:
                    raise
                time.sleep(0.1 * 2**attempt)

    def get(self, key: str) -> bytes:
        return self.open(key).read()

    def open(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except botocore.exceptions.ClientError as e:
            if _s3_code(e) in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.uri}/{key}") from e
            raise

    def download(self, key: str, path: str | os.PathLike) -> None:
        self.client.download_file(self.bucket, self._key(key), os.fspath(path), Config=self.transfer)

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        for page in pages:
            keys += [obj["Key"][len(self.prefix):] for obj in page.get("Contents", [])]
        return sorted(keys)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except botocore.exceptions.ClientError as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def check_reachable(self) -> None:
        where = f"store {self.uri} (endpoint {self.endpoint_url or 'AWS default'})"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as e:
            raise StoreUnreachable(f"{where}: bucket '{self.bucket}' answered {_s3_code(e)}: {e}") from e
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            raise StoreUnreachable(f"{where} cannot be reached: {e}") from e
