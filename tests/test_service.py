"""The evaluation service against real stores: leases, exactly-once results, crashes, damaged checkpoints."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from eval import lease
from evalruns import make_run, rewrite_manifest, tamper
from launching import ROOT, environment
from s3server import BUCKET, free_port, s3_endpoint  # noqa: F401 (fixture)
from trainer import checkpoint
from trainer.store import open_store

RUN = "demo"


def service(store_uri, *args, endpoint=None, wait=True, timeout=240):
    """`elbodiff eval-service` in its own process; returns (exit code, events, stderr) or the Popen."""
    argv = [sys.executable, "-m", "launch.cli", "eval-service", "--store", store_uri, *args]
    if endpoint:
        argv += ["--endpoint-url", endpoint]
    proc = subprocess.Popen(argv, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, events(out), err


def events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def read_until(proc, kind: str, timeout: float = 120) -> list[dict]:
    """Events of a running worker up to and including the first one of `kind`."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(json.loads(line))
        if seen[-1]["event"] == kind:
            return seen
    raise AssertionError(f"no {kind!r} event; saw {seen}; stderr: {proc.stderr.read()[-3000:]}")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return open_store(f"s3://{BUCKET}/race-{time.monotonic_ns()}", endpoint_url=endpoint)


def test_a_race_on_one_expired_lease_has_exactly_one_winner(store):
    item = f"{RUN}/evals/000000001/fid50k"
    first = lease.acquire(store, item, "crashed", seconds=0.01)
    assert first is not None and first.generation == 0
    time.sleep(0.05)  # the holder died: its lease expires
    ready, won = threading.Barrier(8), []

    def contender(i):
        ready.wait()
        held = lease.acquire(store, item, f"worker-{i}", seconds=60)
        if held is not None:
            won.append(held)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and won[0].generation == 1
    assert lease.read(store, item)["worker"] == won[0].worker
    # the crashed holder, had it come back, finds it lost the item
    assert not lease.renew(store, first)
    assert lease.renew(store, won[0])
    assert lease.acquire(store, item, "late", seconds=60) is None  # a live lease is never taken


def test_a_released_lease_is_taken_at_once_and_cleared_when_done(tmp_path):
    store = open_store(str(tmp_path))
    item = f"{RUN}/evals/000000001/bpd"
    held = lease.acquire(store, item, "a", seconds=600)
    lease.release(store, held)
    again = lease.acquire(store, item, "b", seconds=600)
    assert again is not None and again.generation == 1
    lease.clear(store, item)
    assert store.list(f"{RUN}/evals/") == []


