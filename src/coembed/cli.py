"""The ``coembed`` command. Each subcommand parses its arguments and calls one library function.

A user's mistake ends with one line on stderr and exit code 2 (usage) or 1 (failure); a
traceback is only ever shown for a bug in coembed itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from coembed import __version__
from coembed.errors import CoembedError, UsageError
from coembed.process import choose_openmp_waiting


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


# --- subcommands -------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from coembed.train import train_from_args

    train_from_args(args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from coembed.demo import run_demo

    run_demo(output=args.output, data=args.data, steps=args.steps, device=args.device)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from coembed.evaluate import evaluate_retrieval_cli

    metrics = evaluate_retrieval_cli(
        args.model,
        args.data,
        image_key=args.image_key,
        caption_key=args.caption_key,
        split=args.split,
        device=args.device,
    )
    if args.json:
        print_json(metrics)
    else:
        for key, value in metrics.items():
            print(f"{key:>22}  {value:.4f}" if isinstance(value, float) else f"{key:>22}  {value}")
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from coembed.evaluate import zeroshot_cli

    result = zeroshot_cli(args.model, args.data, templates=args.templates, device=args.device)
    if args.json:
        print_json(result)
    else:
        from coembed.evaluate import format_zeroshot

        print(format_zeroshot(result))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from coembed.index import index_cli

    index_cli(args)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from coembed.index import search_cli

    search_cli(args)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from coembed.serve.app import serve

    serve(args.index, host=args.host, port=args.port, workers=args.workers, device=args.device)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
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


def cmd_export(args: argparse.Namespace) -> int:
    from coembed.interop.onnx import export_onnx

    for path in export_onnx(args.onnx, args.output):
        print(f"wrote {path}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.kind == "icons":
        from coembed.data.icons import build_icon_dataset

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
        print(f"wrote {args.output}")
        return 0
    from coembed.data import synthetic

    if args.kind == "synthetic":
        if min(args.n_train, args.n_val) < 0:
            raise UsageError("coembed data: --n-train and --n-val must be 0 or more")
        synthetic.generate(args.output, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    else:
        synthetic.generate_shapes(args.output, seed=args.seed)
    print(f"wrote {args.output}")
    return 0


# --- parser --------------------------------------------------------------------------------------


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")


def add_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-key", default=None, help="image column/key (default: filepath)")
    p.add_argument("--caption-key", default=None, help="caption column/key (default: caption)")


def build_parser() -> Parser:
    parser = Parser(
        prog="coembed",
        description="CLIP-style image-text embeddings: train, evaluate, index, search and serve.",
    )
    parser.add_argument("--version", action="version", version=f"coembed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, func: Callable, help: str, description: str = "") -> Parser:
        p = sub.add_parser(name, help=help, description=description or help)
        p.set_defaults(func=func)
        return p

    p = command(
        "demo",
        cmd_demo,
        "the main job on the shipped data: train, evaluate, index and search",
    )
    p.add_argument("--output", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument(
        "--data", default=None, help="dataset folder with train.csv/val.csv (default: shipped data)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the recipe's epochs)"
    )
    add_device(p)

    p = command(
        "train",
        cmd_train,
        "train or fine-tune a model on image-caption pairs",
        "Train or fine-tune on CSV/TSV, JSONL, an image folder with .txt captions, webdataset "
        "shards (with brace expansion), COCO captions or a Karpathy split JSON.",
    )
    p.add_argument(
        "--config", default="tiny", help="recipe name (tiny, small, rn50, ...) or YAML file"
    )
    p.add_argument("--train-data", required=True, help="training pairs (any supported format)")
    p.add_argument("--val-data", default=None, help="validation pairs: recall@K after each epoch")
    p.add_argument(
        "--output", required=True, help="run folder; the model directory is written here"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument(
        "--init", default=None, help="start from a coembed model dir or an open_clip checkpoint"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its last checkpoint",
    )
    p.add_argument("--lock-image", action="store_true", help="freeze the image tower (fine-tuning)")
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower (fine-tuning)")
    p.add_argument("--split", default=None, help="Karpathy split to read (train, val, test)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile a few steps and report model FLOP utilization",
    )
    add_keys(p)
    add_device(p)

    p = command("eval", cmd_eval, "retrieval recall@1/5/10, image->text and text->image")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="pairs to evaluate (any supported format)")
    p.add_argument("--split", default=None, help="Karpathy split to read (e.g. test)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_keys(p)
    add_device(p)

    p = command(
        "zeroshot",
        cmd_zeroshot,
        "zero-shot classification of an image folder (one sub-folder per class)",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    p.add_argument(
        "--templates", default=None, help="file of prompt templates, one per line, with {}"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device(p)

    p = command("index", cmd_index, "embed images (or texts) into a searchable index")
    p.add_argument("--model", default=None, help="model directory (not needed with --add)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of images, or a dataset file (CSV, JSONL, ...)")
    src.add_argument("--texts", help="a text file with one caption per line (a text index)")
    p.add_argument("--output", required=True, help="index directory")
    p.add_argument(
        "--add", action="store_true", help="add to an existing index instead of building"
    )
    p.add_argument("--kind", default="auto", help="flat, hnsw, ivfpq or auto (by size)")
    p.add_argument("--batch-size", type=int, default=64)
    add_keys(p)
    add_device(p)

    p = command(
        "search",
        cmd_search,
        "search an index by text, by image, or by a compositional query",
        'Queries may combine terms with weights: "a red circle" - "red" + "blue", or '
        '--image photo.png - "red" + "blue".',
    )
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("query", nargs="*", default=None, help="text, or a compositional query")
    p.add_argument("--image", default=None, help="query image path")
    p.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device(p)

    p = command("serve", cmd_serve, "HTTP API and web page for searching an index")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    add_device(p)

    p = command("convert", cmd_convert, "import or export open_clip / OpenAI CLIP checkpoints")
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
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    p.add_argument("--output", required=True, help="model directory (import) or file (export)")

    p = command("export", cmd_export, "export both towers as ONNX with a dynamic batch")
    p.add_argument("--onnx", required=True, metavar="MODEL_DIR", help="model directory")
    p.add_argument("--output", required=True, help="output folder")

    p = command("data", cmd_data, "build the example datasets")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=Parser, required=True)
    k = kinds.add_parser(
        "synthetic",
        help="captioned synthetic pictures (train.csv, val.csv), as shipped in data/synthetic",
    )
    k.add_argument("--output", required=True, help="output folder")
    k.add_argument("--n-train", type=int, default=3000)
    k.add_argument("--n-val", type=int, default=500)
    k.add_argument("--seed", type=int, default=0)
    k = kinds.add_parser(
        "shapes",
        help="a synthetic zero-shot folder (one sub-folder per class), as shipped in data/shapes",
    )
    k.add_argument("--output", required=True, help="output folder")
    k.add_argument("--seed", type=int, default=0)
    k = kinds.add_parser(
        "icons",
        help="a cross-theme retrieval set from the installed freedesktop icon themes",
        description="Build an image-text retrieval set from the freedesktop icon themes "
        "installed here (~/.local/share/icons, ~/.icons, $XDG_DATA_DIRS/icons, and --root): "
        "one picture per theme and icon name, captioned from the name and its context "
        '("audio volume high, status icon"). Whole themes are held out: by default the test '
        "theme is the one with the most icon names that other themes also have, the "
        "validation theme the next; all others train. Validation and test keep only names "
        "the training themes have. Writes images/, train.csv, val.csv, test.csv, stats.json "
        "and README.md.",
    )
    k.add_argument("--output", required=True, help="output folder (new, empty, or a rebuild)")
    k.add_argument(
        "--themes",
        nargs="+",
        default=None,
        metavar="THEME",
        help="themes to use, at least 3 (default: every installed theme but hicolor, locolor "
        "and default)",
    )
    k.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder of icon themes, or one theme folder (repeatable)",
    )
    k.add_argument("--size", type=int, default=64, help="picture side in pixels (default 64)")
    k.add_argument(
        "--val-themes",
        nargs="+",
        default=[],
        metavar="THEME",
        help="validation themes (default: the theme with the second most shared names)",
    )
    k.add_argument(
        "--test-themes",
        nargs="+",
        default=[],
        metavar="THEME",
        help="test themes (default: the theme with the most names other themes also have)",
    )
    k.add_argument(
        "--max-per-theme",
        type=int,
        default=None,
        metavar="N",
        help="keep at most N pictures per theme, those whose names most themes share",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        # libgomp reads its waiting policy when torch loads it, and every subcommand imports
        # torch lazily, after this (parsing does not).
        choose_openmp_waiting(args.command)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args)
    except BrokenPipeError:
        # `coembed search ... | head` closes stdout early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CoembedError as exc:
        sys.stderr.write(f"coembed: error: {exc}\n")
        return exc.exit_code
    except OSError as exc:
        # A path that cannot be read or written (missing, permissions, disk full): the user's to fix.
        sys.stderr.write(f"coembed: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("coembed: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
