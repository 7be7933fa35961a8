"""``coembed demo``: the main job on the shipped data, start to finish.

Train the tiny recipe on the synthetic captioned pictures, measure retrieval on the validation
split, index the validation images, run text, image and compositional searches, and write a
report folder of plots. Everything lands in one run folder (``runs/demo`` by default).

The run folder is the demo's own: a new or empty folder, marked by ``demo.json`` as soon as the
demo starts. An earlier demo run there is replaced only with ``overwrite`` (moved aside while the
new run is made, deleted once it is complete, put back if it fails); any other folder is refused.

The showcase searches are judged, not just shown: the synthetic captions say exactly what each
picture holds (``coembed.datasets.synthetic_words``), so every search's top hit is checked
against the attributes its query asks for, and the share of right top hits is printed and
stored, including where the model does not bind colour to shape or an object to its place.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from coembed.errors import UsageError
from coembed.files import atomic_write_text

if TYPE_CHECKING:
    from coembed.datasets.synthetic_words import Description
    from coembed.embedder import Embedder
    from coembed.index import Index

TEXT_QUERIES = [
    "a large red circle",
    "two blue squares",
    "a yellow star on the left",
    "a green triangle above a purple hexagon",
    "a striped orange cross in the middle",
]
# Word-vector arithmetic: take a description and swap one attribute; a right answer shows the
# description with the attribute swapped.
COMPOSITIONAL = '"a large red circle" - "red" + "blue"'
COMPOSITIONAL_ANSWER = "a large blue circle"
SHOWN = 3  # hits printed per search
SEARCHED = 5  # hits looked at per search (the contact sheet's row)

# The file that marks a run folder as the demo's, and later holds the demo's summary.
DEMO_MARK = "demo.json"
MADE_BY = "coembed demo"


def shipped_data() -> Path | None:
    """The repository's data/synthetic when running from a checkout, else None."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "data" / "synthetic"
        if (candidate / "train.csv").is_file():
            return candidate
    return None


def find_data(data: str | None, output: Path) -> Path:
    """The folder with train.csv and val.csv: ``data``, the shipped data, or a generated copy."""
    if data:
        folder = Path(data)
        if not (folder / "train.csv").is_file() or not (folder / "val.csv").is_file():
            raise UsageError(f"--data {data}: expected a folder with train.csv and val.csv")
        return folder
    folder = shipped_data()
    if folder is not None:
        return folder
    # Installed without the repository: generate the same data set (deterministic).
    from coembed.datasets.synthetic import generate

    folder = output.parent / "demo-data"
    if not (folder / "val.csv").is_file():
        print(f"generating the example data set in {folder}")
        generate(str(folder), n_train=3000, n_val=500, image_size=64, seed=0)
    return folder


# --- the run folder -------------------------------------------------------------------------------


