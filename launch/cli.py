"""The `elbodiff` command line: one entry point for every subcommand."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elbodiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the small end-to-end demonstration on CPU")
    demo.add_argument("--out", default="demo-out", help="directory for everything the demo writes")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from launch import demo as demo_mod
        return demo_mod.run(args.out)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
