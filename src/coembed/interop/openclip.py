"""open_clip / OpenAI CLIP checkpoints of the ResNet family, in and out.

Import reads the weights of an open_clip ``CLIP`` with a ModifiedResNet image tower (a state dict
in ``.pt``/``.pth``/``.bin`` or ``.safetensors``, possibly under ``state_dict`` and with DDP's
``module.`` prefix) or an OpenAI CLIP RN checkpoint, including the TorchScript archive OpenAI
publishes. Every tensor is read without running code from the file: ``torch.load(weights_only=True)``,
safetensors, or, for TorchScript, our own unpickler that only rebuilds tensors (see
``_read_torchscript``). Export writes the reverse: a state dict ``open_clip.create_model(name,
pretrained=FILE)`` loads, plus the open_clip model config JSON beside it.

The names, open_clip -> coembed (the rest of each name is kept)::

    visual.attnpool.*                      visual.pool.*
    visual.{conv,bn}{1,2,3}.*, layerN.*    visual.trunk.*
    token_embedding.weight                 text.token_embedding.weight
    positional_embedding                   text.positional.weight
    transformer.resblocks.i.attn.in_proj_{weight,bias}   text.blocks.i.attn.qkv.{weight,bias}
    transformer.resblocks.i.attn.out_proj.*              text.blocks.i.attn.out.*
    transformer.resblocks.i.mlp.{c_fc,c_proj}.*          text.blocks.i.mlp.{fc,proj}.*
    transformer.resblocks.i.{ln_1,ln_2}.*                text.blocks.i.{ln_1,ln_2}.*
    ln_final.*                             text.ln_final.*
    text_projection (W, D)                 text.proj.weight (D, W), transposed
    logit_scale, logit_bias                the same
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from coembed.checkpoint import load_model_dir
from coembed.config import ModelConfig, load_config, parse_overrides
from coembed.errors import CoembedError, ModelDirError, UsageError
from coembed.files import (
    atomic_write_all,
    check_replaceable,
    clean_leftovers,
    refuse_overlap,
    staged_folder,
)
from coembed.locks import writer_lock

# Entries of OpenAI / open_clip files that are not weights: the causal mask (rebuilt from the
# config) and the hyper-parameters OpenAI's TorchScript models carry as tensors.
NON_WEIGHTS = frozenset({"attn_mask", "input_resolution", "context_length", "vocab_size"})

# BatchNorm's step counter: OpenAI's files leave it out and nothing in inference reads it.
_OPTIONAL_SUFFIX = ".num_batches_tracked"

# Inside a text block, open_clip's nn.MultiheadAttention / MLP names -> ours.
_BLOCK_RENAMES = (
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.out."),
    ("mlp.c_fc.", "mlp.fc."),
    ("mlp.c_proj.", "mlp.proj."),
)
# Whole-name prefixes, open_clip -> coembed; the first match wins (attnpool before visual).
_PREFIXES = (
    ("visual.attnpool.", "visual.pool."),
    ("visual.", "visual.trunk."),
    ("token_embedding.", "text.token_embedding."),
    ("transformer.resblocks.", "text.blocks."),
    ("ln_final.", "text.ln_final."),
)
_EXACT = {
    "positional_embedding": "text.positional.weight",
    "text_projection": "text.proj.weight",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}
_TRANSPOSED = ("text_projection", "text.proj.weight")


def _swap(name: str, pairs, forward: bool) -> str | None:
    for src, dst in pairs:
        a, b = (src, dst) if forward else (dst, src)
        if name.startswith(a):
            return b + name[len(a) :]
    return None


def _block_rename(rest: str, forward: bool) -> str:
    """Rename inside ``<i>.<rest>`` of a text block; names without a rename (ln_1...) pass."""
    index, _, inner = rest.partition(".")
    for src, dst in _BLOCK_RENAMES:
        a, b = (src, dst) if forward else (dst, src)
        if inner.startswith(a):
            return f"{index}.{b}{inner[len(a) :]}"
    return rest


def coembed_name(openclip_name: str) -> str | None:
    """The coembed parameter name for an open_clip one, or None if it has none."""
    if openclip_name in _EXACT:
        return _EXACT[openclip_name]
    renamed = _swap(openclip_name, _PREFIXES, forward=True)
    if renamed is not None and renamed.startswith("text.blocks."):
        return "text.blocks." + _block_rename(renamed[len("text.blocks.") :], forward=True)
    return renamed


def openclip_name(coembed_name_: str) -> str | None:
    """The open_clip parameter name for a coembed one, or None if it has none."""
    for oc, ce in _EXACT.items():
        if coembed_name_ == ce:
            return oc
    if coembed_name_.startswith("text.blocks."):
        rest = _block_rename(coembed_name_[len("text.blocks.") :], forward=False)
        return "transformer.resblocks." + rest
    # visual.pool.* must not fall into the generic visual.trunk.* rule, so test it first.
    return _swap(coembed_name_, _PREFIXES, forward=False)


def to_openclip_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A coembed CLIP-compatible state dict renamed (and the text projection transposed) for open_clip."""
    out = {}
    for name, tensor in state.items():
        oc = openclip_name(name)
        if oc is None:
            raise CoembedError(f"tensor {name} has no open_clip counterpart")
        out[oc] = tensor.t().contiguous() if name == _TRANSPOSED[1] else tensor
    return out


