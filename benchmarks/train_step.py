"""What the training loop costs beyond a bare PyTorch loop, and what a checkpoint costs, on the demo run. Prints JSON.

Step: the loop's body as `trainer.train.train` runs it on one process (the real `train_step` with its seeding,
gradient clipping and non-finite check, the EMAs of the demo config, the progress counters, the per-bin loss
totals and `MetricsLog.step` with its progress bar, metrics.jsonl and TensorBoard writes every 8 steps), against
a bare loop on the same network object and its optimizer: the same weighted loss on the same batch, backward,
gradient clipping to the configured norm and the same AdamW (the optimizer recipe every config sets, not a cost of
the loop), nothing else; and `train_step` alone, to tell the step's own additions from the loop's bookkeeping. The three
take turns step by step; the overhead is the median, over those turns, of the ratio of step times, in wall
seconds and in CPU seconds of this process (the steadier one on a shared machine). One thread by default: each
demo rank runs with one (torchrun sets OMP_NUM_THREADS=1), and a second thread's spin-waits make CPU time
depend on what else the machine runs. The process uses the trainer's CPU allocator setting
(`trainer.train.keep_freed_memory`), for both sides.

Checkpoint: `trainer.train.save_checkpoint` of the demo state, timed for a local store and for S3 (a moto server
started here as a separate process on 127.0.0.1). Training waits for the whole write, so the stall per checkpoint
is the write time; it is given as a multiple of one step and as a fraction of the training time between two
checkpoints at the demo's checkpoint interval.

    .venv/bin/python -m benchmarks.train_step [--steps 200 --writes 3 --threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import botocore.exceptions
import torch

from data import demo
from data.stream import Stream
from models import objective
from trainer import config, train
from trainer.experiment import ExperimentConfig
from trainer.metrics import MetricsLog
from trainer.store import open_store

ROOT = Path(__file__).resolve().parent.parent


def demo_config(data: str, store: str, accumulation: int = 1) -> ExperimentConfig:
    # a record every 8 steps instead of the demo's 64, so that the timed steps include metrics.jsonl and
    # TensorBoard writes: an upper bound on what the demo's interval costs
    return config.load(ExperimentConfig, ROOT / "configs" / "demo.yaml",
                       [f"data.index={data}", f"store={store}", f"log_every_images={256 * accumulation}",
                        f"optimizer.accumulation={accumulation}"])


def loop_step(p: train.Parts, metrics: MetricsLog, progress: train.Progress, micro_batches: list[dict]) -> None:
    """`trainer.train.train`'s loop body on one process, minus the sample grid and checkpoint intervals."""
    cfg, global_batch = p.cfg, p.cfg.global_batch(1)
    loss, grad_norm, logsnr, losses = train.train_step(p, micro_batches, progress.images_seen)
    progress.images_seen += global_batch
    finite = bool(torch.isfinite(grad_norm))
    progress.count(finite, cfg.optimizer.max_nonfinite_steps)
    shared = p.all_reduce(torch.cat([torch.tensor([float(loss), 0.0], dtype=torch.float64, device=p.device),
                                     metrics.logsnr_totals(logsnr, losses)]))
    metrics.step(float(shared[0]) if finite else None, shared[2:], float(grad_norm),
                 train.learning_rate(cfg.optimizer, progress.images_seen, cfg.total_images),
                 progress.images_seen, global_batch, progress.skipped)


def bare_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: ExperimentConfig, sampler, weight,
              micro_batches: list[dict]) -> None:
    optimizer.zero_grad(set_to_none=True)
    for batch in micro_batches:
        x, cond = batch["x"], batch["label"]
        loss = objective.weighted_loss(net, x, cond, schedule=sampler, weighting=weight, t=torch.rand(len(x)),
                                       eps=torch.randn_like(x)).mean()
        (loss / len(micro_batches)).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optimizer.grad_clip)
    optimizer.step()


def timed_cpu(fn) -> tuple[float, float]:
    """Wall and CPU seconds of this process (all its threads): other work on a shared machine stretches the first
    far more than the second."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[1], q[2]]


def median_interval(xs: list[float], resamples: int = 2000) -> list[float]:
    """A 95% bootstrap interval of the median: how far the reported median could move in a rerun."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples)]]


