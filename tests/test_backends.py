"""The FSDP2 and DeepSpeed ZeRO backends, with 2-rank launches on CPU (gloo): parameters against one process on the
global batch, the consolidated EMA files, and resume after a stop.

Five launches in all: one trains every backend setting to the end, one after the other (fp32; accumulating two
micro-batches under DDP, FSDP2 and ZeRO-2; a few bf16 steps under each), and then three short runs with a
non-finite network output on one rank (tests/backends_worker.py); then, for FSDP2 and for ZeRO-3, a run stopped by
SIGTERM and its resumption.
"""
import io
import json
import math
import os

import pytest
import torch

from launching import DEMO, EXTENSIONS, GLOBAL_BATCH, ROOT, TINY, metrics, stop_after_first_record, torchrun, train_argv
from test_train import assert_same_training, one_process_on_the_global_batch
from trainer import checkpoint, config, train
from trainer.config import ConfigError
from trainer.experiment import ExperimentConfig
from trainer.store import open_store

STEPS = 12
BACKENDS = {"fsdp": ["parallel.backend=fsdp"],
            # two shard groups of one rank each: the replicate dimension all-reduces, the shard one is trivial
            "hybrid": ["parallel.backend=fsdp", "parallel.fsdp_shard=hybrid", "parallel.shard_group_size=1"],
            **{f"zero{s}": ["parallel.backend=deepspeed", f"parallel.zero_stage={s}"] for s in (1, 2, 3)},
            "zero2-offload": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "parallel.offload_optimizer=true"]}
NAN_AT, NAN_STEPS = 8, 3  # the second of three steps has a non-finite network output on rank 1 only
# the same global batch of 8 as two micro-batches of 2 per rank, each backend skipping its gradient sync its own way
ACCUMULATION = ["data.batch_size=2", "optimizer.accumulation=2"]
ACCUMULATED = {"ddp-accumulated": ACCUMULATION, "fsdp-accumulated": ["parallel.backend=fsdp", *ACCUMULATION],
               "zero2-accumulated": ["parallel.backend=deepspeed", "parallel.zero_stage=2", *ACCUMULATION]}
BF16 = {"ddp-bf16": ["precision=bf16"], "fsdp-bf16": ["parallel.backend=fsdp", "precision=bf16"],
        "zero2-bf16": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "precision=bf16"]}
BF16_STEPS = 3  # CPU bf16 is slow
TIMEOUT_S = 321  # not accelerate's default (1800 s): the worker prints the one its process group got


def settings(data, store, backend, total=STEPS * GLOBAL_BATCH, sample_every=STEPS * GLOBAL_BATCH):
    return [*TINY, "checkpoint.every_images=32", f"process_group_timeout_s={TIMEOUT_S}", *{"ddp": [], **BACKENDS, **ACCUMULATED, **BF16}[backend],
            f"data.index={data}", f"store={store}", f"total_images={total}", f"sample_every_images={sample_every}"]


@pytest.fixture(scope="session")
def deepspeed_ops():
    """Builds DeepSpeed's shared-memory op once into the workspace cache, so that no launch times out on it."""
    os.environ["TORCH_EXTENSIONS_DIR"] = EXTENSIONS
    from deepspeed.accelerator import get_accelerator
    get_accelerator().create_op_builder("ShareMemCommBuilder").load()


def rank_states(store):
    s = open_store(str(store))
    step = checkpoint.latest_complete(s, "demo")
    return [checkpoint.load_rank(s, "demo", step, rank, 2) for rank in range(2)]


def stop_and_resume(data, tmp, backend):
    """A run signalled on rank 1 after its first step, started the way srun starts ranks, then resumed to the end
    under torchrun. Returns the store, both exit codes of the stopped run and the resumed run's log."""
    store = tmp / f"{backend}-split"
    codes = stop_after_first_record(settings(data, store, backend, total=10**4 * GLOBAL_BATCH, sample_every=0), store,
                                    tmp / f"{backend}-stopped")
    resumed_log = tmp / f"{backend}-resumed.log"
    assert torchrun(train_argv(*settings(data, store, backend)), resumed_log) == 0, \
        resumed_log.read_text()[-3000:]
    return store, codes, resumed_log.read_text()


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory, deepspeed_ops):
    tmp = tmp_path_factory.mktemp("backends")
    stores = {backend: tmp / backend for backend in [*BACKENDS, *ACCUMULATED, *BF16]}
    nonfinite = {b: tmp / f"{b}-nan" for b in ("ddp", "fsdp", "zero3")}
    worker = json.dumps([{"overrides": settings(data, stores[b], b), "nan_at": None} for b in [*BACKENDS, *ACCUMULATED]]
                        + [{"overrides": settings(data, stores[b], b, total=BF16_STEPS * GLOBAL_BATCH, sample_every=0),
                            "nan_at": None} for b in BF16]
                        + [{"overrides": settings(data, nonfinite[b], b, total=NAN_STEPS * GLOBAL_BATCH,
                                                  sample_every=0), "nan_at": NAN_AT} for b in nonfinite])
    log = tmp / "worker.log"
    assert torchrun([str(ROOT / "tests" / "backends_worker.py"), str(DEMO), worker], log) == 0, \
        log.read_text()[-3000:]
    split = {b: stop_and_resume(data, tmp, b) for b in ("fsdp", "zero3")}
    return {"full": stores, "split": split, "nonfinite": nonfinite, "tmp": tmp, "worker_log": log.read_text()}


