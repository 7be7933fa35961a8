"""``coembed probe``, ``merge``, ``score``, ``dedup`` and ``filter``: the tools for fine-tuning and
curating, each a thin layer over ``coembed.curate``."""

from __future__ import annotations

import argparse
import os
import sys

from coembed.cli.common import Command, add_device, add_json, add_keys, print_json
from coembed.errors import UsageError
from coembed.names import escape_name


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    """Add ``--overwrite``: replace an earlier output of the same command."""
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what}")


# --- probe ---------------------------------------------------------------------------------------


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed probe``."""
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument(
        "--train-data",
        required=True,
        help="labelled images: a folder of class sub-folders, or a CSV/TSV/JSONL with an "
        "image column and a label column",
    )
    p.add_argument(
        "--val-data",
        default=None,
        help="labelled images that choose the L2 strength "
        "(default: 20%% of each training class, held out)",
    )
    p.add_argument("--test-data", default=None, help="labelled images to report accuracy on")
    p.add_argument("--output", required=True, help="folder for the model and its classifier")
    p.add_argument("--image-key", default=None, help="image column (default: filepath)")
    p.add_argument("--label-key", default=None, help="label column (default: label)")
    add_overwrite(p, "probe output")
    add_json(p)
    add_device(p)


def run_probe(args: argparse.Namespace) -> int:
    """Fit the probe, write its folder, print its accuracy beside zero-shot's."""
    from coembed.curate.probe import check_probe_output, linear_probe, write_probe
    from coembed.embedder import load

    inputs = {"--model": args.model, "--train-data": args.train_data, "--val-data": args.val_data}
    inputs["--test-data"] = args.test_data
    check_probe_output(args.output, inputs, args.overwrite)
    embedder = load(args.model, device=args.device)
    result = linear_probe(
        embedder,
        args.train_data,
        val_data=args.val_data,
        test_data=args.test_data,
        image_key=args.image_key,
        label_key=args.label_key,
    )
    out = write_probe(result, embedder, args.output, inputs=inputs, overwrite=args.overwrite)
    m = result.metrics
    if args.json:
        print_json({**m, "output": str(out)})
        return 0
    print(
        f"linear probe: {m['classes']} classes, {m['images']['train']} training images, "
        f"L2 {m['l2']:g} chosen on {escape_name(m['validation'])}"
    )
    print(f"on {escape_name(m['evaluated_on'])} ({m['images']['evaluated']} images):")
    print(f"  linear probe  top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}")
    print(f"  zero-shot     top-1 {m['zeroshot_top1']:.4f}  top-5 {m['zeroshot_top5']:.4f}")
    print(
        f"wrote {escape_name(out)} (the model, classifier.safetensors, probe.json, confusion.png)"
    )
    return 0


