"""What an image index reads: dataset files without captions, and COCO's standard layout.

An image index needs images, not captions: a CSV or JSONL with only an image column (or with
empty caption cells) indexes every image. COCO's own layout keeps the captions JSON in
``annotations/`` beside the image folders (``train2017/``, ``val2017/``); it is found there, and
when the images are nowhere the one error line names the folders searched.
"""

from __future__ import annotations

import json

import pytest

from coembed.data.formats import read_records
from coembed.errors import DataError
from tests.helpers import (
    assert_one_line_error,
    copy_images,
    ok,
    run_cli_batch,
    shipped_rows,
    write_csv,
)

N = 6


def coco_layout(root, split="val2017", images_in=None):
    """COCO's layout: ``annotations/captions_<split>.json`` and the images in ``<split>/`` (or in
    ``images_in``, relative to root; None leaves them out); returns the JSON path."""
    rows = shipped_rows(N, "val")
    if images_in is not None:
        copy_images(rows, root / images_in)
    images = [{"id": i, "file_name": name} for i, (name, _) in enumerate(rows)]
    annotations = [
        {"id": 100 + i, "image_id": i, "caption": caption} for i, (_, caption) in enumerate(rows)
    ]
    path = root / "annotations" / f"captions_{split}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def index_args(model, images, output):
    return ["index", "--model", str(model), "--images", str(images), "--output", str(output)]


def indexed(folder):
    """The number of items in a saved index, and their captions."""
    from coembed.index import Index

    index = Index.load(folder)
    return len(index), index.captions


def test_image_index_needs_no_caption_column(tmp_path, tiny_model_dir):
    rows = shipped_rows(N, "val")
    copy_images(rows, tmp_path / "images")
    only_images = write_csv(
        tmp_path / "images.csv", [(f"images/{name}",) for name, _ in rows], header=("filepath",)
    )
    # Captions for some rows only: the images without one are indexed all the same.
    some = [(f"images/{name}", caption if i % 2 else "") for i, (name, caption) in enumerate(rows)]
    some_captions = write_csv(tmp_path / "some.csv", some)
    jsonl = tmp_path / "images.jsonl"
    jsonl.write_text("".join(json.dumps({"filepath": f"images/{n}"}) + "\n" for n, _ in rows))
    procs = run_cli_batch(
        [
            index_args(tiny_model_dir, only_images, tmp_path / "a"),
            index_args(tiny_model_dir, some_captions, tmp_path / "b"),
            index_args(tiny_model_dir, jsonl, tmp_path / "c"),
            ["search", "--index", str(tmp_path / "a"), "--json", "a red circle"],
        ]
    )
    for proc in procs:
        ok(proc)
    assert indexed(tmp_path / "a") == (N, [[] for _ in rows])
    count, captions = indexed(tmp_path / "b")
    assert count == N
    assert captions == [[caption] if i % 2 else [] for i, (_, caption) in enumerate(rows)]
    assert indexed(tmp_path / "c")[0] == N
    assert len(json.loads(procs[3].stdout)["results"]) == N


def test_training_data_still_needs_captions(tmp_path):
    only_images = write_csv(tmp_path / "images.csv", [("a.png",)], header=("filepath",))
    with pytest.raises(DataError, match="no caption column 'caption'"):
        read_records(str(only_images))


@pytest.mark.parametrize("split", ["val2017", "train2017"])
def test_coco_layout_is_found(tmp_path, tiny_model_dir, split):
    path = coco_layout(tmp_path / "coco", split, images_in=split)
    records, report = read_records(str(path))
    assert report.format == "coco" and len(records) == N
    assert all(str(r.image).startswith(str(tmp_path / "coco" / split)) for r in records)
    (proc,) = run_cli_batch([index_args(tiny_model_dir, path, tmp_path / "index")])
    ok(proc)
    count, captions = indexed(tmp_path / "index")
    assert count == N and all(len(c) == 1 for c in captions)


def test_coco_images_nowhere_names_the_folders_searched(tmp_path, tiny_model_dir):
    path = coco_layout(tmp_path / "coco", "val2017", images_in="elsewhere")
    (proc,) = run_cli_batch([index_args(tiny_model_dir, path, tmp_path / "index")])
    assert_one_line_error(proc, 1, "searched")
    line = proc.stderr.strip()
    for folder in ("annotations", "annotations/images", "val2017", "images"):
        assert str(tmp_path / "coco" / folder) in line, folder
    assert "val2017/" in line  # says where COCO keeps its images
    assert not (tmp_path / "index").exists()
