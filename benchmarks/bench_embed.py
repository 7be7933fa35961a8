"""Embedding throughput for the same RN50-shaped weights: coembed vs open_clip, side by side.

A randomly initialized open_clip RN50 (OpenAI shapes, QuickGELU) is converted into coembed with
coembed's own importer; both models then embed the same preprocessed images and the same token
batches, alternating call by call, and the outputs are checked to agree within 1e-5.

    .venv/bin/python benchmarks/bench_embed.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def best_rate(fn, items: int, repeats: int) -> float:
    """Items per second of the median of ``repeats`` timed calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return items / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    args = parser.parse_args()

    import open_clip

    from coembed.config import load_config
    from coembed.interop.openclip import convert_state
    from coembed.model import CoEmbed

    torch.manual_seed(0)
    theirs = open_clip.create_model("RN50-quickgelu").eval()
    cfg = load_config("rn50").model
    ours = CoEmbed(cfg)
    ours.load_state_dict(convert_state(theirs.state_dict(), cfg, "open_clip RN50"))
    ours = ours.eval().to(memory_format=torch.channels_last)

    image_batch = 8 if args.quick else 32
    text_batch = 64 if args.quick else 256
    repeats = 2 if args.quick else 5
    images = torch.randn(image_batch, 3, 224, 224)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    tokens = open_clip.tokenize(
        [f"a photo of {i} red things on a table" for i in range(text_batch)]
    )

    with torch.inference_mode():
        image_diff = (
            (theirs.encode_image(images, normalize=True) - ours.encode_image(images_cl)).abs().max()
        )
        text_diff = (
            (theirs.encode_text(tokens, normalize=True) - ours.encode_text(tokens)).abs().max()
        )
        rows = []
        for what, n, theirs_fn, ours_fn in (
            (
                f"image, batch {image_batch} @224",
                image_batch,
                lambda: theirs.encode_image(images, normalize=True),
                lambda: ours.encode_image(images_cl),
            ),
            (
                f"text, batch {text_batch} x 77",
                text_batch,
                lambda: theirs.encode_text(tokens, normalize=True),
                lambda: ours.encode_text(tokens),
            ),
        ):
            # Alternate the two sides so drift in machine load hits both alike.
            a, b = [], []
            for _ in range(2):
                a.append(best_rate(theirs_fn, n, repeats))
                b.append(best_rate(ours_fn, n, repeats))
            rows.append((what, max(a), max(b)))

    print(
        f"# embedding throughput, RN50 shapes, fp32, {torch.get_num_threads()} threads, {platform.processor()}"
    )
    print(
        f"max |difference|: image {float(image_diff):.2e}, text {float(text_diff):.2e} (must be <= 1e-5)"
    )
    print("| what | open_clip items/s | coembed items/s | ratio |")
    print("|---|--:|--:|--:|")
    for what, a, b in rows:
        print(f"| {what} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    assert float(image_diff) <= 1e-5 and float(text_diff) <= 1e-5


if __name__ == "__main__":
    main()
