"""Evaluation on this machine: Inception feature throughput, where the time of one evaluation goes, and the
service's overhead against a bare script doing the same work. Prints JSON.

The bare script is what one writes by hand: load the EMA network, sample n images, Inception features, Frechet
distance. The service does the same item through `eval.service.Worker.take`: lease, manifest verification (every
file hashed), renewal thread, result written with create_exclusive, report rebuilt. Both sides share one loaded
Inception network and take turns, the first side swapped each round (bare then service, service then bare): the
overhead is the median of the per-round ratios. glibc's malloc keeps freed memory, as in the service itself.

    .venv/bin/python -m benchmarks.eval --n 128 --rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data import demo
from eval import checkpoints, fid, inception, metrics, sample, service, stats
from trainer import checkpoint, config, train
from trainer.ema import EMA
from trainer.experiment import ExperimentConfig
from trainer.store import open_store

RUN = "bench"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def throughput(network, resolution: int, batch: int, batches: int) -> float:
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
    network(images)
    start = time.perf_counter()
    for _ in range(batches):
        network(images)
    return batch * batches / (time.perf_counter() - start)


def make_run(store) -> None:
    """One complete checkpoint of the demo network (initial weights: the timing does not depend on them)."""
    cfg = config.load(ExperimentConfig, CONFIG, [f"run={RUN}", f"store={store.uri}"])
    store.put(f"{RUN}/config.yaml", config.dump(cfg).encode())
    net = cfg.network.build()
    ema = EMA(cfg.ema, [p.detach() for p in net.parameters()])
    ema.update([p.detach() for p in net.parameters()])
    weights = ema.consolidate([n for n, _ in net.named_parameters()], lambda i, local: local)
    checkpoint.save(store, RUN, 1, images_seen=64, rank=0, world_size=1, barrier=lambda: None,
                    train_state={"model": net.state_dict()}, data_state={}, ema=weights,
                    ema_metadata={name: ema.metadata(name) for name in weights})


def bare(store, network, reference, settings: sample.SampleSettings) -> float:
    loaded = checkpoints.load_network(store, RUN, 1)
    features = stats.FeatureStats(network.num_features)
    for images, _, _ in sample.generate(loaded, settings):
        features.update(network(images)[0])
    return fid.frechet_distance(features.mean(), features.cov(), reference.mu, reference.sigma)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="samples per evaluation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train.keep_freed_memory()
    network = inception.load("random")
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
              "inception_images_per_s": {f"{r}x{r}": throughput(network, r, args.batch_size, 3) for r in (32, 64, 256)}}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(str(Path(tmp, "store")))
        make_run(store)
        demo.write(str(Path(tmp, "data")), num_images=args.n, samples_per_shard=args.n)
        reference = fid.ref_stats(str(Path(tmp, "data")), network, batch_size=args.batch_size)
        fid.save_reference(reference, str(Path(tmp, "ref.npz")))
        settings = sample.SampleSettings(n=args.n, batch_size=args.batch_size)
        metric = metrics.parse(f"fid{args.n}", random_inception=True)[0]
        ratios, bare_s, service_s, timings = [], [], [], []

        def run_bare():
            start = time.perf_counter()
            bare(store, network, reference, settings)
            bare_s.append(time.perf_counter() - start)

        def run_service():
            for key in store.list(f"{RUN}/evals/") + store.list(f"{RUN}/report/"):
                store.delete(key)
            worker = service.Worker(store, service.Settings(
                metrics=[metric], runs=[RUN], sampling=settings, reference=reference, reference_path=str(Path(tmp, "ref.npz")),
                inception="random", fid_mode="legacy", val=None, vae=None, sweep=[], once=True, poll=0,
                lease_seconds=300, retries=1))
            worker.network = network
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the worker's event lines
                assert worker.take(RUN, 1, metric) == 1
            service_s.append(time.perf_counter() - start)
            timings.append(json.loads(store.get(service.result_key(RUN, 1, metric)))["timings"])

        for i in range(args.rounds):
            for side in (run_bare, run_service) if i % 2 == 0 else (run_service, run_bare):
                side()
            ratios.append(service_s[-1] / bare_s[-1])
    result.update({"n": args.n, "bare_s": bare_s, "service_s": service_s, "service_over_bare": ratios,
                   "service_over_bare_median": statistics.median(ratios),
                   "breakdown_s": {k: statistics.median(t.get(k, 0.0) for t in timings) for k in timings[0]},
                   # leases, manifest verification, the renewal thread and the report
                   "service_rest_s": statistics.median(s - sum(t.values()) for s, t in zip(service_s, timings))})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
