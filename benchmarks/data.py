"""Reading speed of our shards against an ImageFolder-style dataset, and the JPEG decoders, on one CPU core.

Prints JSON. Source images are synthetic photographs (smooth structure plus grain, so JPEG sizes are like
ImageNet's), written by `elbodiff shards` at 64 and 256; the ImageFolder-style set holds the very same JPEG bytes as
one file per image, read with PIL through a torch DataLoader. Both sides run in the main process (num_workers=0,
one torch thread), timed in CPU seconds of the process: images/s per core. The decode ceiling is the chosen
decoder alone on the same bytes in memory, exact settings, the faster of writing every image into one reused buffer
and into a new array dropped at once; pipelines and decoders are timed in the same interleaved rounds.

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


import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from data import shards
from data.reader import iterate_shard
from data.stream import Stream, StreamConfig


def synthetic_photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    coarse = rng.random((h // 32 + 2, w // 32 + 2, 3))
    smooth = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), float)
    grain = rng.normal(0, 12, (h, w, 3))
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


class ImageFolderStyle(torch.utils.data.Dataset):
    def __init__(self, files: list[tuple[str, int]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        with Image.open(path) as image:
            x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return x, label


def best_rates(runs: dict, counts: dict, rounds: int = 15) -> dict:
    """Images per CPU-second of this process (everything runs in it), best of interleaved rounds: the machine
    is shared, and CPU time with interleaving is what stays comparable between the runs."""
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.process_time()
            run()
            best[name] = min(best[name], time.process_time() - start)
    return {name: counts[name] / seconds for name, seconds in best.items()}


def measure(out: Path, count: int, batch: int) -> dict:
    members = [(s["__key__"], s["jpg"], int(s["cls"])) for name in sorted(out.glob("shard-*.tar"))
               for s in iterate_shard(str(name))]
    folder = out / "folder"
    files = []
    for key, data, label in members:
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        path = folder / str(label) / f"{key}.jpg"
        path.write_bytes(data)
        files.append((str(path), label))
    n = len(members) // batch * batch

    def ours():
        it = iter(Stream(StreamConfig(index=str(out), batch_size=batch, num_workers=0, dtype="uint8")))
        for _ in range(n // batch):
            next(it)

    def folder_style():
        loader = torch.utils.data.DataLoader(ImageFolderStyle(files), batch_size=batch, shuffle=True,
                                             num_workers=0, drop_last=True)
        for _ in loader:
            pass

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
    rates = best_rates({"ours": ours, "imagefolder": folder_style, **decoders},
                       {"ours": n, "imagefolder": n, **{name: len(payloads) for name in decoders}})
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
        "decode_ceiling_images_per_cpu_s": ceiling,
        "fraction_of_decode_ceiling": rates["ours"] / ceiling,
        "decoders_in_memory_images_per_cpu_s": {name: rates[name] for name in decoders},
        "fastdct_fastupsample_abs_error": {"mean": float(errors.mean()), "max": int(errors.max()),
                                           "fraction_nonzero": float((errors > 0).mean())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
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
            report["resolutions"][str(resolution)] = measure(out, args.images, batch=50)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
