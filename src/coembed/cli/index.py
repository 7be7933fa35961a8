"""``coembed index`` and ``coembed search``: build an index directory, query it, print the hits."""

from __future__ import annotations

import argparse
import json
import sys

from coembed.cli.common import Command, add_device, add_json, add_keys
from coembed.names import escape_name


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed index``."""
    p.add_argument("--model", default=None, help="model directory (not needed with --add)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images, or a dataset file (CSV, JSONL, ...)")
    source.add_argument("--texts", help="a text file with one caption per line (a text index)")
    p.add_argument("--output", required=True, help="index directory")
    p.add_argument(
        "--add", action="store_true", help="add to an existing index instead of building"
    )
    p.add_argument("--kind", default="auto", help="flat, hnsw, ivfpq or auto (by size)")
    p.add_argument("--batch-size", type=int, default=64)
    add_keys(p)
    add_device(p)


def run_index(args: argparse.Namespace) -> int:
    """Build (or ``--add`` to) an index directory and print a summary."""
    from coembed.index import build_index

    report = build_index(
        args.output,
        model=args.model,
        images=args.images,
        texts=args.texts,
        add=args.add,
        kind=args.kind,
        batch_size=args.batch_size,
        image_key=args.image_key,
        caption_key=args.caption_key,
        device=args.device,
    )
    output = escape_name(report.output)
    if report.added:
        print(
            f"added {report.count_new} {report.modality}s to {output} ({report.total} in "
            f"all, {report.kind}); {report.already_indexed} were already indexed"
        )
    else:
        print(
            f"indexed {report.total} {report.modality}s into {output} "
            f"({report.kind}, dim {report.dim})"
        )
    if report.skipped_new:
        print(
            f"skipped {report.skipped_new} image(s) that could not be decoded "
            f"(listed in {escape_name(report.skipped_file)})",
            file=sys.stderr,
        )
    return 0


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed search``."""
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument(
        "query",
        nargs="*",
        default=None,
        help='words of a text (a blue circle), or a compositional query: "a red circle" - red + '
        "blue, image:ID - red (ID: an indexed item, as on the web page), image:PATH",
    )
    p.add_argument("--image", default=None, help="query image path")
    p.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    add_json(p)
    add_device(p)


def run_search(args: argparse.Namespace) -> int:
    """Print the ``--k`` best items for a text, image or compositional query."""
    from coembed.index import search_index
    from coembed.index.query import command_line_query

    query = command_line_query(args.query, args.image)
    result = search_index(args.index, query, args.k, device=args.device)
    if args.json:
        payload = {
            "index": result.index,
            "kind": result.kind,
            "modality": result.modality,
            "query": result.query,
            "results": result.hits,
        }
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
        return 0
    # File names and captions may hold newlines or terminal escapes: one visible line a hit.
    for hit in result.hits:
        extra = f"  ({escape_name(hit['captions'][0])})" if hit.get("captions") else ""
        print(f"{hit['rank']:>3}  {hit['score']:.4f}  {escape_name(hit['item'])}{extra}")
    return 0


COMMANDS = (
    Command(
        "index",
        "embed images (or texts) into a searchable index",
        add_index_arguments,
        run_index,
    ),
    Command(
        "search",
        "search an index by text, by image, or by a compositional query",
        add_search_arguments,
        run_search,
        "Unquoted words are one text: search --index I a blue circle. Queries may combine terms "
        'with weights: "a red circle" - "red" + "blue" (or a red circle - red + blue), '
        'image:17 - "red" (item 17 of the index, as on the web page), or '
        '--image photo.png - "red" + "blue".',
    ),
)
