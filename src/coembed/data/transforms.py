"""Image preprocessing: the eval transform (PIL, exact open_clip parity) and batched tensor ops.

Eval: resize the shortest side to S (bicubic), center crop S x S, scale to [0, 1], normalize:
the same operations, in the same order and arithmetic, as ``open_clip.image_transform(S,
is_train=False)``, so embeddings match open_clip's for imported weights. ``Preprocess`` holds
these settings (a model directory's preprocess.json) and ``eval_transform`` reads all of them.

Train: a random resized crop of a whole uint8 batch in one ``roi_align`` call (one bilinear
crop-and-resize kernel for all boxes), optionally colour jitter, greyscale and blur over the whole
batch (``StyleAugment``), then normalization, returning channels_last float32.
There is no horizontal flip on purpose: captions say "left of" and "on the right".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from coembed.data.images import check_shape
from coembed.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZES = ("shortest_side",)
CROPS = ("center",)
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}


@dataclass(frozen=True)
class Preprocess:
    """How a model's images are prepared for inference: what preprocess.json holds.

    The defaults are what training normalizes with (``_normalize_nchw``), so a trained model's
    directory records exactly the pixels it learned from.
    """

    image_size: int
    resize: str = "shortest_side"
    interpolation: str = "bicubic"
    crop: str = "center"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_dict(cls, values: Any) -> Preprocess:
        """Settings from a mapping (preprocess.json); unknown keys or values raise ConfigError."""
        if not isinstance(values, dict):
            raise ConfigError(f"expected a mapping of preprocessing settings, got {values!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown preprocessing key {unknown[0]!r} (known: {', '.join(known)})"
            )
        if "image_size" not in values:
            raise ConfigError("preprocessing settings need an image_size")
        size = values["image_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(f"image_size: expected a positive integer, got {size!r}")
        choices = {"resize": RESIZES, "interpolation": tuple(INTERPOLATIONS), "crop": CROPS}
        for key, allowed in choices.items():
            if key in values and values[key] not in allowed:
                raise ConfigError(f"{key}: {values[key]!r} is not one of {', '.join(allowed)}")
        stats = {key: _channel_values(key, values[key]) for key in ("mean", "std") if key in values}
        if "std" in stats and min(stats["std"]) <= 0:
            raise ConfigError(f"std: every channel's must be positive, got {list(stats['std'])}")
        return cls(**{**values, **stats})

    def to_dict(self) -> dict[str, Any]:
        """The settings as preprocess.json stores them (lists for mean and std)."""
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "crop": self.crop,
        }


def _channel_values(key: str, value: Any) -> tuple[float, float, float]:
    """Three finite numbers (one per RGB channel) or ConfigError naming ``key``."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
    ):
        raise ConfigError(f"{key}: expected three finite numbers (R, G, B), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def resize_shortest(
    im: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC
) -> Image.Image:
    """Resize so the shortest side is ``size``; the long side is truncated like torchvision's.

    An image over ``MAX_ASPECT_RATIO`` raises ImageReadError: its resized copy would be huge.
    """
    w, h = im.size
    check_shape(f"<image {w}x{h}>", w, h)
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return im.resize((new_w, new_h), resample)


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """Center crop to size x size (torchvision's rounding of the offsets)."""
    w, h = im.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


