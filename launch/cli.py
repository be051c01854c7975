"""The `elbodiff` command line: one entry point for every subcommand."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elbodiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train on the demo data with 2 CPU ranks, evaluate it, then the closed-form "
                          "objective demo")
    demo.add_argument("--out", default="demo-out", help="directory for everything the demo writes")
    demo.add_argument("--inception", help="Inception weights for real FID and IS (torch-fidelity's "
                      "weights-inception-2015-12-05-6726825d.pth); default: a fixed random initialisation")

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

    ref = sub.add_parser("ref-stats", help="FID reference statistics (mu, sigma of Inception features) of a shard set")
    ref.add_argument("shards", nargs="?", help="shard index (index.json, or its folder / s3 prefix)")
    ref.add_argument("--out", required=True, help="the .npz to write")
    ref.add_argument("--inception", help="Inception weights file (legacy: torch-fidelity's "
                     "weights-inception-2015-12-05-6726825d.pth; clean: clean-fid's inception-2015-12-05.pt), "
                     "or 'random' for the fixed random initialisation")
    ref.add_argument("--fid-mode", default="legacy", choices=["legacy", "clean"],
                     help="legacy: the TF resize ADM and EDM2 use; clean: clean-fid's PIL bicubic resize")
    ref.add_argument("--n", type=int, default=0, help="use the first N images of the index (0: all)")
    ref.add_argument("--batch-size", type=int, default=64)
    ref.add_argument("--from-edm2", metavar="FILE.pkl", help="convert EDM2's reference pickle instead")

    sample = sub.add_parser("sample", help="sample a checkpoint of a run; under torchrun the seeds are split over ranks")
    sample.add_argument("run_uri", help="the run in its store: /path/to/store/RUN or s3://bucket/prefix/RUN")
    sample.add_argument("--step", type=int, required=True, help="checkpoint step")
    which = sample.add_mutually_exclusive_group()
    which.add_argument("--ema", help="EMA weights by name (e.g. power-0.100, decay-0.9999)")
    which.add_argument("--sigma-rel", type=float, help="post-hoc power EMA of this width from the run's snapshots")
    sample.add_argument("--n", type=int, default=50000)
    sample.add_argument("--seed", type=int, default=0, help="sample i uses seed (SEED, i)")
    sample.add_argument("--sampler", default="ddim", choices=["ancestral", "ddim"])
    sample.add_argument("--steps", type=int, default=32)
    sample.add_argument("--guidance", type=float, default=1.0)
    sample.add_argument("--batch-size", type=int, default=64, help="per rank")
    sample.add_argument("--out", help="folder for the images")
    sample.add_argument("--format", default="png", choices=["png", "npz"],
                        help="png: one file per sample; npz: ADM's layout (arr_0 images, arr_1 labels)")
    sample.add_argument("--vae", help="local AutoencoderKL folder (latent runs)")
    sample.add_argument("--inception", help="Inception weights: also compute FID against --ref")
    sample.add_argument("--fid-mode", default="legacy", choices=["legacy", "clean"])
    sample.add_argument("--ref", help="reference statistics .npz for FID")

    service = sub.add_parser("eval-service", help="evaluate every checkpoint of the runs in a store, by any number "
                             "of workers")
    service.add_argument("--store", required=True, help="/path, file:///path or s3://bucket/prefix")
    service.add_argument("--run", action="append", default=[], help="a run to watch (repeatable; default: every run)")
    service.add_argument("--metrics", default="fid50k,is50k,bpd",
                         help="comma-separated: fidN / fidNk, isN / isNk, bpd, fid_sweepN / fid_sweepNk")
    service.add_argument("--ref", help="reference statistics .npz (fid, is needs none)")
    service.add_argument("--inception", help="Inception weights file, or 'random' (metrics then named "
                         "*_random_inception)")
    service.add_argument("--fid-mode", default="legacy", choices=["legacy", "clean"])
    service.add_argument("--val", help="validation shard index for bpd")
    service.add_argument("--vae", help="local AutoencoderKL folder (latent runs)")
    service.add_argument("--sampler", default="ddim", choices=["ancestral", "ddim"])
    service.add_argument("--steps", type=int, default=32)
    service.add_argument("--guidance", type=float, default=1.0)
    service.add_argument("--seed", type=int, default=0)
    service.add_argument("--batch-size", type=int, default=64, help="per rank")
    service.add_argument("--sweep", default="0.02,0.05,0.08,0.11,0.14,0.17,0.20",
                         help="sigma_rel grid of fid_sweep metrics")
    service.add_argument("--once", action="store_true", help="evaluate what is pending, then exit")
    service.add_argument("--poll", type=float, default=60.0, help="seconds between looks at the store")
    service.add_argument("--lease-seconds", type=float, default=300.0,
                         help="a lease not renewed for this long may be taken over")
    service.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    service.add_argument("--store-retries", type=int, default=6,
                         help="store failures in a row (1, 2, 4, ... s apart) before the service gives up")

    args = parser.parse_args(argv)
    if args.command in ("train", "ref-stats", "sample", "eval-service"):  # the commands that run as ranks
        from launch.ranks import LaunchError, export_ranks
        try:
            export_ranks()
        except LaunchError as e:
            print(f"elbodiff {args.command}: {e}", file=sys.stderr)
            return 2
    if args.command in ("ref-stats", "sample", "eval-service"):
        from importlib import import_module
        module = {"ref-stats": "eval.fid", "sample": "eval.sample", "eval-service": "eval.service"}[args.command]
        return import_module(module).main(args)
    if args.command == "demo":
        from launch import demo as demo_mod
        return demo_mod.main(args.out, args.inception)
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


def exit_now(code: int) -> None:
    """Exit with `code` without the interpreter's teardown, once everything the process writes is written.

    The exit code is what a launcher acts on (75: requeue). The teardown destroys torch.distributed's C++ objects
    (gloo's worker threads, the TCPStore's) in an order that can abort a process that has finished its work with
    "terminate called without an active exception" (SIGABRT, -6 instead of 75 or 0): seen in 4 of a few hundred
    2-process CPU runs, with and without destroy_process_group first, never on demand."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def run() -> None:
    """The `elbodiff` command and `python -m launch.cli`."""
    exit_now(main())


if __name__ == "__main__":
    run()
