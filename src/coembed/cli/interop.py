"""``coembed convert`` and ``coembed export``: checkpoints to and from open_clip, and ONNX."""

from __future__ import annotations

import argparse

from coembed.cli.common import Command, add_set
from coembed.errors import UsageError


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed convert``."""
    p.add_argument(
        "--from-openclip",
        default=None,
        metavar="FILE",
        help="open_clip state dict or OpenAI CLIP file",
    )
    p.add_argument(
        "--to-openclip", default=None, metavar="MODEL_DIR", help="coembed model dir to export"
    )
    p.add_argument(
        "--config", default=None, help="coembed recipe whose shapes the checkpoint has (e.g. rn50)"
    )
    add_set(p)
    p.add_argument("--output", required=True, help="model directory (import) or file (export)")


def run_convert(args: argparse.Namespace) -> int:
    """Import an open_clip checkpoint as a model directory, or export one the other way."""
    from coembed.interop.openclip import export_openclip, import_openclip

    if bool(args.from_openclip) == bool(args.to_openclip):
        raise UsageError(
            "coembed convert: give exactly one of --from-openclip FILE or --to-openclip MODEL_DIR"
        )
    if args.from_openclip:
        if not args.config:
            raise UsageError("coembed convert --from-openclip needs --config (e.g. rn50)")
        out = import_openclip(args.from_openclip, args.config, args.output, overrides=args.set)
    else:
        out = export_openclip(args.to_openclip, args.output)
    print(f"wrote {out}")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed export``."""
    p.add_argument("--onnx", required=True, metavar="MODEL_DIR", help="model directory")
    p.add_argument("--output", required=True, help="output folder")


def run_export(args: argparse.Namespace) -> int:
    """Export both towers of a model directory as ONNX files."""
    from coembed.interop.onnx import export_onnx

    for path in export_onnx(args.onnx, args.output):
        print(f"wrote {path}")
    return 0


COMMANDS = (
    Command(
        "convert",
        "import or export open_clip / OpenAI CLIP checkpoints",
        add_convert_arguments,
        run_convert,
    ),
    Command(
        "export",
        "export both towers as ONNX with a dynamic batch",
        add_export_arguments,
        run_export,
    ),
)
