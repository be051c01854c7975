"""Training metrics: `<run>/logs/metrics.jsonl`, written by rank 0 of `trainer.train`."""
from __future__ import annotations

import json
import logging
import time

from trainer.experiment import ExperimentConfig
from trainer.store import Store

log = logging.getLogger(__name__)


class MetricsLog:
    """`<run>/logs/metrics.jsonl`: one record per log interval, means over that interval's finite steps.

    Every rank keeps the window; rank 0 writes. The store writes whole objects atomically, so the file is rewritten
    at each interval (thousands of steps apart in a real run); on resume, records past the checkpoint are dropped,
    because the resumed run logs those images again."""

    def __init__(self, store: Store, cfg: ExperimentConfig, images_seen: int, writer: bool):
        self.store, self.cfg, self.writer, self.key = store, cfg, writer, f"{cfg.run}/logs/metrics.jsonl"
        old = store.get(self.key).decode().splitlines() if writer and store.exists(self.key) else []
        self.lines = [line for line in old if json.loads(line)["images_seen"] <= images_seen]
        self.window: list[tuple[float, float]] = []
        self.started = time.perf_counter()

    def step(self, loss: float | None, grad_norm: float, lr: float, images_seen: int, global_batch: int,
             skipped: int) -> None:
        if loss is not None:
            self.window.append((loss, grad_norm))
        if images_seen % self.cfg.log_every_images:
            return
        now = time.perf_counter()
        mean = [sum(w[i] for w in self.window) / len(self.window) if self.window else None for i in (0, 1)]
        record = {"images_seen": images_seen, "step": images_seen // global_batch, "loss": mean[0],
                  "grad_norm": mean[1], "lr": lr,
                  "images_per_s": self.cfg.log_every_images / (now - self.started), "skipped_steps": skipped}
        self.window, self.started = [], now
        if self.writer:
            self.lines.append(json.dumps(record))
            self.store.put(self.key, ("\n".join(self.lines) + "\n").encode())
            log.info("%s", self.lines[-1])