@pytest.mark.slow
def test_the_process_group_gets_the_configured_timeout(runs):
    assert runs["worker_log"].count(f"process group timeout: {TIMEOUT_S} s") == 2  # both ranks


@pytest.fixture(scope="module")
def reference(runs, data):
    """The same training in one process on the global batch: both ranks' batches and noise concatenated."""
    return one_process_on_the_global_batch(
        config.load(ExperimentConfig, DEMO, settings(data, runs["tmp"] / "unused", "fsdp")), STEPS)


@pytest.fixture(scope="module")
def accumulated_reference(runs, data):
    """The accumulated runs in one process: each rank's two micro-batches in order, rank 0's first, as one batch."""
    return one_process_on_the_global_batch(
        config.load(ExperimentConfig, DEMO, settings(data, runs["tmp"] / "unused", "ddp-accumulated")), STEPS)


def engine_files(states, folder):
    """The DeepSpeed files both ranks stored, written back into one folder as DeepSpeed laid them out."""
    (folder / "engine").mkdir(parents=True)
    for state in states:
        for name, data in state.train_state["engine"].items():
            (folder / "engine" / name).write_bytes(data.numpy().tobytes())
    return folder


def full_parameters(backend, states, tmp):
    if backend.startswith("ddp"):
        return states[0].train_state["network"]
    if backend.startswith("fsdp") or backend == "hybrid":
        # FSDP2 shards dim 0 in torch.chunk's layout: rank 0's rows, then rank 1's
        a, b = (s.train_state["network"] for s in states)
        return {k: a[k] if backend == "hybrid" else torch.cat([a[k], b[k]]) for k in a}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(engine_files(states, tmp / f"{backend}-engine")), tag="engine")


@pytest.mark.slow  # five 2-rank launches shared by the tests below, about two minutes on two cores
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_ranks_equal_one_process_on_the_global_batch(runs, reference, backend):
    states = rank_states(runs["full"][backend])
    assert states[0].images_seen == STEPS * GLOBAL_BATCH
    full = full_parameters(backend, states, runs["tmp"])
    p, replayed = reference
    assert sorted(full) == sorted(dict(p.module.named_parameters()))
    assert_same_training(replayed, runs["full"][backend], full, p, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(ACCUMULATED))
def test_two_ranks_accumulating_two_micro_batches_equal_one_process_on_the_global_batch(runs, accumulated_reference,
                                                                                       backend):
    states = rank_states(runs["full"][backend])
    assert states[0].images_seen == STEPS * GLOBAL_BATCH
    p, replayed = accumulated_reference
    assert_same_training(replayed, runs["full"][backend], full_parameters(backend, states, runs["tmp"]), p, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BF16))
def test_bf16_runs_on_two_ranks_with_fp32_weights_and_emas_close_to_fp32(runs, backend):
    states = rank_states(runs["full"][backend])
    assert states[0].images_seen == BF16_STEPS * GLOBAL_BATCH
    assert all(v.dtype == torch.float32 for v in full_parameters(backend, states, runs["tmp"]).values())
    assert all(a.dtype == torch.float32 for s in states for avg in s.train_state["ema"]["averages"].values()
               for a in avg)
    # every fp32 backend equals one process to 1e-4 (above): fsdp's fp32 run stands for all of them
    bf16, fp32 = metrics(runs["full"][backend]), metrics(runs["full"]["fsdp"])[:BF16_STEPS]
    for a, b in zip(bf16, fp32):
        assert a["grad_norm"] != b["grad_norm"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-2)
        assert a["loss"] == pytest.approx(b["loss"], rel=5e-2)


