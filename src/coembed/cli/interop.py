"""``coembed convert`` and ``coembed export``: checkpoints to and from open_clip, and ONNX."""

from __future__ import annotations

import argparse

from coembed.cli.common import Command, add_set
from coembed.errors import UsageError
from coembed.names import escape_name


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    """Add ``--overwrite``: replace ``what`` (never a folder holding anything else)."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}")


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
        "--openclip-model",
        default=None,
        metavar="NAME",
        help="open_clip's model name for the checkpoint (RN50 = GELU, RN50-quickgelu = QuickGELU, "
        "RN101, RN50x4, ...); with neither this nor --config the shapes are read from the file",
    )
    p.add_argument(
        "--config", default=None, help="coembed recipe whose shapes the checkpoint has (e.g. rn50)"
    )
    add_set(p)
    p.add_argument("--output", required=True, help="model directory (import) or file (export)")
    add_overwrite(p, "an existing model directory (import) or file (export)")


def run_convert(args: argparse.Namespace) -> int:
    """Import an open_clip checkpoint as a model directory, or export one the other way."""
    from coembed.interop.openclip import export_openclip, import_openclip

    if bool(args.from_openclip) == bool(args.to_openclip):
        raise UsageError(
            "coembed convert: give exactly one of --from-openclip FILE or --to-openclip MODEL_DIR"
        )
    if args.from_openclip:
        out = import_openclip(
            args.from_openclip,
            args.config,
            args.output,
            args.set,
            overwrite=args.overwrite,
            openclip_model=args.openclip_model,
            report=print,
        )
    else:
        out = export_openclip(args.to_openclip, args.output, overwrite=args.overwrite)
    print(f"wrote {escape_name(out)}")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed export``."""
    p.add_argument("--onnx", required=True, metavar="MODEL_DIR", help="model directory")
    p.add_argument("--output", required=True, help="output folder")
    add_overwrite(p, "an existing export")


def run_export(args: argparse.Namespace) -> int:
    """Export both towers of a model directory as ONNX files."""
    from coembed.interop.onnx import export_onnx

    for path in export_onnx(args.onnx, args.output, overwrite=args.overwrite):
        print(f"wrote {escape_name(path)}")
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
