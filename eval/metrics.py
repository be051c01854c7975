"""Metric names of the evaluation service: `fid50k`, `fid500`, `is50k`, `is`, `bpd`, `fid_sweep10k`.

A name fixes what is measured and on how many samples; the sampling settings that differ from the defaults are
appended to the key (`fid50k-ancestral-steps256-guidance1.5`), so one checkpoint is evaluated once per metric and
configuration. With the fixed random Inception (`--inception random`) every Inception metric carries
`_random_inception` in its name (`fid_random_inception500`): its numbers are useful for tests and trends within one
run, never comparable with a published FID.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("fid", "is", "bpd", "fid_sweep")
_NAME = re.compile(r"^(fid_sweep|fid|is)(\d+)(k?)$")
DEFAULT_N = 50_000


@dataclass(frozen=True)
class Metric:
    kind: str  # fid, is, bpd, fid_sweep
    n: int  # samples (fid, is, fid_sweep); 0 for bpd: the whole validation set
    key: str  # the result's file name without .json, unique per configuration

    @property
    def uses_inception(self) -> bool:
        return self.kind != "bpd"


def parse(names: str, *, random_inception: bool, settings_suffix: str = "") -> list[Metric]:
    """`--metrics` as a list; `is` without a count takes the count of the first fid metric (the same samples
    serve both), else 50k. A malformed name is a ValueError naming it and the allowed forms."""
    parts = [p.strip() for p in names.split(",") if p.strip()]
    if not parts:
        raise ValueError("--metrics is empty; allowed: fidN / fidNk, isN / isNk / is, bpd, fid_sweepN / fid_sweepNk")
    parsed: list[tuple[str, int | None]] = []
    for part in parts:
        match = _NAME.match(part)
        if part == "bpd":
            parsed.append(("bpd", 0))
        elif part == "is":
            parsed.append(("is", None))
        elif match and int(match.group(2)) > 0:
            parsed.append((match.group(1), int(match.group(2)) * (1000 if match.group(3) else 1)))
        else:
            raise ValueError(f"--metrics: unknown metric {part!r}; allowed: fidN or fidNk (fid50k, fid500), isN or "
                             "isNk or is, bpd, fid_sweepN or fid_sweepNk")
    fid_n = next((n for kind, n in parsed if kind == "fid"), DEFAULT_N)
    metrics = []
    for kind, n in parsed:
        n = fid_n if n is None else n
        metrics.append(Metric(kind, n, key(kind, n, random_inception=random_inception, suffix=settings_suffix)))
    if len({m.key for m in metrics}) != len(metrics):
        raise ValueError(f"--metrics names a metric twice: {names!r}")
    return metrics


def key(kind: str, n: int, *, random_inception: bool, suffix: str = "") -> str:
    if kind == "bpd":
        return "bpd"
    count = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    return f"{kind}{'_random_inception' if random_inception else ''}{count}{suffix}"


def settings_suffix(sampler: str, steps: int, guidance: float, seed: int, *, defaults: dict) -> str:
    """'' for the default sampling settings, else '-<setting><value>' for each one that differs."""
    given = {"sampler": sampler, "steps": steps, "guidance": guidance, "seed": seed}
    parts = []
    for name, value in given.items():
        if value != defaults[name]:
            parts.append(str(value) if name == "sampler" else f"{name}{value:g}")
    return "".join(f"-{p}" for p in parts)
