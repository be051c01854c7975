import json
import logging

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data import demo
from data.stream import Stream
from s3server import BUCKET, s3_endpoint  # noqa: F401  (pytest fixture)
from test_checkpoint import FailingStore
from launching import DEMO, TINY
from trainer import config, metrics, train
from trainer.experiment import ExperimentConfig
from trainer.metrics import MetricsLog
from trainer.store import open_store

CPU = torch.device("cpu")
BATCH = 4  # global batch of these tests; a record every two steps


def experiment(**extra):
    overrides = ["log_every_images=8", "total_images=64", *(f"{k}={v}" for k, v in extra.items())]
    return config.load(ExperimentConfig, DEMO, overrides)


def records(store, run="demo"):
    return [json.loads(line) for line in store.get(f"{run}/logs/metrics.jsonl").decode().splitlines()]


def step(log, loss, images_seen, logsnr=(0.0,), losses=None, grad_norm=1.0):
    totals = log.logsnr_totals(torch.tensor(logsnr), torch.tensor(losses if losses is not None else [loss]))
    log.step(loss, totals, grad_norm, 1e-3, images_seen, BATCH, 0)


def test_loss_by_logsnr_is_the_mean_over_ranks_of_the_examples_in_each_bin(tmp_path):
    store, rng = open_store(str(tmp_path)), np.random.default_rng(0)
    # the demo schedule spans [-15, 15]; values outside it belong to the end bins
    logsnr = [rng.uniform(-16, 16, size=(2, 4)) for _ in range(2)]  # two steps x two ranks x 4 examples
    losses = [rng.exponential(size=(2, 4)) for _ in range(2)]
    with MetricsLog(store, experiment(), 0, True, CPU) as log:
        for s in range(2):
            per_rank = [log.logsnr_totals(torch.tensor(logsnr[s][r]), torch.tensor(losses[s][r])) for r in range(2)]
            log.step(float(losses[s].mean()), per_rank[0] + per_rank[1], 1.0, 1e-3, (s + 1) * BATCH, BATCH, 0)
    (record,) = records(store)
    assert record["logsnr_edges"] == [-15.0, -11.25, -7.5, -3.75, 0.0, 3.75, 7.5, 11.25, 15.0]
    index = np.clip(np.digitize(np.ravel(logsnr), record["logsnr_edges"]) - 1, 0, 7)
    for b in range(8):
        inside = np.ravel(losses)[index == b]
        expected = inside.mean() if inside.size else None
        assert record["loss_by_logsnr"][b] == pytest.approx(expected), b
    assert record["loss"] == pytest.approx(np.mean(losses))


def test_skipped_steps_are_left_out_of_every_mean_and_empty_bins_are_null(tmp_path):
    store = open_store(str(tmp_path))
    with MetricsLog(store, experiment(), 0, True, CPU) as log:
        step(log, 2.0, 4, logsnr=[-14.0], grad_norm=3.0)
        step(log, None, 8, logsnr=[14.0], losses=[float("nan")], grad_norm=float("nan"))
    (record,) = records(store)
    assert (record["loss"], record["grad_norm"]) == (2.0, 3.0)
    assert record["loss_by_logsnr"] == [2.0] + [None] * 7


def test_a_loss_far_above_the_recent_median_is_warned_and_counted(tmp_path, caplog):
    store = open_store(str(tmp_path))
    calm = metrics.SPIKE_HISTORY // 4  # the first steps that may be compared with a median
    with caplog.at_level(logging.WARNING, logger="trainer.metrics"), \
            MetricsLog(store, experiment(log_every_images=BATCH * (calm + 2)), 0, True, CPU) as log:
        for s in range(calm):
            step(log, 1.0 + 0.01 * s, (s + 1) * BATCH)
        step(log, 3.5, (calm + 1) * BATCH)  # under SPIKE_FACTOR x the median: noise, not a spike
        step(log, 5.0, (calm + 2) * BATCH)
    spikes = [r for r in caplog.records if "loss spike" in r.message]
    assert len(spikes) == 1 and f"at {(calm + 2) * BATCH} images seen" in spikes[0].message
    assert records(store)[-1]["loss_spikes"] == 1


def test_peak_memory_on_cpu_is_the_kernels_high_water_mark_of_the_resident_set():
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    assert metrics.peak_memory_mib(CPU) == pytest.approx(int(status["VmHWM"].split()[0]) / 1024, rel=0.01)


def test_only_rank_0_writes_and_shows_a_progress_bar_counting_images(tmp_path):
    store = open_store(str(tmp_path))
    with MetricsLog(store, experiment(), 16, False, CPU) as other, \
            MetricsLog(store, experiment(), 16, True, CPU) as zero:
        for log in (other, zero):
            step(log, 1.0, 20)
            step(log, 1.0, 24)
        assert other.bar.disable and not zero.bar.disable
        assert zero.bar.n == 24 and zero.bar.total == 64
    assert [r["images_seen"] for r in records(store)] == [24]


