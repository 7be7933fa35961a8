"""Configuration as data: small nested dataclasses, YAML recipes, ``--set`` overrides, validation.

A config is validated once, at the edge (YAML file or command line); everything after that trusts
it. Two separate steps: ``complete_config`` returns a copy with the values other settings imply
filled in, ``validate`` checks and changes nothing. The resolved config is stored in every
model directory and every run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from coembed.errors import ConfigError
from coembed.files import read_regular_file

FORMAT_VERSION = 1
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's starting temperature, in log space
CLIP_VOCAB_SIZE = 49408  # CLIP's BPE vocabulary
CLIP_EOT_ID = 49407  # its end-of-text token, the last one
MAX_CONFIG_BYTES = 1024 * 1024  # the shipped recipes are under 2 KB
CONFIG_DIR = Path(__file__).parent / "configs"

# Options that are one of a few strings; anything else is rejected with the allowed values.
CHOICES: dict[str, tuple[str, ...]] = {
    "text.positional": ("learned", "sinusoidal"),
    "text.attention": ("causal", "bidirectional"),
    "text.pool": ("eot", "cls", "mean", "max"),
    "text.act": ("gelu", "quick_gelu"),
    "image.pool": ("attention", "avg", "max"),
    "model.tokenizer": ("clip", "trained"),
    "train.loss": ("clip", "siglip"),
    "train.precision": ("fp32", "bf16", "fp16", "auto"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.schedule": ("cosine", "constant", "const-cooldown"),
}


@dataclass
class TextConfig:
    """The transformer text tower."""

    vocab_size: int = CLIP_VOCAB_SIZE
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"
    positional: str = "learned"
    attention: str = "causal"
    pool: str = "eot"
    dropout: float = 0.0
    eot_id: int = CLIP_EOT_ID


@dataclass
class ImageConfig:
    """The convolutional image tower: CLIP's ModifiedResNet or a torchvision backbone."""

    backbone: str = "modified_resnet"
    layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    width: int = 64
    image_size: int = 224
    heads: int = 32
    pool: str = "attention"
    # MixStyle (a training-time stage of the ModifiedResNet): the chance per batch that the
    # images' feature statistics after the first two stages are mixed between images; 0: off.
    mixstyle: float = 0.0


@dataclass
class ModelConfig:
    embed_dim: int = 1024
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    # The temperature's log at the start; None: the loss's own (completion fills it in), CLIP's
    # log(1/0.07) for the softmax loss, SigLIP's log(10) for the sigmoid loss.
    init_logit_scale: float | None = None
    max_logit_scale: float = 100.0
    # Only the sigmoid loss uses a bias; None means the model has no bias parameter.
    init_logit_bias: float | None = None
    tokenizer: str = "clip"


@dataclass
class DataConfig:
    image_key: str = "filepath"
    caption_key: str = "caption"
    cache_dir: str | None = None
    max_cache_gb: float = 4.0
    workers: int = 2
    augment: bool = True  # false: no crops and no style changes below (the eval transform)
    crop_scale_min: float = 0.8
    # Side of the decoded, cached squares that training crops from, as a multiple of the model's
    # image size (224 -> 256 by default). Above 8/7 the crops are resized from more of the source
    # pixels, which keeps thin strokes that a second, small resize blurs (cache.py).
    cache_scale: float = 8 / 7
    # Style-invariant augmentation after the crop (coembed.data.transforms.StyleAugment): colour
    # jitter strength, and the probabilities of greyscale and of a Gaussian blur; 0: off.
    color_jitter: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    random_conv_p: float = 0.0  # RandConv: the chance an image is blended with a random filter
    # Pictures whose captions name a colour ("a red car") are spared the changes above that move
    # colours (jitter, greyscale, RandConv), which would make their captions wrong.
    spare_color_captions: bool = True
    prefetch: int = 1  # training batches prepared ahead in a background thread (0: in place)
    # Pairs that share a caption stand together in an epoch's order, in runs of up to this
    # many, so a batch holds one caption under several pictures (needs train.soft_targets); 1: off.
    caption_group: int = 1
    # Webdataset shards: an epoch draws this many pairs, shard by shard with replacement
    # (0: an epoch is one pass over every pair).
    train_num_samples: int = 0


