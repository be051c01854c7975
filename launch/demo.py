"""`elbodiff demo`: a real training run on CPU, its evaluation, then the objective on data whose likelihood is known
in closed form.

Training: the embedded shapes dataset is written as shards (and a held-out split), and configs/demo.yaml trains a
small U-ViT on it with two ranks under torchrun (DDP over gloo) for a few minutes, with checkpoints, metrics and
sample grids in a local store. The summary printed afterwards is read back from that store, never assumed.

Evaluation: reference statistics of the training shards, then the evaluation service over the run (`--once`, two
ranks): bits/dim on the held-out split, FID and Inception Score on a few hundred samples of every checkpoint, and
the run's HTML report. Without Inception weights (`--inception PATH`) the Inception network is the real
architecture with a fixed random initialisation, and its metrics are named `*_random_inception*`: they show the
trend within this run and are not comparable with any published FID.

Gaussian data has an analytic optimal denoiser and entropy, so the printed bound can be checked by eye:
with the optimal denoiser the continuous-time bound equals the differential entropy (plus endpoint gaps of
about 1e-3 nats), whatever the schedule between the same endpoints. The demo also draws samples with both
samplers and compares their moments to the data's.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from data import demo as demo_data
from models import gaussian, objective, samplers, schedules
from trainer import checkpoint, config
from trainer.store import open_store

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESET = CONFIGS / "objectives" / "vdm_cifar10.yaml"
RUN_CONFIG = CONFIGS / "demo.yaml"
RANKS = 2  # one per core of a small machine
VAL_IMAGES = 500  # the held-out split: other draws of the same ten classes (seed 1)
REF_IMAGES = 256  # training images in the FID reference statistics
# classifier-free guidance of the evaluated samples; measured on the demo run with the random-initialised Inception:
# at 3.0 (the sample grids') FID grew as training went on (3.8 at 16384 images, 5.9 at 65536), 2.0 follows it
GUIDANCE = 2.0
SAMPLES = 256  # per checkpoint, for FID and IS: a few hundred (Inception runs at a few images/s per CPU core)


def torchrun(*argv: str) -> list[str]:
    # "--": torchrun's parser would read our --run as an abbreviation of its own --run-path and stop.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
            "-m", "--", "launch.cli", *argv]


def main(out: str, inception: str | None = None, overrides: tuple[str, ...] = (), samples: int = SAMPLES,
         ref_images: int = REF_IMAGES) -> int:
    code = train(out, overrides)
    if code != 0:
        print(f"demo training failed with exit code {code}; its output is above. Nothing was evaluated.")
        return code
    report = evaluate(out, inception, samples, ref_images)
    if report is None:
        print("demo evaluation failed; its output is above.")
        return 1
    code = run(out)
    print(f"everything is under {Path(out).resolve()}: data/ and data-val/ (shards), runs/demo/ (config.yaml, "
          "logs/metrics.jsonl, samples/, checkpoints/, evals/, report/), ref-stats.npz, objective.json")
    print(f"the run's report: {report}")
    return code


def train(out: str, overrides: tuple[str, ...] = ()) -> int:
    """Write the demo shards and the held-out split, train configs/demo.yaml on them from scratch, and print what
    the store holds."""
    data, val, runs = Path(out) / "data", Path(out) / "data-val", Path(out) / "runs"
    index = demo_data.write(str(data), overwrite=True)  # the demo owns this folder; same settings keep the shards
    held_out = demo_data.write(str(val), num_images=VAL_IMAGES, seed=1, overwrite=True)
    print(f"demo shards: {index['num_samples']} images in {data.resolve()}, {held_out['num_samples']} held out in "
          f"{val.resolve()}")
    shutil.rmtree(runs / "demo", ignore_errors=True)  # a fresh run each time; resuming a finished one trains nothing
    command = torchrun("train", str(RUN_CONFIG), f"store={runs.resolve()}", f"data.index={data.resolve()}",
                       *overrides)
    print("training:", " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if code != 0:
        return code
    store = open_store(str(runs.resolve()))
    records = [json.loads(line) for line in store.get("demo/logs/metrics.jsonl").decode().splitlines()]
    steps = checkpoint.complete_steps(store, "demo")
    manifest = checkpoint.read_manifest(store, "demo", steps[-1])
    print(f"trained {manifest['images_seen']} images on {manifest['world_size']} ranks in "
          f"{time.perf_counter() - start:.0f} s ({records[-1]['images_per_s']:.0f} images/s at the end)")
    print(f"  weighted loss (nats per image) over the first {records[0]['images_seen']} images: "
          f"{records[0]['loss']:.1f}; over the last interval: {records[-1]['loss']:.1f}; "
          f"skipped steps: {records[-1]['skipped_steps']}")
    print(f"  complete checkpoints (the newest {len(steps)} are kept): {', '.join(f'{s:09d}' for s in steps)} in "
          f"{(runs / 'demo' / 'checkpoints').resolve()}")
    grids = [str(runs.resolve() / key) for key in store.list("demo/samples/")]
    print(f"  sample grids from the EMA weights: {', '.join(grids)}")
    return 0


def evaluate(out: str, inception: str | None, samples: int = SAMPLES, ref_images: int = REF_IMAGES) -> str | None:
    """Reference statistics, then the evaluation service over every checkpoint of the run; prints the results
    read back from the store and returns the report's path (None when a step failed)."""
    data, val, runs, ref = (Path(out).resolve() / name for name in ("data", "data-val", "runs", "ref-stats.npz"))
    inception = inception or "random"
    start = time.perf_counter()
    # one process with both cores for the reference, then the service with one rank per core
    for command, threads in (
            ([sys.executable, "-m", "launch.cli", "ref-stats", str(data), "--out", str(ref), "--inception", inception,
              "--n", str(ref_images)], "2"),
            (torchrun("eval-service", "--store", str(runs), "--run", "demo", "--once", "--inception", inception,
                      "--ref", str(ref), "--val", str(val), "--metrics", f"fid{samples},is,bpd",
                      "--guidance", str(GUIDANCE)), "1")):
        print("evaluating:", " ".join(command[1:]), flush=True)
        if subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": threads}).returncode != 0:
            return None
    store = open_store(str(runs))
    results = [json.loads(store.get(k)) for k in store.list("demo/evals/") if k.endswith(".json")]
    print(f"evaluated {len({r['step'] for r in results})} checkpoints in {time.perf_counter() - start:.0f} s"
          + ("" if inception != "random" else " (Inception with a fixed random initialisation: *_random_inception "
             "metrics are not FID or IS)"))
    for r in sorted(results, key=lambda r: (r["metric"], r["images_seen"] if "images_seen" in r else 0)):
        value = f"{r['value']:.4g}" + (f" +- {r['stderr']:.2g}" if r.get("stderr") else "") if r["status"] == "ok" \
            else f"{r['status']}: {r.get('error')}"
        print(f"  {r['metric']:>26} at {r.get('images_seen', '?'):>6} images: {value} {r.get('unit', '')}")
    return str(runs / "demo" / "report" / "index.html")


