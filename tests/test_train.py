import dataclasses
import io
import math
import os
import platform
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from data import demo
from data.stream import Stream
from launch.cli import main as cli
from launching import DEMO, GLOBAL_BATCH, TINY, metrics, stop_after_first_record, torchrun, train_argv
from test_checkpoint import FailingStore
from trainer import checkpoint, config, train
from trainer.config import ConfigError
from trainer.experiment import ExperimentConfig
from trainer.store import open_store

CPU = torch.device("cpu")
STEPS, CHECKPOINT_EVERY = 24, 64  # steps of the run; images between checkpoints


def settings(data, store, total=STEPS * GLOBAL_BATCH, sample_every=STEPS * GLOBAL_BATCH):
    return [*TINY, f"checkpoint.every_images={CHECKPOINT_EVERY}", f"data.index={data}", f"store={store}",
            f"total_images={total}", f"sample_every_images={sample_every}"]


def final_state(store):
    s = open_store(str(store))
    return checkpoint.load_rank(s, "demo", checkpoint.latest_complete(s, "demo"), 0, 2)


def whole_batch(cfg: ExperimentConfig, world_size: int) -> ExperimentConfig:
    """`cfg` with its global batch as one batch of one process."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=cfg.global_batch(world_size)),
                               optimizer=dataclasses.replace(cfg.optimizer, accumulation=1))


def concatenated(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in ("x", "label")}


def one_process_on_the_global_batch(cfg: ExperimentConfig, steps: int) -> tuple[train.Parts, list[tuple]]:
    """The 2-rank run of `cfg` replayed in this process: each step on both ranks' micro-batches concatenated in
    rank order (rank 0's accumulation micro-batches, then rank 1's), as one batch of the global size. Nothing else
    is arranged: every example's t and eps follow from its position in the global batch. Returns the parts and
    each step's (loss, gradient norm)."""
    streams = [iter(Stream(cfg.data, rank, 2)) for rank in range(2)]
    whole = whole_batch(cfg, 2)
    p, steps_taken = train.build_parts(whole, 0, 1, torch.device("cpu")), []
    for step in range(steps):
        batches = [next(s) for s in streams for _ in range(cfg.optimizer.accumulation)]
        loss, grad_norm, _, _ = train.train_step(p, [concatenated(batches)], step * whole.global_batch(1))
        steps_taken.append((float(loss), float(grad_norm)))
    return p, steps_taken


def assert_same_training(replayed: list[tuple], store, params: dict, reference: train.Parts, what: str) -> None:
    """A 2-rank run (its metrics.jsonl and full parameters) against its replay in one process.

    The ranks sum float32 gradients in another order (per-rank means, then the all-reduce or reduce-scatter):
    every step's loss agrees to 1e-4 and its gradient norm (before clipping, the most sensitive of the three) to
    1e-3, where a wrong example or draw moves them by percents. Adam then
    divides each coordinate by its own running RMS, which turns a rounding difference in a near-zero gradient into
    a weight difference of a fraction of the learning rate, so the weights are held to lr / 10 (one step moves
    them by up to lr)."""
    logged = [(r["loss"], r["grad_norm"]) for r in metrics(store)]
    assert len(logged) == len(replayed)
    for step, ((loss, norm), (loss1, norm1)) in enumerate(zip(logged, replayed)):
        assert loss == pytest.approx(loss1, rel=1e-4) and norm == pytest.approx(norm1, rel=1e-3), f"{what} step {step}"
    for name, value in reference.module.named_parameters():
        torch.testing.assert_close(params[name], value.detach(), rtol=1e-4, atol=reference.cfg.optimizer.lr / 10,
                                   msg=f"{what} {name}")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Three 2-rank runs of the same config: `full` uninterrupted under torchrun; `stopped` as two processes started
    the way srun starts them (environment only), signalled on rank 1 after its first step; `resumed` under torchrun,
    continuing the stopped run's store to the end."""
    tmp = tmp_path_factory.mktemp("runs")
    full, split = tmp / "full", tmp / "split"
    assert torchrun(train_argv(*settings(data, full)), tmp / "full.log") == 0, (tmp / "full.log").read_text()[-3000:]

    codes = stop_after_first_record(settings(data, split, total=10**4 * GLOBAL_BATCH, sample_every=0), split,
                                    tmp / "stopped", timeout=120)
    stopped_at = metrics(split)[-1]["images_seen"]
    s = open_store(str(split))
    manifests = [checkpoint.read_manifest(s, "demo", step) for step in checkpoint.complete_steps(s, "demo")]

    assert torchrun(train_argv(*settings(data, split)), tmp / "resumed.log") == 0, (tmp / "resumed.log").read_text()[-3000:]
    return {"full": full, "split": split, "codes": codes, "stopped_at": stopped_at, "manifests": manifests,
            "tmp": tmp}


