"""The icon benchmark's bookkeeping: which sides share a speed probe, and the augmentation its
open_clip side is given (the recipe's, in open_clip_train's own flags)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_icons():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_icons

        yield bench_icons
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_open_clip_sides_share_a_probe_unless_their_augmentation_differs(bench_icons):
    settings = bench_icons.openclip_settings()
    sides = {name: bench_icons.Side(name, "open_clip", (), o) for name, o in settings.items()}
    keys = {name: side.probe_key() for name, side in sides.items()}
    assert keys["open_clip, its defaults"] == keys["open_clip, tiny's optimizer"]
    assert keys["open_clip, tiny's optimizer and augmentation"] != keys["open_clip, its defaults"]
    seeded = bench_icons.Side(
        "s", "open_clip", ("train.seed=1",), settings["open_clip, its defaults"]
    )
    assert seeded.probe_key() == keys["open_clip, its defaults"]


def test_saved_rates_find_the_augmented_side_again(bench_icons, tmp_path):
    import json

    settings = bench_icons.openclip_settings()
    lines = []
    for rate, name in enumerate(settings, start=100):
        extra = settings[name]["extra"]
        record = {"name": name, "trainer": "open_clip", "overrides": [], "openclip_flags": extra}
        lines.append(json.dumps({**record, "probe_samples_per_s": float(rate)}))
    (tmp_path / "sides.jsonl").write_text("\n".join(lines) + "\n")
    rates = bench_icons.saved_rates(tmp_path / "sides.jsonl")
    augmented = bench_icons.Side(
        "a", "open_clip", (), settings["open_clip, tiny's optimizer and augmentation"]
    )
    assert rates[augmented.probe_key()] == 102.0
    assert len(rates) == 2  # the two sides without augmentation share one cost class


def test_open_clip_augmentation_is_the_recipes(bench_icons):
    from coembed.config import load_config

    data = load_config("tiny", ["data.color_jitter=0.4", "data.grayscale_p=0.2"]).data
    flags = bench_icons.openclip_augmentation(data)
    assert flags[0] == "--aug-cfg"
    assert f"scale=({data.crop_scale_min},1.0)" in flags
    assert "color_jitter=(0.4,0.4,0.4,0.1)" in flags and "color_jitter_prob=1.0" in flags
    assert "gray_scale_prob=0.2" in flags
    plain = load_config("tiny", ["data.color_jitter=0", "data.grayscale_p=0"]).data
    assert bench_icons.openclip_augmentation(plain) == [
        "--aug-cfg",
        f"scale=({plain.crop_scale_min},1.0)",
    ]


def test_open_clip_parses_the_augmentation_flags(bench_icons):
    """open_clip_train's own argument parser reads them into the AugmentationCfg it trains with."""
    params = pytest.importorskip("open_clip_train.params")
    from coembed.config import load_config

    flags = bench_icons.openclip_augmentation(load_config("tiny").data)
    aug = params.parse_args(["--train-data", "x", *flags]).aug_cfg
    assert aug["scale"] == (0.8, 1.0)
    assert aug["color_jitter"] == (0.4, 0.4, 0.4, 0.1) and aug["color_jitter_prob"] == 1.0
    assert aug["gray_scale_prob"] == 0.2
