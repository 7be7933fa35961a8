"""The model directory: what ``train`` writes and ``load`` reads, and the training state beside it.

A model directory holds::

    config.json        {"format_version", "model": {...}}  the whole model config
    model.safetensors  weights only (never pickle); its metadata carries a digest of config.json
    tokenizer.json     HF tokenizers format
    preprocess.json    image size, mean/std, resize, interpolation and crop for inference

The image size is in two files because preprocess.json must stand alone (an ONNX export carries
it without config.json). config.json's ``model.image.image_size`` wins: the image tower is built
for it (the attention pool's positions are sized for it). preprocess.json is written from it, may
leave it out, and is refused when it names another size. The rest of preprocess.json is read
into a ``Preprocess`` that the eval transform applies (mean, std and interpolation included); a
directory without preprocess.json, as older versions could leave, gets CLIP's defaults.

Every file is written to a temporary name and renamed into place. Because config.json and the
weights are two files, the weights record a digest of the config they belong to: a directory
caught between two writes is reported as inconsistent instead of silently loading a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coembed.config import FORMAT_VERSION, ModelConfig, model_config_from_dict, to_dict
from coembed.data.transforms import Preprocess
from coembed.errors import ConfigError, ModelDirError
from coembed.files import atomic_write, atomic_write_text
from coembed.model import CoEmbed
from coembed.schema import check_shape, read_json, read_json_text

if TYPE_CHECKING:
    from coembed.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESS_FILE = "preprocess.json"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, PREPROCESS_FILE)
# config.json's frame; what is inside "model" is the config's own business (model_config_from_dict).
CONFIG_SHAPE = {"format_version": int, "model": dict}


def config_text(cfg: ModelConfig) -> str:
    """config.json's text for a model config (sorted keys, so equal configs give equal digests)."""
    return json.dumps(
        {"format_version": FORMAT_VERSION, "model": to_dict(cfg)}, indent=2, sort_keys=True
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_preprocess(path: str | os.PathLike, preprocess: Preprocess) -> Path:
    """Write ``preprocess`` as a preprocess.json file, atomically; returns its path."""
    return atomic_write_text(path, json.dumps(preprocess.to_dict(), indent=2))


def save_weights(
    path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write tensors (contiguous, on the CPU) and string metadata as a safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_model_dir(
    model: CoEmbed,
    tokenizer: Tokenizer,
    directory: str | os.PathLike,
    preprocess: Preprocess | None = None,
) -> Path:
    """Write a complete model directory (each file atomically); returns its path.

    ``preprocess`` defaults to CLIP's at the model's image size, what training normalizes with.
    """
    size = model.cfg.image.image_size
    preprocess = preprocess or Preprocess(image_size=size)
    if preprocess.image_size != size:
        raise ConfigError(
            f"preprocessing for {preprocess.image_size}px images, but the model takes {size}px: "
            "give a Preprocess with the model's model.image.image_size"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = config_text(model.cfg)
    tokenizer.save(directory / TOKENIZER_FILE)
    write_preprocess(directory / PREPROCESS_FILE, preprocess)
    save_weights(directory / WEIGHTS_FILE, model.state_dict(), {"config_digest": _digest(text)})
    atomic_write_text(directory / CONFIG_FILE, text)
    return directory


def read_model_config(directory: str | os.PathLike) -> tuple[ModelConfig, str]:
    """The ModelConfig stored in a model directory and the raw text (for the consistency digest)."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise ModelDirError(f"{directory}: not a model directory (it does not exist)")
    if not path.is_file():
        raise ModelDirError(f"{path}: missing; a model directory needs {', '.join(MODEL_FILES)}")
    values, text = read_json_text(path, ModelDirError)
    if not isinstance(values, dict) or "model" not in values:
        raise ModelDirError(f"{path}: not a coembed model config (no 'model' section)")
    version = values.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ModelDirError(
            f"{path}: format version {version!r}, this coembed reads version {FORMAT_VERSION}"
        )
    check_shape(values, CONFIG_SHAPE, str(path), ModelDirError)
    try:
        return model_config_from_dict(values["model"]), text
    except ConfigError as exc:
        raise ModelDirError(f"{path}: {exc}") from None


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with one clear error if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"{path}: missing")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelDirError(f"{path}: unreadable weights (truncated or corrupt: {exc})") from None


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, refusing missing, unexpected or mis-shaped tensors by name."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
        raise ModelDirError(f"{source}: weights do not match the config: {'; '.join(parts)}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ModelDirError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(own[name].shape)}"
            )
    refuse_non_finite(state, source)
    model.load_state_dict(state, strict=True)


def refuse_non_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ModelDirError naming the first tensor that holds a NaN or an infinity.

    Such weights make every embedding NaN: a NaN score compares false with every other, so
    every item ranks first (eval reported every R@K as 1.0), and the server would answer with
    bare NaN, which is not JSON. Training never saves them; a damaged or foreign file can.
    """
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelDirError(
                f"{source}: tensor {name} holds NaN or infinite values ({bad} of "
                f"{tensor.numel()}); the weights are damaged: use another copy or checkpoint"
            )


def read_preprocess(directory: str | os.PathLike, cfg: ModelConfig) -> Preprocess:
    """The Preprocess of a model directory: preprocess.json checked against config.json's size."""
    path = Path(directory) / PREPROCESS_FILE
    size = cfg.image.image_size
    if not path.is_file():
        return Preprocess(image_size=size)
    values = check_shape(read_json(path, ModelDirError), dict, str(path), ModelDirError)
    if values.get("image_size", size) != size:
        raise ModelDirError(
            f"{path}: image_size {values['image_size']!r} disagrees with {CONFIG_FILE}'s "
            f"model.image.image_size {size}, which the model is built for; set it to {size}"
        )
    try:
        return Preprocess.from_dict({"image_size": size, **values})
    except ConfigError as exc:
        raise ModelDirError(f"{path}: {exc}") from None


def load_model_dir(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[CoEmbed, Tokenizer, Preprocess]:
    """Rebuild (model, tokenizer, preprocessing) from a model directory; model in eval mode."""
    from coembed.tokenizer import Tokenizer

    directory = Path(directory)
    cfg, text = read_model_config(directory)
    state, metadata = read_weights(directory / WEIGHTS_FILE)
    if metadata.get("config_digest") not in (None, _digest(text)):
        raise ModelDirError(
            f"{directory}: {WEIGHTS_FILE} was written for another config.json "
            "(an interrupted write or files copied from different models)"
        )
    tokenizer = Tokenizer.load(directory / TOKENIZER_FILE)
    if tokenizer.vocab_size > cfg.text.vocab_size or tokenizer.eot_id != cfg.text.eot_id:
        raise ModelDirError(f"{directory / TOKENIZER_FILE}: does not match the model's vocabulary")
    preprocess = read_preprocess(directory, cfg)
    model = CoEmbed(cfg)
    load_state_strict(model, state, str(directory / WEIGHTS_FILE))
    return model.to(device).eval(), tokenizer, preprocess
