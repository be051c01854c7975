import errno
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.cli import exit_now
from s3server import BUCKET, free_port, s3_endpoint  # noqa: F401  (fixture)
from trainer import checkpoint
from trainer.checkpoint import (CheckpointConfig, all_steps, apply_retention, complete_steps, latest_complete,
                                load_ema, load_rank, read_manifest, restore_rng, save, synthesize_ema, verify)
from trainer.config import ConfigError, from_dict
from trainer.ema import EMA, EMAConfig, gather_full, power_name
from trainer.store import open_store

RUN = "run"


def no_barrier():
    pass


def small_state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(5, 3, generator=g), "b": torch.randn(5, generator=g)},
            "optimizer": {"step": torch.tensor(seed), "exp_avg": [torch.randn(4, generator=g)]}, "seed": seed}


def save_one(store, step, **kw):
    kw.setdefault("train_state", small_state(step))
    kw.setdefault("data_state", {"workers": [{"order": [2, 0, 1], "consumed": step}]})
    return save(store, RUN, step, images_seen=64 * step, rank=0, world_size=1, barrier=no_barrier, **kw)


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# ---- two real ranks ------------------------------------------------------------------------------------------

def _two_rank_worker(rank, world_size, port, local_root, s3_uri, endpoint):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)  # the same on both ranks, as under DDP
        names = [n for n, _ in net.named_parameters()]
        ema = EMA(EMAConfig(sigma_rels=(0.1,), decays=(0.9,)), list(net.parameters()))
        for _ in range(3):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.1)
            ema.update(list(net.parameters()))
        full = ema.consolidate(names, gather_full(list(net.parameters())))
        train_state = {**small_state(rank), "ema": ema.state_dict()}
        data_state = {"rank": rank, "workers": [{"order": [3, 1, 2], "consumed": 17 + rank}]}
        for store in (open_store(local_root), open_store(s3_uri, endpoint_url=endpoint)):
            ok = save(store, RUN, 100, images_seen=6400, rank=rank, world_size=world_size, barrier=dist.barrier,
                      train_state=train_state, data_state=data_state, ema=full if rank == 0 else {},
                      ema_metadata={n: ema.metadata(n) for n in full})
            assert ok, (rank, store.uri)
            dist.barrier()  # rank 0 has written the manifest
            manifest = read_manifest(store, RUN, 100)
            expected = {"attempt", "ema-power-0.100.safetensors", "ema-decay-0.9.safetensors"}
            for r in range(world_size):
                expected |= {f"rank-{r:05d}.pt", f"rng-{r:05d}.pt", f"data-{r:05d}.json", f"files-{r:05d}.json"}
            assert set(manifest["files"]) == expected
            assert (manifest["step"], manifest["images_seen"], manifest["world_size"]) == (100, 6400, 2)
            prefix = checkpoint.checkpoint_prefix(RUN, 100)
            for name, entry in manifest["files"].items():
                raw = store.get(prefix + name)
                assert entry == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
            assert store.list(prefix) == sorted(prefix + n for n in expected | {"manifest.json"})
            assert store.get(f"{RUN}/checkpoints/LATEST") == b"000000100\n"
            assert latest_complete(store, RUN) == 100
            resumed = load_rank(store, RUN, 100, rank, world_size)
            assert_same(resumed.train_state, train_state)
            assert resumed.data_state == data_state and resumed.images_seen == 6400
            restored = EMA(EMAConfig(sigma_rels=(0.1,), decays=(0.9,)), list(net.parameters()))
            restored.load_state_dict(resumed.train_state["ema"])
            assert_same(restored.state_dict(), ema.state_dict())
            plain = torch.nn.Linear(3, 2)
            plain.load_state_dict(load_ema(store, RUN, 100, "power-0.100"), strict=True)
            assert_same(dict(plain.state_dict()), full["power-0.100"])
            with pytest.raises(ValueError, match="different world size"):
                load_rank(store, RUN, 100, 0, 4)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_now(0)  # passed: skip the interpreter teardown that can abort a gloo process (launch/cli.py)


@pytest.mark.slow  # two spawned processes: about 10 s idle, more on a loaded machine
def test_two_ranks_write_a_verified_checkpoint_to_local_and_s3_stores(tmp_path, s3_endpoint):
    s3_uri = f"s3://{BUCKET}/ckpt-{uuid.uuid4().hex}"
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(tmp_path / "root"), s3_uri, s3_endpoint), nprocs=2)


# ---- one rank ------------------------------------------------------------------------------------------------

def test_round_trip_restores_state_rng_and_data_position(tmp_path):
    store = open_store(str(tmp_path))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert save_one(store, 7, data_state={"workers": [{"order": [1, 0], "consumed": 5}]})
    after = (random.random(), np.random.rand(), torch.rand(3))
    resumed = load_rank(store, RUN, 7, 0, 1)
    assert_same(resumed.train_state, small_state(7))
    assert resumed.data_state == {"workers": [{"order": [1, 0], "consumed": 5}]} and resumed.step == 7
    restore_rng(resumed.rng)
    assert_same((random.random(), np.random.rand(), torch.rand(3)), after)


