"""Transforms: eval parity with open_clip; the batched random resized crop; the style-invariant
augmentation (colour jitter, greyscale, blur)."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from coembed.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    Preprocess,
    StyleAugment,
    eval_from_uint8,
    eval_transform,
    random_resized_boxes,
    train_augment,
)
from coembed.errors import ConfigError


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("wh", [(97, 61), (50, 203), (224, 224), (31, 31), (640, 427)])
def test_eval_transform_matches_open_clip(size, wh):
    rng = np.random.default_rng(sum(wh) + size)
    im = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    ours = eval_transform(Preprocess(image_size=size))(im)
    theirs = open_clip.image_transform(size, is_train=False)(im)
    assert ours.shape == theirs.shape == (3, size, size) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < 1e-6


def test_preprocess_settings_reach_the_transform():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    base = eval_transform(Preprocess(image_size=32))(im)
    shifted = eval_transform(Preprocess(image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    # mean 0, std 1: the plain [0, 1] pixels, which the default normalization maps to ``base``.
    plain = shifted(im)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    expected = (plain - mean) / std
    assert torch.allclose(base, expected, atol=1e-6)
    bilinear = eval_transform(Preprocess(image_size=32, interpolation="bilinear"))(im)
    assert not torch.equal(bilinear, base)
    open_clip_bilinear = open_clip.image_transform(32, is_train=False, interpolation="bilinear")
    assert (bilinear - open_clip_bilinear(im)).abs().max().item() < 1e-6


def test_preprocess_dict_round_trip_and_refusals():
    settings = Preprocess(image_size=64, interpolation="bilinear", mean=(0.5, 0.5, 0.5))
    assert Preprocess.from_dict(settings.to_dict()) == settings
    assert Preprocess.from_dict({"image_size": 64}) == Preprocess(image_size=64)
    for bad in [
        {"mean": [0.5, 0.5, 0.5]},  # no size
        {"image_size": True},
        {"image_size": 0},
        {"image_size": 64, "crop": "random"},
        {"image_size": 64, "std": [1, 1, float("inf")]},
        {"image_size": 64, "mean": "0.5"},
        {"image_size": 64, "extra": 1},
    ]:
        with pytest.raises(ConfigError):
            Preprocess.from_dict(bad)


def test_clip_constants_match_open_clip():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert CLIP_MEAN == tuple(OPENAI_DATASET_MEAN)
    assert CLIP_STD == tuple(OPENAI_DATASET_STD)


def random_batch(B=6, H=40, W=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, H, W, 3), generator=g, dtype=torch.uint8)


def test_train_augment_shape_layout_and_determinism():
    batch = random_batch()
    a = train_augment(batch, 32, torch.Generator().manual_seed(1))
    b = train_augment(batch, 32, torch.Generator().manual_seed(1))
    c = train_augment(batch, 32, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_full_box_equals_eval_resize_and_constant_stays_constant():
    batch = random_batch()
    # scale=ratio=1 on a square picks the whole image: the same as the eval resize.
    full = train_augment(batch, 32, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    assert torch.allclose(full, eval_from_uint8(batch, 32), atol=1e-5)
    # A flat picture must stay flat: no darkened borders from sampling outside the image.
    flat = torch.full((4, 40, 40, 3), 200, dtype=torch.uint8)
    out = train_augment(flat, 32, torch.Generator().manual_seed(0))
    expected = (200 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


def test_eval_from_uint8_without_resize_is_plain_normalization():
    batch = random_batch(B=2, H=8, W=8)
    out = eval_from_uint8(batch)
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    ref = (batch.numpy() / 255.0 - mean) / std  # (B, H, W, 3)
    assert np.allclose(out.permute(0, 2, 3, 1).numpy(), ref, atol=1e-6)
    # A wide picture is center-cropped square first.
    wide = torch.zeros(1, 10, 30, 3, dtype=torch.uint8)
    wide[:, :, 10:20] = 255
    assert eval_from_uint8(wide, 10).min() > 1.5  # only the white centre is left


def test_boxes_inside_image_with_area_and_ratio_in_range():
    boxes = random_resized_boxes(
        500, 60, 80, torch.Generator().manual_seed(0), (0.3, 0.9), (0.5, 2.0)
    )
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (
        (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 80 + 1e-4).all() and (y1 <= 60 + 1e-4).all()
    )
    area = (x1 - x0) * (y1 - y0) / (60 * 80)
    ratio = (x1 - x0) / (y1 - y0)
    # As in torchvision, when 10 tries do not fit the box falls back to the whole image.
    fallback = (area - 1).abs() < 1e-5
    assert fallback.float().mean() < 0.05
    area, ratio = area[~fallback], ratio[~fallback]
    assert area.min() >= 0.3 - 1e-4 and area.max() <= 0.9 + 1e-4
    assert ratio.min() >= 0.5 - 1e-4 and ratio.max() <= 2.0 + 1e-4
    assert area.std() > 0.1  # actually random


# --- style-invariant augmentation -----------------------------------------------------------------


def photo_batch(B: int = 6, side: int = 40) -> torch.Tensor:
    """(B, side, side, 3) uint8 pictures with colour and edges: gradients plus a bright square."""
    ramp = torch.linspace(0, 200, side)
    x = torch.stack(
        [
            ramp.view(1, -1).expand(side, side),
            ramp.view(-1, 1).expand(side, side),
            255 - ramp.view(1, -1).expand(side, side),
        ],
        dim=-1,
    )  # (side, side, 3)
    batch = x.unsqueeze(0).repeat(B, 1, 1, 1)
    for k in range(B):
        batch[k, 5 + k : 15 + k, 10:20] = torch.tensor([250.0, 30.0, 60.0])
    return batch.round().to(torch.uint8)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalized (B, 3, S, S) back to 0..255."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def augmented(style: StyleAugment | None, seed: int = 0) -> torch.Tensor:
    return train_augment(photo_batch(), 32, torch.Generator().manual_seed(seed), style=style)


def test_style_off_leaves_the_batch_bitwise_unchanged():
    plain = augmented(None)
    assert torch.equal(augmented(StyleAugment()), plain)


@pytest.mark.parametrize(
    "style",
    [StyleAugment(color_jitter=0.5), StyleAugment(grayscale_p=1.0), StyleAugment(blur_p=1.0)],
    ids=["jitter", "grayscale", "blur"],
)
def test_each_style_change_alters_every_image_the_same_way_each_time(style):
    plain, changed = augmented(None), augmented(style)
    assert changed.shape == plain.shape and changed.is_contiguous(memory_format=torch.channels_last)
    for k in range(len(plain)):
        assert (changed[k] - plain[k]).abs().max() > 0.05, k
    assert torch.equal(augmented(style), changed)  # a function of the generator's state
    assert not torch.equal(augmented(style, seed=1), changed)
    values = pixels(changed)
    assert values.min() > -0.01 and values.max() < 255.01  # still pixels


def test_grayscale_makes_the_channels_equal_and_keeps_the_luma():
    plain, gray = pixels(augmented(None)), pixels(augmented(StyleAugment(grayscale_p=1.0)))
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-3, rtol=0)
    torch.testing.assert_close(gray[:, 1], gray[:, 2], atol=1e-3, rtol=0)
    luma = 0.299 * plain[:, 0] + 0.587 * plain[:, 1] + 0.114 * plain[:, 2]
    torch.testing.assert_close(gray[:, 0], luma, atol=1e-3, rtol=0)


def test_grayscale_probability_picks_some_images():
    gray = pixels(augmented(StyleAugment(grayscale_p=0.5), seed=3))
    flat = (gray[:, 0] - gray[:, 2]).abs().amax(dim=(1, 2)) < 1e-3  # (B,) greyscale images
    assert 0 < int(flat.sum()) < len(flat)


def test_blur_smooths_every_image():
    def roughness(x: torch.Tensor) -> torch.Tensor:  # (B,) mean step between neighbours
        return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))

    plain, blurred = augmented(None), augmented(StyleAugment(blur_p=1.0))
    assert (roughness(blurred) < roughness(plain)).all()
    # The mean colour stays (reflected edges, a normalized kernel).
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), plain.mean(dim=(2, 3)), atol=0.05, rtol=0)


def test_hue_turn_keeps_grey_and_brightness_keeps_black():
    from coembed.data.transforms import _jitter_colors

    grey = torch.full((2, 3, 4, 4), 100.0)
    grey[1] = 0.0
    factors = torch.tensor(
        [[1.0, 1.0, 1.0, 0.2], [1.4, 1.0, 1.0, 0.0]]
    )  # hue only; brightness only
    out = _jitter_colors(grey, factors)
    torch.testing.assert_close(out, grey, atol=1e-3, rtol=0)


def test_random_conv_blends_each_image_with_its_own_filter():
    """The result equals a hand computation from the same draws: a kernel size for the batch,
    one 3 -> 3 filter per image (N(0, 1 / (3 k^2))), then per image whether and how much."""
    from coembed.data.transforms import RANDOM_CONV_SIZES, _random_conv

    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 255
    for seed in range(4):
        got = _random_conv(x, 0.6, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        k = RANDOM_CONV_SIZES[int(torch.randint(4, (1,), generator=g))]
        weight = torch.randn(15, 3, k, k, generator=g) / (3 * k * k) ** 0.5
        chosen, blend = torch.rand(5, 2, generator=g).unbind(1)
        for i in range(5):
            image = torch.nn.functional.pad(x[i : i + 1], (k // 2,) * 4, mode="reflect")
            filtered = torch.nn.functional.conv2d(image, weight[3 * i : 3 * i + 3])[0]
            want = blend[i] * x[i] + (1 - blend[i]) * filtered if chosen[i] < 0.6 else x[i]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-3)


def test_random_conv_probability_picks_some_images_and_keeps_the_others():
    changed = augmented(StyleAugment(random_conv_p=0.5), seed=1)
    plain = augmented(None, seed=1)
    same = (changed - plain).abs().amax(dim=(1, 2, 3)) == 0  # (B,)
    assert 0 < int(same.sum()) < len(same)


@pytest.mark.parametrize(
    "caption, named",
    [
        ("a red car", True),
        ("Grey-blue sky at dusk", True),
        ("a colourful kite", True),
        ("two RED solid triangles", True),
        ("a colored pencil", True),
        ("address book new, action icon", False),
        ("a reddish fox", False),  # whole words only
        ("bluetooth, status icon", False),
        ("the tandem bicycle", False),
        ("", False),
    ],
)
def test_names_a_color_finds_colour_words_as_whole_words(caption, named):
    from coembed.data.transforms import names_a_color

    assert names_a_color(caption) is named


STYLES_THAT_MOVE_COLOURS = [
    StyleAugment(color_jitter=0.5, grayscale_p=1.0),
    StyleAugment(color_jitter=0.5, grayscale_p=0.5, random_conv_p=1.0),
]


@pytest.mark.parametrize("style", STYLES_THAT_MOVE_COLOURS, ids=["jitter+grey", "with RandConv"])
def test_kept_images_keep_their_colours_and_the_others_their_draws(style):
    """Marked images come out as the crop alone made them; the unmarked ones exactly as without
    marks (the draws do not move)."""
    plain, changed = augmented(None), augmented(style)
    keep = torch.tensor([True, False, True, False, False, True])
    generator = torch.Generator().manual_seed(0)
    marked = train_augment(photo_batch(), 32, generator, style=style, keep_colors=keep)
    assert torch.equal(marked[keep], plain[keep])
    assert torch.equal(marked[~keep], changed[~keep])
    assert not torch.equal(changed[keep], plain[keep])  # the style did change them unmarked


def test_kept_images_are_still_blurred():
    style = StyleAugment(color_jitter=0.5, blur_p=1.0)
    keep = torch.ones(6, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    marked = train_augment(photo_batch(), 32, generator, style=style, keep_colors=keep)
    assert torch.equal(marked, augmented(StyleAugment(blur_p=1.0)))


def test_loader_spares_the_pictures_whose_captions_name_a_colour(tmp_path):
    """Through ``PairData.epoch_batches``: of a batch holding captions with and without colour
    words, only the colourless captions' pictures are jittered and turned grey; sparing off,
    all are."""
    from coembed.data.formats import read_records
    from coembed.data.loader import PairData
    from tests.helpers import copy_images, shipped_rows, write_csv

    rows = shipped_rows(4)
    copy_images(rows, tmp_path / "images")
    captions = ["a red square", "a square", "a Blue circle", "a circle"]
    table = [(f"images/{a}", c) for (a, _), c in zip(rows, captions)]
    records, _ = read_records(str(write_csv(tmp_path / "pairs.csv", table)), "filepath", "caption")
    data = PairData.from_records(records, 32, cache_dir=None, num_workers=0)

    def batch(style: StyleAugment | None) -> tuple[torch.Tensor, list[str]]:
        return next(iter(data.epoch_batches(0, 0, 4, style=style)))

    plain, order = batch(None)
    spared, spared_order = batch(StyleAugment(color_jitter=0.5, grayscale_p=1.0))
    unspared, _ = batch(StyleAugment(color_jitter=0.5, grayscale_p=1.0, spare_color_captions=False))
    assert spared_order == order
    for k, caption in enumerate(order):
        coloured = caption in ("a red square", "a Blue circle")
        assert torch.equal(spared[k], plain[k]) is coloured, caption
        assert not torch.equal(unspared[k], plain[k]), caption