# ---------------------------------------------------------------------------------------------
# Which configs open_clip can express


def structural_problems(cfg: ModelConfig) -> list[str]:
    """Why open_clip's CLIP ResNet weights cannot fill a model of this config (empty if they can)."""
    problems = []
    if cfg.image.backbone != "modified_resnet":
        problems.append(
            f"the image tower is the torchvision backbone {cfg.image.backbone!r}; "
            "open_clip's CLIP ResNet is model.image.backbone=modified_resnet"
        )
    if cfg.image.pool != "attention":
        problems.append(f"image pooling is {cfg.image.pool!r}; CLIP ResNets use attention pooling")
    if cfg.text.positional != "learned":
        problems.append(f"text positions are {cfg.text.positional!r}; CLIP uses learned positions")
    return problems


def compatibility_problems(cfg: ModelConfig) -> list[str]:
    """Why a model of this config would not compute what open_clip's CLIP computes (empty if it does)."""
    problems = structural_problems(cfg)
    if cfg.text.attention != "causal":
        problems.append(f"text attention is {cfg.text.attention!r}; CLIP's text tower is causal")
    if cfg.text.pool != "eot":
        problems.append(f"text pooling is {cfg.text.pool!r}; CLIP pools the end-of-text token")
    if cfg.tokenizer != "clip":
        problems.append(
            f"the tokenizer is {cfg.tokenizer!r}; open_clip models use CLIP's BPE tokenizer"
        )
    elif cfg.text.eot_id != cfg.text.vocab_size - 1:
        # open_clip pools at argmax(token id), which is the end-of-text token only if it is the largest id.
        problems.append(
            f"model.text.eot_id ({cfg.text.eot_id}) is not vocab_size - 1 ({cfg.text.vocab_size - 1}); "
            "open_clip pools at the largest token id"
        )
    return problems


def _require(problems: list[str], what: str) -> None:
    if problems:
        raise CoembedError(f"{what}: {'; '.join(problems)}")


def openclip_model_config(cfg: ModelConfig) -> dict:
    """The open_clip model config (the JSON of ``open_clip/model_configs``) for a compatible config."""
    image, text = cfg.image, cfg.text
    model_cfg: dict = {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": text.act == "quick_gelu",
        "vision_cfg": {
            "image_size": image.image_size,
            "layers": list(image.layers),
            "width": image.width,
            # open_clip derives the pooling heads as width * 32 // head_width.
            "head_width": image.width * 32 // image.heads,
            "patch_size": None,
        },
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.layers,
            "mlp_ratio": text.mlp_ratio,
        },
    }
    if cfg.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    return model_cfg