class EvalTransform:
    """PIL RGB image -> normalized float32 tensor (3, S, S). A class so workers can pickle it."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess
        self.image_size = preprocess.image_size
        self.resample = INTERPOLATIONS[preprocess.interpolation]
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, im: Image.Image) -> Tensor:
        """Resize the shortest side, center crop, normalize: (3, S, S) float32."""
        S = self.image_size
        im = center_crop(resize_shortest(im, S, self.resample), S)
        if im.mode != "RGB":
            im = im.convert("RGB")
        x = torch.from_numpy(np.array(im, dtype=np.uint8, copy=True))  # (S, S, 3) uint8
        x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # (3, S, S)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"EvalTransform({self.preprocess})"


def eval_transform(preprocess: Preprocess) -> EvalTransform:
    """The evaluation transform: a callable mapping a PIL image to a (3, S, S) float tensor."""
    return EvalTransform(preprocess)


def _normalize_nchw(x: Tensor) -> Tensor:
    """float (B, 3, S, S) in 0..255 -> normalized, channels_last.

    Training's normalization: the constants are ``Preprocess``'s defaults, which every model
    directory training writes records, so inference normalizes the way the model learned.
    """
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def _crop_resize(batch_uint8_nhwc: Tensor, boxes: Tensor, out_size: int) -> Tensor:
    """Crop box k of image k and resize it to out_size, bilinear; boxes (B, 4) x0,y0,x1,y1."""
    B = batch_uint8_nhwc.shape[0]
    x = batch_uint8_nhwc.permute(0, 3, 1, 2).to(torch.float32)  # (B, H, W, 3) -> (B, 3, H, W)
    index = torch.arange(B, dtype=torch.float32).view(B, 1)
    rois = torch.cat([index, boxes.to(torch.float32)], dim=1).to(x.device)  # (B, 5)
    # aligned=True: box coordinates are continuous pixel edges, so [0, 0, W, H] is the whole
    # image; sampling_ratio=-1 averages ceil(box/out) samples per output pixel (antialiasing).
    # Imported here: torchvision.ops pulls in torch._dynamo (seconds), which only training needs.
    from torchvision.ops import roi_align

    return roi_align(
        x.contiguous(),
        rois,
        output_size=out_size,
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )


def random_resized_boxes(
    B: int,
    H: int,
    W: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tensor:
    """Boxes (B, 4) as torchvision's RandomResizedCrop picks them, vectorized over the batch.

    Every call draws the same amount of randomness, whatever is accepted, so a batch's boxes
    depend only on the generator state.
    """
    area = H * W
    target = area * torch.empty(B, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(B, attempts).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect)  # (B, attempts)
    h = torch.sqrt(target / aspect)
    ok = (w <= W) & (h <= H)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((B,), -1))  # (B,)
    # Fallback when no attempt fits: the whole image, clamped to the allowed aspect ratio.
    in_ratio = W / H
    if in_ratio < ratio[0]:
        fw, fh = float(W), W / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = H * ratio[1], float(H)
    else:
        fw, fh = float(W), float(H)
    pick = first.clamp(min=0).view(B, 1)
    bw = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.tensor(fw))
    bh = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.tensor(fh))
    u = torch.rand(B, 2, generator=generator)
    x0 = u[:, 0] * (W - bw)
    y0 = u[:, 1] * (H - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)  # (B, 4)


@dataclass(frozen=True)
class StyleAugment:
    """Style-invariant changes to training images, after the crop: colour jitter of strength
    ``color_jitter`` (brightness, contrast and saturation factors in [1 - s, 1 + s], hue turned by
    up to s/4 of a full turn), greyscale with probability ``grayscale_p``, Gaussian blur with
    probability ``blur_p`` (sigma from 0.1 to 2 pixels, SimCLR's at 224 px; scaled up with larger
    images), and with probability ``random_conv_p`` a random convolution (``_random_conv``)."""

    color_jitter: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    random_conv_p: float = 0.0
    # Pictures whose captions name a colour keep their colours (no jitter, greyscale or random
    # convolution; blur still applies): "a red car" turned grey or green would teach the caption
    # wrong. The loader finds them with ``names_a_color``.
    spare_color_captions: bool = True

    @property
    def active(self) -> bool:
        """Whether anything changes: off, the batch and its random draws are as without it."""
        return bool(self.color_jitter or self.grayscale_p or self.blur_p or self.random_conv_p)

    @property
    def changes_colors(self) -> bool:
        """Whether some change moves an image's colours (the ones a colour caption is spared)."""
        return bool(self.color_jitter or self.grayscale_p or self.random_conv_p)


# English colour names and the words for colour itself, as captions use them; a caption that
# holds one as a word ("a red car", "grey-blue", "colourful") keeps its picture's colours.
COLOR_WORDS = (
    "red|green|blue|yellow|orange|purple|violet|pink|cyan|magenta|brown|black|white|grey|gray|"
    "golden|gold|silver|beige|turquoise|teal|navy|maroon|lime|indigo|lilac|lavender|crimson|"
    "scarlet|amber|khaki|olive|tan|bronze|copper|ivory|cream|aqua|azure|"
    "colou?r|colou?rs|colou?red|colou?rful|colou?rless|monochrome|greyscale|grayscale"
)
_COLOR_WORD = re.compile(rf"\b(?:{COLOR_WORDS})\b", re.IGNORECASE)