def test_ema_safetensors_file_loads_into_a_plain_module(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    ema = EMA(EMAConfig(sigma_rels=(0.05,)), list(net.parameters()))
    ema.update(list(net.parameters()))
    full = ema.consolidate([n for n, _ in net.named_parameters()], gather_full(list(net.parameters())))
    store = open_store(str(tmp_path))
    assert save_one(store, 1, ema=full, ema_metadata={n: ema.metadata(n) for n in full})
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    fresh.load_state_dict(load_ema(store, RUN, 1, power_name(0.05)), strict=True)
    for p, q in zip(fresh.parameters(), net.parameters()):
        assert torch.equal(p, q)
    meta = checkpoint.ema_metadata(store, RUN, 1, power_name(0.05))
    assert meta["kind"] == "power" and meta["t"] == "1" and meta["step"] == "1" and meta["images_seen"] == "64"


def test_corrupted_byte_fails_verification_and_resume_takes_the_previous_checkpoint(tmp_path):
    store = open_store(str(tmp_path))
    assert save_one(store, 1) and save_one(store, 2)
    assert latest_complete(store, RUN) == 2
    path = tmp_path / RUN / "checkpoints" / "000000002" / "rank-00000.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert not verify(store, RUN, 2) and verify(store, RUN, 1)
    with pytest.raises(ValueError, match="does not match"):
        load_rank(store, RUN, 2, 0, 1)
    assert latest_complete(store, RUN) == 1


def test_a_corrupted_checkpoint_is_set_aside_so_that_its_step_is_written_again_and_retention_skips_it(tmp_path):
    store = open_store(str(tmp_path))
    for step in (1, 2, 3):
        assert save_one(store, step)
    prefix = f"{RUN}/checkpoints/000000003/"
    manifest = store.get(prefix + "manifest.json").decode()
    store.delete(prefix + "rank-00000.pt")
    assert latest_complete(store, RUN) == 2
    assert complete_steps(store, RUN) == [1, 2]
    rejected = json.loads(store.get(prefix + "manifest.json.rejected"))
    assert rejected["manifest"] == manifest
    assert rejected["reason"].startswith("FileNotFoundError") and rejected["reason"].endswith("rank-00000.pt'")
    # the resumed run writes step 3 again, and retention counts only the complete ones
    assert save_one(store, 3, cfg=CheckpointConfig(every_images=64, keep_last=2))
    assert complete_steps(store, RUN) == [2, 3] and latest_complete(store, RUN) == 3
    assert not store.exists(prefix + "manifest.json.rejected")  # cleared with the old attempt's leftovers


class FailingStore:
    """A store whose puts of matching keys fail like a full disk (ENOSPC, as a full tmpfs raises it); `refused`
    counts them."""

    def __init__(self, inner, fails):
        self.inner, self.fails, self.refused = inner, fails, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data):
        if self.fails(key):
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device", key)
        self.inner.put(key, data)


@pytest.mark.parametrize("failing", ["rank-00000.pt", "ema-", "files-00000.json", "manifest.json", "attempt", ""])
def test_failed_write_abandons_the_checkpoint_without_raising(tmp_path, caplog, failing):
    store = open_store(str(tmp_path))
    assert save_one(store, 1)
    broken = FailingStore(store, lambda key: failing in key)
    with caplog.at_level(logging.ERROR, logger="trainer.checkpoint"):
        ok = save_one(broken, 2, ema={"decay-0.9": {"w": torch.ones(2)}})
    assert ok is False
    assert "No space left on device" in caplog.text and "abandoned" in caplog.text
    assert not store.exists(f"{RUN}/checkpoints/000000002/manifest.json")
    assert store.get(f"{RUN}/checkpoints/LATEST") == b"000000001\n"
    assert latest_complete(store, RUN) == 1
    assert save_one(store, 2)  # the next attempt at the same step clears the leftovers and succeeds
    assert latest_complete(store, RUN) == 2


def test_complete_checkpoint_is_never_rewritten(tmp_path, caplog):
    store = open_store(str(tmp_path))
    assert save_one(store, 1)
    before = {k: store.get(k) for k in store.list()}
    with caplog.at_level(logging.ERROR, logger="trainer.checkpoint"):
        assert save_one(store, 1, train_state=small_state(99)) is False
    assert "already complete" in caplog.text
    assert {k: store.get(k) for k in store.list()} == before


def test_retention_keeps_last_n_and_first_after_every_m_images(tmp_path):
    store = open_store(str(tmp_path))
    cfg = from_dict(CheckpointConfig, {"every_images": 64, "keep_last": 2, "keep_every_images": 256})
    for step in (1, 2, 4, 5, 6, 7, 8, 9, 10):  # images seen = 64 * step
        if step == 4:
            store.put(f"{RUN}/checkpoints/000000003/rank-00000.pt", b"abandoned attempt")
        assert save_one(store, step, cfg=cfg)
    store.put(f"{RUN}/checkpoints/000000011/rank-00000.pt", b"attempt in progress")
    apply_retention(store, RUN, cfg)
    # 4 (256 images) and 8 (512) open their windows of 256 images; 9 and 10 are the last two; 11 is newer than
    # every complete checkpoint and may still be in progress.
    assert complete_steps(store, RUN) == [4, 8, 9, 10]
    assert all_steps(store, RUN) == [4, 8, 9, 10, 11]
    assert latest_complete(store, RUN) == 10

    only_last = CheckpointConfig(every_images=64, keep_last=1)
    assert apply_retention(store, RUN, only_last) == [4, 8, 9]
    assert complete_steps(store, RUN) == [10]


