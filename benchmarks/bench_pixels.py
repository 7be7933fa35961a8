"""Train/eval pixels on the icons: does training's view of an image cost recall at evaluation?

Training decodes each image once into a cached square (JPEGs at a reduced scale, the shortest
side resized bicubic to S * 8/7, centre crop) and takes random crops of it, resized bilinear to
the model's size S; evaluation decodes fully and resizes the shortest side once, bicubic, to S
(open_clip's transform, kept exact for imported weights). This trains the tiny recipe on the
cross-theme icons (one model per seed) and embeds the validation and test themes three ways:

- **eval**: what ``coembed eval`` feeds the model;
- **train view**: training's pixels without its randomness, the cached square resized whole;
- **train mean crop**: the centre crop of the cached square at the mean area of training's
  random crops (0.9 for crop scale 0.8-1), resized to S.

Recall@1/5/10 both ways for each; "mean R" is their mean. If the first two agree, the decode and
the double resize cost nothing; the third shows the zoom every random-resized-crop recipe trains
with. The icons are PNGs: JPEG draft decoding is not in these numbers.

    .venv/bin/python benchmarks/bench_pixels.py --data data/icon-themes --epochs 5 --seeds 0 1
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from trainers import coembed_command  # noqa: E402

VIEWS = ("eval", "train view", "train mean crop")
KEYS = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
MEAN_AREA = 0.9  # the mean of a crop area drawn uniformly from 0.8-1 of the square


def embed_views(model, paths: list[str]) -> dict[str, np.ndarray]:
    """Each of VIEWS' image embeddings of ``paths``: (N, D) unit rows."""
    from coembed.data.cache import cache_size_for, decode_square
    from coembed.data.transforms import _crop_resize, _normalize_nchw, eval_from_uint8

    size = model.model.cfg.image.image_size
    cached = cache_size_for(size)
    squares = torch.from_numpy(np.stack([decode_square(p, cached) for p in paths]))
    side = cached * MEAN_AREA**0.5
    start = (cached - side) / 2
    box = torch.tensor([[start, start, start + side, start + side]])
    train_view, mean_crop = [], []
    with torch.no_grad():
        for chunk in squares.split(256):
            train_view.append(model.embed_pixels(eval_from_uint8(chunk, size)))
            boxes = box.expand(len(chunk), 4)
            mean_crop.append(model.embed_pixels(_normalize_nchw(_crop_resize(chunk, boxes, size))))
    return {
        "eval": model.embed_images(paths),
        "train view": np.concatenate(train_view),
        "train mean crop": np.concatenate(mean_crop),
    }


def recall_by_view(model_dir: Path, data: Path, split: str) -> dict[str, dict[str, float]]:
    """Recall@1/5/10 both ways of one split's pairs, for each view of its images."""
    import coembed
    from coembed.evaluate import retrieval_metrics

    model = coembed.load(model_dir, device="cpu")
    with open(data / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    texts = model.embed_texts([r["caption"] for r in rows])
    pairs = np.arange(len(rows))
    views = embed_views(model, [str(data / r["filepath"]) for r in rows])
    return {name: retrieval_metrics(images, texts, pairs) for name, images in views.items()}


def mean_recall(metrics: dict[str, float]) -> float:
    return float(np.mean([metrics[k] for k in KEYS]))


def train(data: Path, out: Path, epochs: int, seed: int) -> Path:
    """The tiny recipe on the icons' training themes; returns the model directory."""
    cmd = coembed_command(data / "train.csv", out, [f"train.seed={seed}"], epochs=epochs)
    env = {**os.environ, "COEMBED_NO_PROGRESS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `coembed data icons` folder")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one model each")
    args = parser.parse_args()
    started = time.time()
    print(f"{machine()}; {args.epochs} epochs per model, seeds {args.seeds}", flush=True)
    lines = ["| seed | split | view | " + " | ".join(KEYS) + " | mean R |"]
    lines.append("|---|---|---|" + "--:|" * (len(KEYS) + 1))
    with tempfile.TemporaryDirectory(prefix="bench-pixels-") as tmp:
        for seed in args.seeds:
            model_dir = train(args.data, Path(tmp) / f"seed{seed}", args.epochs, seed)
            for split in ("val", "test"):
                for view, metrics in recall_by_view(model_dir, args.data, split).items():
                    cells = " | ".join(f"{metrics[k]:.4f}" for k in KEYS)
                    lines.append(
                        f"| {seed} | {split} | {view} | {cells} | {mean_recall(metrics):.4f} |"
                    )
                    print(lines[-1], flush=True)
    print(f"\n{(time.time() - started) / 60:.0f} min in all")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