# OpenAI's ResNets as open_clip names them (image layers, width, size, embed dim, text width/heads).
_OPENAI_SHAPES = {
    "RN50": ([3, 4, 6, 3], 64, 224, 1024, 512, 8),
    "RN101": ([3, 4, 23, 3], 64, 224, 512, 512, 8),
    "RN50x4": ([4, 6, 10, 6], 80, 288, 640, 640, 10),
    "RN50x16": ([6, 8, 18, 8], 96, 384, 768, 768, 12),
    "RN50x64": ([3, 15, 36, 10], 128, 448, 1024, 1024, 16),
}


def openclip_builtin_name(cfg: ModelConfig) -> str | None:
    """The open_clip model name with exactly this architecture (e.g. ``RN50-quickgelu``), if any."""
    oc = openclip_model_config(cfg)
    for name, (layers, width, size, dim, text_width, text_heads) in _OPENAI_SHAPES.items():
        shape = (layers, width, size, dim, text_width, text_heads)
        if shape != (
            oc["vision_cfg"]["layers"],
            oc["vision_cfg"]["width"],
            oc["vision_cfg"]["image_size"],
            oc["embed_dim"],
            oc["text_cfg"]["width"],
            oc["text_cfg"]["heads"],
        ):
            continue
        standard = (
            oc["vision_cfg"]["head_width"] == 64
            and oc["text_cfg"]["layers"] == 12
            and oc["text_cfg"]["mlp_ratio"] == 4.0
            and oc["text_cfg"]["context_length"] == 77
            and oc["text_cfg"]["vocab_size"] == 49408
            and "init_logit_bias" not in oc
        )
        if standard:
            return f"{name}-quickgelu" if oc["quick_gelu"] else name
    return None


# ---------------------------------------------------------------------------------------------
# Choosing the config of an import

# The activation names open_clip's configs and coembed's text tower use.
ACTIVATIONS = {"gelu": "GELU", "quick_gelu": "QuickGELU"}
# open_clip's own names for the CLIP ResNets: each shape with GELU, and with "-quickgelu".
OPENCLIP_MODELS = tuple(n + suffix for n in _OPENAI_SHAPES for suffix in ("", "-quickgelu"))
# Head width of every CLIP ResNet's attention pool and text tower (open_clip's head_width);
# the weights do not store the number of heads.
CLIP_HEAD_WIDTH = 64
# Entries only OpenAI's own files carry; OpenAI trained every CLIP with QuickGELU.
_OPENAI_ONLY = ("input_resolution", "context_length", "vocab_size")


def _shape_overrides(
    layers: list[int], width: int, size: int, dim: int, text: tuple[int, int, int, int, int]
) -> list[str]:
    """Config overrides for a CLIP ResNet; ``text`` is (vocab, context, width, layers, mlp)."""
    vocab, context, text_width, text_layers, mlp = text
    return [
        f"model.embed_dim={dim}",
        f"model.image.layers=[{','.join(map(str, layers))}]",
        f"model.image.width={width}",
        f"model.image.image_size={size}",
        f"model.image.heads={max(1, width * 32 // CLIP_HEAD_WIDTH)}",
        f"model.text.vocab_size={vocab}",
        f"model.text.eot_id={vocab - 1}",
        f"model.text.context_length={context}",
        f"model.text.width={text_width}",
        f"model.text.layers={text_layers}",
        f"model.text.heads={max(1, text_width // CLIP_HEAD_WIDTH)}",
        f"model.text.mlp_ratio={mlp}",
    ]