@dataclass
class TrainConfig:
    batch_size: int = 128
    steps: int = 0
    epochs: int = 0
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"  # after warmup: cosine decay, constant, or constant + cooldown
    cooldown_steps: int = 0  # const-cooldown: the last steps, decaying linearly to zero
    grad_clip: float = 1.0
    accum_steps: int = 1
    loss: str = "clip"
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    compile: bool = False
    channels_last: bool = True
    threads: int = 0
    reuse_memory: bool = True
    deterministic: bool = False
    grad_checkpointing: bool = False  # recompute the towers' activations in the backward pass
    # Pairs of a batch with the same caption or the same image are positives of each other.
    soft_targets: bool = False
    label_smoothing: float = 0.0  # the softmax loss's targets mixed with uniform, in [0, 1)
    # A moving average of the weights (coembed.training.ema), validated and saved; 0: none.
    ema_decay: float = 0.0
    # Masked language modelling on the text tower (bidirectional, head tied to the token
    # embedding), added to the loss with this weight; 0: off.
    mlm_weight: float = 0.0
    # Caption augmentation (coembed.training.step.dropped_words): each word of a training
    # caption is left out with this probability (EDA's random deletion; one word always stays);
    # the pairs' positives and caption proxies still follow the whole captions. 0: off.
    caption_word_dropout: float = 0.0
    # Image self-supervision on a second augmented view of each image (coembed.training.views):
    # SLIP's NT-Xent between the two views' projections, added with this weight; 0: off.
    simclr_weight: float = 0.0
    simclr_temperature: float = 0.1  # NT-Xent's temperature
    # DeCLIP's multi-view: the second view is contrasted with the caption too (mean of the two).
    multiview: bool = False
    # Cross-batch memory (coembed.training.memory): the features of this many of the latest
    # training pairs join every step's softmax loss as extra negatives; 0: off.
    feature_memory: int = 0
    # Supervised contrast between a batch's images whose captions match (coembed.loss.
    # image_supcon), added with this weight (needs train.soft_targets); 0: off.
    image_supcon_weight: float = 0.0
    image_supcon_temperature: float = 0.1
    # A learned vector per distinct training caption (coembed.training.proxies): both towers'
    # features are classified among all of them, added to the loss with this weight; 0: off.
    caption_proxy_weight: float = 0.0
    caption_proxy_temperature: float = 0.07
    caption_proxy_min_pairs: int = 2  # a caption gets a proxy when this many pairs share it
    # CyCLIP's consistency (coembed.loss.cyclic_consistency): image-image similarities match
    # text-text ones, image-text ones are symmetric; added with this weight (CyCLIP's 0.25); 0: off.
    cyclic_weight: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check_choice(path: str, value: Any) -> None:
    key = ".".join(path.split(".")[-2:])
    allowed = CHOICES.get(key)
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(allowed)}")


def _parse_list(path: str, text: str) -> Any:
    """A list given as YAML text (``--set model.image.layers=[1,2]``); ConfigError if not YAML."""
    try:
        return load_yaml(text, path)
    except yaml.YAMLError:
        raise ConfigError(f"{path}: expected a list, got {text!r}") from None


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Return ``value`` converted to the annotated type, or raise ConfigError naming ``path``."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _parse_list(path, value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(path, value, inner)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "1",
            "on",
            "false",
            "no",
            "0",
            "off",
        ):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value  # exact: through a float, a 20-digit number would change
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        if "\0" in value:
            raise ConfigError(f"{path}: holds a NUL byte (\\x00), which no name or path can")
        return value
    raise ConfigError(f"{path}: unsupported type {hint}")


