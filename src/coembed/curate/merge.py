"""Weight-space interpolation between a model and its fine-tuned copy (WiSE-FT).

``theta(alpha) = (1 - alpha) * theta_A + alpha * theta_B`` for every floating-point tensor
(BatchNorm's running statistics included); integer buffers (BatchNorm's batch counters) come
from the nearer end. Fine-tuning moves a model towards its new data and away from what it
knew; models in between often keep most of both. Only models of one architecture can be
interpolated: the same config.json, tokenizer and preprocessing; anything else is refused.

``merge_sweep`` measures each alpha on the new data and on reference data (the old task) and
``write_sweep`` plots the trade-off. A dataset of pairs is measured by retrieval (the mean of
R@1 both ways), a folder of class sub-folders by zero-shot top-1 accuracy.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coembed.errors import ModelDirError, UsageError

if TYPE_CHECKING:
    import torch

    from coembed.data.transforms import Preprocess
    from coembed.embedder import Embedder
    from coembed.model import CoEmbed
    from coembed.tokenizer import Tokenizer

SWEEP_FILES = ("sweep.json", "sweep.csv", "sweep.png")


def check_alpha(alpha: float, flag: str = "--alpha") -> None:
    """Raise UsageError unless 0 <= ``alpha`` <= 1."""
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"{flag} {alpha}: give a weight between 0 (model A) and 1 (model B)")


def parse_alphas(text: str) -> list[float]:
    """``"0,0.25,0.5"`` -> [0.0, 0.25, 0.5]: comma-separated, each in [0, 1], no repeats."""
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(
            f"--sweep {text!r}: give weights separated by commas, e.g. 0,0.5,1"
        ) from None
    if not alphas:
        raise UsageError("--sweep: give at least one weight, e.g. 0,0.25,0.5,0.75,1")
    for alpha in alphas:
        check_alpha(alpha, "--sweep")
    if len(set(alphas)) < len(alphas):
        raise UsageError(f"--sweep {text!r}: a weight is repeated")
    return alphas


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    """The first dotted key where two config dicts differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} vs {b!r}"


def _tokenizer_json(directory: str | os.PathLike) -> Any:
    """A model directory's tokenizer.json, parsed: equal vocabularies and merges compare equal
    however the file was laid out."""
    from coembed.checkpoint import TOKENIZER_FILE

    return json.loads((Path(directory) / TOKENIZER_FILE).read_text(encoding="utf-8"))


def load_pair(
    a: str | os.PathLike, b: str | os.PathLike
) -> tuple[CoEmbed, CoEmbed, Tokenizer, Preprocess]:
    """Both models (on the CPU), their shared tokenizer and preprocessing; ModelDirError unless
    they have the same config, tokenizer and preprocessing."""
    from coembed.checkpoint import load_model_dir
    from coembed.config import to_dict

    model_a, tokenizer, preprocess = load_model_dir(a, "cpu")
    model_b, _, preprocess_b = load_model_dir(b, "cpu")
    config_a, config_b = to_dict(model_a.cfg), to_dict(model_b.cfg)
    if config_a != config_b:
        raise ModelDirError(
            f"{a} and {b} are different architectures ({_first_difference(config_a, config_b)}); "
            "merge interpolates a model and its fine-tuned copy, which share one config"
        )
    if _tokenizer_json(a) != _tokenizer_json(b):
        raise ModelDirError(
            f"{a} and {b} have different tokenizers; their text towers read different tokens, "
            "so their weights cannot be mixed (fine-tune with `coembed train --init` to keep one)"
        )
    if preprocess.to_dict() != preprocess_b.to_dict():
        raise ModelDirError(f"{a} and {b} preprocess images differently; give models that agree")
    return model_a, model_b, tokenizer, preprocess


