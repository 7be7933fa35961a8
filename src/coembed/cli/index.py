"""``coembed index`` and ``coembed search``: build an index directory, query it, print the hits."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coembed.cli.common import Command, add_device, add_json, add_keys
from coembed.errors import UsageError
from coembed.names import escape_name


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed index``."""
    p.add_argument("--model", default=None, help="model directory (not needed with --add)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--images", help="a folder of images, or a dataset file (CSV, JSONL, ...)")
    source.add_argument("--texts", help="a text file with one caption per line (a text index)")
    p.add_argument("--output", required=True, help="index directory")
    p.add_argument(
        "--add", action="store_true", help="add to an existing index instead of building"
    )
    p.add_argument(
        "--kind", default="auto", help="flat, hnsw, ivfflat, ivfpq, or auto (by size and recall)"
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=None,
        help="recall@10 that HNSW's efSearch or IVF-PQ's nprobe is tuned to reach, measured on "
        "a held-out sample of the collection (default 0.95)",
    )
    p.add_argument(
        "--resumable",
        action="store_true",
        help="embed in parts under OUTPUT/parts, so that the same command again continues a "
        "killed run (always so under torchrun, where each rank embeds its own parts)",
    )
    p.add_argument(
        "--part-size",
        type=int,
        default=None,
        help="rows per part of a folder or dataset file (default 8192); a webdataset shard is "
        "one part",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="build the index in --output from the parts embedded there (no embedding)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    add_keys(p)
    add_device(p)


def run_index(args: argparse.Namespace) -> int:
    """Build (or ``--add`` to) an index directory and print a summary."""
    from coembed.index.sharded import launched_by_torchrun
    from coembed.index.shards import DEFAULT_PART_SIZE
    from coembed.index.tune import DEFAULT_TARGET

    if args.target_recall is None:
        args.target_recall = DEFAULT_TARGET
    if args.part_size is None:
        args.part_size = DEFAULT_PART_SIZE

    if args.merge or args.resumable or launched_by_torchrun():
        return run_sharded(args)
    if args.images is None and args.texts is None:
        raise UsageError("coembed index: give --images or --texts (or --merge)")
    from coembed.index import build_index

    report = build_index(args.output, model=args.model, add=args.add, **input_options(args))
    if report.added:
        print(
            f"added {report.count_new} {report.modality}s to {escape_name(report.output)} "
            f"({report.total} in all, {report.kind}); {report.already_indexed} were already "
            "indexed"
        )
    else:
        print_indexed(report.output, report.total, report.modality, report.kind, report.dim)
    print_tuning(report.tuning)
    print_skipped(report.skipped_new, report.skipped_file)
    return 0


def input_options(args: argparse.Namespace) -> dict:
    """What one-process and sharded builds both take from the command line."""
    return {
        "images": args.images,
        "texts": args.texts,
        "kind": args.kind,
        "batch_size": args.batch_size,
        "image_key": args.image_key or "filepath",
        "caption_key": args.caption_key or "caption",
        "device": args.device,
        "target_recall": args.target_recall,
    }


def print_indexed(output: Path, count: int, modality: str, kind: str, dim: int) -> None:
    print(f"indexed {count} {modality}s into {escape_name(output)} ({kind}, dim {dim})")


def print_skipped(count: int, listed_in: Path) -> None:
    if count:
        print(
            f"skipped {count} image(s) that could not be decoded "
            f"(listed in {escape_name(listed_in)})",
            file=sys.stderr,
        )


def print_tuning(tuning: dict | None) -> None:
    if tuning is not None:
        from coembed.index.tune import Tuning

        print("search tuned: " + Tuning(**{**tuning, "trials": []}).summary())


def run_sharded(args: argparse.Namespace) -> int:
    """The parts path: embed in parts (every rank its own), then build from them on rank 0;
    or, with --merge, only build."""
    from coembed.index.sharded import build_sharded, merge_model, merge_parts

    if args.add:
        raise UsageError("--add works on one process; a sharded build embeds into a new --output")
    if args.merge:
        if args.images is not None or args.texts is not None:
            raise UsageError(
                "--merge builds from the parts already embedded: drop --images/--texts"
            )
        index = merge_parts(
            Path(args.output),
            merge_model(Path(args.output), args.model, args.device),
            kind=args.kind,
            target_recall=args.target_recall,
        )
        print_built(Path(args.output), index)
        return 0
    if args.model is None:
        raise UsageError("coembed index: --model is required to embed")
    if args.images is None and args.texts is None:
        raise UsageError("coembed index: give --images or --texts (or --merge)")
    report = build_sharded(
        args.output, model=args.model, part_size=args.part_size, **input_options(args)
    )
    who = f"rank {report.rank} of {report.world}: " if report.world > 1 else ""
    print(
        f"{who}embedded {report.embedded} part(s) of {report.parts}"
        + (f", {report.finished_before} finished before" if report.finished_before else "")
    )
    if report.index is not None:
        print_built(report.output, report.index)
    return 0


def print_built(output: Path, index) -> None:
    print_indexed(output, len(index), index.modality, index.kind, index.dim)
    print_tuning(index.tuning)
    print_skipped(len(index.skipped), output / "skipped.txt")


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