def _update(obj: Any, values: dict, prefix: str) -> None:
    """Apply a nested dict onto a dataclass instance, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown config key {path!r} (known here: {', '.join(sorted(names))})"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _update(current, value, path)
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def _check_choices(cfg: Config) -> None:
    """Every option that is one of a few strings holds one of them."""
    for section in ("model", "model.text", "model.image", "data", "train"):
        obj = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not dataclasses.is_dataclass(value):
                _check_choice(f"{section}.{f.name}", value)


# Upper bounds on sizes: far above any CLIP (the widest towers are under 2,000 wide, the
# longest text contexts a few hundred tokens), far below sizes that cannot be allocated (a
# 20-digit embed_dim dies deep in C++ instead of saying what is wrong).
MAX_WIDTH = 65_536  # embedding dims, text widths, heads; an image tower's pooled width (32x)
MAX_LAYERS = 1_024
MAX_CONTEXT = 8_192
MAX_VOCAB = 1 << 20
MAX_IMAGE_SIZE = 8_192
LIMIT_WHY = "coembed's limit for sizes, far above any CLIP model"


@dataclass(frozen=True)
class Bounds:
    """A range of allowed values; ``None`` leaves a side open, ``*_open`` excludes the bound."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""  # said when the upper bound is broken

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range ("must be positive", ...), or None when it is in."""
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if low and (self.hi is None or isinstance(value, int)):
            if self.lo == 0 and not self.lo_open:
                return "must not be negative"
            if (self.lo == 0 and self.lo_open) or (self.lo == 1 and isinstance(value, int)):
                return "must be positive"
            if self.hi is None:
                return f"must be {'above' if self.lo_open else 'at least'} {_number(self.lo)}"
        if low or high:
            interval = (
                f"{'(' if self.lo_open else '['}{_number(self.lo)}, "
                f"{_number(self.hi)}{')' if self.hi_open else ']'}"
            )
            return f"must be in {interval}" + (f" ({self.why})" if high and self.why else "")
        return None


def _number(value: float | None) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


POSITIVE = Bounds(1)
NOT_NEGATIVE = Bounds(0)
SIZE = Bounds(1, MAX_WIDTH, why=LIMIT_WHY)
FRACTION = Bounds(0, 1, hi_open=True)


def _bounded(cfg: Config) -> list[tuple[str, float, Bounds]]:
    """Every number with a range: (its key, its value, the range)."""
    m, t, i = cfg.model, cfg.model.text, cfg.model.image
    return [
        ("model.embed_dim", m.embed_dim, SIZE),
        ("model.max_logit_scale", m.max_logit_scale, Bounds(1)),  # exp(t) is clamped to [1, max]
        ("model.text.vocab_size", t.vocab_size, Bounds(1, MAX_VOCAB, why=LIMIT_WHY)),
        ("model.text.context_length", t.context_length, Bounds(1, MAX_CONTEXT, why=LIMIT_WHY)),
        ("model.text.width", t.width, SIZE),
        ("model.text.layers", t.layers, Bounds(1, MAX_LAYERS, why=LIMIT_WHY)),
        ("model.text.heads", t.heads, SIZE),
        ("model.text.mlp_ratio", t.mlp_ratio, Bounds(0, 64, lo_open=True, why=LIMIT_WHY)),
        ("model.text.dropout", t.dropout, FRACTION),
        ("model.image.width", i.width, Bounds(1, MAX_WIDTH // 32, why=LIMIT_WHY)),
        ("model.image.image_size", i.image_size, Bounds(1, MAX_IMAGE_SIZE, why=LIMIT_WHY)),
        ("model.image.heads", i.heads, SIZE),
        ("model.image.mixstyle", i.mixstyle, Bounds(0, 1)),
    ] + _bounded_run(cfg)


def _bounded_run(cfg: Config) -> list[tuple[str, float, Bounds]]:
    """The training and data settings of ``_bounded``."""
    tr, d = cfg.train, cfg.data
    return [
        ("train.batch_size", tr.batch_size, Bounds(1, 1 << 24, why=LIMIT_WHY)),
        ("train.accum_steps", tr.accum_steps, POSITIVE),
        ("train.lr", tr.lr, Bounds(0, lo_open=True)),
        ("train.weight_decay", tr.weight_decay, NOT_NEGATIVE),
        ("train.beta1", tr.beta1, FRACTION),
        ("train.beta2", tr.beta2, FRACTION),
        ("train.eps", tr.eps, Bounds(0, lo_open=True)),
        ("train.warmup_steps", tr.warmup_steps, NOT_NEGATIVE),
        ("train.cooldown_steps", tr.cooldown_steps, NOT_NEGATIVE),
        ("train.grad_clip", tr.grad_clip, NOT_NEGATIVE),  # 0: no clipping
        ("train.steps", tr.steps, NOT_NEGATIVE),
        ("train.epochs", tr.epochs, NOT_NEGATIVE),
        ("train.seed", tr.seed, Bounds(0, 2**32 - 1, why="a 32-bit seed")),
        ("train.checkpoint_every", tr.checkpoint_every, POSITIVE),
        ("train.keep_checkpoints", tr.keep_checkpoints, POSITIVE),
        ("train.log_every", tr.log_every, POSITIVE),
        ("train.lock_image_unlocked_groups", tr.lock_image_unlocked_groups, NOT_NEGATIVE),
        ("train.lock_text_unlocked_layers", tr.lock_text_unlocked_layers, NOT_NEGATIVE),
        ("train.threads", tr.threads, Bounds(0, 4096)),  # 0: PyTorch's choice
        ("train.label_smoothing", tr.label_smoothing, FRACTION),
        ("train.ema_decay", tr.ema_decay, FRACTION),
        ("train.mlm_weight", tr.mlm_weight, Bounds(0, 100, why="a loss weight")),
        ("train.caption_word_dropout", tr.caption_word_dropout, Bounds(0, 1)),
        ("train.simclr_weight", tr.simclr_weight, Bounds(0, 100, why="a loss weight")),
        ("train.simclr_temperature", tr.simclr_temperature, Bounds(0, 10, lo_open=True)),
        ("train.feature_memory", tr.feature_memory, Bounds(0, 1 << 20, why=LIMIT_WHY)),
        ("train.image_supcon_weight", tr.image_supcon_weight, Bounds(0, 100, why="a loss weight")),
        ("train.cyclic_weight", tr.cyclic_weight, Bounds(0, 100, why="a loss weight")),
        (
            "train.image_supcon_temperature",
            tr.image_supcon_temperature,
            Bounds(0, 10, lo_open=True),
        ),
        (
            "train.caption_proxy_weight",
            tr.caption_proxy_weight,
            Bounds(0, 100, why="a loss weight"),
        ),
        (
            "train.caption_proxy_temperature",
            tr.caption_proxy_temperature,
            Bounds(0, 10, lo_open=True),
        ),
        ("train.caption_proxy_min_pairs", tr.caption_proxy_min_pairs, Bounds(1, 1 << 30)),
        ("data.caption_group", d.caption_group, Bounds(1, 1 << 16, why=LIMIT_WHY)),
        ("data.max_cache_gb", d.max_cache_gb, NOT_NEGATIVE),
        ("data.workers", d.workers, Bounds(0, 1024)),
        ("data.prefetch", d.prefetch, Bounds(0, 1024)),
        ("data.train_num_samples", d.train_num_samples, NOT_NEGATIVE),
        ("data.crop_scale_min", d.crop_scale_min, Bounds(0, 1, lo_open=True)),
        ("data.cache_scale", d.cache_scale, Bounds(1, 8, why="the cache grows with its square")),
        ("data.color_jitter", d.color_jitter, Bounds(0, 1)),
        ("data.grayscale_p", d.grayscale_p, Bounds(0, 1)),
        ("data.blur_p", d.blur_p, Bounds(0, 1)),
        ("data.random_conv_p", d.random_conv_p, Bounds(0, 1)),
    ]


def _check_ranges(cfg: Config) -> None:
    """Sizes, counts, rates and fractions within their ranges (see ``_bounded``)."""
    for path, value, bounds in _bounded(cfg):
        problem = bounds.problem(value)
        if problem:
            raise ConfigError(f"{path}: {problem}, got {_number(value)}")


def _check_text(t: TextConfig, tokenizer: str) -> None:
    """The text tower's shapes and the combinations of its options that cannot work."""
    if t.width % t.heads:
        raise ConfigError(
            f"model.text.width ({t.width}) must be divisible by model.text.heads ({t.heads})"
        )
    if t.positional == "sinusoidal" and t.width % 2:
        raise ConfigError("model.text.width must be even for sinusoidal positional encoding")
    if t.pool == "cls" and t.attention == "causal":
        raise ConfigError(
            "model.text.pool=cls needs model.text.attention=bidirectional "
            "(with a causal mask the first token sees nothing)"
        )
    # A trained tokenizer sets vocab_size and eot_id when it is built; CLIP's are fixed.
    if tokenizer == "clip" and not 0 <= t.eot_id < t.vocab_size:
        message = f"model.text.eot_id ({t.eot_id}) must be below vocab_size ({t.vocab_size})"
        if t.eot_id == CLIP_EOT_ID:  # a trained tokenizer's recipe switched to CLIP's
            message += f" (CLIP's tokenizer: set model.text.vocab_size={CLIP_VOCAB_SIZE})"
        raise ConfigError(message)