def openclip_model_overrides(name: str) -> list[str]:
    """Config overrides (on the ``rn50`` recipe) for open_clip's built-in model ``name``: its
    shapes, and GELU, or QuickGELU for a ``-quickgelu`` name."""
    base = name.removesuffix("-quickgelu")
    if name not in OPENCLIP_MODELS:
        raise UsageError(
            f"--openclip-model {name}: not one of open_clip's CLIP ResNets; "
            f"choose one of {', '.join(OPENCLIP_MODELS)}"
        )
    layers, width, size, dim, text_width, _ = _OPENAI_SHAPES[base]
    act = "quick_gelu" if name.endswith("-quickgelu") else "gelu"
    shapes = _shape_overrides(layers, width, size, dim, (49408, 77, text_width, 12, 4.0))
    return [*shapes, f"model.text.act={act}"]


def _block_count(state: dict[str, Tensor], prefix: str) -> int:
    """How many numbered blocks ``<prefix><i>.`` the state dict holds."""
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


def inferred_overrides(state: dict[str, Tensor], source: str) -> list[str]:
    """Config overrides for the shapes an open_clip / OpenAI CLIP ResNet state dict holds.

    Head counts are not stored in the weights: CLIP's 64-wide heads are assumed, as every
    OpenAI and open_clip ResNet has them. A logit bias starts the config's ``init_logit_bias``.
    """
    _check_family(state, source)
    try:
        layers = [_block_count(state, f"visual.layer{i}.") for i in range(1, 5)]
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        # The pool's positions: one per cell of the (size / 32)^2 grid, plus the mean token.
        grid = math.isqrt(state["visual.attnpool.positional_embedding"].shape[0] - 1)
        dim = state["visual.attnpool.c_proj.weight"].shape[0]
        vocab, text_width = state["token_embedding.weight"].shape
        hidden = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        text = (
            vocab,
            state["positional_embedding"].shape[0],
            text_width,
            _block_count(state, "transformer.resblocks."),
            hidden / text_width,
        )
    except KeyError as missing:
        raise ModelDirError(
            f"{source}: cannot read the model's shapes: no tensor {missing}; "
            "give --openclip-model NAME or --config RECIPE"
        ) from None
    overrides = _shape_overrides(layers, width, grid * 32, dim, text)
    if "logit_bias" in state:
        overrides.append(f"model.init_logit_bias={float(state['logit_bias'].flatten()[0])}")
    return overrides


def _activation_set(overrides: list[str]) -> str | None:
    """The text activation ``--set`` chooses, if it does."""
    return parse_overrides(overrides).get("model", {}).get("text", {}).get("act")


def _inferred_config(
    state: dict[str, Tensor], source: str, overrides: list[str]
) -> tuple[ModelConfig, str]:
    """The config for the shapes ``state`` holds, and why its activation is the one it is."""
    shapes = inferred_overrides(state, source)
    if _activation_set(overrides):
        return load_config("rn50", shapes + overrides).model, "--set model.text.act"
    if any(k in state for k in _OPENAI_ONLY):
        why = "an OpenAI CLIP file; OpenAI trained every CLIP with QuickGELU"
        return load_config("rn50", [*shapes, "model.text.act=quick_gelu", *overrides]).model, why
    name = openclip_builtin_name(load_config("rn50", shapes + overrides).model)
    if name is None:
        fix = "add --set model.text.act=gelu or quick_gelu, the one it was trained with"
    else:
        base = name.removesuffix("-quickgelu")
        fix = (
            f"name the open_clip model it is (--openclip-model {base} for GELU, "
            f"{base}-quickgelu for QuickGELU) or add --set model.text.act=gelu (or quick_gelu)"
        )
    raise UsageError(
        f"{source}: its weights do not say whether the text tower uses GELU or QuickGELU; {fix}"
    )


@dataclass
class ImportPlan:
    """A checked conversion: the coembed state dict, its config, and where the config came from."""

    state: dict[str, Tensor]
    cfg: ModelConfig
    shapes_from: str
    activation_from: str

    def describe(self) -> str:
        """One line: the architecture, the text activation and why, and the assumed head counts."""
        cfg = self.cfg
        name = openclip_builtin_name(cfg)
        shape = f"open_clip's {name}" if name else "a CLIP ResNet"
        return (
            f"{shape} (shapes from {self.shapes_from}), text activation "
            f"{ACTIVATIONS[cfg.text.act]} (from {self.activation_from}), "
            f"heads: text {cfg.text.heads}, image pool {cfg.image.heads}"
        )