@pytest.mark.slow  # three 2-rank launches, shared by the tests below: about a minute
def test_signal_on_one_rank_checkpoints_and_every_rank_exits_with_the_requeue_code(runs):
    stopped_log = (runs["tmp"] / "stopped-1.log").read_text()
    assert runs["codes"] == [train.EXIT_REQUEUE, train.EXIT_REQUEUE], stopped_log[-3000:]
    assert 0 < runs["stopped_at"] < STEPS * GLOBAL_BATCH, "the signal must arrive mid-run for the resume test"
    assert runs["stopped_at"] == runs["manifests"][-1]["images_seen"]
    assert all(m["world_size"] == 2 for m in runs["manifests"])  # two ranks really trained one model together
    assert "stopped by SIGTERM" in stopped_log
    assert "stopped by another rank's signal" in (runs["tmp"] / "stopped-0.log").read_text()  # rank 0 agreed


@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_losses_and_weights_bitwise(runs):
    full, resumed = metrics(runs["full"]), metrics(runs["split"])
    assert [r["images_seen"] for r in full] == [GLOBAL_BATCH * (i + 1) for i in range(STEPS)]
    assert [(r["images_seen"], r["loss"], r["grad_norm"], r["lr"]) for r in resumed] == \
           [(r["images_seen"], r["loss"], r["grad_norm"], r["lr"]) for r in full]
    a, b = final_state(runs["full"]), final_state(runs["split"])
    assert a.images_seen == b.images_seen == STEPS * GLOBAL_BATCH
    for key, value in a.train_state["network"].items():
        assert torch.equal(value, b.train_state["network"][key]), key
    for name, average in a.train_state["ema"]["averages"].items():
        assert all(torch.equal(x, y) for x, y in zip(average, b.train_state["ema"]["averages"][name])), name


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process_on_the_global_batch(runs, data):
    p, replayed = one_process_on_the_global_batch(config.load(ExperimentConfig, DEMO, settings(data, runs["full"])),
                                                  STEPS)
    assert_same_training(replayed, runs["full"], final_state(runs["full"]).train_state["network"], p, "ddp")


@pytest.mark.slow
def test_sample_grid_has_one_column_per_class(runs):
    grid = Image.open(io.BytesIO((runs["full"] / "demo" / "samples" / f"{STEPS:09d}.png").read_bytes()))
    assert grid.size == (10 * 32, train.SAMPLE_ROWS * 32)
    assert (runs["full"] / "demo" / "config.yaml").exists()


def test_unknown_config_key_is_named_with_the_closest_valid_one(capsys):
    assert cli(["train", str(DEMO), "optimizer.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lrr" in err and "did you mean 'lr'" in err


def test_unreachable_store_is_reported_before_training_starts(tmp_path, data, capsys, monkeypatch):
    (tmp_path / "file").write_text("")

    def no_process_group(*args, **kwargs):
        raise AssertionError("the process group was created before the store was checked")

    monkeypatch.setattr(train, "Accelerator", no_process_group)
    assert cli(["train", str(DEMO), f"data.index={data}", f"store={tmp_path}/file/runs"]) == 2
    assert "not a writable directory" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("store=s3://", "store: store URI 's3://' names no bucket; expected s3://bucket/prefix"),
    ("store=gs://b/x", "store: store URI 'gs://b/x' has unknown scheme 'gs'; supported: /path, file:///path, "
                       "s3://bucket/prefix"),
    ("data.index={tmp}/no-shards", "data.index: no shard index at {tmp}/no-shards/index.json: write shards with "
                                   "`elbodiff shards` first"),
])
def test_a_wrong_store_uri_or_data_index_is_one_line_naming_the_key(tmp_path, data, capsys, setting, message):
    argv = ["train", str(DEMO), f"data.index={data}", f"store={tmp_path}/runs", setting.format(tmp=tmp_path)]
    assert cli(argv) == 2
    assert capsys.readouterr().err == f"elbodiff train: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "runs" / "demo").exists()  # nothing of the run was written