def interpolate(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` for floating-point tensors; other tensors from the
    nearer end (``a`` below 0.5)."""
    import torch

    out = {}
    for name, tensor in a.items():
        if tensor.is_floating_point():
            out[name] = torch.lerp(tensor, b[name].to(tensor.dtype), alpha)
        else:
            out[name] = (tensor if alpha < 0.5 else b[name]).clone()
    return out


def interpolated_model(model_a: CoEmbed, model_b: CoEmbed, alpha: float) -> CoEmbed:
    """A new model (eval mode) with weights interpolated at ``alpha``."""
    from coembed.model import CoEmbed

    model = CoEmbed(model_a.cfg)
    model.load_state_dict(interpolate(model_a.state_dict(), model_b.state_dict(), alpha))
    return model.eval()


def merge_models(
    a: str | os.PathLike,
    b: str | os.PathLike,
    alpha: float,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the model interpolated between model directories ``a`` (alpha 0) and ``b``
    (alpha 1) as a new model directory, which appears whole; returns it."""
    from coembed.checkpoint import MODEL_FILES, save_model_dir
    from coembed.files import check_replaceable, refuse_overlap, staged_folder
    from coembed.locks import writer_lock

    check_alpha(alpha)
    out = Path(output)
    refuse_overlap(out, {"model A": a, "model B": b})
    check_replaceable(out, MODEL_FILES, "a model directory", overwrite)
    model_a, model_b, tokenizer, preprocess = load_pair(a, b)
    model = interpolated_model(model_a, model_b, alpha)
    with writer_lock(out):
        check_replaceable(out, MODEL_FILES, "a model directory", overwrite)  # as it is now
        with staged_folder(out) as stage:
            save_model_dir(model, tokenizer, stage, preprocess)
    return out


# --- the sweep -----------------------------------------------------------------------------------


def is_class_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of class sub-folders (not a dataset of captioned pairs)."""
    root = Path(path)
    if not root.is_dir():
        return False
    entries = list(root.iterdir())
    captioned = any(p.suffix.lower() in (".txt", ".tar") for p in entries if p.is_file())
    return not captioned and sum(p.is_dir() for p in entries) >= 2


def measure(embedder: Embedder, data: str | os.PathLike) -> dict[str, Any]:
    """One number for a model on ``data``: zero-shot top-1 for a class folder, else the mean
    of retrieval R@1 both ways; ``{"metric", "score", "metrics"}``."""
    from coembed.evaluate import evaluate_retrieval, zeroshot

    if is_class_folder(data):
        result = zeroshot(embedder, data)
        metrics = {key: result[key] for key in ("top1", "top5", "images", "classes")}
        return {"metric": "zero-shot top-1", "score": result["top1"], "metrics": metrics}
    metrics = evaluate_retrieval(embedder, data)
    score = (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"]) / 2
    return {"metric": "mean R@1", "score": score, "metrics": metrics}


@dataclass
class Sweep:
    """Each alpha measured on the new data (``eval``) and the reference data."""

    a: str
    b: str
    eval_data: str
    reference_data: str
    rows: list[dict[str, Any]]  # {"alpha", "eval": measure(...), "reference": measure(...)}

    def best_alpha(self) -> float:
        """The alpha with the best mean of the two scores (ties: the smaller alpha)."""
        best = max(
            self.rows, key=lambda r: (r["eval"]["score"] + r["reference"]["score"], -r["alpha"])
        )
        return best["alpha"]

    def summary(self) -> dict[str, Any]:
        """The sweep as one JSON-ready object."""
        return {
            "a": self.a,
            "b": self.b,
            "eval_data": self.eval_data,
            "reference_data": self.reference_data,
            "best_alpha": self.best_alpha(),
            "rows": self.rows,
        }


def merge_sweep(
    a: str | os.PathLike,
    b: str | os.PathLike,
    alphas: list[float],
    eval_data: str | os.PathLike,
    reference_data: str | os.PathLike,
    *,
    device: str = "auto",
    progress: bool = True,
) -> Sweep:
    """Measure the model interpolated at each alpha on ``eval_data`` and ``reference_data``."""
    import torch

    from coembed.device import resolve_device
    from coembed.embedder import Embedder
    from coembed.progress import progress_bar

    for alpha in alphas:
        check_alpha(alpha, "--sweep")
    for flag, path in (("--eval-data", eval_data), ("--reference-data", reference_data)):
        if not Path(path).exists() and "{" not in os.fspath(path):
            raise UsageError(f"{flag} {path}: no such file or folder")
    model_a, model_b, tokenizer, preprocess = load_pair(a, b)
    dev = resolve_device(device)
    rows = []
    for alpha in progress_bar(alphas, desc="merge sweep", unit="alpha", enabled=progress):
        model = interpolated_model(model_a, model_b, alpha).to(
            dev, memory_format=torch.channels_last
        )
        embedder = Embedder(model, tokenizer, preprocess, dev)
        rows.append(
            {
                "alpha": alpha,
                "eval": measure(embedder, eval_data),
                "reference": measure(embedder, reference_data),
            }
        )
    return Sweep(os.fspath(a), os.fspath(b), os.fspath(eval_data), os.fspath(reference_data), rows)


def sweep_csv_text(sweep: Sweep) -> str:
    """``alpha,eval_metric,eval_score,reference_metric,reference_score`` per alpha."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["alpha", "eval_metric", "eval_score", "reference_metric", "reference_score"])
    for row in sweep.rows:
        new, old = row["eval"], row["reference"]
        writer.writerow(
            [
                row["alpha"],
                new["metric"],
                f"{new['score']:.6f}",
                old["metric"],
                f"{old['score']:.6f}",
            ]
        )
    return out.getvalue()


def check_sweep_output(
    output: str | os.PathLike, inputs: tuple[str | os.PathLike, ...], overwrite: bool
) -> None:
    """UsageError unless ``output`` may take a sweep's files: new, empty, or (with
    ``overwrite``) an earlier sweep, apart from (A, B, eval data, reference data)."""
    from coembed.files import check_replaceable, refuse_overlap

    flags = ("model A", "model B", "--eval-data", "--reference-data")
    refuse_overlap(output, dict(zip(flags, inputs)))
    check_replaceable(output, SWEEP_FILES, "a merge sweep", overwrite)


def write_sweep(sweep: Sweep, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write sweep.json, sweep.csv and the trade-off plot sweep.png into ``output``, as a whole."""
    from coembed.curate.plots import sweep_png
    from coembed.files import check_replaceable, staged_folder
    from coembed.locks import writer_lock

    out = Path(output)
    inputs = (sweep.a, sweep.b, sweep.eval_data, sweep.reference_data)
    check_sweep_output(out, inputs, overwrite)
    png = sweep_png(sweep.rows, Path(sweep.eval_data).name, Path(sweep.reference_data).name)
    with writer_lock(out):
        check_replaceable(out, SWEEP_FILES, "a merge sweep", overwrite)  # as it is now
        with staged_folder(out) as stage:
            (stage / "sweep.json").write_text(json.dumps(sweep.summary(), indent=2))
            (stage / "sweep.csv").write_text(sweep_csv_text(sweep))
            (stage / "sweep.png").write_bytes(png)
    return out
