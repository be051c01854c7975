"""Hard crashes of a 2-rank run (kill -9, no chance to checkpoint) and a run whose checkpoints live in S3.

Five launches share the tests below (one to two minutes on 2 cores): `full`, uninterrupted; `crash`, the same run killed on rank 1
at a random step, then restarted and killed on rank 0 while it writes a checkpoint, then restarted to the end;
`s3`, 8 steps into a moto S3 server, then 8 more resumed from its checkpoint."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from s3server import BUCKET, s3_endpoint  # noqa: F401  (pytest fixture)
from launching import GLOBAL_BATCH, ROOT, environment, train_argv
from test_train import settings
from trainer import checkpoint
from trainer.store import open_store

STEPS = 32  # checkpoints every 8 steps (test_train's CHECKPOINT_EVERY)
CHECKPOINT_STEPS = 8
LOSS_KEYS = ("images_seen", "loss", "grad_norm", "lr", "loss_by_logsnr")


def launch(args, log, env=None):
    """torchrun with 2 CPU ranks, started in the background; output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", *train_argv(*args)], cwd=ROOT, env=environment(**(env or {})), stdout=f,
                                stderr=subprocess.STDOUT)


def finish(proc, log, timeout=120):
    return proc.wait(timeout=timeout), Path(log).read_text()


