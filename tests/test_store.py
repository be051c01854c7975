import os
import threading
import uuid

import pytest

from s3server import BUCKET, free_port, s3_endpoint  # noqa: F401  (fixture)
from trainer.store import LocalStore, S3Store, StoreUnreachable, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    endpoint = request.getfixturevalue("s3_endpoint")
    # A fresh prefix per test keeps the tests independent inside the one bucket.
    return open_store(f"s3://{BUCKET}/t-{uuid.uuid4().hex}", endpoint_url=endpoint, part_size=5 * 2**20)


def test_uri_schemes_pick_the_backend(tmp_path, monkeypatch):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}/x").root == tmp_path / "x"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = open_store("s3://bucket/some/prefix")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    assert s3.endpoint_url == "http://127.0.0.1:9"
    assert open_store("s3://bucket", endpoint_url="http://127.0.0.1:8").endpoint_url == "http://127.0.0.1:8"
    with pytest.raises(ValueError, match=r"unknown scheme 'gs'.*s3://bucket/prefix"):
        open_store("gs://bucket/x")


def test_put_get_list_exists_delete_round_trip(store, tmp_path):
    store.check_reachable()
    store.put("run/a.json", b"{}")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1000))
    store.put("run/sub/b.bin", src)
    store.put("other/c", b"c")
    assert store.get("run/a.json") == b"{}"
    assert store.get("run/sub/b.bin") == src.read_bytes()
    with store.open("run/sub/b.bin") as f:
        assert f.read(10) == src.read_bytes()[:10]
    assert store.list("run/") == ["run/a.json", "run/sub/b.bin"]
    assert store.list() == ["other/c", "run/a.json", "run/sub/b.bin"]
    assert store.list("run/s") == ["run/sub/b.bin"] and store.list("missing/") == []
    assert store.exists("run/a.json") and not store.exists("run/missing")
    store.put("run/a.json", b"new")  # overwrite replaces the whole object
    assert store.get("run/a.json") == b"new"
    store.delete("run/sub/b.bin")
    assert not store.exists("run/sub/b.bin") and store.list("run/") == ["run/a.json"]
    with pytest.raises(FileNotFoundError):
        store.get("run/sub/b.bin")


def test_keys_that_escape_the_store_are_refused(store):
    for key in ["", "/abs", "a/../b", "a//b", "a/./b"]:
        with pytest.raises(ValueError, match="invalid store key"):
            store.put(key, b"x")


def test_large_object_round_trips_through_multipart_upload(store, tmp_path):
    data = os.urandom(12 * 2**20)  # above the 5 MiB part size: three parts on S3
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.put("big/from-file", src)
    store.put("big/from-bytes", data)
    out = tmp_path / "down.bin"
    store.download("big/from-file", out)
    assert out.read_bytes() == data
    assert store.get("big/from-bytes") == data


def test_s3_large_put_is_a_completed_multipart_upload(s3_endpoint, tmp_path):
    store = open_store(f"s3://{BUCKET}/mp-{uuid.uuid4().hex}", endpoint_url=s3_endpoint, part_size=5 * 2**20)
    store.put("big", os.urandom(12 * 2**20))
    head = store.client.head_object(Bucket=BUCKET, Key=store.prefix + "big", PartNumber=1)
    assert head["PartsCount"] == 3 and head["ContentLength"] == 5 * 2**20


def test_create_exclusive_has_exactly_one_winner_among_concurrent_creators(store):
    for round_ in range(5):
        key = f"leases/{round_}.lease"
        start = threading.Barrier(2)
        wins = {}

        def create(who):
            start.wait()
            wins[who] = store.create_exclusive(key, who.encode())

        threads = [threading.Thread(target=create, args=(w,)) for w in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins.values()) == [False, True]
        winner = next(w for w, won in wins.items() if won)
        assert store.get(key) == winner.encode()
    assert store.create_exclusive("leases/0.lease", b"late") is False
    store.delete("leases/0.lease")
    assert store.create_exclusive("leases/0.lease", b"again") is True


def test_local_store_hides_temporaries_and_leaves_none_behind(tmp_path):
    store = open_store(str(tmp_path))
    store.put("a/b", b"1")
    store.create_exclusive("a/c", b"2")
    store.create_exclusive("a/c", b"3")
    (tmp_path / "a" / ".tmp-crashed").write_bytes(b"partial")  # what a killed writer leaves
    assert store.list() == ["a/b", "a/c"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".tmp-crashed", "b", "c"]


def test_unreachable_stores_are_reported_before_use(tmp_path, s3_endpoint):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreUnreachable, match="not a writable directory"):
        open_store(str(blocker / "root")).check_reachable()
    with pytest.raises(StoreUnreachable, match="no-such-bucket"):
        open_store("s3://no-such-bucket/x", endpoint_url=s3_endpoint).check_reachable()
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnreachable, match="cannot be reached"):
        open_store(f"s3://{BUCKET}/x", endpoint_url=nothing_listens).check_reachable()

