"""read_records: every dataset format, path resolution, and the errors a user meets first."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from coembed.data.formats import TarMember, expand_braces, read_records
from coembed.data.images import open_image
from coembed.errors import DataError


def good_png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def by_key(records):
    return {r.key: r for r in records}


def test_csv_relative_paths_resolve_against_file_folder(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "pairs.csv").write_text(
        'filepath,caption\nimg/a.png,"a cat, sitting"\n/abs/b.png,a dog\nimg/a.png,  second caption \n'
    )
    monkeypatch.chdir(tmp_path)  # a relative dataset path must still give absolute images
    records, report = read_records("ds/pairs.csv")
    assert report.format == "csv" and report.rows == 3
    recs = by_key(records)
    assert recs["img/a.png"].image == str(tmp_path / "ds" / "img" / "a.png")
    assert recs["img/a.png"].captions == ["a cat, sitting", "second caption"]  # grouped, stripped
    assert recs["/abs/b.png"].image == "/abs/b.png"
    assert report.images == 2 and report.captions == 3


def test_quoted_newlines_and_unicode_separators_stay_in_the_caption(tmp_path):
    text = 'filepath,caption\r\na.png,"two\nlines"\r\nb.png,odd\u2028sep\r\n'
    (tmp_path / "d.csv").write_text(text, encoding="utf-8", newline="")
    records, report = read_records(str(tmp_path / "d.csv"))
    assert [r.captions[0] for r in records] == ["two\nlines", "odd\u2028sep"] and report.rows == 2
    (tmp_path / "d.jsonl").write_text(
        '{"filepath": "a.png", "caption": "x\u2028y"}\n', encoding="utf-8"
    )
    assert read_records(str(tmp_path / "d.jsonl"))[0][0].captions == ["x\u2028y"]


@pytest.mark.parametrize("name", ["pairs.tsv", "pairs.csv", "pairs.txt"])
def test_tsv_sniffed_whatever_the_extension(tmp_path, name):
    (tmp_path / name).write_text("filepath\tcaption\na.png\ta cat, with a comma\n")
    records, report = read_records(str(tmp_path / name))
    assert report.format == "tsv"
    assert records[0].captions == ["a cat, with a comma"]


def test_missing_column_names_the_columns_and_the_flag(tmp_path):
    path = tmp_path / "openclip.csv"
    path.write_text("filepath,title\na.png,a cat\n")
    with pytest.raises(DataError) as info:
        read_records(str(path))
    msg = str(info.value)
    assert "'caption'" in msg and "'filepath', 'title'" in msg and "--caption-key title" in msg
    records, _ = read_records(str(path), caption_key="title")
    assert records[0].captions == ["a cat"]
    with pytest.raises(DataError, match="--image-key"):
        read_records(str(path), image_key="image", caption_key="title")


def test_empty_and_long_captions_counted(tmp_path):
    long = "x" * 50
    (tmp_path / "d.csv").write_text(
        f"filepath,caption\na.png,   \nb.png,{long}\nc.png,ok\n,no image\n"
    )
    records, report = read_records(str(tmp_path / "d.csv"), max_caption_chars=10)
    assert [r.key for r in records] == ["b.png", "c.png"]
    assert records[0].captions == ["x" * 10]
    assert report.empty_captions == 1 and report.long_captions_truncated == 1
    assert report.missing_image_field == 1
    assert "1 empty captions" in report.summary()


def test_utf8_bom_ok_and_other_encodings_refused(tmp_path):
    (tmp_path / "bom.csv").write_bytes("filepath,caption\na.png,café\n".encode("utf-8-sig"))
    records, _ = read_records(str(tmp_path / "bom.csv"))
    assert records[0].captions == ["café"]
    (tmp_path / "latin.csv").write_bytes("filepath,caption\na.png,café\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*line 2.*iconv"):
        read_records(str(tmp_path / "latin.csv"))


def test_wrong_path_and_nothing_usable(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(str(tmp_path / "nope.csv"))
    (tmp_path / "empty.csv").write_text("filepath,caption\na.png,\n")
    with pytest.raises(DataError, match="no usable"):
        read_records(str(tmp_path / "empty.csv"))
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(DataError, match="header"):
        read_records(str(tmp_path / "blank.csv"))


def test_jsonl_with_caption_lists(tmp_path):
    rows = [
        {"filepath": "a.png", "caption": ["one", "two", ""]},
        {"filepath": "b.png", "caption": "three"},
        {"filepath": "c.png"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records, report = read_records(str(tmp_path / "d.jsonl"))
    assert [r.captions for r in records] == [["one", "two"], ["three"]]
    assert report.empty_captions == 1 and report.missing_caption_field == 1
    with pytest.raises(DataError, match=r"columns 'caption', 'filepath'.*--image-key"):
        read_records(str(tmp_path / "d.jsonl"), image_key="url")
    (tmp_path / "bad.jsonl").write_text('{"filepath": "a.png", "caption": "x"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        read_records(str(tmp_path / "bad.jsonl"))


def test_image_folder_with_txt_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.jpg", "c.png"):
        (tmp_path / name).write_bytes(good_png_bytes())
    (tmp_path / "a.txt").write_text("a caption\n")
    (tmp_path / "sub" / "b.txt").write_bytes(b"caf\xe9")  # latin-1: kept, replaced and counted
    records, report = read_records(str(tmp_path))
    recs = by_key(records)
    assert report.format == "folder" and set(recs) == {"a", "sub/b"}
    assert recs["a"].image == str(tmp_path / "a.png") and recs["a"].captions == ["a caption"]
    assert report.missing_caption_field == 1 and report.non_utf8_captions == 1


def test_folder_without_captions_explains(tmp_path):
    (tmp_path / "a.png").write_bytes(good_png_bytes())
    with pytest.raises(DataError, match=r"\.txt captions"):
        read_records(str(tmp_path))


def write_shard(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shards(folder, n: int = 4) -> None:
    png = good_png_bytes()
    for s in range(n):
        write_shard(
            folder / f"shards-{s:03d}.tar",
            {
                f"s{s}/x0": {"png": png, "txt": f"shard {s} text".encode()},
                f"s{s}/x1": {
                    "jpg": png,
                    "json": json.dumps({"caption": f"shard {s} json"}).encode(),
                },
                f"s{s}/x2": {"txt": b"no image here"},
            },
        )


def test_webdataset_brace_expansion(tmp_path):
    make_shards(tmp_path)
    records, report = read_records(str(tmp_path / "shards-{000..003}.tar"))
    assert report.format == "webdataset" and report.images == 8
    assert report.missing_image_field == 4
    caps = sorted(c for r in records for c in r.captions)
    assert caps[:2] == ["shard 0 json", "shard 0 text"]
    first = records[0].image
    assert isinstance(first, TarMember) and os.path.isabs(first.tar_path)
    assert open_image(first).size == (32, 32)
    records, _ = read_records(str(tmp_path / "shards-{000,002}.tar"))
    assert {r.image.tar_path for r in records} == {
        str(tmp_path / "shards-000.tar"),
        str(tmp_path / "shards-002.tar"),
    }
    joined = f"{tmp_path}/shards-000.tar::{tmp_path}/shards-003.tar"
    assert len(read_records(joined)[0]) == 4
    assert len(read_records(str(tmp_path / "shards-001.tar"))[0]) == 2
    assert len(read_records(str(tmp_path))[0]) == 8  # a folder of shards
    with pytest.raises(DataError, match="1 of 5 shards not found"):
        read_records(str(tmp_path / "shards-{000..004}.tar"))


def test_expand_braces():
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_coco_captions_multi_caption_and_images_subfolder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(good_png_bytes())
    coco = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"image_id": 1, "caption": "first"},
            {"image_id": 2, "caption": "other"},
            {"image_id": 1, "caption": "second"},
            {"image_id": 9, "caption": "orphan"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    records, report = read_records(str(tmp_path / "captions.json"))
    recs = by_key(records)
    assert report.format == "coco" and report.captions == 3 and report.missing_image_field == 1
    assert recs["1"].captions == ["first", "second"]
    assert recs["1"].image == str(tmp_path / "images" / "1.jpg")


def karpathy(tmp_path):
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "imgid": 0},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "imgid": 1},
        {"filepath": "train2014", "filename": "c.jpg", "split": "train", "imgid": 2},
    ]
    for i, img in enumerate(images):
        img["sentences"] = [{"raw": f"img {i} cap {k}", "tokens": []} for k in range(5)]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_splits(tmp_path):
    path = karpathy(tmp_path)
    records, report = read_records(str(path), split="test")
    assert report.format == "karpathy" and len(records) == 1
    assert records[0].captions == [f"img 0 cap {k}" for k in range(5)]
    assert records[0].image == str(tmp_path / "val2014" / "a.jpg")
    assert len(read_records(str(path), split="train")[0]) == 2  # restval counts as train
    assert len(read_records(str(path))[0]) == 3
    with pytest.raises(DataError, match="restval, test, train"):
        read_records(str(path), split="val")


def test_split_only_for_json_and_unknown_json(tmp_path):
    (tmp_path / "d.csv").write_text("filepath,caption\na.png,x\n")
    with pytest.raises(DataError, match="split"):
        read_records(str(tmp_path / "d.csv"), split="test")
    (tmp_path / "other.json").write_text('{"foo": 1}')
    with pytest.raises(DataError, match="COCO"):
        read_records(str(tmp_path / "other.json"))