def run(out: str, examples: int = 20000, seed: int = 0) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.load(objective.ObjectiveConfig, PRESET)
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    std = torch.tensor([1.0, 0.3, 2.0, 0.05], dtype=torch.float64)
    x = mean + std * torch.randn(examples, 4, generator=g, dtype=torch.float64)
    net = gaussian.diagonal(mean, std)
    entropy = gaussian.entropy(torch.diag(std**2)) / 4
    report = {"data": "x ~ N(mean, diag(std^2)) in 4 dimensions", "examples": examples,
              "entropy_nats_per_dim": entropy, "bounds": {}, "samples": {}}
    print(f"Gaussian data, {examples} examples: differential entropy {entropy:.4f} nats/dim")
    for name in ("linear", "cosine", "vp", cfg.schedule.name):
        sched_cfg = schedules.ScheduleConfig(name=name, logsnr_min=cfg.schedule.logsnr_min,
                                             logsnr_max=cfg.schedule.logsnr_max)
        sched = schedules.build(sched_cfg).double()
        with torch.no_grad():
            terms = objective.vlb(net, x, None, schedule=sched, data="continuous", generator=g)
        per_dim = objective.per_dim(terms.total, x, "continuous")
        stderr = float(per_dim.std()) / math.sqrt(examples)
        report["bounds"][name] = {"nats_per_dim": float(per_dim.mean()), "stderr": stderr,
                                  "prior": float(terms.prior.mean()) / 4,
                                  "reconstruction": float(terms.reconstruction.mean()) / 4,
                                  "diffusion": float(terms.diffusion.mean()) / 4}
        print(f"  bound with the {name:>14} schedule: {float(per_dim.mean()):.4f} +- {stderr:.4f} nats/dim")
    sched = schedules.build(schedules.ScheduleConfig(name="cosine", logsnr_min=-12.0, logsnr_max=12.0)).double()
    for sampler in (samplers.ancestral, samplers.ddim):
        start = time.perf_counter()
        samples = sampler(net, (4000, 4), None, schedule=sched, steps=250, generator=g, dtype=torch.float64)
        report["samples"][sampler.__name__] = {
            "mean": samples.mean(0).tolist(), "std": samples.std(0).tolist(),
            "seconds": time.perf_counter() - start}
        print(f"  {sampler.__name__:>9} sampler, 250 steps: mean {[round(v, 3) for v in samples.mean(0).tolist()]}"
              f" std {[round(v, 3) for v in samples.std(0).tolist()]}")
    report["data_mean"], report["data_std"] = mean.tolist(), std.tolist()
    path = out_dir / "objective.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"  data mean {mean.tolist()} std {std.tolist()}")
    print(f"results written to {path.resolve()}")
    return 0
