"""Training metrics of `trainer.train`: `<run>/logs/metrics.jsonl`, TensorBoard scalars and a progress bar.

One record per log interval, means over that interval's finite (not skipped) steps:

    images_seen, step, loss, grad_norm, lr, images_per_s, skipped_steps (in the whole run),
    loss_by_logsnr    mean loss of the examples whose logsnr fell in each of LOGSNR_BINS equal-width bins of the
                      schedule's [logsnr_min, logsnr_max] (edges in `logsnr_edges`), over all ranks; null for a
                      bin no example fell in. The weighted loss is an integral over logsnr, so this shows which
                      noise levels the loss (and its variance) comes from.
    peak_memory_mib   rank 0's peak since start: memory allocated by tensors on a GPU, the process's resident set
                      (ru_maxrss) on a CPU
    loss_spikes       steps of the interval whose loss exceeded SPIKE_FACTOR x the median of the previous
                      SPIKE_HISTORY steps' losses; each is also logged as a warning when it happens

Every rank keeps the window (the per-bin sums ride on the step's all-reduce, see `logsnr_totals`); rank 0
writes. TensorBoard scalars (the same numbers, against images seen) are written when `torch.utils.tensorboard`
imports, i.e. when the `tensorboard` package is installed. A store error on any of these writes (a full disk, a
lost endpoint) never stops training: see `BestEffort`.
"""
from __future__ import annotations

import json
import logging
import resource
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from trainer.experiment import ExperimentConfig
from trainer.store import STORE_ERRORS, Store

log = logging.getLogger(__name__)

LOGSNR_BINS = 8
SPIKE_FACTOR = 4.0
SPIKE_HISTORY = 64  # steps; no step is called a spike before a quarter of this history exists
MAX_BACKOFF_S = 300.0


class BestEffort:
    """A store write that must not stop training (metrics, TensorBoard events, sample grids), unlike a checkpoint.

    A failed write is logged and the next ones are skipped for 1, 2, 4, ... (at most MAX_BACKOFF_S) seconds, so
    that a lost endpoint does not cost its timeout at every interval. The objects are rewritten whole (metrics.jsonl,
    event files), so the first write that succeeds carries everything the failed ones held; a sample grid skipped
    meanwhile is lost, and the log says so."""

    def __init__(self, what: str, clock=time.monotonic):
        self.what, self.clock = what, clock
        self.failures, self.retry_at = 0, 0.0

    def __call__(self, write, *, force: bool = False) -> bool:
        """Run `write()` unless backing off (`force`: try anyway, for the run's last write); True when written."""
        now = self.clock()
        if now < self.retry_at and not force:
            log.warning("%s not written: the store failed %d time(s) in a row; next try in %.0f s", self.what,
                        self.failures, self.retry_at - now)
            return False
        try:
            write()
        except STORE_ERRORS as e:
            self.failures += 1
            delay = min(2.0 ** (self.failures - 1), MAX_BACKOFF_S)
            self.retry_at = now + delay
            log.error("could not write %s: %s; training goes on, next try in %.0f s", self.what,
                      " ".join(str(e).split()) or type(e).__name__, delay)
            return False
        if self.failures:
            log.warning("%s written again after %d failed write(s)", self.what, self.failures)
        self.failures, self.retry_at = 0, 0.0
        return True


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