def test_checkpoint_config_is_validated():
    with pytest.raises(ConfigError, match="keep_last"):
        from_dict(CheckpointConfig, {"keep_last": 0})
    with pytest.raises(ConfigError, match="multiple of every_images"):
        from_dict(CheckpointConfig, {"every_images": 100, "keep_every_images": 250})


def test_posthoc_ema_synthesised_from_checkpoints_matches_a_tracked_one(tmp_path, generator):
    store = open_store(str(tmp_path))
    steps, target = 1000, 0.07
    ema = EMA(EMAConfig(sigma_rels=(0.05, 0.10, target)), [torch.zeros(16)])
    freq, phase = torch.rand(16, generator=generator) * 3, torch.rand(16, generator=generator) * 6
    saved = [power_name(0.05), power_name(0.10)]
    for t in range(1, steps + 1):
        u = t / steps
        ema.update([torch.sin(freq * u * 6 + phase) + 2 * u + 0.05 * torch.randn(16, generator=generator)])
        if t % 100 == 0:
            assert save_one(store, t, ema={n: {"w": ema.averages[n][0]} for n in saved},
                            ema_metadata={n: ema.metadata(n) for n in saved})
    rebuilt = synthesize_ema(store, RUN, target)["w"]
    direct = ema.averages[power_name(target)][0]
    spread = (ema.averages[saved[0]][0] - ema.averages[saved[1]][0]).abs().max()
    assert (rebuilt - direct).abs().max() < 0.01 * spread


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from trainer import checkpoint
    from trainer.store import open_store

    class Slow:
        def __init__(self, inner):
            self.inner = inner
        def __getattr__(self, name):
            return getattr(self.inner, name)
        def put(self, key, data):
            self.inner.put(key, data)
            print("put", key, flush=True)
            time.sleep(0.5)

    store = open_store(sys.argv[1])
    state = {"w": torch.arange(10.0)}
    kw = dict(rank=0, world_size=1, barrier=lambda: None, train_state=state, data_state={})
    assert checkpoint.save(store, "run", 1, images_seen=64, **kw)
    checkpoint.save(Slow(store), "run", 2, images_seen=128, **kw)
""")


def test_writer_killed_mid_checkpoint_leaves_it_ignored(tmp_path):
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "put run/checkpoints/000000002/rank-00000.pt":
                break
        else:
            pytest.fail(f"the writer exited early with {proc.wait()}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    store = open_store(str(root))
    assert all_steps(store, RUN) == [1, 2] and complete_steps(store, RUN) == [1]
    assert store.exists(f"{RUN}/checkpoints/000000002/rank-00000.pt")
    assert latest_complete(store, RUN) == 1
    assert json.loads(store.get(f"{RUN}/checkpoints/000000001/manifest.json"))["step"] == 1


def flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def test_at_resume_each_rank_checks_its_own_files_and_rank_0_also_the_shared_ones(tmp_path):
    import threading

    store, barrier, written = open_store(str(tmp_path)), threading.Barrier(2), {}

    def write(rank):  # two ranks of one checkpoint, meeting at a real barrier
        written[rank] = save(store, RUN, 1, images_seen=64, rank=rank, world_size=2, barrier=barrier.wait,
                             train_state=small_state(rank), data_state={"consumed": rank},
                             ema={"e": {"w": torch.zeros(2)}} if rank == 0 else {})
    threads = [threading.Thread(target=write, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert written == {0: True, 1: True} and [checkpoint.rank_check(store, RUN, 1, r) for r in (0, 1)] == [None, None]
    folder = tmp_path / RUN / "checkpoints" / "000000001"
    flip_a_byte(folder / "rank-00001.pt")
    assert checkpoint.rank_check(store, RUN, 1, 0) is None  # rank 0 does not read rank 1's files
    assert checkpoint.rank_check(store, RUN, 1, 1) == ("corrupted", "rank-00001.pt does not match its manifest")
    flip_a_byte(folder / "ema-e.safetensors")
    assert checkpoint.rank_check(store, RUN, 1, 0) == ("corrupted", "ema-e.safetensors does not match its manifest")
    broken = FailingStore(store, lambda key: False)
    broken.open = lambda key: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error", key))
    assert checkpoint.rank_check(broken, RUN, 1, 0)[0] == "unreadable"
    checkpoint.set_aside(store, RUN, 1, "rank-00001.pt does not match its manifest")
    assert complete_steps(store, RUN) == [] and store.exists(f"{RUN}/checkpoints/000000001/manifest.json.rejected")