@pytest.mark.slow
def test_fsdp_parameters_are_dim0_shards_including_uneven_and_empty_ones(runs, reference):
    a, b = (s.train_state["network"] for s in rank_states(runs["full"]["fsdp"]))
    for name, param in reference[0].module.named_parameters():
        rows = param.shape[0]
        assert (a[name].shape[0], b[name].shape[0]) == ((rows + 1) // 2, rows // 2), name  # not a DDP fallback
    assert a["class_emb.weight"].shape[0] == 6 and b["class_emb.weight"].shape[0] == 5  # 11 rows
    assert b["mid_pos"].shape[0] == 0  # one row: rank 1 holds nothing and still takes part in every gather


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3"])
def test_deepspeed_engine_runs_the_configured_zero_stage(runs, backend):
    for rank, state in enumerate(rank_states(runs["full"][backend])):
        optim = torch.load(io.BytesIO(state.train_state["engine"][f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
                                      .numpy().tobytes()), weights_only=False)  # DeepSpeed's own pickles
        assert optim["optimizer_state_dict"]["zero_stage"] == int(backend[-1])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "hybrid", "zero1", "zero3"])
def test_consolidated_ema_loads_strictly_into_a_plain_network_and_equals_one_process(runs, reference, backend):
    s = open_store(str(runs["full"][backend]))
    step = checkpoint.latest_complete(s, "demo")
    p = reference[0]
    for name, average in zip(p.ema.averages, p.ema.consolidate(
            [n for n, _ in p.module.named_parameters()], p.backend.gather()).values()):
        weights = checkpoint.load_ema(s, "demo", step, name)
        assert all(w.dtype == torch.float32 for w in weights.values())
        p.cfg.network.build().load_state_dict(weights, strict=True)
        for key, value in average.items():
            # the weights' tolerance (test_train.assert_same_training): the EMAs average them
            torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=p.cfg.optimizer.lr / 10,
                                       msg=f"{backend} {name} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_resumed_run_repeats_the_uninterrupted_losses_and_state_bitwise(runs, backend):
    store, codes, resumed_log = runs["split"][backend]
    assert codes == [train.EXIT_REQUEUE, train.EXIT_REQUEUE]
    assert "resumed from checkpoint" in resumed_log  # not a fresh start that happens to log the same losses
    full, resumed = metrics(runs["full"][backend]), metrics(store)
    assert [r["images_seen"] for r in full] == [GLOBAL_BATCH * (i + 1) for i in range(STEPS)]
    assert [(r["images_seen"], r["loss"], r["grad_norm"]) for r in resumed] == \
           [(r["images_seen"], r["loss"], r["grad_norm"]) for r in full]
    a, b = rank_states(runs["full"][backend]), rank_states(store)
    for x, y in zip(a, b):
        for name, average in x.train_state["ema"]["averages"].items():
            assert all(torch.equal(u, v) for u, v in zip(average, y.train_state["ema"]["averages"][name])), name
    full_a = full_parameters(backend, a, runs["tmp"] / "uninterrupted")
    full_b = full_parameters(backend, b, runs["tmp"] / "resumed")
    for key, value in full_a.items():
        assert torch.equal(value, full_b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero3"])
def test_nonfinite_output_on_one_rank_skips_that_step_on_every_rank(runs, backend):
    logged = metrics(runs["nonfinite"][backend])
    assert [(r["images_seen"], r["skipped_steps"]) for r in logged] == [(8, 0), (16, 1), (24, 1)]
    assert logged[1]["loss"] is None and math.isfinite(logged[2]["loss"])
    # each rank's EMA counts the optimizer steps it applied: two of three, on both ranks
    assert [s.train_state["ema"]["t"] for s in rank_states(runs["nonfinite"][backend])] == [2, 2]


def test_resuming_with_other_parallel_settings_is_refused_with_both_settings_named(data, tmp_path):
    from accelerate import Accelerator

    store = open_store(str(tmp_path))
    cfg = config.load(ExperimentConfig, DEMO, settings(data, tmp_path, "ddp", total=8, sample_every=0))
    assert train.train(cfg, store, Accelerator(cpu=True)) == 0
    fsdp = config.load(ExperimentConfig, DEMO, settings(data, tmp_path, "fsdp", total=16, sample_every=0))
    with pytest.raises(ConfigError, match="'backend': 'ddp'.*'backend': 'fsdp'"):
        train.train(fsdp, store, Accelerator(cpu=True))
