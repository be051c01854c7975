"""Reading speed of our shards against an ImageFolder-style dataset, and the JPEG decoders, on one CPU core.

Prints JSON. Source images are synthetic photographs (smooth structure plus grain, so JPEG sizes are like
ImageNet's), written by `elbodiff shards` at 64 and 256. Two baselines, both torchvision's ImageFolder with PIL
decode, a random flip and a torch DataLoader: `imagefolder` over the very same JPEG bytes as our shards, one file
per image (what the shard format and reader add or save, the decode being equal), and `imagefolder_source` over
the source JPEGs with the same ADM/EDM centre crop done in the transform (the pipeline of DiT's and ADM's training
scripts, which the shards replace). Everything runs in the main process (num_workers=0, one torch thread, the
trainer's malloc setting), timed in CPU seconds of the process: images/s per core. As a run has them, ours and the
same-bytes baseline also run with one DataLoader worker, timed in CPU seconds of the process and its worker
together (sending each batch from the worker included), and ours with one and two worker threads
(`worker_type: thread`; CPU of the process, threads included). Our side is one stream read round after round, as
in a run: each round an epoch's worth of uint8 batches, with the training stream's random flips and also without
them (reading and decoding only, what the ceiling measures). The decode ceiling is the chosen decoder alone on the
same bytes in memory, exact settings, the faster of writing every image into one reused buffer and into a new
array dropped at once; pipelines and decoders are timed in the same interleaved rounds. Rates are each side's best
round; ratios are given both between best rounds and as the median of the ratios within a round
(`paired_median`).

    .venv/bin/python -m benchmarks.data [--images 1000]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import simplejpeg
import torch
from PIL import Image
import torchvision
from torchvision import transforms
from torchvision.io import decode_jpeg

from data import shards
from data.images import centre_crop
from data.reader import iterate_shard
from data.stream import Stream, StreamConfig
from trainer import train


def synthetic_photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    coarse = rng.random((h // 32 + 2, w // 32 + 2, 3))
    smooth = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), float)
    grain = rng.normal(0, 12, (h, w, 3))
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def imagefolder(root: Path, *crop: Callable) -> torchvision.datasets.ImageFolder:
    """torchvision's ImageFolder with the transforms of a DiT / ADM training script: (crop,) random flip, uint8."""
    return torchvision.datasets.ImageFolder(str(root), transform=transforms.Compose(
        [*crop, transforms.RandomHorizontalFlip(), transforms.PILToTensor()]))


def cpu_seconds(children: list) -> float:
    """CPU seconds of this process and the given children (DataLoader workers), to the nanosecond: each child's
    CPU-time clock has the id that clock_getcpuclockid(3) gives, ((~pid) << 3) | 2 on Linux."""
    return time.process_time() + sum(time.clock_gettime(((~child.pid) << 3) | 2) for child in children)


def timed_rounds(runs: dict, rounds: int = 15, settle: float = 0.1) -> dict:
    """CPU seconds of this process and its workers for each run in each of `rounds` interleaved rounds: the
    machine is shared, and CPU time with interleaving is what stays comparable between the runs. Each reading
    waits `settle` seconds first, so that workers have made the batches they prefetch (`prefetch_factor` each)
    within the round of their own run: a round consumes as many batches as its workers make."""
    seconds = {name: [] for name in runs}
    children = psutil.Process().children(recursive=True)  # workers persist; listing them costs ~1 ms, not timed
    for _ in range(rounds):
        for name, run in runs.items():
            time.sleep(settle)
            start = cpu_seconds(children)
            run()
            time.sleep(settle)
            seconds[name].append(cpu_seconds(children) - start)
    return seconds


