"""``coembed data synthetic|shapes|icons``: build the example datasets."""

from __future__ import annotations

import argparse

from coembed.cli.common import Command, Parser
from coembed.errors import UsageError
from coembed.names import escape_name


def add_synthetic_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed data synthetic``."""
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)


def run_synthetic(args: argparse.Namespace) -> int:
    """Write the captioned synthetic pictures (train.csv, val.csv)."""
    from coembed.datasets.synthetic import generate

    if min(args.n_train, args.n_val) < 0:
        raise UsageError("coembed data: --n-train and --n-val must be 0 or more")
    generate(args.output, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    print(f"wrote {escape_name(args.output)}")
    return 0


def add_shapes_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed data shapes``."""
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)


def run_shapes(args: argparse.Namespace) -> int:
    """Write the synthetic zero-shot folder (one sub-folder per class)."""
    from coembed.datasets.synthetic import generate_shapes

    generate_shapes(args.output, seed=args.seed)
    print(f"wrote {escape_name(args.output)}")
    return 0


def add_icons_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed data icons``."""
    p.add_argument("--output", required=True, help="output folder (new, empty, or a rebuild)")
    p.add_argument(
        "--themes",
        nargs="+",
        default=None,
        metavar="THEME",
        help="themes to use, at least 3 (default: every installed theme but hicolor, locolor "
        "and default)",
    )
    p.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder of icon themes, or one theme folder (repeatable)",
    )
    p.add_argument("--size", type=int, default=64, help="picture side in pixels (default 64)")
    p.add_argument(
        "--val-themes",
        nargs="+",
        default=[],
        metavar="THEME",
        help="validation themes (default: the theme with the second most shared names)",
    )
    p.add_argument(
        "--test-themes",
        nargs="+",
        default=[],
        metavar="THEME",
        help="test themes (default: the theme with the most names other themes also have)",
    )
    p.add_argument(
        "--max-per-theme",
        type=int,
        default=None,
        metavar="N",
        help="keep at most N pictures per theme, those whose names most themes share",
    )


def run_icons(args: argparse.Namespace) -> int:
    """Build the cross-theme retrieval set from the installed icon themes; print its table."""
    from coembed.datasets.icons import build_icon_dataset

    report = build_icon_dataset(
        args.output,
        themes=args.themes,
        roots=args.root,
        size=args.size,
        val_themes=args.val_themes,
        test_themes=args.test_themes,
        max_per_theme=args.max_per_theme,
    )
    print(report.table())
    print(f"wrote {escape_name(args.output)}")
    return 0


KINDS = (
    Command(
        "synthetic",
        "captioned synthetic pictures (train.csv, val.csv), as shipped in data/synthetic",
        add_synthetic_arguments,
        run_synthetic,
    ),
    Command(
        "shapes",
        "a synthetic zero-shot folder (one sub-folder per class), as shipped in data/shapes",
        add_shapes_arguments,
        run_shapes,
    ),
    Command(
        "icons",
        "a cross-theme retrieval set from the installed freedesktop icon themes",
        add_icons_arguments,
        run_icons,
        "Build an image-text retrieval set from the freedesktop icon themes "
        "installed here (~/.local/share/icons, ~/.icons, $XDG_DATA_DIRS/icons, and --root): "
        "one picture per theme and icon name, captioned from the name and its context "
        '("audio volume high, status icon"). Whole themes are held out: by default the test '
        "theme is the one with the most icon names that other themes also have, the "
        "validation theme the next; all others train. Validation and test keep only names "
        "the training themes have. Writes images/, train.csv, val.csv, test.csv, stats.json "
        "and README.md.",
    ),
)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The kinds of ``coembed data``, each a sub-command with its own arguments."""
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=Parser, required=True)
    for kind in KINDS:
        # A kind without a description of its own shows only its usage and options in --help.
        kind.add_arguments(
            kinds.add_parser(kind.name, help=kind.help, description=kind.description or None)
        )


def run_data(args: argparse.Namespace) -> int:
    """Build the dataset of the kind given."""
    return next(kind for kind in KINDS if kind.name == args.kind).run(args)


COMMANDS = (Command("data", "build the example datasets", add_data_arguments, run_data),)
