"""Both towers as ONNX graphs with a dynamic batch, for serving without PyTorch.

``export_onnx(model_dir, output_dir)`` writes::

    image_encoder.onnx   pixel_values (B, 3, S, S) float32 -> image_embeddings (B, D) float32, unit rows
    text_encoder.onnx    tokens (B, L) int64            -> text_embeddings (B, D) float32, unit rows
    tokenizer.json       the model's tokenizer (HF tokenizers), to make the tokens; its normalizer
                         does the whitespace and case steps of coembed's caption clean-up
    text_cleanup.py      the rest of the clean-up (ftfy, HTML entities): call ``fix_text`` on a
                         caption before the tokenizer to get coembed's tokens (see onnx.json)
    preprocess.json      image size, mean/std, resize, interpolation and crop, to make the pixels
    onnx.json            the inputs and outputs above, for a reader without this docstring

The export is built in a hidden folder beside the output and swapped into place as a whole, so
a crash leaves the old export or the new one, never a mix of towers. An existing export is
replaced only when asked (``overwrite``), and a folder holding anything else never.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from coembed import text_cleanup
from coembed.checkpoint import PREPROCESS_FILE, TOKENIZER_FILE, load_model_dir, write_preprocess
from coembed.config import ModelConfig
from coembed.data.transforms import Preprocess
from coembed.errors import CoembedError
from coembed.files import (
    atomic_write,
    atomic_write_text,
    check_replaceable,
    clean_leftovers,
    refuse_overlap,
    staged_folder,
)
from coembed.locks import writer_lock
from coembed.model import CoEmbed
from coembed.tokenizer import Tokenizer

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
SPEC_FILE = "onnx.json"
CLEANUP_FILE = "text_cleanup.py"  # coembed.text_cleanup, copied as it is (it needs only ftfy)
# Everything an export folder holds, graphs first.
EXPORT_FILES = (IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE, CLEANUP_FILE, PREPROCESS_FILE, SPEC_FILE)
# Small enough to trace fast; 2 rather than 1 so the exporter cannot specialize the batch to 1.
_EXAMPLE_BATCH = 2


class ImageEncoder(nn.Module):
    """(B, 3, S, S) normalized pixels -> (B, D) unit-norm image embeddings."""

    def __init__(self, model: CoEmbed):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D)."""
        return self.model.encode_image(pixel_values)


class TextEncoder(nn.Module):
    """(B, L) token ids -> (B, D) unit-norm text embeddings."""

    def __init__(self, model: CoEmbed):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, D)."""
        return self.model.encode_text(tokens)


def _export_graph(
    module: nn.Module, example: torch.Tensor, names: tuple[str, str], path: Path
) -> None:
    """Export ``module`` with a dynamic first axis and write it atomically to ``path``."""
    input_name, output_name = names
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module.eval(),
        (example,),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes={input_name: {0: batch}},
        dynamo=True,
        verbose=False,
    )
    # One self-contained file: the towers of the configs we ship are far below protobuf's 2 GB.
    atomic_write(path, lambda tmp: program.save(tmp, external_data=False))


def _import_exporter() -> None:
    # torch.onnx's exporter (dynamo=True) translates with onnxscript and builds onnx protos.
    import onnx  # noqa: F401
    import onnxscript  # noqa: F401


def _require_exporter() -> None:
    try:
        _import_exporter()
    except ImportError as exc:
        raise CoembedError(
            f"coembed export --onnx needs the onnx and onnxscript packages ({exc.name} is missing): "
            "pip install coembed[onnx]"
        ) from None


def _tensor_spec(name: str, shape: list, dtype: str) -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


def graph_spec(cfg: ModelConfig) -> dict:
    """onnx.json's content: each graph's file, input and output (name, shape, dtype)."""
    size, D, L = cfg.image.image_size, cfg.embed_dim, cfg.text.context_length
    return {
        "embed_dim": D,
        "normalized": True,
        "image": {
            "file": IMAGE_FILE,
            "input": _tensor_spec("pixel_values", ["batch", 3, size, size], "float32"),
            "output": _tensor_spec("image_embeddings", ["batch", D], "float32"),
        },
        "text": {
            "file": TEXT_FILE,
            "input": _tensor_spec("tokens", ["batch", L], "int64"),
            "output": _tensor_spec("text_embeddings", ["batch", D], "float32"),
            "tokenizer": TOKENIZER_FILE,
            # The tokens are coembed's only for captions cleaned as coembed cleans them.
            "cleanup": {
                "first": f"{CLEANUP_FILE}: fix_text(caption), ftfy.fix_text then HTML unescape twice",
                "then": f"{TOKENIZER_FILE}'s normalizer: NFC, whitespace runs to one space, "
                "strip, lower-case (with final sigma)",
            },
        },
    }


def _export_towers(model: CoEmbed, out: Path) -> None:
    """Trace both towers on example inputs and write their graphs into ``out``."""
    cfg = model.cfg
    size = cfg.image.image_size
    pixels = torch.randn(_EXAMPLE_BATCH, 3, size, size)
    tokens = torch.zeros(_EXAMPLE_BATCH, cfg.text.context_length, dtype=torch.long)
    tokens[:, -1] = cfg.text.eot_id  # a valid end-of-text position in every row
    with torch.no_grad():
        _export_graph(
            ImageEncoder(model), pixels, ("pixel_values", "image_embeddings"), out / IMAGE_FILE
        )
        _export_graph(TextEncoder(model), tokens, ("tokens", "text_embeddings"), out / TEXT_FILE)


def _write_export(model: CoEmbed, preprocess: Preprocess, src: Path, out: Path) -> None:
    """Write every file of an export of ``model`` (from the model directory ``src``) into ``out``."""
    _export_towers(model, out)
    atomic_write_text(out / TOKENIZER_FILE, Tokenizer.load(src).standalone_json())
    atomic_write(out / CLEANUP_FILE, lambda tmp: shutil.copyfile(text_cleanup.__file__, tmp))
    write_preprocess(out / PREPROCESS_FILE, preprocess)
    atomic_write_text(out / SPEC_FILE, json.dumps(graph_spec(model.cfg), indent=2))


def export_onnx(model_dir: str, output_dir: str, overwrite: bool = False) -> list[Path]:
    """Export a model directory's two towers (and its tokenizer and preprocessing) to ONNX.

    The folder appears whole; an existing export is replaced only with ``overwrite``. Returns
    the paths written, graphs first.
    """
    _require_exporter()
    out = Path(output_dir)
    refuse_overlap(out, {"--onnx": model_dir})
    check_replaceable(out, EXPORT_FILES, "an ONNX export", overwrite)
    model, _tokenizer, preprocess = load_model_dir(model_dir)
    model = model.float().eval()
    with writer_lock(out):
        check_replaceable(out, EXPORT_FILES, "an ONNX export", overwrite)  # as it is now
        clean_leftovers(out)
        with staged_folder(out) as stage:
            _write_export(model, preprocess, Path(model_dir), stage)
    return [out / name for name in EXPORT_FILES]