@pytest.mark.slow
def test_three_workers_evaluate_every_checkpoint_once_and_refuse_damaged_ones(s3_endpoint, data):
    store = open_store(f"s3://{BUCKET}/service", endpoint_url=s3_endpoint)
    make_run(store, RUN, range(1, 25))
    checkpoint.read_manifest(store, RUN, 21)
    store.delete(checkpoint.checkpoint_prefix(RUN, 21) + checkpoint.MANIFEST)  # never complete
    tamper(store, checkpoint.checkpoint_prefix(RUN, 22) + "ema-power-0.050.safetensors")
    rewrite_manifest(store, RUN, 23, lambda m: [m["files"].pop(k) for k in list(m["files"]) if k.startswith("ema-")])
    rewrite_manifest(store, RUN, 24, lambda m: m["files"].update({"../other-run/x": m["files"]["attempt"]}))
    args = ["--metrics", "bpd", "--val", str(data), "--batch-size", "32", "--once"]
    procs = [service(store.uri, *args, endpoint=s3_endpoint, wait=False) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    seen = [e for out, _ in outputs for e in events(out)]
    done = sorted(e["step"] for e in seen if e["event"] == "done")
    assert done == list(range(1, 21))  # each good checkpoint exactly once, over all workers
    assert len({e["worker"] for e in seen if e["event"] == "done"}) >= 2  # the work was shared
    bad = {e["step"]: e for e in seen if e["event"] == "error"}
    assert sorted(bad) == [22, 23, 24] and all(e["status"] == "bad_checkpoint" for e in bad.values())
    assert "ema-power-0.050.safetensors does not match" in bad[22]["error"]
    assert "safetensors" in bad[23]["error"] and "../other-run/x" in bad[24]["error"]
    assert 21 not in {e["step"] for e in seen}
    results = [k for k in store.list(f"{RUN}/evals/") if k.endswith(".json")]
    assert len(results) == 23 and not [k for k in store.list(f"{RUN}/evals/") if ".lease." in k]
    result = json.loads(store.get(f"{RUN}/evals/000000005/bpd.json"))
    assert result["status"] == "ok" and result["unit"] == "bits/dim" and result["n"] == 96
    assert store.exists(f"{RUN}/report/index.html")
    logs = "".join(out + err for out, err in outputs)
    assert "testing" not in logs.replace("elbodiff-testing", "")  # the credentials never appear


@pytest.mark.slow
def test_a_killed_worker_item_is_finished_after_its_lease_expires_and_sigterm_releases(tmp_path, data):
    store = open_store(str(tmp_path / "store"))
    make_run(store, RUN, [1, 2])
    args = ["--run", RUN, "--metrics", "is10", "--inception", "random", "--batch-size", "5", "--lease-seconds", "3"]
    victim = service(store.uri, *args, "--once", wait=False)
    started = read_until(victim, "start")[-1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    item = f"{RUN}/evals/{started['step']:09d}/is_random_inception10"
    assert lease.read(store, item)["worker"] == started["worker"]
    code, seen, err = service(store.uri, *args, "--once")  # waits for nothing: takes what has expired
    assert code == 0, err[-3000:]
    if not [e for e in seen if e["event"] == "done" and e["step"] == started["step"]]:
        time.sleep(3)  # the dead worker's lease had not expired yet on the first look
        code, seen, err = service(store.uri, *args, "--once")
    finished = [e for e in seen if e["event"] == "done" and e["step"] == started["step"]]
    assert len(finished) == 1 and finished[0]["worker"] != started["worker"]
    assert json.loads(store.get(item + ".json"))["worker"] == finished[0]["worker"]

    # SIGTERM: the item is released (not left to expire) and the worker exits 0
    make_run(store, RUN, [3])
    worker = service(store.uri, *args, "--poll", "0.2", wait=False)
    started = read_until(worker, "start")[-1]
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err[-3000:]
    assert [e["event"] for e in events(out)][-1:] in (["skip"], ["done"])
    code, seen, err = service(store.uri, *args, "--once")
    assert code == 0 and [e["step"] for e in seen if e["event"] == "done"] == [3], (seen, err[-3000:])


def test_bad_input_is_one_line_and_changes_nothing(tmp_path, data):
    store = open_store(str(tmp_path / "store"))
    make_run(store, RUN, [1])
    port = free_port()  # nothing listens there
    code, seen, err = service(f"s3://{BUCKET}/x", "--metrics", "bpd", "--val", str(data), "--store-retries", "1",
                              endpoint=f"http://127.0.0.1:{port}")
    assert code == 2 and err.strip().splitlines()[-1].startswith("elbodiff eval-service: store s3://")
    code, _, err = service(store.uri, "--metrics", "is50k", "--inception", str(tmp_path / "none.pth"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "none.pth" in err
    code, _, err = service(store.uri, "--metrics", "fid50k", "--inception", "random", "--ref", str(tmp_path / "r.npz"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "r.npz" in err
    code, _, err = service(store.uri, "--metrics", "fid50q")
    assert code == 2 and "fid50q" in err and "Traceback" not in err
    code, _, err = service(store.uri, "--metrics", "bpd")
    assert code == 2 and "--val" in err
    assert store.list(f"{RUN}/evals/") == []


@pytest.mark.slow
def test_a_config_that_cannot_rebuild_the_network_is_an_error_result_and_the_service_goes_on(tmp_path, data):
    store = open_store(str(tmp_path / "store"))
    make_run(store, "good", [1])
    make_run(store, "broken", [1])
    cfg = store.get("broken/config.yaml").decode().replace("transformer_channels: 32", "transformer_channels: 48")
    store.put("broken/config.yaml", cfg.encode())
    code, seen, err = service(store.uri, "--metrics", "bpd", "--val", str(data), "--once")
    assert code == 0, err[-3000:]
    assert {(e["run"], e["event"]) for e in seen if e["event"] != "start"} == {("good", "done"), ("broken", "error")}
    result = json.loads(store.get("broken/evals/000000001/bpd.json"))
    assert result["status"] == "error" and "does not rebuild the network" in result["error"]


@pytest.mark.slow
def test_fid_is_and_the_posthoc_sweep_of_a_run_with_power_ema_snapshots(tmp_path, data):
    from eval import fid, inception
    store = open_store(str(tmp_path / "store"))
    make_run(store, RUN, [4, 8])
    ref = tmp_path / "ref.npz"
    fid.save_reference(fid.ref_stats(str(data), inception.load("random"), n=16, batch_size=16), str(ref))
    code, seen, err = service(store.uri, "--metrics", "fid10,is,fid_sweep10", "--inception", "random", "--ref", str(ref),
                              "--sweep", "0.03,0.15", "--batch-size", "10", "--run", RUN, "--once")
    assert code == 0, err[-3000:]
    assert sorted((e["step"], e["metric"]) for e in seen if e["event"] == "done") == sorted(
        (s, m) for s in (4, 8) for m in ("fid_random_inception10", "is_random_inception10",
                                         "fid_sweep_random_inception10"))
    fid10 = json.loads(store.get(f"{RUN}/evals/000000008/fid_random_inception10.json"))
    assert fid10["value"] > 0 and fid10["n"] == 10 and fid10["reference"]["id"] == fid.load_reference(str(ref)).id()
    assert "fewer than the 2048 feature dimensions" in fid10["warnings"][0]
    assert set(fid10["timings"]) >= {"load", "sampling", "features", "statistics", "storage"}
    score = json.loads(store.get(f"{RUN}/evals/000000008/is_random_inception10.json"))
    assert score["value"] >= 1 and score["stderr"] >= 0
    sweep = json.loads(store.get(f"{RUN}/evals/000000008/fid_sweep_random_inception10.json"))
    assert [c["sigma_rel"] for c in sweep["curve"]] == [0.03, 0.15]
    assert sweep["best"] == min(sweep["curve"], key=lambda c: c["value"]) and sweep["value"] == sweep["best"]["value"]
    assert sweep["curve"][0]["value"] != sweep["curve"][1]["value"]  # two different synthesised networks
    page = store.get(f"{RUN}/report/index.html").decode()
    assert "fid_sweep_random_inception10" in page and "fid_random_inception10" in page