def names_a_color(caption: str) -> bool:
    """Whether ``caption`` holds a colour word (``COLOR_WORDS``) as a whole word."""
    return _COLOR_WORD.search(caption) is not None


# RGB -> luma, as torchvision's rgb_to_grayscale weighs the channels.
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: hue is the angle in the I-Q plane, so a hue shift is a rotation there.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _gray(x: Tensor) -> Tensor:
    """(B, 3, S, S) -> (B, 1, S, S) luma."""
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _turn_hue(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate each image's colours by ``turns`` (B,) of a full turn around the grey axis."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=x.dtype, device=x.device)
    angle = 2 * math.pi * turns.to(x.dtype)
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    rotate = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(
        -1, 3, 3
    )  # (B, 3, 3) in YIQ
    mix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq  # (B, 3, 3) in RGB
    return torch.einsum("bij,bjhw->bihw", mix, x)


def _jitter_colors(x: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast, saturation factors and hue turns, ``factors`` (B, 4), in that
    order on float (B, 3, S, S) pixels in 0..255, clamped after each as torchvision does."""
    b, c, s, h = (factors[:, k].view(-1, 1, 1, 1).to(x.dtype) for k in range(4))
    x = (x * b).clamp(0, 255)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = ((x - mean) * c + mean).clamp(0, 255)
    gray = _gray(x)
    x = ((x - gray) * s + gray).clamp(0, 255)
    return _turn_hue(x, h.view(-1)).clamp(0, 255)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur of image k with ``sigma[k]`` pixels (0: unchanged), separable, in one grouped
    convolution per axis over the whole batch."""
    B, C, S, _ = x.shape
    radius = max(1, min(S // 2 - 1, math.ceil(3 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)  # (K,)
    spread = sigma.to(x.dtype).clamp(min=1e-6).view(B, 1)
    kernel = torch.exp(-0.5 * (offsets / spread) ** 2)  # (B, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(C, dim=0)  # (B*C, K): one kernel per image channel
    y = x.reshape(1, B * C, S, S)  # images as channels, so each gets its own kernel
    y = torch.nn.functional.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = torch.nn.functional.conv2d(y, kernel.view(B * C, 1, 1, -1), groups=B * C)  # along W
    y = torch.nn.functional.conv2d(y, kernel.view(B * C, 1, -1, 1), groups=B * C)  # along H
    return y.view(B, C, S, S)


# RandConv's kernel sizes (Xu et al., ICLR 2021): one is drawn per batch.
RANDOM_CONV_SIZES = (1, 3, 5, 7)


def _random_conv(
    x: Tensor, p: float, generator: torch.Generator, keep: Tensor | None = None
) -> Tensor:
    """RandConv (Xu et al., ICLR 2021), for styles never seen in training: each image, with
    probability ``p``, is blended with its own random 3 -> 3 convolution, whose weights are drawn
    from N(0, 1 / (3 k^2)) for a k x k kernel (k drawn per batch from RANDOM_CONV_SIZES), by a
    weight drawn from U(0, 1). A random filter keeps the shapes and edges of a picture and changes
    its colours, textures and strokes. Every draw comes from the CPU ``generator``; images
    marked in ``keep`` (B,) bool are left as they are, with the same draws."""
    B, C, S, _ = x.shape
    k = RANDOM_CONV_SIZES[int(torch.randint(len(RANDOM_CONV_SIZES), (1,), generator=generator))]
    weight = torch.randn(B * C, C, k, k, generator=generator) / math.sqrt(C * k * k)
    chosen, blend = torch.rand(B, 2, generator=generator).to(x.device).unbind(1)
    y = x.reshape(1, B * C, S, S)  # images as channel groups, so each gets its own filter
    if k > 1:
        y = torch.nn.functional.pad(y, (k // 2,) * 4, mode="reflect")
    y = torch.nn.functional.conv2d(y, weight.to(x), groups=B).view(B, C, S, S)
    blend = blend.view(B, 1, 1, 1).to(x.dtype)
    chosen = chosen < p if keep is None else (chosen < p) & ~keep
    return torch.where(chosen.view(B, 1, 1, 1), blend * x + (1 - blend) * y, x)


def style_augment(
    x: Tensor, style: StyleAugment, generator: torch.Generator, keep_colors: Tensor | None = None
) -> Tensor:
    """Jitter, greyscale, blur and randomly convolve float (B, 3, S, S) pixels in 0..255 as
    ``style`` says, drawing from the CPU ``generator`` (the same draws on any device). Images
    marked in ``keep_colors`` (B,) bool keep their colours: of the changes only the blur reaches
    them, and the draws are the same as without the marks."""
    B, S = x.shape[0], x.shape[-1]
    draws = torch.rand(B, 7, generator=generator).to(x.device)  # (B, 7): one row per image
    keep = None if keep_colors is None else keep_colors.to(device=x.device, dtype=torch.bool)
    if style.color_jitter and (keep is None or not bool(keep.all())):  # else nothing to jitter
        s = style.color_jitter
        low = torch.tensor([max(0.0, 1 - s)] * 3 + [-s / 4], device=x.device)
        high = torch.tensor([1 + s] * 3 + [s / 4], device=x.device)
        jittered = _jitter_colors(x, low + (high - low) * draws[:, :4])
        x = jittered if keep is None else torch.where(keep.view(B, 1, 1, 1), x, jittered)
    if style.grayscale_p:
        gray = draws[:, 4] < style.grayscale_p
        if keep is not None:
            gray = gray & ~keep
        x = torch.where(gray.view(B, 1, 1, 1), _gray(x).expand_as(x), x)
    if style.blur_p:
        sigma = (0.1 + 1.9 * draws[:, 6]) * max(1.0, S / 224)  # pixels
        x = _blur(x, torch.where(draws[:, 5] < style.blur_p, sigma, torch.zeros_like(sigma)))
    if style.random_conv_p:  # drawn after the others, which stay as they were without it
        x = _random_conv(x, style.random_conv_p, generator, keep)
    return x


def train_augment(
    batch_uint8_nhwc: Tensor,
    out_size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    style: StyleAugment | None = None,
    keep_colors: Tensor | None = None,
) -> Tensor:
    """Random resized crop (+ ``style``'s changes, sparing the colours of the images marked in
    ``keep_colors``) + normalize a uint8 batch (B, H, W, 3) -> float32 (B, 3, S, S).

    The result is channels_last and on the batch's device; the randomness comes from the CPU
    ``generator`` only, so it is the same on any device. The style draws come after the crop's,
    so the crops are the same with it or without it.
    """
    B, H, W, C = batch_uint8_nhwc.shape
    if C != 3:
        raise ValueError(f"expected (B, H, W, 3) uint8, got shape {tuple(batch_uint8_nhwc.shape)}")
    boxes = random_resized_boxes(B, H, W, generator, scale, ratio)
    x = _crop_resize(batch_uint8_nhwc, boxes, out_size)
    if style is not None and style.active:
        x = style_augment(x, style, generator, keep_colors)
    return _normalize_nchw(x)


def eval_from_uint8(batch_uint8_nhwc: Tensor, out_size: int | None = None) -> Tensor:
    """Center square crop, resize to ``out_size`` (default: keep), normalize: (B, 3, S, S).

    No randomness. For cached (already square) images this is a plain resize of the whole image.
    """
    B, H, W, _ = batch_uint8_nhwc.shape
    side = min(H, W)
    S = out_size or side
    if S == side and H == W:
        x = batch_uint8_nhwc.permute(0, 3, 1, 2).to(torch.float32)  # (B, H, W, 3) -> (B, 3, H, W)
        return _normalize_nchw(x)
    x0, y0 = (W - side) / 2, (H - side) / 2
    boxes = torch.tensor([[x0, y0, x0 + side, y0 + side]], dtype=torch.float32).expand(B, 4)
    return _normalize_nchw(_crop_resize(batch_uint8_nhwc, boxes, S))
