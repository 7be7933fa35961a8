"""``coembed eval`` and ``coembed zeroshot``: measure a model and print the result."""

from __future__ import annotations

import argparse

from coembed.cli.common import Command, add_device, add_json, add_keys, print_json
from coembed.errors import UsageError


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed eval``."""
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="pairs to evaluate (any supported format)")
    p.add_argument("--split", default=None, help="Karpathy split to read (e.g. test)")
    add_json(p)
    add_keys(p)
    add_device(p)


def run_eval(args: argparse.Namespace) -> int:
    """Print retrieval recall@1/5/10 and median/mean rank both ways, one metric a line or as
    JSON."""
    from coembed.evaluate import evaluate_retrieval

    metrics = evaluate_retrieval(
        args.model,
        args.data,
        image_key=args.image_key,
        caption_key=args.caption_key,
        split=args.split,
        device=args.device,
    )
    if args.json:
        print_json(metrics)
        return 0
    for key, value in metrics.items():
        print(f"{key:>26}  {value:.4f}" if isinstance(value, float) else f"{key:>26}  {value}")
    return 0


def add_zeroshot_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed zeroshot``."""
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    p.add_argument(
        "--templates", default=None, help="file of prompt templates, one per line, with {}"
    )
    p.add_argument(
        "--classifier",
        default=None,
        help="classify with a linear probe (`coembed probe`'s output folder) instead of prompts",
    )
    add_json(p)
    add_device(p)


def run_zeroshot(args: argparse.Namespace) -> int:
    """Print zero-shot (or a probe's) accuracy and the per-class table, or the result as JSON."""
    from coembed.evaluate import format_zeroshot, zeroshot

    if args.classifier is not None:
        from coembed.curate.probe import classify_folder

        if args.templates is not None:
            raise UsageError("--templates and --classifier: a probe classifies without prompts")
        result = classify_folder(args.model, args.data, args.classifier, device=args.device)
    else:
        result = zeroshot(args.model, args.data, templates=args.templates, device=args.device)
    if args.json:
        print_json(result)
    else:
        print(format_zeroshot(result))
    return 0


COMMANDS = (
    Command(
        "eval",
        "retrieval recall@1/5/10 and median/mean rank, image->text and text->image",
        add_eval_arguments,
        run_eval,
    ),
    Command(
        "zeroshot",
        "zero-shot classification of an image folder (one sub-folder per class)",
        add_zeroshot_arguments,
        run_zeroshot,
    ),
)
