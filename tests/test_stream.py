import io
import json
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from data import demo, writer
from s3server import BUCKET, free_port, s3_endpoint  # noqa: F401  (pytest fixture)
from data.plan import as_runs, from_runs
from data.stream import Stream, StreamConfig
from data.validation import ValidationStream


def uneven_shards(out, counts, seed=0):
    """Demo images in shards of the given sizes (ids are the sample keys, so shards are known exactly)."""
    jobs, key = [], 0
    for s, n in enumerate(counts):
        jobs.append((f"shard-{s:06d}.tar", (seed, [(key + j, key + j) for j in range(n)])))
        key += n
    writer.write_shards(str(out), {"kind": "images", "resolution": 32, "format": "png"}, jobs, demo.make_demo_shard,
                        processes=1, overwrite=False, classes=demo.CLASSES)
    return str(out)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def assert_prefix_of_epochs(ids, n):
    """`ids` are a prefix of the epoch-by-epoch stream: each of the n samples appears q or q+1 times (q full
    epochs read), and exactly len(ids) mod n samples appear q+1 times: nothing dropped, nothing read twice."""
    counts = Counter(ids)
    q, r = divmod(len(ids), n)
    assert set(counts) <= set(range(n))
    assert sum(1 for i in range(n) if counts[i] == q + 1) == r
    assert all(counts[i] in (q, q + 1) for i in range(n))


@pytest.mark.parametrize("worker_type", ["thread", "process"])
@pytest.mark.parametrize("counts", [[1, 37, 5, 60], [1, 100, 2], [103]],
                         ids=["uneven", "fewer-shards-than-slots", "one-shard"])
def test_two_ranks_two_workers_read_each_sample_once_per_epoch_with_equal_full_batches(tmp_path, counts, worker_type):
    index = uneven_shards(tmp_path, counts)
    n = sum(counts)  # 103: not divisible by ranks x workers x batch = 16
    config = StreamConfig(index=index, batch_size=4, num_workers=2, shuffle_buffer=10, worker_type=worker_type)
    streams = [Stream(config, rank=r, world_size=2) for r in range(2)]
    assert streams[0].batches_per_round == streams[1].batches_per_round
    rounds = 2
    batches = [take(s, rounds * s.batches_per_round) for s in streams]
    assert all(b["x"].shape == (4, 3, 32, 32) for rank in batches for b in rank)
    assert all(b[k].dtype == torch.int64 for rank in batches for b in rank for k in ("label", "index"))
    ids = [int(i) for rank in batches for b in rank for i in b["index"]]
    assert_prefix_of_epochs(ids, n)


def test_labels_and_pixels_match_the_demo_generator(tmp_path):
    index = uneven_shards(tmp_path, [7, 5])
    batch = take(Stream(StreamConfig(index=index, batch_size=12, num_workers=0, flip=False, dtype="uint8")), 1)[0]
    for x, label, i in zip(batch["x"], batch["label"], batch["index"]):
        image, expected = demo.draw(0, int(i))
        assert int(label) == expected
        assert torch.equal(x, torch.from_numpy(image).permute(2, 0, 1))


def test_float_batches_are_in_minus_one_one_and_flips_mirror_the_image(tmp_path):
    index = uneven_shards(tmp_path, [30])
    plain = take(Stream(StreamConfig(index=index, batch_size=30, num_workers=0, flip=False, dtype="float")), 1)[0]
    flipped = take(Stream(StreamConfig(index=index, batch_size=30, num_workers=0, flip=True, dtype="float")), 1)[0]
    assert torch.equal(plain["index"], flipped["index"])
    assert plain["x"].dtype == torch.float32 and plain["x"].min() >= -1 and plain["x"].max() <= 1
    mirrored = [torch.equal(f, p.flip(2)) and not torch.equal(f, p) for f, p in zip(flipped["x"], plain["x"])]
    assert 5 < sum(mirrored) < 25


