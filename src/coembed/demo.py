"""``coembed demo``: the main job on the shipped data, start to finish.

Train the tiny recipe on the synthetic captioned pictures, measure retrieval on the validation
split, index the validation images, run text, image and compositional searches, and write a
report folder of plots. Everything lands in one run folder (``runs/demo`` by default).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from coembed.errors import UsageError

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
    if data:
        folder = Path(data)
        if not (folder / "train.csv").is_file() or not (folder / "val.csv").is_file():
            raise UsageError(f"--data {data}: expected a folder with train.csv and val.csv")
        return folder
    folder = shipped_data()
    if folder is not None:
        return folder
    # Installed without the repository: generate the same data set (deterministic).
    from coembed.data.synthetic import generate

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


def show_results(title: str, results, captions: dict[str, str]) -> None:
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
    from coembed.evaluate import evaluate_retrieval_cli
    from coembed.index import Index
    from coembed.train import train_from_args

    started = time.perf_counter()
    out = Path(output)
    folder = find_data(data, out)
    fresh_output(out)
    args = argparse.Namespace(
        config="tiny",
        train_data=str(folder / "train.csv"),
        val_data=str(folder / "val.csv"),
        output=str(out),
        steps=steps,
        epochs=None,
        batch_size=None,
        lr=None,
        init=None,
        resume=False,
        lock_image=False,
        lock_text=False,
        split=None,
        set=[],
        profile=False,
        image_key=None,
        caption_key=None,
        device=device,
    )
    print(f"== training the tiny recipe on {folder}")
    train_from_args(args)
    trained = time.perf_counter() - started

    print("\n== retrieval on the validation split (500 images, 500 captions)")
    metrics = evaluate_retrieval_cli(str(out), str(folder / "val.csv"), device=device)
    for direction in ("image_to_text", "text_to_image"):
        print(
            f"  {direction.replace('_', ' '):>14}:  "
            + "   ".join(f"R@{k} {metrics[f'{direction}_R@{k}']:.3f}" for k in (1, 5, 10))
        )

    print("\n== indexing the validation images")
    embedder = load(out, device=device)
    index = Index.build(embedder, images=str(folder / "val.csv"), progress=False)
    index.save(out / "index")
    captions = {item: (caps[0] if caps else "") for item, caps in zip(index.items, index.captions)}
    print(f"  {len(index)} images in {out / 'index'} ({index.kind})")

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

    print("\n== report")
    for path in write_demo_report(out, metrics, embedder, index, sheet_rows):
        print(f"  {path}")
    total = time.perf_counter() - started
    print(f"\ndemo done in {total:.0f} s (training {trained:.0f} s); run folder: {out}")
    return metrics


def write_demo_report(out: Path, metrics: dict, embedder, index, sheet_rows) -> list[Path]:
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
