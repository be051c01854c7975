"""Time the objective adds around the network call, per example, relative to one forward of the demo network.

The objective's own work (drawing t and eps, logsnr and density, diffusing x, converting the output to
eps_hat, the weighted squared error, the finiteness checks) is timed with a network that returns a
precomputed tensor, and compared with a forward pass of the demo network on the same batch. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from models import objective, presets, schedules, weighting


class Precomputed(torch.nn.Module):
    def __init__(self, out: torch.Tensor, prediction: str):
        super().__init__()
        self.out, self.prediction = out, prediction

    def forward(self, z, logsnr, cond):
        return self.out


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="uvit_tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = presets.build_network(args.preset).eval()
    cfg = presets.preset_config(args.preset)
    shape = (args.batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    cond = torch.randint(0, cfg.num_classes, (args.batch,), generator=g)
    logsnr = torch.zeros(args.batch)
    with torch.no_grad():
        forward = best_of(lambda: net(x, logsnr, cond), args.repeats)
        stand_in = Precomputed(net(x, logsnr, cond), net.prediction)
    results = {}
    for name, sampler, w in (
        ("weighted_loss_cosine_sigmoid",
         schedules.build(schedules.ScheduleConfig(name="cosine")), weighting.build(weighting.WeightingConfig())),
        ("weighted_loss_adaptive_edm_monotonic",
         objective.build_sampler(objective.ObjectiveConfig(importance="adaptive",
                                                           weighting=weighting.WeightingConfig(name="edm_monotonic"))),
         weighting.build(weighting.WeightingConfig(name="edm_monotonic"))),
    ):
        with torch.no_grad():
            seconds = best_of(lambda: objective.weighted_loss(stand_in, x, cond, schedule=sampler, weighting=w,
                                                              generator=g), args.repeats)
        results[name] = {"seconds_per_example": seconds / args.batch, "ratio_to_forward": seconds / forward}
    linear = schedules.build(schedules.ScheduleConfig(name="linear", logsnr_min=-5.0, logsnr_max=13.3))
    with torch.no_grad():
        seconds = best_of(lambda: objective.vlb(stand_in, x, cond, schedule=linear, data="continuous",
                                                generator=g), args.repeats)
    results["vlb_continuous_linear"] = {"seconds_per_example": seconds / args.batch,
                                        "ratio_to_forward": seconds / forward}
    print(json.dumps({
        "benchmark": "objective overhead", "preset": args.preset, "batch": args.batch, "shape": list(shape),
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "network_forward_seconds_per_example": forward / args.batch,
        "objective": results, "target_ratio": 0.05,
    }, indent=2))


if __name__ == "__main__":
    main()
