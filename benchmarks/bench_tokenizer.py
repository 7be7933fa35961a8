"""Caption tokenization throughput: ``open_clip.tokenize`` vs ``coembed.tokenizer.Tokenizer.clip()``.

Both return a LongTensor (N, 77). Every timed call is checked to give identical ids.

    .venv/bin/python benchmarks/bench_tokenizer.py [--captions 10000] [--repeats 5]

Cases (10,000 captions per call unless --captions says otherwise):
  repetitive        captions drawn from 100 distinct ones
  unique            all distinct, ~6% with non-ASCII text or HTML entities; each repeat uses
                    captions neither side has seen (both keep their word caches warm)
  unique, cold      as unique, but a freshly loaded coembed tokenizer for every call (empty cache)
  unique, non-ASCII all distinct and all non-ASCII (accents, CJK, emoji, curly quotes): ftfy runs
                    on every caption on both sides
Reports the best of --repeats calls per side.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections.abc import Callable

import open_clip
import torch

from coembed.tokenizer import Tokenizer

SUBJECTS = (
    "dog cat man woman child girl boy bird horse cow car truck bus bicycle train boat plane "
    "pizza sandwich cake banana apple laptop phone table chair couch bed clock vase kite "
    "umbrella skateboard surfboard elephant giraffe zebra bear sheep teddy bear tennis player"
).split(" ")
ADJECTIVES = (
    "red blue green yellow black white small large old young happy wooden shiny fluffy "
    "striped empty crowded sunny snowy wet dirty colorful tall tiny vintage modern"
).split(" ")
VERBS = (
    "sitting on|standing next to|running across|lying on|riding|holding|looking at|"
    "walking along|parked near|flying over|eating|playing with"
).split("|")
PLACES = (
    "the beach|a park|the street|a kitchen|the forest|the city|a field|the river|a table|"
    "a window|the snow|a parking lot|the grass|an airport|a living room|the ocean"
).split("|")
NON_ASCII = [
    "café",
    "naïve",
    "Zürich",
    "São Paulo",
    "東京の夜景",
    "强大的",
    "😀",
    "🐶🐱",
    "“quoted”",
    "it’s",
    "—",
    "…",
    "Ångström",
]
ENTITIES = ["&amp;", "&quot;", "&#39;", "&lt;3"]


def caption(rng: random.Random, non_ascii: float) -> str:
    """Return one caption in the style of COCO / web alt text."""
    words = [
        rng.choice(["A", "a", "An image of a", "Photo of a", "Two", "Close-up of a"]),
        rng.choice(ADJECTIVES),
        rng.choice(SUBJECTS),
        rng.choice(VERBS),
        rng.choice(PLACES),
    ]
    if rng.random() < 0.5:
        words += ["with", "a", rng.choice(ADJECTIVES), rng.choice(SUBJECTS)]
    if rng.random() < 0.3:
        words.append(f"in {rng.randint(1950, 2024)}")
    if rng.random() < 0.2:
        words.append(f"#{rng.randint(1, 99999)}")
    if rng.random() < non_ascii:
        words.insert(rng.randrange(len(words) + 1), rng.choice(NON_ASCII))
    if rng.random() < 0.02:
        words.insert(rng.randrange(len(words) + 1), rng.choice(ENTITIES))
    return " ".join(words) + rng.choice(["", ".", "!", " ."])


def unique_captions(n: int, seed: int, non_ascii: float) -> list[str]:
    """Return n distinct captions (a short id makes the rare collisions distinct)."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        text = caption(rng, non_ascii)
        seen[text if text not in seen else f"{text} ({seed}-{len(seen)})"] = None
    return list(seen)


def best_rates(
    calls: list[tuple[list[str], Callable[[list[str]], torch.Tensor]]],
) -> tuple[float, float]:
    """Return the best captions/s of (open_clip, coembed) over the calls, checking equal ids.

    The two sides alternate call by call, so load from other processes hits both alike.
    """
    best_theirs = best_ours = 0.0
    for texts, ours in calls:
        start = time.perf_counter()
        expected = open_clip.tokenize(texts)
        middle = time.perf_counter()
        got = ours(texts)
        end = time.perf_counter()
        assert torch.equal(got, expected), "coembed ids differ from open_clip"
        best_theirs = max(best_theirs, len(texts) / (middle - start))
        best_ours = max(best_ours, len(texts) / (end - middle))
    return best_theirs, best_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, repeats = args.captions, args.repeats

    tok = Tokenizer.clip()
    # Warm both word caches on captions that are never timed, as after a few training steps.
    warm = unique_captions(n, seed=999, non_ascii=0.06)
    open_clip.tokenize(warm)
    tok(warm)

    distinct = unique_captions(100, seed=1, non_ascii=0.06)
    rng = random.Random(2)
    repetitive = [[rng.choice(distinct) for _ in range(n)] for _ in range(repeats)]
    unique = [unique_captions(n, seed=10 + r, non_ascii=0.06) for r in range(repeats)]
    cold = [unique_captions(n, seed=20 + r, non_ascii=0.06) for r in range(repeats)]
    non_ascii = [unique_captions(n, seed=30 + r, non_ascii=1.0) for r in range(repeats)]
    fresh = [Tokenizer.clip() for _ in range(repeats)]  # loaded before timing starts

    cases = [
        ("repetitive (100 distinct)", [(t, tok) for t in repetitive]),
        ("unique", [(t, tok) for t in unique]),
        ("unique, cold cache", list(zip(cold, fresh))),
        ("unique, all non-ASCII", [(t, tok) for t in non_ascii]),
    ]
    print(f"{n} captions per call, best of {repeats}; torch {torch.__version__}, ", end="")
    print(
        f"open_clip {open_clip.__version__}, {platform.processor() or platform.machine()}, ", end=""
    )
    print(
        f"{os.cpu_count()} CPUs, TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}"
    )
    print(f"| {'case':28s} | open_clip captions/s | coembed captions/s |  ratio |")
    print(f"|{'-' * 30}|---------------------:|-------------------:|-------:|")
    for name, calls in cases:
        theirs, ours = best_rates(calls)
        print(f"| {name:28s} | {theirs:20,.0f} | {ours:18,.0f} | {ours / theirs:5.1f}x |")


if __name__ == "__main__":
    main()
