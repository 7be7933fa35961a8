"""``coembed demo``: the main job on the shipped data, start to finish.

Train the tiny recipe on the synthetic captioned pictures, measure retrieval on the validation
split, index the validation images, run text, image and compositional searches, and write a
report folder of plots. Everything lands in one run folder (``runs/demo`` by default).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from coembed.errors import UsageError

if TYPE_CHECKING:
    from coembed.embedder import Embedder
    from coembed.index import Index

TEXT_QUERIES = [
    "a large red circle",
    "two blue squares",
    "a yellow star on the left",
    "a green triangle above a purple hexagon",
    "a striped orange cross in the middle",
]
# Word-vector arithmetic: take a description and swap one attribute.
COMPOSITIONAL = '"a large red circle" - "red" + "blue"'


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


def fresh_output(output: Path) -> None:
    """The demo is reproducible, so a previous demo run is replaced; anything else is refused."""
    if not output.exists():
        return
    if any(output.iterdir()) and not (output / "run_config.json").is_file():
        raise UsageError(
            f"{output} exists and is not a coembed run folder; choose another --output"
        )
    shutil.rmtree(output)


def show_results(title: str, results: list[tuple[str, float]], captions: dict[str, str]) -> None:
    """Print a search's title, then one line per hit: rank, score, file name and caption."""
    print(f"\n{title}")
    for rank, (item, score) in enumerate(results, 1):
        print(f"  {rank}. {score:.3f}  {Path(item).name:<18} {captions.get(item, '')}")


def run_demo(
    output: str = "runs/demo",
    data: str | None = None,
    steps: int | None = None,
    device: str = "auto",
) -> dict:
    """Train, evaluate, index, search and report; returns the validation metrics."""
    from coembed import load

    started = time.perf_counter()
    out = Path(output)
    folder = find_data(data, out)
    fresh_output(out)
    print(f"== training the tiny recipe on {folder}")
    train_demo_model(folder, out, steps, device)
    trained = time.perf_counter() - started

    print("\n== retrieval on the validation split (500 images, 500 captions)")
    metrics = show_retrieval(out, folder / "val.csv", device)

    print("\n== indexing the validation images")
    embedder = load(out, device=device)
    index = build_demo_index(embedder, folder / "val.csv", out / "index")
    sheet_rows = run_searches(index)

    print("\n== report")
    for path in write_demo_report(out, metrics, embedder, index, sheet_rows):
        print(f"  {path}")
    total = time.perf_counter() - started
    print(f"\ndemo done in {total:.0f} s (training {trained:.0f} s); run folder: {out}")
    return metrics


def train_demo_model(folder: Path, out: Path, steps: int | None, device: str) -> dict:
    """Train the tiny recipe on ``folder``'s train.csv into ``out``; returns the run's summary."""
    from coembed.config import load_config
    from coembed.training import train

    # Without --steps the recipe's epochs decide the length; with it, steps replace epochs.
    flags = [] if steps is None else [f"train.steps={steps}", "train.epochs=0"]
    return train(
        load_config("tiny", flags),
        str(folder / "train.csv"),
        out,
        val_data=str(folder / "val.csv"),
        device=device,
    )


def show_retrieval(model: Path, pairs: Path, device: str) -> dict:
    """Measure recall@1/5/10 both ways on ``pairs`` and print one line per direction."""
    from coembed.evaluate import evaluate_retrieval

    metrics = evaluate_retrieval(model, str(pairs), device=device)
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


def run_searches(index: Index) -> list[tuple[str, list[tuple[str, float]]]]:
    """Text, image and compositional searches, printed; returns the contact sheet's rows."""
    captions = {item: (caps[0] if caps else "") for item, caps in zip(index.items, index.captions)}
    sheet_rows = []
    for query in TEXT_QUERIES:
        results = index.search(query, k=5)
        show_results(f'text search: "{query}"', results[:3], captions)
        sheet_rows.append((query, results))
    probe = index.items[0]
    results = index.search(Path(probe), k=4)  # a Path is an image; a str would be a text query
    show_results(f"image search: {Path(probe).name} ({captions[probe]})", results[:3], captions)
    sheet_rows.append((f"image: {captions[probe]}", results))
    results = index.search(COMPOSITIONAL, k=5)
    show_results(f"compositional search: {COMPOSITIONAL}", results[:3], captions)
    sheet_rows.append((COMPOSITIONAL, results))
    return sheet_rows


def write_demo_report(
    out: Path,
    metrics: dict,
    embedder: Embedder,
    index: Index,
    sheet_rows: list[tuple[str, list[tuple[str, float]]]],
) -> list[Path]:
    """Write the training, recall, similarity and search plots into OUT/report; returns their paths."""
    from coembed.report import (
        contact_sheet,
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
    paths.append(contact_sheet(sheet_rows, report / "searches.png"))
    return paths