class MetricsLog:
    """Use as a context manager: leaving it closes the progress bar and uploads the last TensorBoard events.

    The store writes whole objects atomically, so metrics.jsonl is rewritten at each interval (thousands of steps
    apart in a real run); on resume, records past the checkpoint are dropped, because the resumed run logs those
    images again."""

    def __init__(self, store: Store, cfg: ExperimentConfig, images_seen: int, writer: bool, device: torch.device):
        self.store, self.cfg, self.writer, self.device = store, cfg, writer, device
        self.key = f"{cfg.run}/logs/metrics.jsonl"
        old = store.get(self.key).decode().splitlines() if writer and store.exists(self.key) else []
        self.lines = [line for line in old if json.loads(line)["images_seen"] <= images_seen]
        lo, hi = cfg.objective.schedule.logsnr_min, cfg.objective.schedule.logsnr_max
        self.edges = [lo + (hi - lo) * i / LOGSNR_BINS for i in range(LOGSNR_BINS + 1)]
        self._inner_edges = torch.tensor(self.edges[1:-1], device=device)
        self.recent: deque[float] = deque(maxlen=SPIKE_HISTORY)
        self._reset(time.perf_counter())
        self.bar = tqdm(total=cfg.total_images, initial=images_seen, unit="img", unit_scale=True, disable=not writer)
        self.tensorboard = TensorBoard(store, cfg.run, images_seen) if writer and TensorBoard.available() else None
        self.upload = BestEffort(self.key)

    def _reset(self, now: float) -> None:
        self.window: list[tuple[float, float]] = []
        self.bins = torch.zeros(2 * LOGSNR_BINS, dtype=torch.float64, device=self.device)
        self.spikes, self.started = 0, now

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.writer and self.upload.failures:  # the last records, if the store is back
            self.upload(self._write, force=True)
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _write(self) -> None:
        self.store.put(self.key, ("\n".join(self.lines) + "\n").encode())

    def logsnr_totals(self, logsnr: Tensor, losses: Tensor) -> Tensor:
        """This rank's per-bin loss sums, then counts (float64), to be summed over ranks with the step's loss."""
        index = torch.bucketize(logsnr.detach(), self._inner_edges)  # outside the range: the end bins
        return torch.cat([torch.bincount(index, weights=losses.detach().double(), minlength=LOGSNR_BINS),
                          torch.bincount(index, minlength=LOGSNR_BINS).double()])

    def step(self, loss: float | None, by_logsnr: Tensor, grad_norm: float, lr: float, images_seen: int,
             global_batch: int, skipped: int) -> None:
        """`loss`: the global mean loss, None when the step was skipped; `by_logsnr`: `logsnr_totals` summed over
        ranks."""
        self.bar.update(global_batch)
        if loss is not None:
            self._check_spike(loss, images_seen)
            self.window.append((loss, grad_norm))
            self.bins += by_logsnr
        if images_seen % self.cfg.log_every_images:
            return
        now = time.perf_counter()
        mean = [sum(w[i] for w in self.window) / len(self.window) if self.window else None for i in (0, 1)]
        bins = self.bins.tolist()
        sums, counts = bins[:LOGSNR_BINS], bins[LOGSNR_BINS:]
        record = {"images_seen": images_seen, "step": images_seen // global_batch, "loss": mean[0],
                  "grad_norm": mean[1], "lr": lr, "images_per_s": self.cfg.log_every_images / (now - self.started),
                  "skipped_steps": skipped, "loss_by_logsnr": [s / n if n else None for s, n in zip(sums, counts)],
                  "logsnr_edges": self.edges, "peak_memory_mib": peak_memory_mib(self.device),
                  "loss_spikes": self.spikes}
        self._reset(now)
        if self.writer:
            self.lines.append(json.dumps(record))
            self.upload(self._write)
            log.info("%s", self.lines[-1])
            self.bar.set_postfix(loss=record["loss"], refresh=False)
            if self.tensorboard is not None:
                self.tensorboard.write(record)

    def _check_spike(self, loss: float, images_seen: int) -> None:
        if len(self.recent) >= SPIKE_HISTORY // 4:
            median = statistics.median(self.recent)
            if loss > SPIKE_FACTOR * median:
                self.spikes += 1
                if self.writer:
                    log.warning("loss spike at %d images seen: %.4g, %.1f x the median %.4g of the last %d steps",
                                images_seen, loss, loss / median, median, len(self.recent))
        self.recent.append(loss)


class TensorBoard:
    """Scalars under `<run>/tensorboard/`, stepped by images seen. The event files are written to a local
    temporary directory and uploaded through the store, whole, after every log interval (they are small; the store
    writes whole objects, and a failed upload is retried with the next one, see `BestEffort`). A resumed run hides the events its predecessor wrote
    after the checkpoint (`purge_step`), as metrics.jsonl drops those records."""

    @staticmethod
    def available() -> bool:
        try:
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            return False
        return True

    def __init__(self, store: Store, run: str, images_seen: int):
        from torch.utils.tensorboard import SummaryWriter

        self.store, self.prefix = store, f"{run}/tensorboard/"
        self.tmp = tempfile.TemporaryDirectory(prefix="elbodiff-tb-")
        self.dir = Path(self.tmp.name)
        self.writer = SummaryWriter(str(self.dir), purge_step=images_seen + 1 if images_seen else None)
        self.upload = BestEffort(self.prefix)

    def write(self, record: dict) -> None:
        step = record["images_seen"]
        for key in ("loss", "grad_norm", "lr", "images_per_s", "peak_memory_mib", "loss_spikes"):
            if record[key] is not None:
                self.writer.add_scalar(key, record[key], step)
        for lo, value in zip(record["logsnr_edges"], record["loss_by_logsnr"]):
            if value is not None:
                self.writer.add_scalar(f"loss_by_logsnr/from_{lo:g}", value, step)
        self.writer.flush()
        self._upload()

    def _upload(self, force: bool = False) -> None:
        def put_all():
            for path in self.dir.iterdir():
                self.store.put(self.prefix + path.name, path)
        self.upload(put_all, force=force)

    def close(self) -> None:
        self.writer.close()
        self._upload(force=True)  # the last events, even while backing off
        self.tmp.cleanup()