def step_overhead(p: train.Parts, store, steps: int) -> dict:
    """The loop, `train_step` alone and the bare loop take turns step by step, so all three meet the same load;
    each ratio to the bare loop is over steps taken side by side."""
    cfg = p.cfg
    g = torch.Generator().manual_seed(0)
    n = cfg.data.batch_size
    res = cfg.network.build_config().resolution
    micro_batches = [{"x": torch.rand((n, 3, res, res), generator=g) * 2 - 1,
                      "label": torch.randint(0, 10, (n,), generator=g)} for _ in range(cfg.optimizer.accumulation)]
    progress = train.Progress()
    names = ("loop", "train_step", "bare")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}  # (wall, cpu) seconds per step
    with MetricsLog(store, cfg, 0, True, p.device) as metrics:
        sides = {"loop": lambda: loop_step(p, metrics, progress, micro_batches),
                 "train_step": lambda: train.train_step(p, micro_batches, progress.images_seen),
                 "bare": lambda: bare_step(p.module, p.backend.optimizer, cfg, p.sampler, p.weight, micro_batches)}
        for _ in range(3):  # warm-up: allocator, first AdamW state
            for side in sides.values():
                side()
        for i in range(steps):
            for name in names[i % 3:] + names[:i % 3]:  # each side goes first, second and third in turn
                times[name].append(timed_cpu(sides[name]))
    result = {"steps_per_side": steps, "metrics_records_written": progress.images_seen // cfg.log_every_images}
    for c, clock in enumerate(("wall", "cpu")):
        result[clock] = {f"{name}_s": statistics.median(t[c] for t in times[name]) for name in names}
        for name in names[:2]:
            ratios = [a[c] / b[c] for a, b in zip(times[name], times["bare"])]
            result[clock][f"{name}_over_bare_quartiles"] = quartiles(ratios)
            result[clock][f"{name}_over_bare_median_95"] = median_interval(ratios)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_cost(p: train.Parts, store, step_s: float, writes: int) -> dict:
    """`p` has trained, so the optimizer state is in the checkpoint."""
    cfg = p.cfg
    stream = Stream(cfg.data, 0, 1)
    progress = train.Progress()
    seconds = []
    for i in range(writes):
        progress.images_seen = (i + 1) * cfg.checkpoint.every_images
        seconds.append(timed_cpu(lambda: train.save_checkpoint(p, store, stream, progress, lambda: None))[0])
    write_s = statistics.median(seconds)
    steps_between = cfg.checkpoint.every_images // cfg.global_batch(1)
    prefix = f"{cfg.run}/checkpoints/{progress.images_seen // cfg.global_batch(1):09d}/"
    return {"write_s": write_s, "write_s_all": seconds, "bytes": sum(len(store.get(k)) for k in store.list(prefix)),
            "stall_in_steps": write_s / step_s,
            "stall_fraction_at_demo_interval": write_s / (write_s + steps_between * step_s),
            "steps_between_checkpoints": steps_between}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="steps timed on each side")
    parser.add_argument("--writes", type=int, default=3, help="checkpoints written per store")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches of 32 per optimizer step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train.keep_freed_memory()  # as `elbodiff train` does on CPU; the bare loop runs in the same process
    with tempfile.TemporaryDirectory(prefix="elbodiff-bench-") as tmp:
        demo.write(f"{tmp}/data", num_images=256, samples_per_shard=128)
        cfg = demo_config(f"{tmp}/data", f"{tmp}/runs", args.accumulation)
        p = train.build_parts(cfg, 0, 1, torch.device("cpu"))
        step = step_overhead(p, open_store(f"{tmp}/runs"), args.steps)
        result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                              "threads": args.threads, "load_average": os.getloadavg()},
                  "config": {"preset": cfg.network.preset, "overrides": cfg.network.overrides,
                             "batch": cfg.data.batch_size, "accumulation": cfg.optimizer.accumulation,
                             "emas": len(cfg.ema.sigma_rels),
                             "log_every_images": cfg.log_every_images,
                             "checkpoint_every_images": cfg.checkpoint.every_images},
                  "step": step}
        result["checkpoint_local"] = checkpoint_cost(p, open_store(f"{tmp}/ckpt"), step["wall"]["loop_s"],
                                                     args.writes)
        port = free_port()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                   str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            endpoint = f"http://127.0.0.1:{port}"
            client = boto3.client("s3", endpoint_url=endpoint)
            for _ in range(100):  # the server takes a moment to listen
                try:
                    client.create_bucket(Bucket="bench")
                    break
                except botocore.exceptions.EndpointConnectionError:
                    time.sleep(0.1)
            s3 = open_store("s3://bench/runs", endpoint_url=endpoint)
            result["checkpoint_s3_moto"] = checkpoint_cost(p, s3, step["wall"]["loop_s"], args.writes)
        finally:
            server.terminate()
            server.wait()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