def jpeg_shard(out, sizes, damaged=None):
    """One shard of JPEG samples of the given (height, width) sizes, labelled by position; returns the index path
    and the JPEG bytes. `damaged` maps positions to members ({"jpg": ..., "cls": ...}) written instead of theirs."""
    import simplejpeg

    out.mkdir()
    rng = np.random.default_rng(0)
    jpegs = [simplejpeg.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 90) for h, w in sizes]
    with tarfile.open(out / "shard-000000.tar", "w") as tar:
        for i, data in enumerate(jpegs):
            members = {"jpg": data, "cls": str(i).encode(), **(damaged or {}).get(i, {})}
            for name, member in ((f"{i:09d}.{ext}", member) for ext, member in members.items()):
                info = tarfile.TarInfo(name)
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
    index = {"kind": "images", "complete": True, "num_samples": len(sizes), "classes": [str(i) for i in sizes],
             "shards": [{"name": "shard-000000.tar", "count": len(sizes)}]}
    (out / "index.json").write_text(json.dumps(index))
    return str(out), jpegs


def test_jpeg_batches_are_channels_last_views_equal_to_the_exact_decode_mirrored_where_flipped(tmp_path):
    import simplejpeg

    index, jpegs = jpeg_shard(tmp_path / "j", [(24, 40)] * 40)
    stream = Stream(StreamConfig(index=index, batch_size=40, num_workers=0))  # uint8 by default
    batch = take(stream, 1)[0]
    x = batch["x"]
    assert x.dtype == torch.uint8
    assert x.shape == (40, 3, 24, 40) and x.is_contiguous(memory_format=torch.channels_last)
    flipped = 0
    for image, label in zip(x, batch["label"]):
        exact = torch.from_numpy(simplejpeg.decode_jpeg(jpegs[int(label)], "RGB")).permute(2, 0, 1)
        assert torch.equal(image, exact) or torch.equal(image, exact.flip(2))
        flipped += not torch.equal(image, exact)
    assert 5 < flipped < 35
    floats = take(Stream(StreamConfig(index=index, batch_size=40, num_workers=0, dtype="float")), 1)[0]["x"]
    assert floats.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(floats, x.float() / 127.5 - 1)


def test_flipped_jpeg_batches_replace_bad_samples_by_a_copy_of_a_good_one(tmp_path):
    import simplejpeg

    index, jpegs = jpeg_shard(tmp_path / "j", [(24, 40)] * 40, {5: {"jpg": b"\xff\xd8 not a jpeg"}, 9: {"cls": b"x"}})
    stream = Stream(StreamConfig(index=index, batch_size=40, num_workers=0, dtype="uint8", max_bad_fraction=0.5))
    batch = take(stream, 1)[0]
    assert dict(stream.bad) == {"decode_error": 1, "no_label": 1}
    ids = batch["index"].tolist()
    assert 5 not in ids and 9 not in ids and len(set(ids)) == 38
    flipped = 0
    for image, label, i in zip(batch["x"], batch["label"], ids):
        exact = torch.from_numpy(simplejpeg.decode_jpeg(jpegs[i], "RGB")).permute(2, 0, 1)
        assert int(label) == i and (torch.equal(image, exact) or torch.equal(image, exact.flip(2)))
        flipped += not torch.equal(image, exact)
    assert 5 < flipped < 35
    copies = [j for j, i in enumerate(ids) if ids.index(i) != j]
    assert len(copies) == 2 and all(torch.equal(batch["x"][j], batch["x"][ids.index(ids[j])]) for j in copies)


@pytest.mark.parametrize("other", [(16, 40), (32, 40)], ids=["smaller", "larger"])
def test_a_batch_mixing_jpeg_sizes_is_an_error_not_a_bad_sample(tmp_path, other):
    index, _ = jpeg_shard(tmp_path / "j", [(24, 40)] * 3 + [other])
    for flip in (False, True):
        with pytest.raises(ValueError, match="fixed resolution"):
            take(Stream(StreamConfig(index=index, batch_size=4, num_workers=0, shuffle_buffer=1, flip=flip)), 1)


