"""``coembed demo``: the main job on the shipped data, start to finish."""

from __future__ import annotations

import argparse

from coembed.cli.common import Command, add_device, add_set


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed demo``."""
    p.add_argument(
        "--output",
        default="runs/demo",
        help="run folder: new or empty, or an earlier demo run with --overwrite (default: runs/demo)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier demo run in --output (never a folder the demo did not make)",
    )
    p.add_argument(
        "--data", default=None, help="dataset folder with train.csv/val.csv (default: shipped data)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the recipe's epochs)"
    )
    add_set(p)
    add_device(p)


def run_demo_command(args: argparse.Namespace) -> int:
    """Train, evaluate, index, search and report into the run folder."""
    from coembed.demo import run_demo

    run_demo(
        output=args.output,
        data=args.data,
        steps=args.steps,
        device=args.device,
        overwrite=args.overwrite,
        overrides=args.set,
    )
    return 0


COMMANDS = (
    Command(
        "demo",
        "the main job on the shipped data: train, evaluate, index and search",
        add_demo_arguments,
        run_demo_command,
    ),
)