def measure(src: Path, out: Path, resolution: int, batch: int) -> dict:
    members = [(s["__key__"], s["jpg"], int(s["cls"])) for name in sorted(out.glob("shard-*.tar"))
               for s in iterate_shard(str(name))]
    folder = out / "folder"
    for key, data, label in members:
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / f"{key}.jpg").write_bytes(data)
    n = len(members) // batch * batch

    def ours(flip: bool, workers: int = 0, worker_type: str = "process"):
        # One stream for all rounds, as a run has: each round reads an epoch's worth of batches from where the last
        # stopped (the new epoch's plan included); opening the index and shards once, 5-8 ms, and starting the
        # workers are outside the rounds.
        stream = iter(Stream(StreamConfig(index=str(out), batch_size=batch, num_workers=workers,
                                          worker_type=worker_type, dtype="uint8", flip=flip)))
        next(stream)

        def run():
            for _ in range(n // batch):
                next(stream)
        return run

    def baseline(dataset, workers: int = 0):
        # persistent workers, started before the rounds, as ours are
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                             drop_last=True, persistent_workers=workers > 0)
        next(iter(loader))

        def run():
            for _ in loader:
                pass
        return run

    pipelines = {"ours": ours(flip=True), "ours_no_flip": ours(flip=False),
                 "imagefolder": baseline(imagefolder(folder)),
                 "imagefolder_source": baseline(imagefolder(src, lambda image: centre_crop(image, resolution))),
                 "ours_1_worker": ours(flip=True, workers=1), "imagefolder_1_worker": baseline(imagefolder(folder), 1),
                 "ours_1_thread": ours(flip=True, workers=1, worker_type="thread"),
                 "ours_2_threads": ours(flip=True, workers=2, worker_type="thread")}

    payloads = [data for _, data, _ in members]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in payloads]
    buffer = np.empty_like(simplejpeg.decode_jpeg(payloads[0]))

    def each(decode, inputs=payloads):
        # each result is dropped before the next decode: holding them all would add page faults to the decoding
        def run():
            for d in inputs:
                decode(d)
        return run

    decoders = {
        "simplejpeg (chosen), into one buffer": each(lambda d: simplejpeg.decode_jpeg(d, "RGB", buffer=buffer)),
        "simplejpeg, new array per image": each(lambda d: simplejpeg.decode_jpeg(d, "RGB")),
        "simplejpeg fastdct+fastupsample, into one buffer": each(
            lambda d: simplejpeg.decode_jpeg(d, "RGB", fastdct=True, fastupsample=True, buffer=buffer)),
        "pillow": each(lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))),
        "torchvision.io.decode_jpeg": each(decode_jpeg, tensors),
    }
    # pipelines and decoders in the same rounds, so that their ratios see the same load
    seconds = timed_rounds({**pipelines, **decoders})
    counts = {**{name: n for name in pipelines}, **{name: len(payloads) for name in decoders}}
    rates = {name: counts[name] / min(times) for name, times in seconds.items()}  # best round of each
    per_round = {name: counts[name] / np.array(times) for name, times in seconds.items()}
    ceiling_per_round = np.maximum(per_round["simplejpeg (chosen), into one buffer"],
                                   per_round["simplejpeg, new array per image"])

    def paired(name: str, reference: np.ndarray) -> float:
        # the median of the ratios within each round: both sides saw the same moment of a shared machine, while
        # each side's best round may come from a different, quieter moment
        return float(np.median(per_round[name] / reference))
    # the fast options trade exactness for speed: how far their pixels are from the exact decode
    errors = np.concatenate([
        np.abs(simplejpeg.decode_jpeg(d, "RGB", fastdct=True, fastupsample=True).astype(np.int16)
               - simplejpeg.decode_jpeg(d, "RGB")).ravel() for d in payloads])
    ceiling = max(rates["simplejpeg (chosen), into one buffer"], rates["simplejpeg, new array per image"])
    return {
        "images": len(members),
        "mean_jpeg_bytes": int(np.mean([len(d) for d in payloads])),
        "ours_images_per_cpu_s": rates["ours"],
        "imagefolder_images_per_cpu_s": rates["imagefolder"],
        "ratio_to_imagefolder": rates["ours"] / rates["imagefolder"],
        "mean_source_jpeg_bytes": int(np.mean([p.stat().st_size for p in src.rglob("*.JPEG")])),
        "imagefolder_source_images_per_cpu_s": rates["imagefolder_source"],
        "ratio_to_imagefolder_source": rates["ours"] / rates["imagefolder_source"],
        "decode_ceiling_images_per_cpu_s": ceiling,
        "fraction_of_decode_ceiling": rates["ours"] / ceiling,
        # reading and decoding alone, as the ceiling has them: the same stream without its random flips
        "ours_no_flip_images_per_cpu_s": rates["ours_no_flip"],
        "fraction_of_decode_ceiling_no_flip": rates["ours_no_flip"] / ceiling,
        # with one DataLoader worker: CPU of the process and the worker
        "ours_1_worker_images_per_cpu_s": rates["ours_1_worker"],
        "imagefolder_1_worker_images_per_cpu_s": rates["imagefolder_1_worker"],
        "ratio_to_imagefolder_1_worker": rates["ours_1_worker"] / rates["imagefolder_1_worker"],
        "fraction_of_decode_ceiling_1_worker": rates["ours_1_worker"] / ceiling,
        # the same stream with worker threads instead of worker processes: CPU of the process, threads included
        "ours_1_thread_images_per_cpu_s": rates["ours_1_thread"],
        "fraction_of_decode_ceiling_1_thread": rates["ours_1_thread"] / ceiling,
        "ours_2_threads_images_per_cpu_s": rates["ours_2_threads"],
        "fraction_of_decode_ceiling_2_threads": rates["ours_2_threads"] / ceiling,
        "ratio_to_imagefolder_1_worker_with_2_threads": rates["ours_2_threads"] / rates["imagefolder_1_worker"],
        "paired_median": {
            "ratio_to_imagefolder": paired("ours", per_round["imagefolder"]),
            "ratio_to_imagefolder_1_worker": paired("ours_1_worker", per_round["imagefolder_1_worker"]),
            "fraction_of_decode_ceiling_1_worker": paired("ours_1_worker", ceiling_per_round),
            "fraction_of_decode_ceiling_2_threads": paired("ours_2_threads", ceiling_per_round),
            "ratio_to_imagefolder_source": paired("ours", per_round["imagefolder_source"]),
            "fraction_of_decode_ceiling": paired("ours", ceiling_per_round),
            "fraction_of_decode_ceiling_no_flip": paired("ours_no_flip", ceiling_per_round),
        },
        "decoders_in_memory_images_per_cpu_s": {name: rates[name] for name in decoders},
        "fastdct_fastupsample_abs_error": {"mean": float(errors.mean()), "max": int(errors.max()),
                                           "fraction_nonzero": float((errors > 0).mean())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train.keep_freed_memory()  # as in `elbodiff train` and its forked DataLoader workers; for every side alike
    rng = np.random.default_rng(0)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch_threads": 1, "resolutions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "src")
        for i in range(args.images):
            folder = src / f"n{i % 10:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(synthetic_photo(rng, 300, 400))
            image.save(folder / f"{i}.JPEG", quality=90)
        for resolution in (64, 256):
            out = Path(tmp, f"r{resolution}")
            shards.write(str(src), str(out), resolution=resolution, samples_per_shard=250,
                         processes=os.cpu_count() or 1)
            report["resolutions"][str(resolution)] = measure(src, out, resolution, batch=50)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