def test_resumed_log_drops_records_past_the_checkpoint(tmp_path):
    store = open_store(str(tmp_path))
    with MetricsLog(store, experiment(), 0, True, CPU) as log:
        for s in range(1, 5):
            step(log, float(s), s * BATCH)
    with MetricsLog(store, experiment(), 8, True, CPU) as log:
        step(log, 7.0, 12)
        step(log, 7.0, 16)
    assert [(r["images_seen"], r["loss"]) for r in records(store)] == [(8, 1.5), (16, 7.0)]


def scalars(directory, tag="loss"):
    events = EventAccumulator(str(directory))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_scalars_go_to_the_run_folder_of_a_local_store(tmp_path):
    store = open_store(str(tmp_path))
    with MetricsLog(store, experiment(), 0, True, CPU) as log:
        for s in range(1, 5):
            step(log, float(s), s * BATCH, logsnr=[1.0])
    assert scalars(tmp_path / "demo" / "tensorboard") == [(8, 1.5), (16, 3.5)]
    assert scalars(tmp_path / "demo" / "tensorboard", "loss_by_logsnr/from_0") == [(8, 1.5), (16, 3.5)]


def test_tensorboard_events_are_uploaded_to_s3_at_every_interval(tmp_path, s3_endpoint):  # noqa: F811
    store = open_store(f"s3://{BUCKET}/metrics", endpoint_url=s3_endpoint)
    with MetricsLog(store, experiment(), 0, True, CPU) as log:
        step(log, 1.0, 4)
        step(log, 2.0, 8)
        (key,) = store.list("demo/tensorboard/")  # uploaded before the run ends
        store.download(key, tmp_path / key.split("/")[-1])
        assert scalars(tmp_path) == [(8, 1.5)]
    assert records(store)[0]["loss"] == 1.5


def test_best_effort_backs_off_1_2_4_seconds_and_resets_after_a_success(caplog):
    now, calls = [0.0], []

    def write():
        calls.append(now[0])
        if len(calls) <= 3:
            raise OSError(28, "No space left on device")

    upload = metrics.BestEffort("metrics.jsonl", clock=lambda: now[0])
    for t in [0, 0.5, 1, 2, 2.9, 3, 6.9, 7, 7.1]:
        now[0] = t
        upload(write)
    assert calls == [0, 1, 3, 7, 7.1]  # failures at 0, 1 and 3 back off 1, 2 and 4 s; the 4th write succeeds
    assert upload.failures == 0
    assert "could not write metrics.jsonl: [Errno 28] No space left on device; training goes on" in caplog.text
    assert "metrics.jsonl written again after 3 failed write(s)" in caplog.text
    now[0] = 7.2
    assert upload(lambda: (_ for _ in ()).throw(OSError(5, "EIO"))) is False
    assert upload(write, force=True) is True  # force: the run's last write, whatever the backoff


def test_metrics_and_tensorboard_writes_that_fail_are_logged_and_the_last_write_carries_every_record(tmp_path,
                                                                                                   caplog):
    full = [True]  # the disk, until it is cleared below
    store = FailingStore(open_store(str(tmp_path)),
                         lambda key: full[0] and key.startswith(("demo/logs/", "demo/tensorboard/")))
    with caplog.at_level(logging.WARNING), MetricsLog(store, experiment(), 0, True, CPU) as log:
        for s in range(1, 9):
            step(log, float(s), s * BATCH)
        assert not store.exists("demo/logs/metrics.jsonl") and store.refused
        full[0] = False
    assert [r["images_seen"] for r in records(store)] == [8, 16, 24, 32]
    assert scalars(tmp_path / "demo" / "tensorboard") == [(8, 1.5), (16, 3.5), (24, 5.5), (32, 7.5)]
    assert "could not write demo/logs/metrics.jsonl" in caplog.text


def test_train_step_returns_each_examples_logsnr_and_loss(tmp_path):
    data = tmp_path / "data"
    demo.write(str(data), num_images=8, samples_per_shard=8)
    cfg = config.load(ExperimentConfig, DEMO, [*TINY, f"data.index={data}", "sample_every_images=0"])
    p = train.build_parts(cfg, 0, 1, CPU)
    t, _ = train.draw_noise(cfg, 0, 0, 4, (4, 3, 32, 32), CPU)
    loss, grad_norm, logsnr, losses = train.train_step(p, [next(iter(Stream(cfg.data, 0, 1)))], 0)
    assert torch.isfinite(grad_norm) and losses.shape == logsnr.shape == (4,)
    assert torch.equal(loss, losses.mean())
    # the adaptive sampler starts uniform on the schedule's range, logsnr decreasing in t
    torch.testing.assert_close(logsnr, 15.0 - 30.0 * t)