def test_intervals_that_are_not_whole_global_batches_are_refused(data, tmp_path):
    cfg = config.load(ExperimentConfig, DEMO, settings(data, tmp_path, total=100))
    with pytest.raises(config.ConfigError, match="total_images"):
        cfg.check_intervals(GLOBAL_BATCH)


def test_nonfinite_steps_are_skipped_then_training_stops_with_a_clear_message(data, tmp_path, monkeypatch):
    from accelerate import Accelerator

    build_parts = train.build_parts

    def poisoned(*args):
        p = build_parts(*args)
        with torch.no_grad():
            next(p.module.parameters()).fill_(float("nan"))
        return p

    monkeypatch.setattr(train, "build_parts", poisoned)
    cfg = config.load(ExperimentConfig, DEMO, [*settings(data, tmp_path), "optimizer.max_nonfinite_steps=3",
                                               "log_every_images=4"])
    with pytest.raises(FloatingPointError, match="3 steps in a row had non-finite gradients"):
        train.train(cfg, open_store(str(tmp_path)), Accelerator(cpu=True))
    logged = metrics(tmp_path)
    assert [(r["loss"], r["skipped_steps"]) for r in logged] == [(None, 1), (None, 2)]


def sigterm_at(monkeypatch, images_seen):
    """SIGTERM to this process during the step that starts at `images_seen` (as scancel would send it)."""
    step = train.train_step

    def signalled(p, batch, at):
        if at == images_seen:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(p, batch, at)

    monkeypatch.setattr(train, "train_step", signalled)


@pytest.mark.parametrize("stop", [False, True])
def test_a_run_whose_last_checkpoint_fails_exits_1_naming_the_newest_complete_one(data, tmp_path, caplog, monkeypatch,
                                                                                 stop):
    from accelerate import Accelerator

    cfg = config.load(ExperimentConfig, DEMO, settings(data, tmp_path, total=2 * CHECKPOINT_EVERY, sample_every=0))
    last = 2 * CHECKPOINT_EVERY // cfg.data.batch_size  # one process: a step is one rank's batch
    if stop:  # a stop signal after the first checkpoint: the checkpoint written for it fails
        last = CHECKPOINT_EVERY // cfg.data.batch_size + 1
        cfg.total_images = 10 * CHECKPOINT_EVERY
        sigterm_at(monkeypatch, CHECKPOINT_EVERY)
    prefix = f"demo/checkpoints/{last:09d}/"
    store = FailingStore(open_store(str(tmp_path)), lambda key: key.startswith(prefix))
    with caplog.at_level("ERROR"):
        code = train.train(cfg, store, Accelerator(cpu=True))
    assert code == train.EXIT_CHECKPOINT_FAILED == 1
    first = CHECKPOINT_EVERY // cfg.data.batch_size
    assert checkpoint.complete_steps(store, "demo") == [first]
    assert f"the newest complete checkpoint is {first:09d}" in caplog.text


