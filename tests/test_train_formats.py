"""`coembed train` reads and trains on every dataset format, run from a folder elsewhere, so
relative image paths must resolve against the dataset file's own folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.helpers import (
    copy_images,
    metrics,
    ok,
    run_cli_batch,
    shipped_rows,
    train_args,
    write_csv,
)

N = 16  # images per dataset: two batches of 8


def write_shards(folder: Path, rows: list[tuple[str, str]], images: Path) -> str:
    """Two webdataset shards (png + txt, and png + json for the second); returns the brace pattern."""
    folder.mkdir(parents=True)
    for shard, part in enumerate((rows[: N // 2], rows[N // 2 :])):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for i, (name, caption) in enumerate(part):
                key = f"{shard:03d}{i:04d}"
                text = caption if shard == 0 else json.dumps({"caption": caption})
                for member, data in (
                    (f"{key}.png", (images / name).read_bytes()),
                    (f"{key}.{'txt' if shard == 0 else 'json'}", text.encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "shard-{000..001}.tar")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[list[str], int]]:
    """Each format's train arguments and the number of pairs it holds."""
    root = tmp_path_factory.mktemp("formats")
    rows = shipped_rows(N)
    images = root / "images"
    copy_images(rows, images)
    out: dict[str, tuple[list[str], int]] = {}
    # CSV one folder down: "../images/x.png" is relative to the CSV, not to the cwd.
    csv_path = write_csv(root / "csv" / "pairs.csv", [(f"../images/{a}", b) for a, b in rows])
    out["csv"] = ([str(csv_path)], N)
    tsv = write_csv(
        root / "tsv" / "pairs.tsv",
        [(f"../images/{a}", b) for a, b in rows],
        header=("path", "title"),
        sep="\t",
    )
    out["tsv"] = ([str(tsv), "--image-key", "path", "--caption-key", "title"], N)
    jsonl = root / "jsonl" / "pairs.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text(
        "".join(json.dumps({"filepath": f"../images/{a}", "caption": b}) + "\n" for a, b in rows)
    )
    out["jsonl"] = ([str(jsonl)], N)
    folder = root / "folder"
    copy_images(rows, folder)
    for name, caption in rows:
        (folder / name).with_suffix(".txt").write_text(caption)
    out["folder"] = ([str(folder)], N)
    out["webdataset"] = ([write_shards(root / "shards", rows, images)], N)
    coco = {
        "images": [{"id": i, "file_name": a} for i, (a, _) in enumerate(rows)],
        "annotations": [{"id": i, "image_id": i, "caption": b} for i, (_, b) in enumerate(rows)],
    }
    (root / "coco.json").write_text(json.dumps(coco))  # images/ beside it
    out["coco"] = ([str(root / "coco.json")], N)
    # Karpathy: two captions per image, 12 train + restval images and 4 val ones.
    karpathy = {
        "images": [
            {
                "filename": a,
                "filepath": "images",
                "imgid": i,
                "split": "train" if i < 10 else ("restval" if i < 12 else "val"),
                "sentences": [{"raw": b}, {"raw": f"another view: {b}"}],
            }
            for i, (a, b) in enumerate(rows)
        ]
    }
    (root / "karpathy" / "dataset.json").parent.mkdir()
    (root / "karpathy" / "images").symlink_to(images)  # Karpathy's layout: images/ beside it
    (root / "karpathy" / "dataset.json").write_text(json.dumps(karpathy))
    out["karpathy"] = ([str(root / "karpathy" / "dataset.json"), "--split", "train"], 24)
    return out


@pytest.fixture(scope="module")
def runs(datasets, tmp_path_factory):
    """Train 2 steps on each format, with the working directory somewhere unrelated."""
    elsewhere = tmp_path_factory.mktemp("cwd")
    outputs = {name: elsewhere / f"run-{name}" for name in datasets}
    procs = run_cli_batch(
        [
            train_args(args[0], outputs[name], *args[1:], steps=2, batch=8)
            for name, (args, _) in datasets.items()
        ],
        cwd=elsewhere,
    )
    return {name: (outputs[name], proc) for name, proc in zip(datasets, procs)}


@pytest.mark.parametrize(
    "name", ["csv", "tsv", "jsonl", "folder", "webdataset", "coco", "karpathy"]
)
def test_format_reads_and_trains(name, datasets, runs):
    import coembed

    out, proc = runs[name]
    ok(proc)
    pairs = datasets[name][1]
    assert f"on {pairs} pairs" in proc.stdout, proc.stdout
    assert f"data: {name}: " in proc.stdout, proc.stdout
    assert "images skipped" not in proc.stdout, proc.stdout
    assert [m["step"] for m in metrics(out) if "loss" in m] == [2]
    embedder = coembed.load(out)
    assert embedder.embed_texts(["two red triangles"]).shape == (1, 32)