def _check_image(i: ImageConfig) -> None:
    """CLIP's ModifiedResNet: four stages, a size its 32x downsampling divides, whole heads."""
    if i.backbone != "modified_resnet":
        if i.mixstyle:
            raise ConfigError(
                f"model.image.mixstyle mixes the modified_resnet's stage statistics; the "
                f"{i.backbone} backbone has none: use model.image.mixstyle=0"
            )
        return
    if len(i.layers) != 4 or any(not 1 <= n <= MAX_LAYERS for n in i.layers):
        raise ConfigError(
            f"model.image.layers: expected 4 block counts from 1 to {MAX_LAYERS}, got {i.layers}"
        )
    if i.image_size % 32:
        raise ConfigError(f"model.image.image_size ({i.image_size}) must be a multiple of 32")
    if (i.width * 32) % i.heads:
        raise ConfigError(
            f"model.image.heads ({i.heads}) must divide the pooled width ({i.width * 32})"
        )


def _check_run(tr: TrainConfig) -> None:
    """How the batch splits into accumulation steps; a cooldown for the schedule that has one;
    label smoothing and the feature memory for the loss that has them."""
    if tr.batch_size % tr.accum_steps:
        raise ConfigError(
            f"train.batch_size ({tr.batch_size}) must be divisible by train.accum_steps ({tr.accum_steps})"
        )
    if tr.label_smoothing and tr.loss != "clip":
        raise ConfigError(
            f"train.label_smoothing smooths the softmax loss's targets; train.loss={tr.loss} has "
            "none: use train.loss=clip or train.label_smoothing=0"
        )
    if tr.feature_memory and (tr.loss != "clip" or tr.label_smoothing):
        raise ConfigError(
            "train.feature_memory adds negative columns to the softmax loss without label "
            f"smoothing; train.loss={tr.loss}, train.label_smoothing={tr.label_smoothing}: use "
            "train.loss=clip and train.label_smoothing=0, or train.feature_memory=0"
        )
    if tr.schedule == "const-cooldown" and tr.cooldown_steps <= 0:
        raise ConfigError(
            "train.schedule=const-cooldown needs train.cooldown_steps: the number of last steps "
            "over which the learning rate falls to zero"
        )