@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_resume_at_a_random_step_gives_the_uninterrupted_batches(tmp_path, worker_type):
    index = uneven_shards(tmp_path, [13, 40, 9, 41])
    config = StreamConfig(index=index, batch_size=4, num_workers=2, shuffle_buffer=10, seed=3, worker_type=worker_type)
    total = 40  # more than one round: k * workers = 14 batches per round for rank 1 of 2
    reference = take(Stream(config, rank=1, world_size=2), total)
    step = random.Random(0).randrange(1, total)
    first = Stream(config, rank=1, world_size=2)
    head = take(first, step)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, as a checkpoint stores it
    second = Stream(config, rank=1, world_size=2)
    second.load_state_dict(state)
    resumed = head + take(second, total - step)
    for a, b in zip(reference, resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"])
        assert torch.equal(a["label"], b["label"])
    assert state["workers"][0]["samples_consumed"] + state["workers"][1]["samples_consumed"] == step * 4


def test_resume_with_another_world_size_continues_without_repeating_or_skipping(tmp_path):
    counts = [13, 40, 9, 41]
    index = uneven_shards(tmp_path, counts)
    old = [Stream(StreamConfig(index=index, batch_size=4, num_workers=2, shuffle_buffer=10), r, 2) for r in range(2)]
    done = [int(i) for s in old for b in take(s, 5) for i in b["index"]]  # stopped inside the first round
    state = old[0].state_dict()
    new_config = StreamConfig(index=index, batch_size=5, num_workers=1, shuffle_buffer=10)
    new = [Stream(new_config, r, 3) for r in range(3)]
    for s in new:
        s.load_state_dict(state)
    after = [int(i) for s in new for b in take(s, 2 * s.batches_per_round) for i in b["index"]]
    assert_prefix_of_epochs(done + after, sum(counts))


def test_a_position_with_leftover_samples_is_stored_as_runs_and_resumes_exactly(tmp_path):
    index = uneven_shards(tmp_path, [13, 40, 9, 41])
    old = Stream(StreamConfig(index=index, batch_size=4, num_workers=2, shuffle_buffer=10), 0, 2)
    take(old, 5)
    config = StreamConfig(index=index, batch_size=5, num_workers=1, shuffle_buffer=10)
    new = Stream(config, 1, 3)
    new.load_state_dict(old.state_dict())
    take(new, 1)  # still inside the leftover samples
    state = json.loads(json.dumps(new.state_dict()))
    assert len(new.plan.pending) > 3 * len(state["pending"])
    assert all(stop > first for first, stop in state["pending"])
    resumed = Stream(config, 1, 3)
    resumed.load_state_dict(state)
    assert resumed.plan == new.plan
    flat = Stream(config, 1, 3)
    flat.load_state_dict({**state, "pending": list(new.plan.pending)})  # as positions were saved before runs
    assert flat.plan == new.plan
    for a, b in zip(take(new, 10), take(resumed, 10)):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"])


@pytest.mark.parametrize("seed", range(5))
def test_runs_give_back_the_ids(seed):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.arange(a, a + n) for a, n in zip(rng.integers(0, 50, 20), rng.integers(1, 6, 20))])
    runs = as_runs(ids)
    assert np.array_equal(from_runs(runs), ids) and len(runs) <= 20
    assert as_runs([]) == [] and len(from_runs([])) == 0


@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_validation_reads_every_sample_once_with_the_same_batch_count_on_every_rank(tmp_path, worker_type):
    counts = [1, 37, 5, 60]
    index = uneven_shards(tmp_path, counts)
    config = StreamConfig(index=index, batch_size=8, num_workers=2, worker_type=worker_type)
    ranks = [ValidationStream(config, r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 7
    seen = []
    for v in ranks:
        batches = list(v)
        assert len(batches) == len(v) and all(b["x"].shape[0] == 8 for b in batches)
        seen += [int(i) for b in batches for i in b["index"][b["mask"]]]
    assert sorted(seen) == list(range(sum(counts)))


def test_unknown_url_scheme_is_an_error_listing_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="s3://.*pipe:"):
        Stream(StreamConfig(index="gs://bucket/index.json"))


def test_pipe_urls_give_the_same_samples_as_local_paths(tmp_path):
    index = uneven_shards(tmp_path, [20, 12])
    local = take(Stream(StreamConfig(index=index, batch_size=8, num_workers=0)), 4)
    piped = take(Stream(StreamConfig(index=index, shards=f"pipe:cat {tmp_path}/{{name}}", batch_size=8,
                                     num_workers=0)), 4)
    for a, b in zip(local, piped):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])


