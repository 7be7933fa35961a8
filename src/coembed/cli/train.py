"""``coembed train``: the command line's flags become one Config, then one call to training."""

from __future__ import annotations

import argparse

from coembed.cli.common import Command, add_device, add_keys, add_set

# Explicit flags and the config keys they set; they are applied after --set, so they win.
FLAG_KEYS = (
    ("steps", "train.steps"),
    ("epochs", "train.epochs"),
    ("batch_size", "train.batch_size"),
    ("lr", "train.lr"),
    ("lr_schedule", "train.schedule"),
    ("cooldown_steps", "train.cooldown_steps"),
    ("train_num_samples", "data.train_num_samples"),
    ("image_key", "data.image_key"),
    ("caption_key", "data.caption_key"),
)
# Switches and the config keys they turn on.
SWITCH_KEYS = (
    ("lock_image", "train.lock_image"),
    ("lock_text", "train.lock_text"),
    ("grad_checkpointing", "train.grad_checkpointing"),
)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """What ``coembed train`` reads and where it writes."""
    p.add_argument("--train-data", default=None, help="training pairs (any supported format)")
    p.add_argument("--val-data", default=None, help="validation pairs: recall@K after each epoch")
    p.add_argument(
        "--split", default=None, help="split of a Karpathy/COCO --train-data (Karpathy: train)"
    )
    p.add_argument(
        "--val-split", default=None, help="split of a Karpathy/COCO --val-data (Karpathy: val)"
    )
    p.add_argument(
        "--zeroshot-data",
        default=None,
        help="folder of class sub-folders: zero-shot top-1/top-5 at each validation",
    )
    p.add_argument(
        "--train-num-samples",
        type=int,
        default=None,
        help="webdataset shards: each epoch draws N pairs, shards drawn with replacement",
    )
    p.add_argument(
        "--output", required=True, help="run folder; the model directory is written here"
    )
    add_keys(p)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed train``."""
    p.add_argument(
        "--config", default=None, help="recipe name (tiny, small, rn50, ...) or YAML file"
    )
    add_data_arguments(p)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument(
        "--lr-schedule",
        choices=("cosine", "constant", "const-cooldown"),
        default=None,
        help="after warmup: cosine decay (default), constant, or constant then a cooldown",
    )
    p.add_argument(
        "--cooldown-steps", type=int, default=None, help="const-cooldown: steps of the cooldown"
    )
    p.add_argument(
        "--init", default=None, help="start from a coembed model dir or an open_clip checkpoint"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its checkpoint"
    )
    p.add_argument("--lock-image", action="store_true", help="freeze the image tower (fine-tuning)")
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower (fine-tuning)")
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute the towers' activations in the backward pass: less memory, more time",
    )
    p.add_argument(
        "--profile", action="store_true", help="profile a few steps and report MFU; no run is kept"
    )
    add_set(p)
    add_device(p)


def config_flags(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then the explicit flags (which win), as ``key=value`` strings."""
    flags = list(args.set)
    for name, key in FLAG_KEYS:
        value = getattr(args, name)
        if value is not None:
            flags.append(f"{key}={value}")
    # One length wins: --steps clears the recipe's epochs and --epochs its steps.
    if args.steps is not None:
        flags.append("train.epochs=0")
    elif args.epochs is not None:
        flags.append("train.steps=0")
    flags += [f"{key}=true" for name, key in SWITCH_KEYS if getattr(args, name)]
    return flags


def run_train(args: argparse.Namespace) -> int:
    """Train (or resume) with the recipe and flags given."""
    from coembed.config import load_config
    from coembed.training import train

    flags = config_flags(args)
    if args.resume and not flags and args.config is None:
        config = None  # continue with the config the run saved
    else:
        config = load_config(args.config or "tiny", flags)
    train(
        config,
        args.train_data,
        args.output,
        val_data=args.val_data,
        init=args.init,
        resume=args.resume,
        split=args.split,
        val_split=args.val_split,
        zeroshot_data=args.zeroshot_data,
        device=args.device,
        profile=args.profile,
    )
    return 0


COMMANDS = (
    Command(
        "train",
        "train or fine-tune a model on image-caption pairs",
        add_train_arguments,
        run_train,
        "Train or fine-tune on CSV/TSV, JSONL, an image folder with .txt captions, webdataset "
        "shards (with brace expansion), COCO captions or a Karpathy split JSON. Ctrl-C or "
        "SIGTERM stops after the current step with a checkpoint; --resume continues.",
    ),
)
