"""Forward + backward time of each tiny network preset against a plain nn.TransformerEncoder, as JSON.

The baseline has the preset's transformer width and depth and the token count its transformer blocks see
(for the VDM U-Net, which has no transformer: its width, its number of ResNet blocks and one token per pixel).
Both sides run in the same process, one after the other, so the ratio survives a busy machine better than
either time. Usage, from the repository root (run as a module, so that `models` is the package and not
this file): python -m benchmarks.models [--threads N] [--batch B] [--repeats R]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from models import uvit, uvit_latent
from models.layers import num_params, transformer_block_flops
from models.presets import build_network, flops_per_forward

TINY = ("uvit_tiny", "uvit_residual_tiny", "uvit_latent_tiny", "vdm_tiny")


def baseline_shape(net: nn.Module) -> dict:
    c = net.config
    if isinstance(c, uvit.UViTConfig):
        stage_blocks = [2 * n for n, kind in zip(c.blocks, c.stages) if kind == "transformer"]
        return {"width": c.transformer_channels, "depth": c.transformer_depth + sum(stage_blocks),
                "tokens": c.transformer_resolution**2, "heads": c.transformer_channels // c.head_channels}
    if isinstance(c, uvit_latent.UViTLatentConfig):
        return {"width": c.width, "depth": c.depth, "tokens": c.num_tokens, "heads": c.num_heads}
    return {"width": c.n_embd, "depth": 2 * c.n_layer + 3, "tokens": c.resolution**2, "heads": 1}


def seconds_per_step(step, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    net = build_network(name).train()
    c = net.config
    z = torch.randn(batch, c.in_channels, c.resolution, c.resolution)
    logsnr, cond = torch.randn(batch), torch.zeros(batch, dtype=torch.long)

    def net_step():
        net.zero_grad(set_to_none=True)
        net(z, logsnr, cond).square().mean().backward()

    shape = baseline_shape(net)
    layer = nn.TransformerEncoderLayer(shape["width"], shape["heads"], 4 * shape["width"], dropout=0.0,
                                       batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, shape["depth"], enable_nested_tensor=False).train()
    tokens = torch.randn(batch, shape["tokens"], shape["width"])

    def baseline_step():
        encoder.zero_grad(set_to_none=True)
        encoder(tokens).square().mean().backward()

    network_s, baseline_s = seconds_per_step(net_step, repeats), seconds_per_step(baseline_step, repeats)
    baseline_flops = shape["depth"] * transformer_block_flops(batch, shape["tokens"], shape["width"], 4.0, None)
    return {
        "preset": name,
        "params": num_params(net),
        "baseline": shape,
        "baseline_params": num_params(encoder),
        "network_ms": round(1e3 * network_s, 2),
        "baseline_ms": round(1e3 * baseline_s, 2),
        "time_ratio": round(network_s / baseline_s, 2),
        "forward_gflops": round(flops_per_forward(c, batch) / 1e9, 3),
        "baseline_forward_gflops": round(baseline_flops / 1e9, 3),
        "flops_ratio": round(flops_per_forward(c, batch) / baseline_flops, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "batch": args.batch,
        "step": "forward + backward, fp32, median of repeats after 3 warm-up steps",
        "results": [measure(name, args.batch, args.repeats) for name in TINY],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