def test_s3_shards_written_and_read_through_a_real_s3_server_match_local_ones(tmp_path, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # shard URLs carry no endpoint: boto3 reads it from here
    local_index = demo.write(str(tmp_path), num_images=60, samples_per_shard=25)
    s3_index = demo.write(f"s3://{BUCKET}/demo", num_images=60, samples_per_shard=25)
    assert [s["sha256"] for s in local_index["shards"]] == [s["sha256"] for s in s3_index["shards"]]
    again = demo.write(f"s3://{BUCKET}/demo", num_images=60, samples_per_shard=25)  # finished shards are kept
    assert again["shards"] == s3_index["shards"]
    config = dict(batch_size=8, num_workers=2, shuffle_buffer=16)
    local = take(Stream(StreamConfig(index=str(tmp_path), **config)), 10)
    remote = take(Stream(StreamConfig(index=f"s3://{BUCKET}/demo/index.json", **config)), 10)
    for a, b in zip(local, remote):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])


def damaged_shards(out):
    """Shard 0: 20 good samples, one with a corrupt JPEG, one without label, one without image. Shard 1: cut off
    inside its 10th sample's image (a truncated tar member): 8 samples read, 12 owed, as WebDataset only
    yields the 9th once the 10th's member has been read."""
    out.mkdir()
    good = [demo.draw(0, i) for i in range(30)]

    def png(i):
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(good[i][0]).save(buf, format="PNG")
        return buf.getvalue()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(out / "shard-000000.tar", "w") as tar:
        for i in range(20):
            add(tar, f"{i:09d}.png", png(i))
            add(tar, f"{i:09d}.cls", str(good[i][1]).encode())
        add(tar, "000000020.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
        add(tar, "000000020.cls", b"1")
        add(tar, "000000021.png", png(0))
        add(tar, "000000022.cls", b"2")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(20):
            add(tar, f"{100 + i:09d}.png", png(i))
            add(tar, f"{100 + i:09d}.cls", str(good[i][1]).encode())
    data = buf.getvalue()
    member = tarfile.open(fileobj=io.BytesIO(data)).getmember("000000109.png")
    (out / "shard-000001.tar").write_bytes(data[:member.offset_data + 100])
    index = {"kind": "images", "complete": True, "num_samples": 43, "classes": demo.CLASSES,
             "shards": [{"name": "shard-000000.tar", "count": 23}, {"name": "shard-000001.tar", "count": 20}]}
    (out / "index.json").write_text(json.dumps(index))
    return str(out)


def test_reader_replaces_and_counts_bad_samples_by_reason(tmp_path):
    index = damaged_shards(tmp_path / "bad")
    stream = Stream(StreamConfig(index=index, batch_size=43, num_workers=0, max_bad_fraction=0.5))
    batch = take(stream, 1)[0]
    assert dict(stream.bad) == {"decode_error": 1, "no_label": 1, "no_image": 1, "truncated_shard": 12}
    assert batch["x"].shape[0] == 43 and len(set(batch["index"].tolist())) == 43 - 15
    assert stream.state_dict()["bad"] == dict(stream.bad)
    validation = ValidationStream(StreamConfig(index=index, batch_size=15, num_workers=0))
    kept = [int(i) for b in validation for i in b["index"][b["mask"]]]
    assert len(kept) == len(set(kept)) == 43 - 15 and validation.bad == dict(stream.bad)


@pytest.mark.parametrize("workers", [(0, "process"), (2, "process"), (2, "thread")], ids=["none", "process", "thread"])
def test_too_many_bad_samples_fail_with_a_clear_message(tmp_path, workers):
    index = damaged_shards(tmp_path / "bad")
    num_workers, worker_type = workers
    config = StreamConfig(index=index, batch_size=43, num_workers=num_workers, worker_type=worker_type,
                          max_bad_fraction=0.1)
    with pytest.raises(RuntimeError, match="max_bad_fraction=0.1"):
        take(Stream(config), 1)


def _distributed_check(rank, world, port, index, n, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        config = StreamConfig(index=index, batch_size=4, num_workers=2, shuffle_buffer=10, worker_type="process")
        stream = Stream(config, rank, world)
        ids = [int(i) for b in take(stream, stream.batches_per_round) for i in b["index"]]
        gathered = [None] * world
        dist.all_gather_object(gathered, ids)
        seen = torch.zeros(n, dtype=torch.int64)
        for b in ValidationStream(StreamConfig(index=index, batch_size=8, num_workers=2, worker_type="process"), rank,
                                  world):
            seen.index_add_(0, b["index"][b["mask"]], torch.ones(int(b["mask"].sum()), dtype=torch.int64))
            # a collective per batch, as an evaluation loop has: it would wait forever if batch counts differed
            dist.all_reduce(torch.zeros(1))
        dist.all_reduce(seen)
        if rank == 0:
            results.put((sum(gathered, []), seen.tolist()))
    finally:
        dist.destroy_process_group()


def test_two_real_processes_with_gloo_read_each_sample_once(tmp_path):
    counts = [1, 37, 5, 60]
    index = uneven_shards(tmp_path, counts)
    # fork, like the ranks torchrun starts: a spawned rank's DataLoader workers would be spawned too, each
    # importing torch again (about 20 s here instead of 1 s)
    results = tmp_mp.get_context("fork").SimpleQueue()
    tmp_mp.start_processes(_distributed_check, args=(2, free_port(), index, sum(counts), results), nprocs=2,
                           start_method="fork")
    train_ids, seen = results.get()
    assert_prefix_of_epochs(train_ids, sum(counts))
    assert seen == [1] * sum(counts)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_samples_match_webdataset_grouping_for_long_names_and_folders(tmp_path, fmt):
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from data import tar as tar_reader

    path = tmp_path / "t.tar"
    long_folder = "d" * 60 + "/" + "e" * 60 if fmt != tarfile.USTAR_FORMAT else "short"
    with tarfile.open(path, "w", format=fmt) as t:
        t.addfile(tarfile.TarInfo("folder"), None)
        for i, (name, data) in enumerate([("a.jpg", b"x" * 700), ("a.CLS", b"1"), (f"{long_folder}/b.x.npy", b""),
                                          (f"{long_folder}/b.cls", b"22"), ("c.cls", b"3" * 512)]):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        ours = list(tar_reader.samples(f))
    with open(path, "rb") as f:
        theirs = [{k: v for k, v in s.items() if k != "__url__"}
                  for s in group_by_keys(tar_file_expander([{"url": "t", "stream": f}]))]
    assert ours == theirs and len(ours) == 3
    with pytest.raises(tar_reader.TruncatedTar):
        list(tar_reader.samples(io.BytesIO(path.read_bytes()[:1500])))


def test_stream_config_loads_strictly_from_yaml(tmp_path):
    from trainer.config import ConfigError, load

    path = tmp_path / "data.yaml"
    path.write_text("index: s3://bucket/in64\nbatch_size: 128\ndtype: uint8\n")
    config = load(StreamConfig, path, ["seed=3"])
    assert (config.index, config.batch_size, config.dtype, config.seed) == ("s3://bucket/in64", 128, "uint8", 3)
    with pytest.raises(ConfigError, match="allowed values: 'uint8', 'float'"):
        load(StreamConfig, path, ["dtype=half"])
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load(StreamConfig, path, ["batch=3"])


def test_each_epoch_reads_the_shards_in_a_new_order_fixed_by_the_seed(tmp_path):
    from data.plan import Layout

    def orders(seed):
        layout = Layout(tuple([3] * 12), seed=seed, world_size=2, workers=2, batch_size=4, block=5)
        return [tuple(layout.shard_order(epoch)) for epoch in range(4)]

    assert len(set(orders(0))) == 4 and orders(0) == orders(0) and orders(0) != orders(1)
    index = uneven_shards(tmp_path, [10] * 6)
    stream = Stream(StreamConfig(index=index, batch_size=10, num_workers=0, shuffle_buffer=10))
    first, second = [[int(i) for b in batches for i in b["index"]] for batches in (take(stream, 6), take(stream, 6))]
    assert sorted(first) == sorted(second) == list(range(60)) and first != second


def test_dataloader_workers_survive_the_stop_signal_meant_for_their_rank(tmp_path):
    """scancel and pod evictions signal every process of the job; the rank checkpoints before it exits, so its
    workers must keep serving batches until then."""
    import psutil

    index = uneven_shards(tmp_path, [40, 40])
    before = set(psutil.Process().children())  # other tests may have left processes behind (resource trackers)
    stream = iter(Stream(StreamConfig(index=index, batch_size=4, num_workers=2, shuffle_buffer=8,
                                      worker_type="process")))
    next(stream)
    workers = set(psutil.Process().children()) - before
    assert len(workers) == 2
    # a worker still starting (the other one made the first batch) has not reached its init function yet
    deadline = time.monotonic() + 30
    while not all(_ignores(w.pid, signal.SIGTERM) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert all(worker.is_running() for worker in workers)
    assert len(take(stream, 10)) == 10


def _ignores(pid: int, sig: int) -> bool:
    """Whether the process ignores `sig`, from the SigIgn mask in /proc/<pid>/status."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


CRASH_WITH_OPEN_STREAMS = """
import sys
from data.stream import Stream, StreamConfig
from data.validation import ValidationStream
config = StreamConfig(index=sys.argv[1], batch_size=16, num_workers=2, shuffle_buffer=32, worker_type=sys.argv[2])
batches, validation = iter(Stream(config)), iter(ValidationStream(config))
next(batches), next(validation)
raise RuntimeError("a failed training step")
"""


@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_a_process_that_fails_with_streams_open_exits_with_its_error(tmp_path, worker_type):
    """Worker processes ignore SIGTERM, with which multiprocessing ends daemonic children at exit: left to it, a
    rank that fails would hang instead of exiting. Worker threads left running are ended by the interpreter in the
    middle of their work, which aborted the process in about one exit in four (a torch call cut short): the
    script runs four times. The streams stop their workers themselves."""
    index, _ = jpeg_shard(tmp_path / "j", [(64, 64)] * 200)
    for _ in range(4 if worker_type == "thread" else 1):
        done = subprocess.run([sys.executable, "-c", CRASH_WITH_OPEN_STREAMS, index, worker_type],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.rstrip().endswith("RuntimeError: a failed training step")


def test_thread_workers_give_the_batches_of_worker_processes_and_stop_when_closed(tmp_path):
    index = uneven_shards(tmp_path, [13, 40, 9, 41])
    config = dict(index=index, batch_size=4, num_workers=2, shuffle_buffer=10, seed=1)
    processes = Stream(StreamConfig(**config, worker_type="process"), 1, 2)
    threads = Stream(StreamConfig(**config, worker_type="thread"), 1, 2)
    total = 2 * threads.batches_per_round + 1  # into the third round
    batches = iter(threads)
    for a, b in zip(take(processes, total), [next(batches) for _ in range(total)]):
        assert all(torch.equal(a[k], b[k]) for k in ("x", "label", "index"))
    assert threads.state_dict() == processes.state_dict()
    assert sum(t.name.startswith("stream-worker") for t in threading.enumerate()) == 2
    batches.close()
    assert not any(t.name.startswith("stream-worker") for t in threading.enumerate())