def test_store_errors_on_metrics_events_and_sample_grids_do_not_stop_the_run(data, tmp_path, caplog):
    from accelerate import Accelerator

    cfg = config.load(ExperimentConfig, DEMO, settings(data, tmp_path, total=2 * CHECKPOINT_EVERY,
                                                       sample_every=CHECKPOINT_EVERY))
    store = FailingStore(open_store(str(tmp_path)),
                         lambda key: key.startswith(("demo/logs/", "demo/tensorboard/", "demo/samples/")))
    with caplog.at_level("WARNING"):
        assert train.train(cfg, store, Accelerator(cpu=True)) == 0
    steps = [CHECKPOINT_EVERY // cfg.data.batch_size, 2 * CHECKPOINT_EVERY // cfg.data.batch_size]
    assert checkpoint.complete_steps(store, "demo") == steps
    assert store.list("demo/logs/") == store.list("demo/samples/") == [] and store.refused >= 3
    assert "could not write demo/logs/metrics.jsonl: [Errno 28] No space left on device" in caplog.text
    assert "could not write a sample grid: [Errno 28]" in caplog.text


def test_learning_rate_schedules_follow_their_closed_forms_after_the_warmup():
    from trainer.experiment import OptimizerConfig

    def lr(images, **kw):
        return train.learning_rate(OptimizerConfig(lr=0.01, warmup_images=100, **kw), images, 1100)

    assert [lr(i) for i in (50, 100, 1100)] == [0.005, 0.01, 0.01]
    edm2 = dict(schedule="inverse_sqrt", ref_images=400)
    assert [lr(i, **edm2) for i in (50, 400)] == [0.005, 0.01]
    assert lr(1600, **edm2) == pytest.approx(0.01 / 2) and lr(900, **edm2) == pytest.approx(0.01 / 1.5)
    cosine = dict(schedule="cosine", lr_min=0.001)
    assert lr(50, **cosine) == pytest.approx(0.005) and lr(100, **cosine) == pytest.approx(0.01)
    assert lr(600, **cosine) == pytest.approx(0.001 + 0.009 * 0.5) and lr(1100, **cosine) == pytest.approx(0.001)
    assert lr(350, **cosine) == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(config.ConfigError, match="optimizer.ref_images must be positive for schedule inverse_sqrt"):
        OptimizerConfig(schedule="inverse_sqrt")
    with pytest.raises(config.ConfigError, match=r"optimizer.lr_min must be in \[0, optimizer.lr = 0.01\]"):
        OptimizerConfig(lr=0.01, schedule="cosine", lr_min=0.1)


def test_a_resumed_run_continues_the_cosine_schedule_and_the_weights_bitwise(data, tmp_path, monkeypatch):
    from accelerate import Accelerator

    def run(store, stop_at=None):
        cfg = config.load(ExperimentConfig, DEMO, [*settings(data, store, total=2 * CHECKPOINT_EVERY, sample_every=0),
                                                   "optimizer.schedule=cosine", "optimizer.lr_min=1e-5",
                                                   "log_every_images=4"])
        sigterm_at(monkeypatch, stop_at)
        return train.train(cfg, open_store(str(store)), Accelerator(cpu=True))

    assert run(tmp_path / "full") == 0
    assert run(tmp_path / "split", stop_at=40) == train.EXIT_REQUEUE  # stopped between checkpoints
    assert run(tmp_path / "split") == 0
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["lr"] for r in split] == [r["lr"] for r in full] and full[-1]["lr"] == pytest.approx(1e-5)
    assert len({r["lr"] for r in full}) == len(full)  # decaying at every record
    a, b = (checkpoint.load_rank(open_store(str(tmp_path / n)), "demo", 2 * CHECKPOINT_EVERY // 4, 0, 1)
            for n in ("full", "split"))
    assert all(torch.equal(x, y) for x, y in zip(a.train_state["network"].values(), b.train_state["network"].values()))


def test_bf16_step_runs_the_networks_matmuls_in_bf16_and_keeps_its_state_and_loss_in_fp32(data, tmp_path):
    steps = {}
    for precision in ("fp32", "bf16"):
        cfg = config.load(ExperimentConfig, DEMO, [*settings(data, tmp_path), f"precision={precision}"])
        p = train.build_parts(cfg, 0, 1, torch.device("cpu"))
        computed = set()
        for m in p.module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.register_forward_hook(lambda m, inputs, out: computed.add(out.dtype))
        batch = next(iter(Stream(cfg.data, 0, 2)))
        loss, grad_norm, _, losses = train.train_step(p, [batch], 0)
        assert computed == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert loss.dtype == losses.dtype == grad_norm.dtype == torch.float32
        assert all(q.dtype == torch.float32 for q in p.module.parameters())
        assert all(a.dtype == torch.float32 for avg in p.ema.averages.values() for a in avg)
        assert all(v.dtype == torch.float32 for state in p.backend.optimizer.state.values() for v in state.values()
                   if v.ndim)
        steps[precision] = float(grad_norm), [q.detach().clone() for q in p.module.parameters()]
    (norm32, weights32), (norm16, weights16) = steps["fp32"], steps["bf16"]
    assert norm16 != norm32 and norm16 == pytest.approx(norm32, rel=1e-2)  # rounded, not another computation
    assert any(not torch.equal(a, b) for a, b in zip(weights32, weights16))


@pytest.mark.parametrize("env, precision", [("bf16", "fp32"), ("fp16", "bf16"), ("no", "bf16")])
def test_an_accelerate_precision_variable_that_disagrees_with_the_config_is_one_line(data, tmp_path, capsys,
                                                                                      monkeypatch, env, precision):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    assert cli(["train", str(DEMO), f"data.index={data}", f"store={tmp_path}", f"precision={precision}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"elbodiff train: environment variable ACCELERATE_MIXED_PRECISION={env} conflicts with "
                          f"precision={precision} in the config") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no" if precision == "fp32" else precision)
    train.check_precision_environment(precision)  # agreeing: accepted


def test_two_accumulated_micro_batches_equal_one_batch_of_twice_the_size(data, tmp_path):
    """One process, batch 4 x accumulation 2 against batch 8: the same examples (the stream's order does not depend
    on its batch size on one rank), the same t and eps for each, so the same losses and, up to float32 sums in
    another order, the same parameters and EMAs."""
    cfg = config.load(ExperimentConfig, DEMO, [*settings(data, tmp_path), "optimizer.accumulation=2"])
    whole = whole_batch(cfg, 1)
    assert (cfg.data.batch_size, cfg.global_batch(1), whole.data.batch_size) == (4, 8, 8)
    runs = []
    for c in (cfg, whole):
        p, stream = train.build_parts(c, 0, 1, CPU), iter(Stream(c.data, 0, 1))
        losses = []
        for step in range(6):
            micro_batches = [next(stream) for _ in range(c.optimizer.accumulation)]
            losses.append(train.train_step(p, micro_batches, step * 8)[3])
        runs.append((torch.cat(losses), p))
    (losses, accumulated), (whole_losses, plain) = runs
    torch.testing.assert_close(losses, whole_losses, rtol=1e-4, atol=1e-4)  # the first step's: bitwise
    assert torch.equal(losses[:8], whole_losses[:8])
    for (name, a), b in zip(accumulated.module.named_parameters(), plain.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for name in accumulated.ema.averages:
        for a, b in zip(accumulated.ema.averages[name], plain.ema.averages[name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_accumulation_that_does_not_divide_an_interval_names_both_numbers(data, tmp_path):
    cfg = config.load(ExperimentConfig, DEMO, [*settings(data, tmp_path), "optimizer.accumulation=3"])
    with pytest.raises(ConfigError, match=r"global batch 24 \(data.batch_size 4 x optimizer.accumulation 3 x 2 "
                                          r"ranks\); found \{'log_every_images': 8"):
        cfg.check_intervals(cfg.global_batch(2))
    with pytest.raises(ConfigError, match="optimizer.accumulation >= 1 \\(found 0\\)"):
        config.load(ExperimentConfig, DEMO, [*settings(data, tmp_path), "optimizer.accumulation=0"])


def test_uint8_batches_train_exactly_like_the_streams_float_batches(data, tmp_path):
    """The trainer turns uint8 images into floats on its device by the stream's own rule, so that workers send
    (and a GPU receives) a quarter of the bytes without changing a step."""
    cfg = config.load(ExperimentConfig, DEMO, settings(data, tmp_path))
    steps = []
    for dtype in ("uint8", "float"):
        cfg.data.dtype = dtype
        batch = next(iter(Stream(cfg.data, 0, 2)))
        assert batch["x"].dtype == (torch.uint8 if dtype == "uint8" else torch.float32)
        p = train.build_parts(cfg, 0, 1, torch.device("cpu"))
        loss = train.train_step(p, [batch], 0)[0]
        steps.append((loss, [w.detach().clone() for w in p.module.parameters()]))
    (loss_u8, weights_u8), (loss_float, weights_float) = steps
    assert torch.equal(loss_u8, loss_float)
    assert all(torch.equal(a, b) for a, b in zip(weights_u8, weights_float))


def test_demo_config_loads_and_its_intervals_fit_two_ranks():
    cfg = config.load(ExperimentConfig, DEMO)
    cfg.check_intervals(2 * cfg.data.batch_size)
    assert cfg.network.build_config().resolution == 32 == demo.draw(0, 0)[0].shape[0]


FREE_AND_REALLOCATE = """
import ctypes, resource, sys, torch
from trainer import train
# glibc's documented starting thresholds, fixed: blocks of 128 KiB and more are mapped (and unmapped when freed)
# and a free top of the heap above 128 KiB is trimmed. Left to itself glibc moves them as it sees blocks freed,
# so whether a step's memory goes back to the kernel depends on the whole history of the process.
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 128 << 10)
libc.mallopt(-1, 128 << 10)
if sys.argv[1] == "keep":
    train.keep_freed_memory()
def step():  # 40 MiB in 256 KiB blocks, freed at the end
    held = [torch.ones(64 << 10) for _ in range(160)]
    del held
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_freed_memory_is_kept_for_the_next_step():
    def page_faults(mode):
        out = subprocess.run([sys.executable, "-c", FREE_AND_REALLOCATE, mode], capture_output=True, text=True,
                             check=True)
        return int(out.stdout)

    # unmapped at the end of every step and faulted in again, zeroed: 10,240 pages a step
    assert page_faults("glibc") > 10 * 8000
    assert page_faults("keep") < 100


def test_the_step_keeps_one_memory_format_so_ddp_gradients_match_its_buckets(data, tmp_path):
    """The demo network (1x1 convolutions where a stage widens) under DDP on a one-rank gloo group in this process:
    the trainer's step raises no stride warning; the stream's channels_last batch fed as it comes does (so the
    check can fail). The trainer's step goes first: the warning is emitted once per process."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cfg = config.load(ExperimentConfig, DEMO, [f"data.index={data}", f"store={tmp_path}"])
    batch = next(iter(Stream(cfg.data, 0, 1)))
    assert batch["x"].is_contiguous(memory_format=torch.channels_last)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        p = train.build_parts(cfg, 0, 1, CPU)
        p.backend.net = DistributedDataParallel(p.module)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train.train_step(p, [batch], 0)
            assert not [w for w in caught if "bucket view strides" in str(w.message)]
            x = train.to_float(batch["x"])
            p.backend.zero_grad()  # gradients that exist keep their layout
            p.backend.net(x, torch.zeros(len(x)), batch["label"]).square().mean().backward()
        assert [w for w in caught if "bucket view strides" in str(w.message)]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # inductor compiles the blocks' kernels with g++: about a minute on two cores
def test_compiled_blocks_train_like_eager_without_graph_breaks_and_their_checkpoint_loads_uncompiled(data, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for compiled in (False, True):
        cfg = config.load(ExperimentConfig, DEMO, [*settings(data, tmp_path), f"compile={str(compiled).lower()}"])
        p, stream = train.build_parts(cfg, 0, 1, CPU), iter(Stream(cfg.data, 0, 1))
        losses = [train.train_step(p, [next(stream)], step * 4)[0] for step in range(3)]
        runs[compiled] = torch.stack(losses), p.module.state_dict()
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] > 0
    (eager_losses, eager), (compiled_losses, state) = runs[False], runs[True]
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-3)  # other kernels, other sums
    assert list(state) == list(eager) and not [k for k in state if "_orig_mod" in k]
    cfg.network.build().load_state_dict(state, strict=True)


def test_compile_where_inductor_cannot_build_kernels_is_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    cfg = config.load(ExperimentConfig, DEMO, [*settings(data, tmp_path), "compile=true"])
    with pytest.raises(ConfigError, match="compile: true on CPU needs a C\\+\\+ compiler.*'/nonexistent/g\\+\\+'"):
        train.build_parts(cfg, 0, 1, CPU)


@pytest.mark.slow
def test_a_two_rank_ddp_checkpoint_holds_one_copy_of_the_replicated_state_and_both_ranks_resume_from_it(runs):
    store = open_store(str(runs["full"]))
    step = checkpoint.latest_complete(store, "demo")
    files = checkpoint.read_manifest(store, "demo", step)["files"]
    network_bytes = sum(v.numel() * v.element_size() for v in final_state(runs["full"]).train_state["network"].values())
    assert files["rank-00000.pt"]["size"] > 3 * network_bytes  # the network, AdamW's two moments, two EMAs
    assert files["rank-00001.pt"]["size"] < 2000  # an empty state: rank 1 resumes from rank 0's
    ranks = [checkpoint.load_rank(store, "demo", step, rank, 2) for rank in range(2)]
    assert all(torch.equal(ranks[1].train_state["network"][k], v) for k, v in ranks[0].train_state["network"].items())
