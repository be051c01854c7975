"""The `elbodiff` command line: one entry point for every subcommand."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elbodiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train on the demo data with 2 CPU ranks, then the closed-form objective demo")
    demo.add_argument("--out", default="demo-out", help="directory for everything the demo writes")

    train = sub.add_parser("train", help="train one rank of a run (start it with torchrun, srun or a pod per rank)")
    train.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", help="key.sub=value settings replacing the YAML's")

    shards = sub.add_parser("shards", help="image folders (ImageNet train/val layout) to tar shards")
    shards.add_argument("src", help="class-per-folder tree, or a flat folder with --labels")
    shards.add_argument("out", help="output folder or s3://bucket/prefix")
    shards.add_argument("--labels", help="label file (NAME LABEL per line) for a flat folder such as ImageNet val")
    shards.add_argument("--resolution", default="64", type=lambda s: 0 if s == "keep" else int(s),
                        help="square size (ADM/EDM centre crop), or 0/keep for the original bytes")
    shards.add_argument("--format", default="jpg", choices=["jpg", "png"], help="encoding of written images")
    shards.add_argument("--samples-per-shard", type=int, default=1000)
    shards.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    shards.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    shards.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")

    demo_data = sub.add_parser("demo-data", help="write the embedded demo dataset (shapes, 32x32) as shards")
    demo_data.add_argument("out", help="output folder or s3://bucket/prefix")
    demo_data.add_argument("--num-images", type=int, default=5000)
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.add_argument("--overwrite", action="store_true")

    encode = sub.add_parser("encode", help="image shards to latent shards through a pretrained autoencoder")
    encode.add_argument("shards", help="image shard index (index.json, or its folder / s3 prefix)")
    encode.add_argument("out", help="output folder or s3://bucket/prefix")
    encode.add_argument("--vae", required=True, help="local folder of a diffusers AutoencoderKL")
    encode.add_argument("--scale", type=float, required=True, help="latent scale (e.g. 0.18215 for SD's VAE)")
    encode.add_argument("--shift", type=float, default=0.0)
    encode.add_argument("--processes", type=int, default=0, help="0: one per GPU, or one without GPUs")
    encode.add_argument("--overwrite", action="store_true")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from launch import demo as demo_mod
        return demo_mod.main(args.out)
    if args.command == "train":
        from trainer import train as train_mod
        from trainer.config import ConfigError
        from trainer.store import StoreUnreachable
        try:
            return train_mod.main(args.config, args.overrides)
        except (ConfigError, StoreUnreachable) as e:  # nothing has started yet: say what to fix
            print(f"elbodiff train: {e}", file=sys.stderr)
            return 2
    if args.command == "shards":
        from data import shards as shards_mod
        print(shards_mod.report(shards_mod.write(
            args.src, args.out, resolution=args.resolution, fmt=args.format, labels=args.labels,
            samples_per_shard=args.samples_per_shard, seed=args.seed, processes=args.processes,
            overwrite=args.overwrite)))
        return 0
    if args.command == "demo-data":
        from data import demo as demo_data_mod, shards as shards_mod
        print(shards_mod.report(demo_data_mod.write(args.out, num_images=args.num_images, seed=args.seed,
                                                    overwrite=args.overwrite)))
        return 0
    if args.command == "encode":
        from data import encode as encode_mod, shards as shards_mod
        print(shards_mod.report(encode_mod.write(args.shards, args.out, vae=args.vae, scale=args.scale,
                                                 shift=args.shift, processes=args.processes,
                                                 overwrite=args.overwrite)))
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