def worker_pid(launcher: subprocess.Popen, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker `rank`, found among its children by the RANK in their environment."""
    while time.monotonic() < deadline and launcher.poll() is None:
        try:
            children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
            for pid in children:
                if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return int(pid)
        except (FileNotFoundError, ProcessLookupError):  # a child that just exited (or is exiting)
            pass
        time.sleep(0.01)
    raise AssertionError(f"torchrun started no rank {rank} worker")


def records(store: Path) -> list[dict]:
    path = store / "demo" / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kill_at_step(launcher, rank, store, step, deadline):
    """kill -9 rank `rank` once rank 0 has logged `step` (one record per step)."""
    pid = worker_pid(launcher, rank, deadline)
    while time.monotonic() < deadline and launcher.poll() is None:
        logged = records(store)
        if logged and logged[-1]["step"] >= step:
            os.kill(pid, signal.SIGKILL)
            return logged[-1]["step"]
        time.sleep(0.005)
    raise AssertionError(f"the run ended or stalled before step {step}")


def kill_while_writing_checkpoint(launcher, rank, store, started, deadline):
    """kill -9 rank `rank` when a checkpoint directory of this launch has its attempt token (step 1 of the protocol,
    trainer/checkpoint.py) but no manifest yet. Returns that checkpoint's step."""
    pid = worker_pid(launcher, rank, deadline)
    base = store / "demo" / "checkpoints"
    while time.monotonic() < deadline and launcher.poll() is None:
        for attempt in base.glob("*/attempt"):
            try:
                fresh = attempt.stat().st_mtime >= started  # not a leftover of the previous launch
            except FileNotFoundError:  # retention or a new attempt removed it meanwhile
                continue
            if fresh and not (attempt.parent / checkpoint.MANIFEST).exists():
                os.kill(pid, signal.SIGKILL)
                return int(attempt.parent.name)
        time.sleep(0.001)
    raise AssertionError("no checkpoint of this launch was seen half-written")


def resumed_from(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from checkpoint (\d+)", log)]


@pytest.fixture(scope="module")
def crash(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    full, store = tmp / "full", tmp / "crash"
    args = [*settings(data, full, total=STEPS * GLOBAL_BATCH, sample_every=0)]
    code, log = finish(launch(args, tmp / "full.log"), tmp / "full.log")
    assert code == 0, log[-3000:]

    args = [*settings(data, store, total=STEPS * GLOBAL_BATCH, sample_every=0)]
    seed = random.randrange(2**32)
    kill_step = random.Random(seed).randrange(CHECKPOINT_STEPS + 1, STEPS - 2)
    proc = launch(args, tmp / "killed.log")
    killed_at = kill_at_step(proc, 1, store, kill_step, time.monotonic() + 120)
    killed = finish(proc, tmp / "killed.log")
    complete_after_kill = max(int(m.parent.name) for m in (store / "demo" / "checkpoints").glob("*/manifest.json"))

    started = time.time()
    proc = launch(args, tmp / "half.log")
    half_step = kill_while_writing_checkpoint(proc, 0, store, started, time.monotonic() + 120)
    half = finish(proc, tmp / "half.log")
    half_files = sorted(os.listdir(store / "demo" / "checkpoints" / f"{half_step:09d}"))

    resumed = finish(launch(args, tmp / "resumed.log"), tmp / "resumed.log")
    return {"full": full, "store": store, "seed": seed, "killed_at": killed_at, "killed": killed,
            "complete_after_kill": complete_after_kill, "half_step": half_step, "half": half,
            "half_files": half_files, "resumed": resumed}


@pytest.mark.slow
def test_kill_9_of_one_rank_ends_the_job_and_the_restart_resumes_from_the_last_complete_checkpoint(crash):
    code, log = crash["killed"]
    why = f"seed {crash['seed']}, rank 1 killed at step {crash['killed_at']}\n{log[-3000:]}"
    assert code != 0, why
    # a checkpoint existed, and the killed run had trained past it: the restart must repeat steps
    assert 0 < crash["complete_after_kill"] < crash["killed_at"], why
    assert resumed_from(crash["half"][1]) == [crash["complete_after_kill"]], crash["half"][1][-3000:]


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_leaves_no_manifest_and_the_restart_skips_it(crash):
    code, log = crash["half"]
    assert code != 0, log[-3000:]
    step = crash["half_step"]
    assert step == crash["complete_after_kill"] + CHECKPOINT_STEPS, log[-3000:]
    assert checkpoint.ATTEMPT in crash["half_files"] and checkpoint.MANIFEST not in crash["half_files"]
    code, log = crash["resumed"]
    assert code == 0, log[-3000:]
    # the restart ignored the half-written checkpoint and went back to the one before it
    assert resumed_from(log) == [crash["complete_after_kill"]], log[-3000:]
    s = open_store(str(crash["store"]))
    assert checkpoint.latest_complete(s, "demo") == STEPS and checkpoint.verify(s, "demo", step)


@pytest.mark.slow
def test_losses_after_two_kills_equal_the_uninterrupted_run(crash):
    full, crashed = records(crash["full"]), records(crash["store"])
    assert [r["step"] for r in full] == list(range(1, STEPS + 1))
    assert [[r[k] for k in LOSS_KEYS] for r in crashed] == [[r[k] for k in LOSS_KEYS] for r in full], \
        f"seed {crash['seed']}"


@pytest.mark.slow
def test_checkpoints_round_trip_through_s3_and_the_resumed_run_repeats_the_losses(
        crash, data, s3_endpoint, tmp_path):  # noqa: F811
    env = {"AWS_ENDPOINT_URL": s3_endpoint}
    store = f"s3://{BUCKET}/crash"
    # a request to moto costs milliseconds and the log is rewritten at every step: two checkpoints' worth of steps
    for steps, name in ((CHECKPOINT_STEPS, "first"), (2 * CHECKPOINT_STEPS, "second")):
        args = settings(data, store, total=steps * GLOBAL_BATCH, sample_every=0)
        code, log = finish(launch(args, tmp_path / f"{name}.log", env), tmp_path / f"{name}.log")
        assert code == 0, log[-3000:]
    assert resumed_from(log) == [CHECKPOINT_STEPS]
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=BUCKET, Prefix="crash/demo/checkpoints/")["Contents"]]
    assert f"crash/demo/checkpoints/{CHECKPOINT_STEPS:09d}/{checkpoint.MANIFEST}" in keys
    s = open_store(store, endpoint_url=s3_endpoint)
    assert checkpoint.verify(s, "demo", CHECKPOINT_STEPS) and checkpoint.verify(s, "demo", 2 * CHECKPOINT_STEPS)
    logged = [json.loads(line) for line in s.get("demo/logs/metrics.jsonl").decode().splitlines()]
    assert [[r[k] for k in LOSS_KEYS] for r in logged] == \
           [[r[k] for k in LOSS_KEYS] for r in records(crash["full"])[:2 * CHECKPOINT_STEPS]]
