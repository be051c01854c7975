"""The evaluation service: `elbodiff eval-service --store URI [--run NAME ...] --metrics fid50k,is,bpd ...`.

Stateless workers, any number of them, watch the runs of a store. A work item is (run, checkpoint, metric with
its settings); a worker takes it with a lease (eval/lease.py), evaluates it, writes the result once with
`create_exclusive` to `<run>/evals/<step:09d>/<metric>.json`, drops the lease and rebuilds the run's report.
Only checkpoints with a manifest are seen, and only those whose files all match it are evaluated
(eval/checkpoints.py); a damaged one gets a `bad_checkpoint` result and the service goes on.

Every event is one JSON line on stdout, `{"event": "start"|"done"|"skip"|"error", "run", "step", "metric",
"worker", ...}`, so a run's evaluation history can be audited from the workers' logs. SIGTERM finishes nothing
half-way: the current item is released for another worker and the process exits 0. Under torchrun the ranks of
one worker evaluate one item together (rank 0 alone talks to the leases and writes results).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

import torch
import torch.distributed as dist

from eval import bpd, checkpoints, fid, inception, lease, metrics, report, sample, stats
from eval.metrics import Metric
from eval.sample import Interrupted
from trainer import checkpoint
from trainer.config import ConfigError
from trainer.store import STORE_ERRORS, Store, StoreUnreachable, open_store
from trainer.train import keep_freed_memory

log = logging.getLogger(__name__)

FEATURE_DIMS = 2048


@dataclass
class Settings:
    metrics: list[Metric]
    runs: list[str]
    sampling: sample.SampleSettings
    reference: fid.Reference | None
    reference_path: str | None
    inception: str | None
    fid_mode: str
    val: str | None
    vae: str | None
    sweep: list[float]
    once: bool
    poll: float
    lease_seconds: float
    retries: int  # store failures in a row before the service gives up, 1, 2, 4, ... s apart


@dataclass
class Worker:
    store: Store
    settings: Settings
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.network = None  # the feature network, loaded on first use
        self.verified: dict[tuple[str, int], str | None] = {}  # (run, step) -> None when verified, else the reason
        self.last_sampling: tuple | None = None  # (identity, stats) of the newest sampling, reused by fid and is
        self.failed: set[str] = set()  # items this worker failed on; with --once they are not tried again

    # ---- events --------------------------------------------------------------------------------------------
    def event(self, kind: str, run: str, step: int, metric: str, **extra) -> None:
        if self.rank == 0:
            print(json.dumps({"event": kind, "run": run, "step": step, "metric": metric, "worker": self.id, **extra}),
                  flush=True)

    # ---- discovery -----------------------------------------------------------------------------------------
    def runs(self) -> list[str]:
        if self.settings.runs:
            return self.settings.runs
        return sorted({k.split("/")[0] for k in self.store.list("") if k.count("/") == 1 and k.endswith("/config.yaml")})

    def pending(self) -> list[tuple[str, int, Metric]]:
        """Items without a result, newest checkpoints first (the ones a person watching training wants)."""
        items = []
        for run in self.runs():
            done = set(self.store.list(f"{run}/evals/"))
            for step in reversed(checkpoint.complete_steps(self.store, run)):
                items += [(run, step, m) for m in self.settings.metrics
                          if result_key(run, step, m) not in done
                          and not (self.settings.once and result_key(run, step, m) in self.failed)]
        return items

    # ---- the loop ------------------------------------------------------------------------------------------
    def serve(self) -> int:
        """Evaluate until stopped (or, with --once, until nothing is pending). Returns the exit code."""
        failures = 0
        while not self.stopping.is_set():
            try:
                evaluated = self.one_pass()
                failures = 0
            except STORE_ERRORS as e:
                failures += 1
                if failures >= self.settings.retries:
                    self.event("error", "", -1, "", error=f"store {self.store.uri} failed {failures} times in a row, "
                               f"giving up: {one_line(e)}")
                    return 1
                log.warning("store error (%d of %d, retrying in %d s): %s", failures, self.settings.retries,
                            2 ** (failures - 1), one_line(e))
                self.stopping.wait(2 ** (failures - 1))
                continue
            if self.settings.once and not evaluated:
                break
            if not evaluated:
                self.stopping.wait(self.settings.poll)
        return 0

    def one_pass(self) -> int:
        """Take and evaluate pending items one at a time; returns how many were finished (or given up)."""
        count = 0
        items = self.pending() if self.rank == 0 else None
        for item in self._broadcast_items(items):
            if self.stopping.is_set():
                break
            count += self.take(*item)
        return count

    def _broadcast_items(self, items):
        if self.world == 1:
            yield from items
            return
        # rank 0 decides, item by item, which one the ranks evaluate together; None ends the pass
        pending = list(items or [])
        while True:
            box = [pending.pop(0) if self.rank == 0 and pending else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            yield box[0]

    def take(self, run: str, step: int, metric: Metric) -> int:
        """Evaluate one item if its lease can be had; 1 when it was finished or released, 0 when not taken."""
        item = f"{run}/evals/{step:09d}/{metric.key}"
        held = self._agree(lambda: lease.acquire(self.store, item, self.id, self.settings.lease_seconds))
        if held is None:
            return 0
        if self._agree(lambda: self.store.exists(result_key(run, step, metric))):  # finished since the listing
            if self.rank == 0:
                lease.clear(self.store, item)
            return 0
        self.event("start", run, step, metric.key)
        start = time.time()
        renewer = lease.Renewer(self.store, held) if self.rank == 0 else contextlib.nullcontext()
        should_stop = self._stop_check(renewer)
        try:
            with renewer:
                result = self.evaluate(run, step, metric, should_stop)
        except Interrupted as e:
            self._release(held)
            self.event("skip", run, step, metric.key, reason=should_stop.reason or str(e))
            return 1
        except STORE_ERRORS:
            self._release(held)
            raise  # the loop backs off and tries again
        except Exception as e:  # a failure of this worker, not of the checkpoint: no result, the item stays pending
            log.exception("evaluating %s failed", item)
            self._release(held)
            self.failed.add(result_key(run, step, metric))
            self.event("error", run, step, metric.key, error=one_line(e), status="retry")
            return 0  # not progress: the loop waits a poll interval before trying again
        if self.rank == 0:
            self.publish(run, step, metric, item, result, time.time() - start)
        return 1

    def _release(self, held: lease.Held) -> None:
        if self.rank == 0:
            try:
                lease.release(self.store, held)
            except STORE_ERRORS as e:  # the lease then simply expires
                log.warning("lease %s not released: %s", held.item, one_line(e))

    def _agree(self, decide: Callable):
        """`decide()` on rank 0, its answer on every rank."""
        box = [decide() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def _stop_check(self, renewer) -> Callable[[], bool]:
        """What sampling and the bound ask between batches; it remembers why it said stop."""
        def should_stop() -> bool:
            if self.stopping.is_set():
                should_stop.reason = "stopped by a signal; the lease was released for another worker"
            # With several ranks, rank 0 cannot stop alone in the middle of their collectives; the result is still
            # written only once, by create_exclusive.
            elif getattr(renewer, "lost", False) and self.world == 1:
                should_stop.reason = "the lease was taken over by another worker"
            return should_stop.reason is not None
        should_stop.reason = None
        return should_stop

    def publish(self, run: str, step: int, metric: Metric, item: str, result: dict, seconds: float) -> None:
        result = {"run": run, "step": step, "metric": metric.key, "kind": metric.kind, **result,
                  "code_version": code_version(), "worker": self.id,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        written = self.store.create_exclusive(result_key(run, step, metric), json.dumps(result, indent=1).encode())
        lease.clear(self.store, item)
        if not written:
            self.event("skip", run, step, metric.key, reason="another worker wrote this result first")
            return
        if result["status"] == "ok":
            self.event("done", run, step, metric.key, value=result["value"], seconds=round(seconds, 3))
        else:
            self.event("error", run, step, metric.key, status=result["status"], error=result["error"])
        try:
            report.write(self.store, run)
        except Exception as e:  # the report is a view of the results; it must never stop the evaluation
            log.error("report of run %s not rebuilt: %s", run, one_line(e))

    # ---- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, run: str, step: int, metric: Metric, should_stop: Callable[[], bool]) -> dict:
        """The result body of one item: status ok with the value, or bad_checkpoint / error with a one-line reason."""
        started = time.perf_counter()
        reason = self._agree(lambda: self._verify(run, step))
        timings = {"storage": time.perf_counter() - started}  # reading and hashing every file of the checkpoint
        if reason is not None:
            if not self._agree(lambda: self.store.exists(checkpoint.checkpoint_prefix(run, step) + checkpoint.MANIFEST)):
                raise Interrupted("the checkpoint was deleted (by retention) before it was evaluated")
            return {"status": "bad_checkpoint", "error": reason, "timings": timings}
        try:
            if metric.kind == "bpd":
                return self._bpd(run, step, should_stop, timings)
            if metric.kind == "fid_sweep":
                return self._sweep(run, step, metric, should_stop, timings)
            return self._inception_metric(run, step, metric, should_stop, timings)
        except (ConfigError, ValueError, FileNotFoundError, checkpoints.BadCheckpoint) as e:
            status = "bad_checkpoint" if isinstance(e, checkpoints.BadCheckpoint) else "error"
            return {"status": status, "error": one_line(e), "timings": timings}

    def _verify(self, run: str, step: int) -> str | None:
        if (run, step) not in self.verified:
            try:
                checkpoints.verify(self.store, run, step)
                self.verified[(run, step)] = None
            except checkpoints.BadCheckpoint as e:
                self.verified[(run, step)] = one_line(e)
        return self.verified[(run, step)]

    def _load(self, run: str, step: int, timings: dict, sigma_rel: float | None = None):
        started = time.perf_counter()
        loaded = checkpoints.load_network(self.store, run, step, sigma_rel=sigma_rel, device=self.device)
        timings["load"] = timings.get("load", 0.0) + time.perf_counter() - started
        return loaded

    def _bpd(self, run, step, should_stop, timings) -> dict:
        loaded = self._load(run, step, timings)
        s = self.settings.sampling
        begin = time.perf_counter()
        out = bpd.bits_per_dim(loaded, self.settings.val, rank=self.rank, world=self.world, batch_size=s.batch_size,
                               seed=s.seed, device=self.device, should_stop=should_stop)
        timings["bound"] = time.perf_counter() - begin
        return {"status": "ok", "images_seen": loaded.images_seen, "value": out["value"], "stderr": out["stderr"],
                "n": out["n"], "unit": out["unit"], "warnings": [],
                "settings": {"ema": loaded.ema, "seed": s.seed, "val": self.settings.val}, "timings": timings}

    def _inception_metric(self, run, step, metric, should_stop, timings) -> dict:
        loaded = self._load(run, step, timings)
        stats = self._sample_stats(run, step, loaded, metric.n, should_stop, timings)
        return self._finish(metric, loaded, stats, timings)

    def _sweep(self, run, step, metric, should_stop, timings) -> dict:
        curve = []
        for sigma_rel in self.settings.sweep:
            loaded = self._load(run, step, timings, sigma_rel=sigma_rel)
            stats = self._sample_stats(run, step, loaded, metric.n, should_stop, timings)
            curve.append({"sigma_rel": sigma_rel, "value": self._finish(metric, loaded, stats, timings)["value"]})
        best = min(curve, key=lambda c: c["value"])
        out = self._finish(metric, loaded, stats, timings)
        return {**out, "value": best["value"], "curve": curve, "best": best,
                "settings": {**out["settings"], "ema": f"posthoc sigma_rel {best['sigma_rel']}"}}

    def _features(self):
        if self.network is None:
            self.network = inception.load(self.settings.inception, self.settings.fid_mode, device=self.device)
        return self.network

    def _sample_stats(self, run, step, loaded, n, should_stop, timings) -> tuple:
        """Feature and Inception Score statistics of n samples of `loaded`, reduced over ranks; the newest are
        kept, so fid and is of the same checkpoint and settings sample once."""
        s = self.settings.sampling
        identity = (run, step, loaded.ema, n, s)
        if self.last_sampling and self.last_sampling[0] == identity:
            return self.last_sampling[1]
        network = self._features()
        settings = sample.SampleSettings(n=n, sampler=s.sampler, steps=s.steps, guidance=s.guidance, seed=s.seed,
                                         batch_size=s.batch_size)
        features = stats.FeatureStats(network.num_features, device=self.device)
        scores = stats.InceptionScoreStats(device=self.device)
        resolution = None
        batches = sample.generate(loaded, settings, rank=self.rank, world=self.world, device=self.device,
                                  vae=self._vae(loaded), should_stop=should_stop)
        begin = time.perf_counter()
        for images, labels, ids in batches:
            mid = time.perf_counter()
            timings["sampling"] = timings.get("sampling", 0.0) + mid - begin
            if resolution is None:
                resolution = images.shape[-1]
                if self.settings.reference is not None:
                    fid.check_compatible(self.settings.reference, resolution, network.extractor)
            pool, logits = network(images.to(self.device))
            features.update(pool)
            if logits is not None:
                scores.update(logits, ids)
            if self.device.type == "cuda":  # the split between sampling and features is only true once both ran
                torch.cuda.synchronize(self.device)
            begin = time.perf_counter()
            timings["features"] = timings.get("features", 0.0) + begin - mid
        begin = time.perf_counter()
        features.all_reduce()
        scores.all_reduce()
        timings["statistics"] = timings.get("statistics", 0.0) + time.perf_counter() - begin
        result = (features, scores, resolution)
        self.last_sampling = (identity, result)
        return result

    def _vae(self, loaded):
        if loaded.latent is None:
            return None
        if not self.settings.vae:
            raise ValueError(f"run {loaded.cfg.run!r} trains on latents: give --vae PATH (the autoencoder its "
                             "shards were encoded with) to decode samples")
        from models.vae import LatentVAE
        return LatentVAE.from_pretrained(self.settings.vae, loaded.latent["scale"], loaded.latent["shift"]).to(self.device)

    def _finish(self, metric: Metric, loaded, sampled: tuple, timings: dict) -> dict:
        features, scores, resolution = sampled
        s = self.settings.sampling
        warnings = []
        settings = {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "seed": s.seed, "ema": loaded.ema,
                    "fid_mode": self.settings.fid_mode, "inception": self.network.extractor}
        out = {"status": "ok", "images_seen": loaded.images_seen, "n": features.n, "unit": "", "settings": settings,
               "resolution": resolution, "timings": timings, "warnings": warnings}
        if metric.kind == "is":
            if not bool(scores.count.sum()):
                raise ValueError(f"{metric.key} needs the Inception classifier head, which --fid-mode "
                                 f"{self.settings.fid_mode} does not have; use --fid-mode legacy")
            value, spread = scores.score()
            return {**out, "value": value, "stderr": spread}
        ref = self.settings.reference
        begin = time.perf_counter()
        value = fid.frechet_distance(features.mean(), features.cov(), ref.mu, ref.sigma)
        timings["statistics"] = timings.get("statistics", 0.0) + time.perf_counter() - begin
        if features.n < FEATURE_DIMS:
            warnings.append(f"FID from {features.n} samples, fewer than the {FEATURE_DIMS} feature dimensions: the "
                            "covariance is singular and FID is biased upwards; compare only FIDs of the same n")
        if not math.isfinite(value):
            raise ValueError(f"{metric.key}: the Frechet distance is not finite ({value})")
        return {**out, "value": value, "stderr": None,
                "reference": {"path": self.settings.reference_path, "id": ref.id(), "n": ref.n,
                              "extractor": ref.extractor, "resolution": ref.resolution}}


def result_key(run: str, step: int, metric: Metric) -> str:
    return f"{run}/evals/{step:09d}/{metric.key}.json"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def code_version() -> str:
    try:
        return metadata.version("elbodiff")
    except metadata.PackageNotFoundError:
        return "unknown"


def settings_from(args) -> Settings:
    """The command line as Settings, checked before any work: every user mistake is one ValueError line."""
    random = args.inception == "random"
    suffix = metrics.settings_suffix(args.sampler, args.steps, args.guidance, args.seed,
                                     defaults={"sampler": "ddim", "steps": 32, "guidance": 1.0, "seed": 0})
    wanted = metrics.parse(args.metrics, random_inception=random, settings_suffix=suffix)
    kinds = {m.kind for m in wanted}
    if kinds & {"fid", "is", "fid_sweep"} and not args.inception:
        raise ValueError(f"--metrics {args.metrics} needs --inception PATH (torch-fidelity's "
                         f"{inception.WEIGHTS_FILE['legacy']} for --fid-mode legacy, or 'random')")
    if kinds & {"fid", "fid_sweep"} and not args.ref:
        raise ValueError(f"--metrics {args.metrics} needs --ref REF.npz (see elbodiff ref-stats)")
    if "bpd" in kinds and not args.val:
        raise ValueError("--metrics bpd needs --val SHARDS (the validation shard index)")
    if args.store_retries < 1 or args.lease_seconds <= 0 or args.poll < 0:
        raise ValueError("--store-retries must be >= 1, --lease-seconds > 0 and --poll >= 0")
    sweep = [float(x) for x in args.sweep.split(",") if x.strip()]
    reference = fid.load_reference(args.ref) if args.ref and kinds & {"fid", "fid_sweep"} else None
    return Settings(metrics=wanted, runs=args.run, reference=reference, reference_path=args.ref,
                    sampling=sample.SampleSettings(n=0, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                                   seed=args.seed, batch_size=args.batch_size),
                    inception=args.inception, fid_mode=args.fid_mode, val=args.val, vae=args.vae, sweep=sweep,
                    once=args.once, poll=args.poll, lease_seconds=args.lease_seconds, retries=args.store_retries)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    try:
        settings = settings_from(args)
        store = open_store(args.store, endpoint_url=args.endpoint_url)
        for attempt in range(settings.retries):
            try:
                store.check_reachable()
                break
            except StoreUnreachable as e:
                if attempt == settings.retries - 1:
                    raise
                log.warning("%s; retrying in %d s", one_line(e), 2 ** attempt)
                time.sleep(2 ** attempt)
    except (ValueError, FileNotFoundError, StoreUnreachable) as e:
        print(f"elbodiff eval-service: {one_line(e)}", file=sys.stderr)
        return 2
    rank, world, device = sample.distributed()
    if device.type == "cpu":  # Inception's large activation buffers, freed and reallocated every batch
        keep_freed_memory()
    worker = Worker(store, settings, rank, world, device)
    if settings.inception:  # a missing or wrong weights file fails now, not at the first item
        try:
            network = worker._features()
            if settings.reference is not None:
                fid.check_compatible(settings.reference, settings.reference.resolution or 0, network.extractor)
        except (ValueError, FileNotFoundError) as e:
            print(f"elbodiff eval-service: {one_line(e)}", file=sys.stderr)
            return 2
    previous = {sig: signal.signal(sig, lambda *_: worker.stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return worker.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if world > 1:
            dist.destroy_process_group()
