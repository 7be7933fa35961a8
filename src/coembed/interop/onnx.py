"""Both towers as ONNX graphs with a dynamic batch, for serving without PyTorch.

``export_onnx(model_dir, output_dir)`` writes::

    image_encoder.onnx   pixel_values (B, 3, S, S) float32 -> image_embeddings (B, D) float32, unit rows
    text_encoder.onnx    tokens (B, L) int64            -> text_embeddings (B, D) float32, unit rows
    tokenizer.json       the model's tokenizer (HF tokenizers), to make the tokens
    preprocess.json      image size, mean/std, resize, interpolation and crop, to make the pixels
    onnx.json            the inputs and outputs above, for a reader without this docstring

Each file is written to a temporary name and renamed, so a crash leaves no half-written graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from coembed.checkpoint import PREPROCESS_FILE, TOKENIZER_FILE, load_model_dir, write_preprocess
from coembed.config import ModelConfig
from coembed.errors import CoembedError
from coembed.files import atomic_write, atomic_write_text
from coembed.model import CoEmbed

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
SPEC_FILE = "onnx.json"
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


def export_onnx(model_dir: str, output_dir: str) -> list[Path]:
    """Export a model directory's two towers (and its tokenizer and preprocessing) to ONNX.

    Returns the paths written, graphs first.
    """
    _require_exporter()
    model, _tokenizer, preprocess = load_model_dir(model_dir)
    model = model.float().eval()
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise CoembedError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    _export_towers(model, out)
    src = Path(model_dir)
    atomic_write(out / TOKENIZER_FILE, lambda tmp: shutil.copyfile(src / TOKENIZER_FILE, tmp))
    write_preprocess(out / PREPROCESS_FILE, preprocess)
    atomic_write_text(out / SPEC_FILE, json.dumps(graph_spec(model.cfg), indent=2))
    return [
        out / IMAGE_FILE,
        out / TEXT_FILE,
        out / TOKENIZER_FILE,
        out / PREPROCESS_FILE,
        out / SPEC_FILE,
    ]
