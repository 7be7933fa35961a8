"""The synthetic generator: deterministic, and the shipped data is what it generates."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from coembed.datasets.synthetic import COLOURS, generate, generate_shapes

SHIPPED = Path(__file__).resolve().parents[1] / "data"


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_is_deterministic(tmp_path):
    assert generate(tmp_path / "a", n_train=8, n_val=3, seed=1) == {"train": 8, "val": 3}
    generate(tmp_path / "b", n_train=8, n_val=3, seed=1)
    generate(tmp_path / "c", n_train=8, n_val=3, seed=2)
    a, b, c = (tmp_path / d for d in "abc")
    assert rows(a / "train.csv") == rows(b / "train.csv") != rows(c / "train.csv")
    assert rows(a / "train.csv")[0] == ["filepath", "caption"] and len(rows(a / "val.csv")) == 4
    for name in sorted(p.name for p in (a / "images").iterdir()):
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
    assert not np.array_equal(
        pixels(a / "images/train_00000.png"), pixels(c / "images/train_00000.png")
    )
    im = Image.open(a / "images/val_00002.png")
    assert im.size == (64, 64) and im.mode == "RGB"


def test_shipped_data_is_what_the_generator_makes(tmp_path):
    # Picture i depends only on (seed, split, i), so a short run reproduces the shipped prefix.
    generate(tmp_path, n_train=5, n_val=2, image_size=64, seed=0)
    shipped_train = rows(SHIPPED / "synthetic" / "train.csv")
    assert len(shipped_train) == 3001 and len(rows(SHIPPED / "synthetic" / "val.csv")) == 501
    assert rows(tmp_path / "train.csv") == shipped_train[:6]
    for name in ("train_00000.png", "train_00004.png", "val_00001.png"):
        assert np.array_equal(
            pixels(tmp_path / "images" / name), pixels(SHIPPED / "synthetic/images" / name)
        )


def test_captions_need_binding():
    captions = [r[1] for r in rows(SHIPPED / "synthetic" / "train.csv")[1:]]
    colour_words = set(COLOURS) | {"violet", "turquoise"}
    two_colours = [c for c in captions if sum(w in colour_words for w in c.split()) == 2]
    assert len(two_colours) > 600  # relation scenes: each colour must be bound to its shape
    assert len(set(captions)) > 0.95 * len(captions)
    templates = {c.split()[0] for c in captions}
    assert len(templates) >= 5  # phrased several ways


def test_shapes(tmp_path):
    classes = generate_shapes(
        tmp_path, n_per_class=2, colours=("red", "blue"), shapes=("circle", "star")
    )
    assert classes == ["blue circle", "blue star", "red circle", "red star"]
    assert sorted(p.name for p in tmp_path.iterdir()) == classes
    assert all(len(list((tmp_path / c).glob("*.png"))) == 2 for c in classes)
    # A red circle is mostly red among its saturated pixels.
    a = pixels(tmp_path / "red circle" / "000.png").astype(int)
    vivid = a[(a.max(-1) - a.min(-1)) > 100]
    assert (vivid[:, 0] > vivid[:, 2]).mean() > 0.9
    shipped = sorted(p.name for p in (SHIPPED / "shapes").iterdir())
    assert len(shipped) == 16 and all(
        len(list((SHIPPED / "shapes" / c).glob("*.png"))) == 16 for c in shipped
    )
