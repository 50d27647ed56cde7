"""`megatron-dispo demo`: the embedded CPU default run (tiny Qwen3, synthetic arithmetic, DISPO)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.max_steps=5")


def run(args: argparse.Namespace) -> int:
    print("The embedded CPU demo arrives with the trainer issue.")
    return 0