def plan_openclip_import(
    file: str,
    config: str | None = None,
    openclip_model: str | None = None,
    overrides: list[str] | None = None,
) -> ImportPlan:
    """Read a checkpoint and choose its config: a coembed recipe, open_clip's model name, or
    (with neither) the shapes its tensors hold; returns the checked conversion."""
    overrides = list(overrides or [])
    if config and openclip_model:
        raise UsageError("give --config RECIPE or --openclip-model NAME, not both")
    raw = read_checkpoint(file)
    if openclip_model:
        cfg = load_config("rn50", openclip_model_overrides(openclip_model) + overrides).model
        shapes_from, act_from = f"--openclip-model {openclip_model}", openclip_model
    elif config:
        cfg = load_config(config, overrides).model
        shapes_from = act_from = f"--config {config}"
    else:
        shapes_from = "the checkpoint's tensors"
        cfg, act_from = _inferred_config(raw, file, overrides)
    if _activation_set(overrides):
        act_from = "--set model.text.act"
    _require(
        compatibility_problems(cfg), f"{shapes_from} does not compute what open_clip's CLIP does"
    )
    return ImportPlan(convert_state(raw, cfg, file), cfg, shapes_from, act_from)


# ---------------------------------------------------------------------------------------------
# Reading files safely


class _ScriptObject:
    """Stands in for a ``__torch__.*`` class of a TorchScript archive: it only keeps its attributes."""

    def __setstate__(self, state) -> None:
        self.attributes = state if isinstance(state, dict) else {}


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: Tensor, offset: int, size, stride, *_ignored) -> Tensor:
    """The pickled ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, ...)``."""
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def _identity(value, *_ignored):
    return value


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl`` allowing nothing but tensors, dicts and attribute holders.

    ``torch.jit.load`` would compile and run the archive's code; ``torch.load(weights_only=True)``
    refuses TorchScript archives. The module tree in ``data.pkl`` only needs: the tensor rebuild
    function, storage types (as dtypes), OrderedDict, TorchScript's list/type-tag helpers, and
    the ``__torch__.*`` module classes, which become inert ``_ScriptObject``s. Any other global
    is refused, so no callable from the file ever runs.
    """

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive = archive
        self.root = root

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and (
            name == "restore_type_tag" or name.startswith("build_")
        ):
            return _identity
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a tensor")

    def persistent_load(self, pid) -> Tensor:
        # ('storage', dtype, key, location, numel): raw little-endian bytes in <root>/data/<key>.
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        raw = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise pickle.UnpicklingError(
                f"storage {key} has {len(raw)} bytes, expected {numel * itemsize}"
            )
        if not raw:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype)


def _collect_tensors(node, prefix: str, out: dict[str, Tensor]) -> None:
    """Flatten a TorchScript module tree to ``state_dict`` names: every tensor attribute, recursively."""
    for key, value in node.attributes.items():
        if isinstance(value, Tensor):
            out[prefix + key] = value
        elif isinstance(value, _ScriptObject):
            _collect_tensors(value, f"{prefix}{key}.", out)


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    # torch.jit.save writes constants.pkl and code/; torch.save never does.
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in archive.namelist())


def _read_torchscript(archive: zipfile.ZipFile) -> dict[str, Tensor]:
    data = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not data:
        raise pickle.UnpicklingError("TorchScript archive without data.pkl")
    root = data[0].split("/")[0]
    if f"{root}/byteorder" in archive.namelist() and archive.read(f"{root}/byteorder") != b"little":
        raise pickle.UnpicklingError("big-endian TorchScript archive")
    with archive.open(data[0]) as f:
        tree = _TensorOnlyUnpickler(f, archive, root).load()
    if not isinstance(tree, _ScriptObject):
        raise pickle.UnpicklingError("TorchScript archive does not hold a module")
    out: dict[str, Tensor] = {}
    _collect_tensors(tree, "", out)
    return out


# The protocol byte after a pickle's 0x80 mark, for the protocols Python writes (2 to 5).
PICKLE_PROTOCOLS = {bytes([p]) for p in range(2, pickle.HIGHEST_PROTOCOL + 1)}


def _is_safetensors(path: Path, head: bytes) -> bool:
    # A safetensors file starts with its header's length (8 bytes, little-endian) and then "{".
    return path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{")


def _load_raw(path: Path, head: bytes) -> object:
    """The object stored in ``path``, read without executing anything from it."""
    if _is_safetensors(path, head):
        from safetensors.torch import load_file

        return load_file(str(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if _is_torchscript(archive):
                return _read_torchscript(archive)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of an open_clip / OpenAI checkpoint file, unwrapped from ``state_dict``/``module.``."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ModelDirError(f"{path}: empty file, not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(9)
    # torch.save writes a zip ("PK", even when truncated) or, in its legacy format, a pickle:
    # 0x80 and the protocol, 2 to 5 (any other "protocol" is bytes that only start like one).
    pickled = head[:1] == b"\x80" and head[1:2] in PICKLE_PROTOCOLS
    if not _is_safetensors(path, head) and head[:2] != b"PK" and not pickled:
        raise ModelDirError(
            f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle); "
            "give an open_clip .pt/.pth/.bin or .safetensors file"
        )
    try:
        obj = _load_raw(path, head)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "refusing" in str(exc):
            raise ModelDirError(
                f"{path}: holds Python objects besides tensors; coembed only loads weights ({first})"
            ) from None
        raise ModelDirError(
            f"{path}: not a PyTorch checkpoint, or truncated/corrupt ({first})"
        ) from None
    except Exception as exc:  # torch, zipfile and safetensors each raise their own kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelDirError(
            f"{path}: unreadable checkpoint, truncated or corrupt ({first})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ModelDirError(f"{path}: not a checkpoint (it holds no named tensors)")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _check_family(state: dict[str, Tensor], source: str) -> None:
    """Refuse ViTs, other open_clip towers and non-CLIP files with a message saying which."""
    if (
        "visual.class_embedding" in state
        or "visual.proj" in state
        or any(k.startswith("visual.transformer.") for k in state)
    ):
        raise ModelDirError(
            f"{source}: ViT checkpoints are not supported yet: coembed imports the ResNet family"
        )
    if any(k.startswith(("visual.trunk.", "text.transformer.")) for k in state):
        if "text.blocks.0.attn.qkv.weight" in state:
            raise ModelDirError(
                f"{source}: this is a coembed checkpoint; use its model directory instead"
            )
        raise ModelDirError(
            f"{source}: an open_clip model with a timm or Hugging Face tower; "
            "coembed imports the CLIP ResNet family"
        )
    if "token_embedding.weight" not in state or "visual.layer1.0.conv1.weight" not in state:
        example = ", ".join(sorted(state)[:3])
        raise ModelDirError(
            f"{source}: not an open_clip or OpenAI CLIP ResNet checkpoint "
            f"(no token_embedding.weight or visual.layer1.0.conv1.weight; it has {example}, ...)"
        )


def _expected_openclip_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from coembed.model import CoEmbed

    # Only the shapes are needed, so build on the meta device: no memory, no initialization cost.
    with torch.device("meta"):
        model = CoEmbed(cfg)
    return {k: tuple(v.shape) for k, v in to_openclip_state(model.state_dict()).items()}


def convert_state(state: dict[str, Tensor], cfg: ModelConfig, source: str) -> dict[str, Tensor]:
    """Check an open_clip state dict against ``cfg`` and return it as a coembed state dict (float32).

    Every tensor must be used: a tensor the config has no place for is an error, as is a tensor
    the config needs and the checkpoint lacks (except BatchNorm step counters, which OpenAI does
    not save, and a logit bias, which then starts at ``cfg.init_logit_bias``), or one whose
    shape differs.
    """
    _require(structural_problems(cfg), f"{source}: the config cannot hold CLIP ResNet weights")
    _check_family(state, source)
    expected = _expected_openclip_shapes(cfg)
    weights = {k: v for k, v in state.items() if k not in NON_WEIGHTS}
    for name in ("logit_scale", "logit_bias"):
        # open_clip has scalar and (1,)-shaped variants of the same parameter.
        if name in weights and name in expected and weights[name].numel() == 1:
            weights[name] = weights[name].reshape(expected[name])
    if "logit_bias" in weights and "logit_bias" not in expected:
        raise ModelDirError(
            f"{source}: the checkpoint has a logit_bias (a SigLIP-style model); "
            "add --set model.init_logit_bias=0 so the config has one"
        )
    for name, tensor in weights.items():
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise ModelDirError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"the config expects {expected[name]}"
            )
    unused = sorted(set(weights) - set(expected))
    if unused:
        raise ModelDirError(
            f"{source}: {len(unused)} checkpoint tensors left unused (first: {unused[0]}): "
            "the config does not match the checkpoint (a typo, or the wrong --config?)"
        )
    missing = sorted(
        k
        for k in set(expected) - set(weights)
        if not k.endswith(_OPTIONAL_SUFFIX) and k != "logit_bias"
    )
    if missing:
        raise ModelDirError(
            f"{source}: {len(missing)} tensors the config needs are not in the checkpoint "
            f"(first: {missing[0]}): the config does not match the checkpoint"
        )
    out = {}
    for name, shape in expected.items():
        tensor = weights.get(name)
        if name == "logit_bias" and tensor is None:
            # A CLIP checkpoint starting a SigLIP run: the bias starts where the config says.
            tensor = torch.full(shape, float(cfg.init_logit_bias))
        elif tensor is None:  # a BatchNorm step counter OpenAI did not save
            tensor = torch.zeros(shape, dtype=torch.long)
        elif tensor.is_floating_point():
            # OpenAI stores most weights in float16; coembed computes in float32.
            tensor = tensor.float()
        if name == _TRANSPOSED[0]:
            tensor = tensor.t()  # (W, D) -> (D, W), nn.Linear's layout
        out[coembed_name(name)] = tensor.contiguous()
    return out


def read_openclip_state(path: str, cfg: ModelConfig) -> dict[str, Tensor]:
    """A coembed state dict from an open_clip / OpenAI CLIP ResNet file, checked against ``cfg``.

    Used by ``coembed train --init FILE``: the result loads into ``CoEmbed(cfg)`` strictly.
    """
    return convert_state(read_checkpoint(path), cfg, str(path))


def import_openclip(
    file: str,
    config: str | None,
    output: str,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    openclip_model: str | None = None,
    report: Callable[[str], object] | None = None,
) -> Path:
    """Convert an open_clip / OpenAI CLIP ResNet checkpoint into a coembed model directory; returns it.

    The config is the recipe ``config``, open_clip's model ``openclip_model`` (``RN50``,
    ``RN50-quickgelu``, ...), or with neither the shapes the checkpoint holds (see
    ``plan_openclip_import``); ``report`` gets one line saying which, and the text activation.

    The directory appears whole (built beside it, then swapped in); an existing model directory
    is replaced only with ``overwrite``, and a folder holding anything else never.
    """
    from coembed.checkpoint import MODEL_FILES, load_state_strict, save_model_dir
    from coembed.model import CoEmbed
    from coembed.tokenizer import Tokenizer

    out = Path(output)
    refuse_overlap(out, {"--from-openclip": file})
    check_replaceable(out, MODEL_FILES, "a model directory", overwrite)
    plan = plan_openclip_import(file, config, openclip_model, overrides)
    if report is not None:
        report(plan.describe())
    cfg = plan.cfg
    model = CoEmbed(cfg)
    load_state_strict(model, plan.state, file)
    tokenizer = Tokenizer.clip(context_length=cfg.text.context_length)
    with writer_lock(out):
        check_replaceable(out, MODEL_FILES, "a model directory", overwrite)  # as it is now
        clean_leftovers(out)
        with staged_folder(out) as stage:
            save_model_dir(model.eval(), tokenizer, stage)
    return out


def _export_target(model_dir: str, output_file: str, overwrite: bool) -> tuple[Path, Path]:
    """The weights file and its .json sibling, checked: a file name, apart from the model, and
    not in the way of existing files unless ``overwrite``."""
    output = Path(output_file)
    if output.is_dir() or output.suffix == ".json":
        raise CoembedError(
            f"{output}: give a file name such as model.pt or model.safetensors "
            "(its .json sibling gets the open_clip model config)"
        )
    config_file = output.with_suffix(".json")
    for path in (output, config_file):
        refuse_overlap(path, {"--to-openclip": model_dir})
        if path.exists() and not overwrite:
            raise UsageError(f"--output: {path} exists; add --overwrite to replace it")
    return output, config_file


def _weights_writer(state: dict[str, Tensor], output: Path) -> Callable[[str], object]:
    """How to write ``state`` to a file: safetensors for ``.safetensors``, else ``torch.save``."""
    if output.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in state.items()}
        return lambda tmp: save_file(tensors, tmp)
    return lambda tmp: torch.save(state, tmp)


def export_openclip(model_dir: str, output_file: str, overwrite: bool = False) -> Path:
    """Write a coembed model's weights as an open_clip state dict; returns the weights file.

    ``FILE.safetensors`` is written with safetensors, anything else with ``torch.save``. The open_clip
    model config goes beside it as ``FILE`` with the suffix ``.json``, so that::

        open_clip.add_model_config("FILE.json")      # registers the name "FILE"
        open_clip.create_model("FILE", pretrained="FILE.pt")

    works for any shapes; for OpenAI's shapes the built-in name (``RN50-quickgelu``...) works too.
    Both files are written in full before either replaces an existing one (only with
    ``overwrite``).
    """
    output, config_file = _export_target(model_dir, output_file, overwrite)
    model, tokenizer, _ = load_model_dir(model_dir)
    cfg = model.cfg
    _require(compatibility_problems(cfg), f"{model_dir}: cannot export to open_clip")
    # The tokenizer file could hold a trained vocabulary even if the config says clip.
    if tokenizer.vocab_size != 49408 or tokenizer.eot_id != 49407:
        raise CoembedError(
            f"{model_dir}: cannot export to open_clip: its tokenizer is not CLIP's BPE "
            f"(vocab_size {tokenizer.vocab_size}, eot_id {tokenizer.eot_id})"
        )
    write_weights = _weights_writer(to_openclip_state(model.state_dict()), output)
    config_text = json.dumps(openclip_model_config(cfg), indent=2)
    with writer_lock(output):
        _export_target(model_dir, output_file, overwrite)  # as it is now
        clean_leftovers(output)
        clean_leftovers(config_file)
        atomic_write_all(
            {
                config_file: lambda tmp: Path(tmp).write_text(config_text),
                output: write_weights,
            }
        )
    return output


__all__ = [
    "NON_WEIGHTS",
    "OPENCLIP_MODELS",
    "ImportPlan",
    "coembed_name",
    "compatibility_problems",
    "convert_state",
    "export_openclip",
    "import_openclip",
    "inferred_overrides",
    "openclip_builtin_name",
    "openclip_model_config",
    "openclip_model_overrides",
    "openclip_name",
    "plan_openclip_import",
    "read_checkpoint",
    "read_openclip_state",
    "structural_problems",
    "to_openclip_state",
]