# --- merge ---------------------------------------------------------------------------------------


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed merge``."""
    p.add_argument("a", metavar="A", help="model directory at alpha 0 (e.g. the original)")
    p.add_argument("b", metavar="B", help="model directory at alpha 1 (e.g. its fine-tuned copy)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--alpha", type=float, help="write the model (1-alpha)*A + alpha*B")
    how.add_argument(
        "--sweep",
        metavar="ALPHAS",
        help="measure each alpha (e.g. 0,0.25,0.5,0.75,1) on "
        "--eval-data and --reference-data and plot the trade-off",
    )
    p.add_argument("--eval-data", default=None, help="with --sweep: the new data (B's task)")
    p.add_argument("--reference-data", default=None, help="with --sweep: the old data (A's task)")
    p.add_argument(
        "--output",
        required=True,
        help="the merged model directory (with --sweep: a folder "
        "for sweep.json, sweep.csv and sweep.png)",
    )
    add_overwrite(p, "output")
    add_json(p)
    add_device(p)


def run_merge(args: argparse.Namespace) -> int:
    """Write the interpolated model, or measure and plot a sweep of alphas."""
    from coembed.curate.merge import (
        check_sweep_output,
        merge_models,
        merge_sweep,
        parse_alphas,
        write_sweep,
    )

    if args.alpha is not None:
        if args.eval_data or args.reference_data:
            raise UsageError("--eval-data and --reference-data go with --sweep, not --alpha")
        out = merge_models(args.a, args.b, args.alpha, args.output, overwrite=args.overwrite)
        if args.json:
            print_json({"alpha": args.alpha, "output": str(out)})
        else:
            print(f"wrote {escape_name(out)}: (1 - {args.alpha:g}) * A + {args.alpha:g} * B")
        return 0
    if not (args.eval_data and args.reference_data):
        raise UsageError("--sweep needs --eval-data NEW and --reference-data OLD")
    alphas = parse_alphas(args.sweep)
    inputs = (args.a, args.b, args.eval_data, args.reference_data)
    check_sweep_output(args.output, inputs, args.overwrite)
    sweep = merge_sweep(
        args.a, args.b, alphas, args.eval_data, args.reference_data, device=args.device
    )
    out = write_sweep(sweep, args.output, overwrite=args.overwrite)
    if args.json:
        print_json({**sweep.summary(), "output": str(out)})
        return 0
    metric = sweep.rows[0]["eval"]["metric"], sweep.rows[0]["reference"]["metric"]
    print(f"{'alpha':>6}  {'new: ' + metric[0]:>22}  {'reference: ' + metric[1]:>28}")
    for row in sweep.rows:
        print(
            f"{row['alpha']:>6g}  {row['eval']['score']:>22.4f}  {row['reference']['score']:>28.4f}"
        )
    print(f"best mean of both at alpha {sweep.best_alpha():g}; wrote {escape_name(out)}")
    return 0


# --- score ---------------------------------------------------------------------------------------


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed score``."""
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="image-caption pairs (any supported format)")
    p.add_argument(
        "--scores",
        default=None,
        help="CSV file for path,caption,score per pair (default: printed on stdout, unless --json)",
    )
    p.add_argument("--histogram", default=None, help="PNG file for the histogram of scores")
    p.add_argument("--min-score", type=float, default=None, help="keep pairs scoring >= this")
    p.add_argument(
        "--output",
        default=None,
        help="with --min-score: the filtered dataset, in the "
        "input's format (CSV, TSV or JSONL inputs)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    add_keys(p)
    add_overwrite(p, "output file")
    add_json(p)
    add_device(p)


def run_score(args: argparse.Namespace) -> int:
    """Score every pair; print or write the scores, the histogram and the filtered dataset."""
    from coembed.curate.score import ScoreFiles, score_dataset, scores_csv_text

    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    files = ScoreFiles(args.scores, args.histogram, args.output)
    scores, kept = score_dataset(
        args.model,
        args.data,
        files,
        min_score=args.min_score,
        image_key=args.image_key,
        caption_key=args.caption_key,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        device=args.device,
    )
    summary = {**scores.summary(), "format": scores.format}
    if kept is not None:
        summary.update(min_score=args.min_score, kept=kept, output=args.output)
    if args.json:
        print_json(summary)
        return 0
    if args.scores is None:
        sys.stdout.write(scores_csv_text(scores))
    line = (
        f"scored {summary['pairs']} pairs of {summary['images']} images, mean {summary['mean']:.4f}"
    )
    if scores.skipped:
        line += f"; skipped {len(scores.skipped)} unreadable images ({scores.skipped_pairs} pairs)"
    if kept is not None:
        line += f"; kept {kept} pairs >= {args.min_score:g} in {escape_name(args.output)}"
    print(line, file=sys.stderr if args.scores is None else sys.stdout)
    return 0


# --- dedup ---------------------------------------------------------------------------------------


def add_dedup_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed dedup``."""
    from coembed.curate.dedup import DEFAULT_K, DEFAULT_THRESHOLD

    p.add_argument("--index", required=True, help="index directory")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"cosine similarity that makes two items near-duplicates (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--k",
        type=int,
        default=DEFAULT_K,
        help=f"neighbours searched per item on HNSW/IVF-PQ indexes (default {DEFAULT_K}; "
        "flat indexes find every pair)",
    )
    p.add_argument("--no-exact", action="store_true", help="skip hashing files for exact copies")
    p.add_argument(
        "--output",
        default=None,
        help="folder for groups.csv, keep.txt, drop.txt, groups.png and dedup.json",
    )
    add_overwrite(p, "dedup output")
    add_json(p)


def run_dedup(args: argparse.Namespace) -> int:
    """Find duplicate groups; print them or write the output folder."""
    from coembed.curate.dedup import check_dedup_output, find_duplicates, write_duplicates

    if args.output is not None:
        check_dedup_output(args.output, args.index, args.overwrite)
    found = find_duplicates(args.index, threshold=args.threshold, k=args.k, exact=not args.no_exact)
    if args.output is not None:
        write_duplicates(found, args.output, index_dir=args.index, overwrite=args.overwrite)
    summary = {**found.summary(), "output": args.output}
    if args.json:
        print_json(summary)
        return 0
    if args.output is None:
        for g, group in enumerate(found.groups, start=1):
            for i, sim, how in group:
                print(f"{g:>5}  {sim:.4f}  {how:<5}  {escape_name(found.items[i])}")
    print(
        f"{summary['groups']} groups of duplicates among {summary['items']} items: "
        f"{summary['duplicates']} to drop ({summary['exact_pairs']} exact pairs, "
        f"{summary['near_pairs']} near pairs >= {args.threshold:g}, {summary['search']})"
        + (f"; wrote {escape_name(args.output)}" if args.output else "")
    )
    return 0


# --- filter --------------------------------------------------------------------------------------


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed filter``."""
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--query", default=None, help="a text, or a compositional query")
    p.add_argument("--image", default=None, help="a query image (with --query: added to it)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--min-score", type=float, help="every item scoring >= this (-1..1)")
    how.add_argument("--k", type=int, help="the k best items")
    p.add_argument("--output", default=None, help="CSV file for rank,score,item,caption")
    add_overwrite(p, "CSV file")
    add_json(p)
    add_device(p)


def run_filter(args: argparse.Namespace) -> int:
    """Print (or write as CSV) the items matching the query."""
    from coembed.curate.filter import check_filter_options, filter_index, write_filter_csv
    from coembed.files import refuse_overlap
    from coembed.index.query import command_line_query

    check_filter_options(args.min_score, args.k)
    query = command_line_query(args.query, args.image)
    if args.output is not None:
        refuse_overlap(args.output, {"--index": args.index})
        if not args.overwrite and os.path.exists(args.output):
            raise UsageError(f"--output {args.output} exists; add --overwrite to replace it")
    result = filter_index(args.index, query, min_score=args.min_score, k=args.k, device=args.device)
    if args.output is not None:
        write_filter_csv(result, args.output)
    if args.json:
        print_json(
            {
                "query": result.query,
                "min_score": args.min_score,
                "k": args.k,
                "count": len(result.hits),
                "results": result.hits,
            }
        )
        return 0
    if args.output is None:
        for hit in result.hits:
            extra = f"  ({escape_name(hit['captions'][0])})" if hit.get("captions") else ""
            print(f"{hit['rank']:>4}  {hit['score']:.4f}  {escape_name(hit['item'])}{extra}")
    else:
        print(f"{len(result.hits)} items match; wrote {escape_name(args.output)}")
    return 0


COMMANDS = (
    Command(
        "probe",
        "linear probe: a classifier on frozen image embeddings, beside zero-shot",
        add_probe_arguments,
        run_probe,
    ),
    Command(
        "merge",
        "interpolate the weights of a model and its fine-tuned copy (WiSE-FT)",
        add_merge_arguments,
        run_merge,
    ),
    Command(
        "score",
        "cosine image-caption score of every pair; filter a dataset by it",
        add_score_arguments,
        run_score,
    ),
    Command(
        "dedup",
        "exact and near-duplicate groups among an index's items",
        add_dedup_arguments,
        run_dedup,
    ),
    Command(
        "filter",
        "the indexed items matching a text or image query above a score, or the k best",
        add_filter_arguments,
        run_filter,
    ),
)
