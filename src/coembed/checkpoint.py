"""The model directory: what ``train`` writes and ``load`` reads, and the training state beside it.

A model directory holds::

    config.json        {"format_version", "model": {...}}  the whole model config
    model.safetensors  weights only (never pickle); its metadata carries a digest of config.json
    tokenizer.json     HF tokenizers format
    preprocess.json    image size, mean/std, resize and crop for inference

Every file is written to a temporary name and renamed into place. Because config.json and the
weights are two files, the weights record a digest of the config they belong to: a directory
caught between two writes is reported as inconsistent instead of silently loading a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coembed.config import FORMAT_VERSION, ModelConfig, model_config_from_dict, to_dict
from coembed.errors import ConfigError, ModelDirError
from coembed.model import CoEmbed

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESS_FILE = "preprocess.json"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, PREPROCESS_FILE)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def is_atomic_temporary(name: str) -> bool:
    """Whether ``name`` is one of ``atomic_write``'s temporaries (``.<name>.<8 chars>.tmp``)."""
    return re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", name) is not None


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file via ``write(tmp_path)`` then rename over ``path``: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open() would under the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, write)


def config_text(cfg: ModelConfig) -> str:
    return json.dumps(
        {"format_version": FORMAT_VERSION, "model": to_dict(cfg)}, indent=2, sort_keys=True
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def preprocess_settings(image_size: int) -> dict[str, Any]:
    return {
        "image_size": image_size,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "resize": "shortest_side",
        "interpolation": "bicubic",
        "crop": "center",
    }


def save_weights(
    path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_model_dir(model: CoEmbed, tokenizer, directory: str | os.PathLike) -> Path:
    """Write a complete model directory (each file atomically); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = config_text(model.cfg)
    tokenizer.save(directory / TOKENIZER_FILE)
    atomic_write_text(
        directory / PREPROCESS_FILE,
        json.dumps(preprocess_settings(model.cfg.image.image_size), indent=2),
    )
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
    text = path.read_text()
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        raise ModelDirError(f"{path}: not valid JSON (truncated or corrupt)") from None
    if not isinstance(values, dict) or "model" not in values:
        raise ModelDirError(f"{path}: not a coembed model config (no 'model' section)")
    version = values.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format version {version!r}, this coembed reads version {FORMAT_VERSION}"
        )
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
    model.load_state_dict(state, strict=True)


def load_model_dir(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild (model, tokenizer, preprocess settings) from a model directory; model in eval mode."""
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
    preprocess = preprocess_settings(cfg.image.image_size)
    pre_path = directory / PREPROCESS_FILE
    if pre_path.is_file():
        try:
            preprocess.update(json.loads(pre_path.read_text()))
        except json.JSONDecodeError:
            raise ModelDirError(f"{pre_path}: not valid JSON (truncated or corrupt)") from None
    model = CoEmbed(cfg)
    load_state_strict(model, state, str(directory / WEIGHTS_FILE))
    return model.to(device).eval(), tokenizer, preprocess