def is_demo_run(folder: Path) -> bool:
    """Whether ``folder`` carries the demo's mark (it was made by ``coembed demo``)."""
    try:
        mark = json.loads((folder / DEMO_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and mark.get("made_by") == MADE_BY


def claim_output(output: Path, overwrite: bool) -> Path | None:
    """Make ``output`` the demo's empty run folder and mark it; returns where an earlier demo run
    there was moved aside (None if there was none). Anything else in the way is refused."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder for the demo run")
    aside = None
    if output.is_dir() and any(output.iterdir()):
        if not is_demo_run(output):
            raise UsageError(
                f"--output {output} holds files the demo did not make (or a demo run from before "
                f"demo runs carried {DEMO_MARK}); it writes only to a new or empty folder, or over "
                f"an earlier demo run: move that folder away or choose another --output"
            )
        if not overwrite:
            raise UsageError(
                f"--output {output} holds an earlier demo run; add --overwrite to replace it, "
                "or choose another --output"
            )
        target = output.resolve()
        aside = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
        os.replace(target, aside)
    try:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / DEMO_MARK, json.dumps({"made_by": MADE_BY, "finished": False}))
    except BaseException:
        put_back(output, aside)
        raise
    return aside


def put_back(output: Path, aside: Path | None) -> None:
    """After a failed run: the earlier demo run moved to ``aside`` takes ``output`` back."""
    if aside is None:
        return
    shutil.rmtree(output, ignore_errors=True)
    os.replace(aside, output.resolve())


# --- the demo -------------------------------------------------------------------------------------


def run_demo(
    output: str = "runs/demo",
    data: str | None = None,
    steps: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> dict:
    """Train, evaluate, index, search and report into a run folder of the demo's own; returns
    the demo's summary (retrieval metrics, showcase verdicts), also written to demo.json."""
    out = Path(output)
    folder = find_data(data, out)
    aside = claim_output(out, overwrite)
    try:
        summary = demo_steps(out, folder, steps, device, list(overrides or []))
    except BaseException:
        put_back(out, aside)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return summary


def demo_steps(
    out: Path, folder: Path, steps: int | None, device: str, overrides: list[str]
) -> dict:
    """The demo's work in its claimed run folder ``out``; returns the summary it writes."""
    from coembed import load

    started = time.perf_counter()
    print(f"== training the tiny recipe on {folder}")
    train_demo_model(folder, out, steps, device, overrides)
    trained = time.perf_counter() - started

    metrics = show_retrieval(out, folder / "val.csv", device)

    print("\n== indexing the validation images")
    embedder = load(out, device=device)
    index = build_demo_index(embedder, folder / "val.csv", out / "index")
    searches = run_searches(index)
    showcase = showcase_summary(searches)

    print("\n== report")
    for path in write_demo_report(out, metrics, embedder, index, searches):
        print(f"  {path}")
    summary = {"made_by": MADE_BY, "finished": True, "retrieval": metrics, "showcase": showcase}
    write_summaries(out, summary)
    total = time.perf_counter() - started
    print(f"\n{showcase_line(showcase)}")
    print(f"demo done in {total:.0f} s (training {trained:.0f} s); run folder: {out}")
    return summary


def train_demo_model(
    folder: Path, out: Path, steps: int | None, device: str, overrides: list[str]
) -> dict:
    """Train the tiny recipe on ``folder``'s train.csv into ``out``; returns the run's summary."""
    from coembed.config import load_config
    from coembed.training import train

    # Without --steps the recipe's epochs decide the length; with it, steps replace epochs.
    flags = [] if steps is None else [f"train.steps={steps}", "train.epochs=0"]
    return train(
        load_config("tiny", [*flags, *overrides]),
        str(folder / "train.csv"),
        out,
        val_data=str(folder / "val.csv"),
        device=device,
    )


def show_retrieval(model: Path, pairs: Path, device: str) -> dict:
    """Measure recall@1/5/10 both ways on ``pairs`` and print one line per direction."""
    from coembed.evaluate import evaluate_retrieval

    metrics = evaluate_retrieval(model, str(pairs), device=device)
    print(
        f"\n== retrieval on the validation split "
        f"({metrics['images']} images, {metrics['captions']} captions)"
    )
    for direction in ("image_to_text", "text_to_image"):
        print(
            f"  {direction.replace('_', ' '):>14}:  "
            + "   ".join(f"R@{k} {metrics[f'{direction}_R@{k}']:.3f}" for k in (1, 5, 10))
        )
    return metrics


def build_demo_index(embedder: Embedder, pairs: Path, directory: Path) -> Index:
    """Index the images of ``pairs`` and save the index to ``directory``."""
    from coembed.index import Index

    index = Index.build(embedder, images=str(pairs), progress=False)
    index.save(directory)
    print(f"  {len(index)} images in {directory} ({index.kind})")
    return index


# --- the showcase searches ------------------------------------------------------------------------


@dataclass
class Search:
    """One showcase search, its hits, and whether they show what the query asks for."""

    kind: str  # "text", "image" or "compositional"
    query: str  # the query as typed, or for an image search the probe's file name
    wants: str  # the description a right hit shows (the query in the generator's words)
    # (item, score), best first; an image search leaves out its probe (its own best hit)
    results: list[tuple[str, float]]
    right: list[bool | None] = field(default_factory=list)  # per hit; None: cannot tell
    differences: list[str] = field(default_factory=list)  # the top hit's, when it is wrong

    @property
    def top_right(self) -> bool | None:
        """Whether the top hit shows what the query asks for (None: the words do not say)."""
        return self.right[0] if self.right else None


def judge(search: Search, captions: dict[str, str]) -> Search:
    """Fill in ``search.right`` and the top hit's differences from the hits' captions."""
    from coembed.datasets.synthetic_words import describe, differences

    wanted = describe(search.wants)
    found: list[Description | None] = [describe(captions.get(i, "")) for i, _ in search.results]
    if wanted is None:
        search.right = [None for _ in found]
        return search
    if search.kind == "image":
        wanted = wanted.as_picture()  # the probe's caption describes a picture, as a hit's does
    search.right = [None if f is None else not differences(wanted, f.as_picture()) for f in found]
    if found and found[0] is not None:
        search.differences = differences(wanted, found[0].as_picture())
    return search


def verdict_line(search: Search) -> str:
    """'top hit right: yes (2 of the top 5 right)', or 'no (square, not star); first right hit:
    rank 4'."""
    if search.top_right is None:
        return "top hit right: cannot tell (not in the synthetic captions' words)"
    if search.top_right:
        right = sum(map(bool, search.right))
        return f"top hit right: yes ({right} of the top {len(search.right)} right)"
    first = next((rank for rank, r in enumerate(search.right, 1) if r), None)
    where = (
        f"first right hit: rank {first}" if first else f"none right in the top {len(search.right)}"
    )
    return f"top hit right: no ({'; '.join(search.differences)}); {where}"


def show_search(title: str, search: Search, captions: dict[str, str]) -> None:
    """Print a search's title, one line per shown hit, and its verdict."""
    print(f"\n{title}")
    for rank, (item, score) in enumerate(search.results[:SHOWN], 1):
        print(f"  {rank}. {score:.3f}  {Path(item).name:<18} {captions.get(item, '')}")
    print(f"  {verdict_line(search)}")


def run_searches(index: Index) -> list[Search]:
    """Text, image and compositional searches, judged and printed; returns them."""
    captions = {item: (caps[0] if caps else "") for item, caps in zip(index.items, index.captions)}
    searches = []
    for query in TEXT_QUERIES:
        search = judge(Search("text", query, query, index.search(query, k=SEARCHED)), captions)
        show_search(f'text search: "{query}"', search, captions)
        searches.append(search)
    probe = index.items[0]
    # A Path is an image (a str would be a text query); the probe finds itself first: skip it.
    hits = [r for r in index.search(Path(probe), k=SEARCHED + 1) if r[0] != probe][:SEARCHED]
    search = judge(Search("image", Path(probe).name, captions[probe], hits), captions)
    show_search(f"image search: {Path(probe).name} ({captions[probe]})", search, captions)
    searches.append(search)
    hits = index.search(COMPOSITIONAL, k=SEARCHED)
    search = judge(Search("compositional", COMPOSITIONAL, COMPOSITIONAL_ANSWER, hits), captions)
    show_search(
        f"compositional search: {COMPOSITIONAL} (wants {COMPOSITIONAL_ANSWER})", search, captions
    )
    searches.append(search)
    return searches


def showcase_summary(searches: list[Search]) -> dict:
    """How many judged top hits are right, and each search's verdict, for the summary files."""
    judged = [s for s in searches if s.top_right is not None]
    right = sum(bool(s.top_right) for s in judged)
    return {
        "top_hits_right": right,
        "judged": len(judged),
        "accuracy": right / len(judged) if judged else None,
        "searches": [
            {
                "kind": s.kind,
                "query": s.query,
                "wants": s.wants,
                "top_hit": Path(s.results[0][0]).name if s.results else None,
                "top_hit_right": s.top_right,
                "differences": s.differences,
                "right_in_top": sum(bool(r) for r in s.right),
            }
            for s in searches
        ],
    }


def showcase_line(showcase: dict) -> str:
    """The summary's line, e.g. 'showcase: 2 of 7 top hits show what their query asks for'."""
    if not showcase["judged"]:
        return "showcase: no search could be judged (the captions are not the synthetic ones)"
    return (
        f"showcase: {showcase['top_hits_right']} of {showcase['judged']} top hits show what "
        f"their query asks for ({showcase['accuracy']:.0%}; shape, colour, size, texture, count, "
        "position and relation checked against the captions)"
    )


# --- files ----------------------------------------------------------------------------------------


def write_summaries(out: Path, summary: dict) -> None:
    """The demo's summary into demo.json, its showcase into the run's summary.json too."""
    atomic_write_text(out / DEMO_MARK, json.dumps(summary, indent=2))
    run_summary = out / "summary.json"
    if run_summary.is_file():
        merged = {
            **json.loads(run_summary.read_text(encoding="utf-8")),
            "showcase": summary["showcase"],
        }
        atomic_write_text(run_summary, json.dumps(merged, indent=2))


def showcase_table(searches: list[Search]) -> str:
    """The showcase as text: one line per search with its verdict, then the total."""
    lines = [f"{'kind':<14} {'query':<44} verdict"]
    for s in searches:
        lines.append(f"{s.kind:<14} {s.query:<44} {verdict_line(s)}")
    return "\n".join([*lines, "", showcase_line(showcase_summary(searches)), ""])


def write_demo_report(
    out: Path, metrics: dict, embedder: Embedder, index: Index, searches: list[Search]
) -> list[Path]:
    """Write the training, recall, similarity and search plots and the showcase table into
    OUT/report; returns their paths."""
    from coembed.report import (
        comparison_sheet,
        plot_recall,
        plot_similarity,
        plot_training,
        read_metrics,
    )

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_training(read_metrics(out), report / "training.png"),
        plot_recall(metrics, report / "recall.png"),
    ]
    n = min(12, len(index))
    items = index.items[:n]
    texts = [caps[0] for caps in index.captions[:n]]
    similarity = embedder.embed_texts(texts) @ embedder.embed_images(items).T
    paths.append(plot_similarity(np.asarray(similarity), texts, report / "similarity.png"))
    queries = [s.query if s.kind != "image" else f"image: {s.wants}" for s in searches]
    right = [{item for (item, _), r in zip(s.results, s.right) if r} for s in searches]
    title = "green frame: the picture shows what the query asks for (from its caption)"
    paths.append(
        comparison_sheet(
            queries,
            {"": [s.results for s in searches]},
            report / "searches.png",
            right,
            title=title,
        )
    )
    paths.append(atomic_write_text(report / "showcase.txt", showcase_table(searches)))
    return paths


__all__ = ["COMPOSITIONAL", "DEMO_MARK", "TEXT_QUERIES", "is_demo_run", "run_demo"]