def _check_views(cfg: Config) -> None:
    """The second view (train.simclr_weight, train.multiview) is a second random crop: it needs
    augmentation on, and one batch per step (the accumulation path caches one view only)."""
    tr = cfg.train
    for name, on in (("simclr_weight", tr.simclr_weight), ("multiview", tr.multiview)):
        if on and not cfg.data.augment:
            raise ConfigError(
                f"train.{name} trains on a second random view: it needs data.augment=true"
            )
        if on and tr.accum_steps > 1:
            raise ConfigError(
                f"train.{name} does not combine with gradient accumulation: use train.accum_steps=1"
            )


def _check_caption_matches(cfg: Config) -> None:
    """Caption runs and the images' supervised contrast work on the pairs of a batch whose
    captions match, which only soft targets tell apart from negatives."""
    on = [
        name
        for name, value in (
            ("data.caption_group", cfg.data.caption_group > 1),
            ("train.image_supcon_weight", cfg.train.image_supcon_weight),
        )
        if value
    ]
    if on and not cfg.train.soft_targets:
        off = " and ".join(f"{name}={1 if name == 'data.caption_group' else 0}" for name in on)
        raise ConfigError(
            f"{' and '.join(on)} work on pairs of a batch with one caption, which without soft "
            f"targets are each other's negatives: add train.soft_targets=true, or {off}"
        )


def validate(cfg: Config) -> Config:
    """Check ranges and choices, changing nothing; returns the same config or raises ConfigError."""
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_views(cfg)
    _check_caption_matches(cfg)
    _check_text(cfg.model.text, cfg.model.tokenizer)
    _check_image(cfg.model.image)
    _check_run(cfg.train)
    return cfg


