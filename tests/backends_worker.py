"""One rank of several training runs in one process group (started by tests/test_backends.py under torchrun).

argv: the config, then a JSON list of runs {"overrides": [...], "nan_at": images seen or null}; each is trained to
the end with `trainer.train.main`, the path of `elbodiff train`, one after the other: one launch instead of one
per backend setting. `nan_at` makes rank 1 alone (the second half of the global batch) draw NaN noise for the batch
starting there, so its network output is not finite while rank 0's is."""
import json
import math
import sys

from trainer import train

DRAW_NOISE = train.draw_noise


def noise_with_nan_on_rank_1(nan_at):
    def draw_noise(cfg, images_seen, start, global_batch, shape, device):
        t, eps = DRAW_NOISE(cfg, images_seen, start, global_batch, shape, device)
        return t, eps * math.nan if start >= global_batch // 2 and images_seen == nan_at else eps
    return draw_noise


if __name__ == "__main__":
    config_path, runs = sys.argv[1], json.loads(sys.argv[2])
    for run in runs:
        train.draw_noise = noise_with_nan_on_rank_1(run["nan_at"])
        code = train.main(config_path, run["overrides"])
        if code:
            sys.exit(code)
    # the first run made the process group (accelerate keeps it for the others) with its configured timeout
    import torch
    import torch.distributed as dist
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    print(f"process group timeout: {backend.options._timeout.total_seconds():.0f} s")
    from launch.cli import exit_now
    exit_now(0)
