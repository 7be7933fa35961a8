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

FORMAT_VERSION = 1
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
}


@dataclass
class TextConfig:
    """The transformer text tower."""

    vocab_size: int = 49408
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
    eot_id: int = 49407


@dataclass
class ImageConfig:
    """The convolutional image tower: CLIP's ModifiedResNet or a torchvision backbone."""

    backbone: str = "modified_resnet"
    layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    width: int = 64
    image_size: int = 224
    heads: int = 32
    pool: str = "attention"


@dataclass
class ModelConfig:
    embed_dim: int = 1024
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    init_logit_scale: float = math.log(1 / 0.07)
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
    augment: bool = True
    crop_scale_min: float = 0.8
    prefetch: int = 1  # training batches prepared ahead in a background thread (0: in place)


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


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Return ``value`` converted to the annotated type, or raise ConfigError naming ``path``."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
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


def _check_positive(cfg: Config) -> None:
    """Sizes, counts and intervals that must be above zero."""
    t, i, tr = cfg.model.text, cfg.model.image, cfg.train
    positive = {
        "model.embed_dim": cfg.model.embed_dim,
        "model.text.vocab_size": t.vocab_size,
        "model.text.context_length": t.context_length,
        "model.text.width": t.width,
        "model.text.layers": t.layers,
        "model.text.heads": t.heads,
        "model.image.width": i.width,
        "model.image.image_size": i.image_size,
        "model.image.heads": i.heads,
        "train.batch_size": tr.batch_size,
        "train.accum_steps": tr.accum_steps,
        "train.lr": tr.lr,
        "train.checkpoint_every": tr.checkpoint_every,
        "train.keep_checkpoints": tr.keep_checkpoints,
        "train.log_every": tr.log_every,
    }
    for path, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{path}: must be positive, got {value}")


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
    if not 0 <= t.dropout < 1:
        raise ConfigError(f"model.text.dropout: must be in [0, 1), got {t.dropout}")
    # A trained tokenizer sets vocab_size and eot_id when it is built; CLIP's are fixed.
    if tokenizer == "clip" and not 0 <= t.eot_id < t.vocab_size:
        raise ConfigError(
            f"model.text.eot_id ({t.eot_id}) must be below vocab_size ({t.vocab_size})"
        )


def _check_image(i: ImageConfig) -> None:
    """CLIP's ModifiedResNet: four stages, a size its 32x downsampling divides, whole heads."""
    if i.backbone != "modified_resnet":
        return
    if len(i.layers) != 4 or any(n <= 0 for n in i.layers):
        raise ConfigError(f"model.image.layers: expected 4 positive block counts, got {i.layers}")
    if i.image_size % 32:
        raise ConfigError(f"model.image.image_size ({i.image_size}) must be a multiple of 32")
    if (i.width * 32) % i.heads:
        raise ConfigError(
            f"model.image.heads ({i.heads}) must divide the pooled width ({i.width * 32})"
        )


def _check_run(tr: TrainConfig, data: DataConfig) -> None:
    """Training length, accumulation and the data pipeline's ranges."""
    if tr.steps < 0 or tr.epochs < 0:
        raise ConfigError("train.steps and train.epochs must not be negative")
    if tr.batch_size % tr.accum_steps:
        raise ConfigError(
            f"train.batch_size ({tr.batch_size}) must be divisible by train.accum_steps ({tr.accum_steps})"
        )
    if not 0 < data.crop_scale_min <= 1:
        raise ConfigError(f"data.crop_scale_min: must be in (0, 1], got {data.crop_scale_min}")
    if data.workers < 0 or data.prefetch < 0:
        raise ConfigError("data.workers and data.prefetch must not be negative")


def validate(cfg: Config) -> Config:
    """Check ranges and choices, changing nothing; returns the same config or raises ConfigError."""
    _check_choices(cfg)
    _check_positive(cfg)
    _check_text(cfg.model.text, cfg.model.tokenizer)
    _check_image(cfg.model.image)
    _check_run(cfg.train, cfg.data)
    return cfg


def complete_config(cfg: Config) -> Config:
    """A copy of ``cfg`` with the values its other settings imply filled in; ``cfg`` is unchanged.

    The sigmoid loss needs a logit bias: without one given, it starts at -10 (SigLIP's).
    """
    done = copy.deepcopy(cfg)
    if done.train.loss == "siglip" and done.model.init_logit_bias is None:
        done.model.init_logit_bias = -10.0
    return done


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
            value = yaml.safe_load(raw) if raw.strip() else raw
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
    if path.is_file():
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
            values = yaml.safe_load(path.read_text()) or {}
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