def complete_config(cfg: Config) -> Config:
    """A copy of ``cfg`` with the values its other settings imply filled in; ``cfg`` is unchanged.

    The temperature starts where the loss's recipe starts it unless one is given: 1/0.07 for the
    softmax loss (CLIP), 10 for the sigmoid loss (SigLIP), which also needs a logit bias: without
    one given, it starts at -10 (SigLIP's).
    """
    done = copy.deepcopy(cfg)
    siglip = done.train.loss == "siglip"
    if done.model.init_logit_scale is None:
        done.model.init_logit_scale = math.log(10.0) if siglip else CLIP_INIT_LOGIT_SCALE
    if siglip and done.model.init_logit_bias is None:
        done.model.init_logit_bias = -10.0
    return done


# A recipe holds about a hundred values. Aliases (&name, then *name) may repeat values, but a few
# hundred bytes of aliases of aliases can stand for billions of them ("billion laughs"), which
# validating or printing would walk one by one: such a document is refused while it is parsed.
MAX_ALIAS_EXPANSION = 10_000


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases that expand to over MAX_ALIAS_EXPANSION values
    more than the text writes out, or that refer to a value containing them."""

    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self._where = where
        self._values: dict[int, int] = {}  # id(node) -> the values it stands for, expanded
        self._written = 0  # nodes written out in the text so far

    def compose_node(self, parent: Any, index: Any) -> Any:
        """The next node, as PyYAML composes it, after counting what its aliases expand to."""
        alias = self.check_event(yaml.AliasEvent)
        line = self.peek_event().start_mark.line + 1
        node = super().compose_node(parent, index)
        if alias:
            if id(node) not in self._values:  # an anchor still open: the alias is inside it
                raise ConfigError(f"{self._where}: line {line}: a YAML alias inside its own anchor")
            return node
        self._written += 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        self._values[id(node)] = size = 1 + sum(self._values[id(c)] for c in children)
        if size - self._written > MAX_ALIAS_EXPANSION:
            raise ConfigError(
                f"{self._where}: line {line}: YAML aliases (*name) expand to over "
                f"{MAX_ALIAS_EXPANSION:,} values; a config needs a few hundred: write them out"
            )
        return node


def load_yaml(text: str, where: str) -> Any:
    """The value of a YAML document, parsed safely; aliases that expand past
    ``MAX_ALIAS_EXPANSION`` values raise ConfigError naming ``where``, bad syntax yaml.YAMLError."""
    loader = _BoundedLoader(text, where)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_overrides(pairs: list[str]) -> dict:
    """Turn ``["train.lr=1e-3", "model.text.layers=2"]`` into a nested dict; values parsed as YAML."""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = load_yaml(raw, f"--set {key.strip()}") if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is both a value and a section")
        node[parts[-1]] = value
    return nested


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped recipe (``tiny``, ``small``, ``rn50``...)."""
    path = Path(name_or_path)
    if path.exists() and not path.is_dir():  # a FIFO or device too: reading it says what it is
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} not found: give a YAML file or one of {names}")


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated Config from a recipe (file or shipped name) and ``key=value`` overrides."""
    cfg = Config()
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            values = load_yaml(read_regular_file(path, MAX_CONFIG_BYTES).decode(), str(path)) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read this config ({exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        _update(cfg, values, "")
    if overrides:
        _update(cfg, parse_overrides(overrides), "")
    return validate(complete_config(cfg))


def to_dict(obj: Any) -> dict:
    """A dataclass (a config or a section of one) as nested plain dicts and lists."""
    return dataclasses.asdict(obj)


def model_config_from_dict(values: dict) -> ModelConfig:
    """Rebuild a ModelConfig stored in a model directory; unknown keys are an error."""
    cfg = Config()
    _update(cfg.model, values, "model")
    validate(cfg)
    return cfg.model


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config stored in a run folder (completed, validated); unknown keys are an error."""
    cfg = Config()
    _update(cfg, values, "")
    return validate(complete_config(cfg))


def dump_json(obj: Any) -> str:
    """A config (or any JSON-able value) as indented JSON with sorted keys."""
    return json.dumps(
        to_dict(obj) if dataclasses.is_dataclass(obj) else obj, indent=2, sort_keys=True
    )
