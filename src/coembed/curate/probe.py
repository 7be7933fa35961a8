"""Linear probe: multinomial logistic regression on frozen image embeddings.

The classic measure of what an image tower has learned (CLIP's "linear-probe" evaluation), and
a classifier for a task with labelled images. The regression is fitted in torch with L-BFGS on
the full batch: cross-entropy plus ``l2 / 2 * ||W||^2`` (the bias is not penalized), on vectors
standardized per dimension (folded back into the saved weights). The L2 strength is swept over
decades and the one with the best validation accuracy kept (ties: the lower validation loss).
Without validation data, 20% of each class's training images are held out for it.

Labelled images are a folder with one sub-folder per class (as ``coembed zeroshot`` reads), or
a dataset file (CSV, TSV, JSONL) with an image column and a label column.

The output folder is the model directory (its files hard-linked, or copied) with the classifier
beside it, so ``coembed zeroshot --model OUT --classifier OUT`` needs nothing else::

    config.json, model.safetensors, tokenizer.json, preprocess.json    the model
    classifier.safetensors   weight (C, D) and bias (C,); metadata: classes, l2, the model's identity
    probe.json               accuracy and top-5 next to zero-shot's on the same images, the sweep
    confusion.png            the confusion matrix on the evaluation images
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coembed.errors import DataError, ModelDirError, UsageError

if TYPE_CHECKING:
    from coembed.embedder import Embedder

CLASSIFIER_FILE = "classifier.safetensors"
PROBE_FILE = "probe.json"
CONFUSION_FILE = "confusion.png"
PROBE_FORMAT = "coembed-linear-probe-1"
L2_GRID = tuple(10.0**e for e in range(-6, 2))  # 1e-6 .. 10, one per decade
HOLDOUT = 0.2
MAX_ITER = 150  # L-BFGS iterations per fit; the weakest penalties stop here, not at a tolerance
SMALL_PROBLEM = 1 << 24  # N * D * C below which one thread fits fastest


@dataclass
class LabelledImages:
    """Images with a class each."""

    sources: list[Any]  # image paths (or shard members)
    labels: np.ndarray  # (N,) int64 indexes into classnames
    classnames: list[str]


def read_labelled(
    data: str | os.PathLike,
    *,
    classnames: list[str] | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
) -> LabelledImages:
    """Images and labels from a class-folder tree or a dataset file; with ``classnames``, the
    labels must be among them (a validation set of the training classes)."""
    from coembed.data.formats import read_records
    from coembed.evaluate import class_folders

    if Path(data).is_dir():
        pairs = [(path, name) for name, paths in class_folders(data) for path in paths]
    else:
        records, _ = read_records(os.fspath(data), image_key or "filepath", label_key or "label")
        pairs = [(record.image, record.captions[0]) for record in records]
    names = classnames if classnames is not None else sorted({label for _, label in pairs})
    if len(names) < 2:
        raise DataError(f"{data}: {len(names)} class(es); a classifier needs at least two")
    position = {name: c for c, name in enumerate(names)}
    unknown = sorted({label for _, label in pairs if label not in position})
    if unknown:
        raise DataError(
            f"{data}: class {unknown[0]!r} is not one of the {len(names)} training classes"
        )
    labels = np.array([position[label] for _, label in pairs], np.int64)
    return LabelledImages([source for source, _ in pairs], labels, list(names))


def embed_labelled(
    embedder: Embedder, images: LabelledImages, what: str, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, int]:
    """(vectors (N, D), labels (N,), skipped count) for the images that decode."""
    vectors, kept, skipped = embedder.embed_images_skipping(images.sources, progress=progress)
    if not kept:
        first = f" (first: {skipped[0][1]})" if skipped else ""
        raise DataError(f"{what}: none of the {len(images.sources)} images could be read{first}")
    return vectors, images.labels[kept], len(skipped)


def holdout_split(labels: np.ndarray, share: float = HOLDOUT, seed: int = 0) -> np.ndarray:
    """A boolean (N,) mask of validation rows: ``share`` of each class with two or more images."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) >= 2:
            n = max(1, int(round(share * len(rows))))
            held[rng.choice(rows, n, replace=False)] = True
    return held


# --- the regression ------------------------------------------------------------------------------


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    classes: int,
    l2: float,
    start: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = MAX_ITER,
) -> tuple[np.ndarray, np.ndarray]:
    """Weight (C, D) and bias (C,) minimizing mean cross-entropy + ``l2 / 2 * ||W||^2`` on
    vectors ``x`` (N, D) with labels ``y`` (N,); L-BFGS on the full batch, from ``start``."""
    import torch
    import torch.nn.functional as F

    features = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    targets = torch.from_numpy(np.asarray(y, np.int64))
    dim = features.shape[1]
    weight = torch.zeros(classes, dim) if start is None else torch.from_numpy(start[0].copy())
    bias = torch.zeros(classes) if start is None else torch.from_numpy(start[1].copy())
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ weight.T + bias  # (N, C)
        loss = F.cross_entropy(logits, targets) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    # A small problem runs on one thread: its matrix products take microseconds, and waking a
    # second thread for each of thousands of them costs more than the work (far more on
    # busy cores, where the other thread may not be scheduled for a while).
    threads = torch.get_num_threads()
    if x.size * classes < SMALL_PROBLEM:
        torch.set_num_threads(1)
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return weight.detach().numpy(), bias.detach().numpy()


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), scale (D,)) of training vectors ``x`` (N, D): each dimension is fitted at
    zero mean and unit variance, which conditions L-BFGS and makes one L2 grid fit any model
    (a random model's vectors vary in the fourth decimal)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    return mean, np.where(scale > 1e-12, scale, 1.0).astype(np.float32)


def unstandardized(
    weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The (weight, bias) that give on raw vectors the logits ``(weight, bias)`` give on
    standardized ones: ``((x - mean) / scale) @ W.T + b = x @ (W / scale).T + (b - ...)``."""
    folded = weight / scale  # (C, D)
    return folded.astype(np.float32), (bias - folded @ mean).astype(np.float32)


def logits_of(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(N, C) class scores of vectors ``x`` (N, D)."""
    return x @ weight.T + bias


def _mean_loss(logits: np.ndarray, y: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean())


def sweep_l2(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    classes: int,
    grid: tuple[float, ...] = L2_GRID,
    progress: bool = True,
) -> tuple[float, tuple[np.ndarray, np.ndarray], list[dict[str, float]]]:
    """Fit at every L2 strength of ``grid`` (strongest first, each fit starting from the last)
    and pick the best validation accuracy (ties: lower validation loss). Returns the chosen
    strength, its (weight, bias) and one row per strength."""
    from coembed.progress import progress_bar

    rows, fits = [], []
    start = None
    for l2 in progress_bar(
        sorted(grid, reverse=True), desc="L2 sweep", leave=False, enabled=progress
    ):
        start = fit_logistic(train[0], train[1], classes, l2, start)
        logits = logits_of(val[0], *start)
        accuracy = float((logits.argmax(axis=1) == val[1]).mean())
        rows.append({"l2": l2, "val_top1": accuracy, "val_loss": _mean_loss(logits, val[1])})
        fits.append(start)
    best = min(range(len(rows)), key=lambda i: (-rows[i]["val_top1"], rows[i]["val_loss"]))
    return rows[best]["l2"], fits[best], rows


# --- the classifier on disk ----------------------------------------------------------------------


@dataclass
class LinearProbe:
    """A linear classifier over a model's unit image vectors."""

    weight: np.ndarray  # (C, D) float32
    bias: np.ndarray  # (C,) float32
    classnames: list[str]
    l2: float
    model: dict[str, Any]  # the identity of the model it classifies (coembed.index.store)

    def logits(self, vectors: np.ndarray) -> np.ndarray:
        """(N, C) class scores of unit image vectors (N, D)."""
        return logits_of(vectors, self.weight, self.bias)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """(N, C) class probabilities (softmax of the logits) of unit image vectors (N, D)."""
        logits = self.logits(vectors)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def folded(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors with a column of ones (N, D+1), [weight | bias] (C, D+1)): the bias folded
        into one matrix product, the form ``evaluate.zeroshot_scores`` classifies with."""
        ones = np.ones((len(vectors), 1), np.float32)
        return np.hstack([vectors, ones]), np.hstack([self.weight, self.bias[:, None]])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the classifier as one safetensors file, atomically; returns its path."""
        import torch

        from coembed.checkpoint import save_weights

        meta = {"classnames": self.classnames, "l2": self.l2, "model": self.model}
        tensors = {"weight": torch.from_numpy(self.weight), "bias": torch.from_numpy(self.bias)}
        save_weights(path, tensors, {"format": PROBE_FORMAT, "probe": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearProbe:
        """Read a classifier: its file, or a probe output folder holding one."""
        from coembed.checkpoint import read_weights

        file = Path(path) / CLASSIFIER_FILE if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise ModelDirError(f"{path}: no classifier here; make one with `coembed probe`")
        tensors, metadata = read_weights(file)
        if metadata.get("format") != PROBE_FORMAT or set(tensors) != {"weight", "bias"}:
            raise ModelDirError(f"{file}: not a classifier written by `coembed probe`")
        meta = json.loads(metadata["probe"])
        weight, bias = tensors["weight"].float().numpy(), tensors["bias"].float().numpy()
        if (
            weight.ndim != 2
            or bias.shape != (len(weight),)
            or len(weight) != len(meta["classnames"])
        ):
            raise ModelDirError(f"{file}: weight, bias and classes do not agree; probe again")
        return cls(weight, bias, list(meta["classnames"]), float(meta["l2"]), meta["model"])


def check_probe_model(
    probe: LinearProbe, identity: dict[str, Any], where: str, given: str = "the model given is"
) -> None:
    """ModelDirError unless the model ``identity`` names (see ``coembed.index.store``) is the
    one the probe was fitted on."""
    from coembed.index.store import describe_model, same_model

    if not same_model(probe.model, identity):
        raise ModelDirError(
            f"{where}: this classifier was fitted on the embeddings of another model, "
            f"{describe_model(probe.model)}; {given} {describe_model(identity)}. "
            "Use the probe's own folder as the model, or probe this model"
        )


def probe_for_index(path: str | os.PathLike, index: Any) -> LinearProbe:
    """The classifier at ``path``, checked to be a probe of the model that built ``index``
    (a coembed Index); ModelDirError otherwise."""
    probe = LinearProbe.load(path)
    check_probe_model(probe, index.model, os.fspath(path), "the index was built with")
    return probe


# --- the whole command ---------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """What ``linear_probe`` found: the classifier, its figures, and the confusion matrix."""

    probe: LinearProbe
    metrics: dict[str, Any]  # top1, top5, zeroshot_top1, zeroshot_top5, counts, sweep, per_class
    confusion: np.ndarray  # (C, C) counts: rows true class, columns predicted


def _validation(
    embedder: Embedder,
    train: tuple[np.ndarray, np.ndarray],
    val_data: str | os.PathLike | None,
    names: list[str],
    keys: dict[str, str | None],
    progress: bool,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str, int]:
    """(train, validation, what the validation is, skipped images) with or without val data."""
    if val_data is None:
        held = holdout_split(train[1])
        if not held.any():
            raise DataError("too few training images to hold some out; give --val-data")
        split = (train[0][~held], train[1][~held]), (train[0][held], train[1][held])
        return *split, f"{HOLDOUT:.0%} of each training class, held out", 0
    images = read_labelled(val_data, classnames=names, **keys)
    x, y, skipped = embed_labelled(embedder, images, os.fspath(val_data), progress)
    return train, (x, y), os.fspath(val_data), skipped


def fit_probe(
    embedder: Embedder,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    names: list[str],
    l2_grid: tuple[float, ...] = L2_GRID,
    progress: bool = True,
) -> tuple[LinearProbe, list[dict[str, float]]]:
    """The probe fitted on (vectors, labels) ``train`` at the L2 strength best on ``val`` (on
    standardized vectors, folded back), and the sweep's rows."""
    from coembed.index.store import model_identity

    if not l2_grid or min(l2_grid) < 0 or not all(math.isfinite(v) for v in l2_grid):
        raise UsageError("the L2 grid needs at least one finite strength >= 0")
    mean, scale = standardizer(train[0])
    l2, fitted, sweep = sweep_l2(
        ((train[0] - mean) / scale, train[1]),
        ((val[0] - mean) / scale, val[1]),
        len(names),
        l2_grid,
        progress,
    )
    weight, bias = unstandardized(*fitted, mean, scale)
    return LinearProbe(weight, bias, names, l2, model_identity(embedder)), sweep


def measure_probe(
    probe: LinearProbe, embedder: Embedder, x: np.ndarray, y: np.ndarray
) -> tuple[dict[str, Any], np.ndarray]:
    """The probe's top-1/top-5 (and per class) beside zero-shot's by the class names, on the
    same vectors ``x`` (N, D) and labels ``y``, and the probe's (C, C) confusion matrix."""
    from coembed.evaluate import DEFAULT_TEMPLATES, zeroshot_classifier, zeroshot_scores

    names = probe.classnames
    folded_x, folded_w = probe.folded(x)
    scores = zeroshot_scores(folded_x, y, folded_w, names)
    zero = zeroshot_scores(x, y, zeroshot_classifier(embedder, names, DEFAULT_TEMPLATES), names)
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (y, probe.logits(x).argmax(axis=1)), 1)
    figures = {"top1": scores["top1"], "top5": scores["top5"]}
    figures.update(zeroshot_top1=zero["top1"], zeroshot_top5=zero["top5"])
    return {**figures, "per_class": scores["per_class"]}, confusion


def linear_probe(
    model: str | os.PathLike | Embedder,
    train_data: str | os.PathLike,
    *,
    val_data: str | os.PathLike | None = None,
    test_data: str | os.PathLike | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    l2_grid: tuple[float, ...] = L2_GRID,
    device: str = "auto",
    progress: bool = True,
) -> ProbeResult:
    """Fit a linear probe on frozen image embeddings, L2 strength chosen on the validation
    images, and measure it (on ``test_data`` when given, else the validation images) next to
    zero-shot classification by the class names."""
    from coembed.embedder import as_embedder

    embedder = as_embedder(model, device)
    keys = {"image_key": image_key, "label_key": label_key}
    images = read_labelled(train_data, **keys)
    names = images.classnames
    x, y, skipped = embed_labelled(embedder, images, os.fspath(train_data), progress)
    train, val, val_name, val_skipped = _validation(
        embedder, (x, y), val_data, names, keys, progress
    )
    probe, sweep = fit_probe(embedder, train, val, names, l2_grid, progress)
    eval_x, eval_y, eval_name, test_skipped = (*val, val_name, 0)
    if test_data is not None:
        test = read_labelled(test_data, classnames=names, **keys)
        eval_x, eval_y, test_skipped = embed_labelled(
            embedder, test, os.fspath(test_data), progress
        )
        eval_name = os.fspath(test_data)
    figures, confusion = measure_probe(probe, embedder, eval_x, eval_y)
    metrics = {
        **figures,
        "evaluated_on": eval_name,
        "validation": val_name,
        "images": {"train": len(train[1]), "validation": len(val[1]), "evaluated": len(eval_y)},
        "skipped_images": skipped + val_skipped + test_skipped,
        "classes": len(names),
        "l2": probe.l2,
        "sweep": sweep,
    }
    return ProbeResult(probe, metrics, confusion)


def _link_model_files(source: Path, target: Path) -> None:
    """Hard-link (or copy) a model directory's files into ``target``: the same bytes, so the
    copy has the identity of the original."""
    from coembed.checkpoint import MODEL_FILES

    for name in MODEL_FILES:
        if (source / name).is_file():
            try:
                os.link(source / name, target / name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(source / name, target / name)


def probe_files() -> tuple[str, ...]:
    """The files of a probe's output folder."""
    from coembed.checkpoint import MODEL_FILES

    return (*MODEL_FILES, CLASSIFIER_FILE, PROBE_FILE, CONFUSION_FILE)


def check_probe_output(
    output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], overwrite: bool
) -> None:
    """UsageError unless ``output`` may take a probe's folder: new, empty, or (with
    ``overwrite``) an earlier probe output, and apart from the ``inputs`` (by option name)."""
    from coembed.files import check_replaceable, refuse_overlap

    refuse_overlap(output, inputs)
    check_replaceable(output, probe_files(), "a probe output", overwrite)


def write_probe(
    result: ProbeResult,
    embedder: Embedder,
    output: str | os.PathLike,
    *,
    inputs: dict[str, str | os.PathLike | None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the probe's folder (see the module docstring) as a whole; returns it. It must be
    new, empty, or (with ``overwrite``) an earlier probe output, and apart from the inputs."""
    from coembed.checkpoint import MODEL_FILES, save_model_dir
    from coembed.curate.plots import confusion_png
    from coembed.files import check_replaceable, staged_folder
    from coembed.locks import writer_lock

    out = Path(output)
    check_probe_output(out, inputs or {}, overwrite)
    expected = probe_files()
    title = f"linear probe on {Path(result.metrics['evaluated_on']).name}: top-1 " + (
        f"{result.metrics['top1']:.3f} (zero-shot {result.metrics['zeroshot_top1']:.3f})"
    )
    png = confusion_png(result.confusion, result.probe.classnames, title)
    source = Path(embedder.source) if embedder.source else None
    with writer_lock(out):
        check_replaceable(out, expected, "a probe output", overwrite)  # as it is now
        with staged_folder(out) as stage:
            if source is not None and (source / MODEL_FILES[0]).is_file():
                _link_model_files(source, stage)
            else:
                save_model_dir(embedder.model, embedder.tokenizer, stage, embedder.preprocess)
            result.probe.save(stage / CLASSIFIER_FILE)
            (stage / PROBE_FILE).write_text(json.dumps(result.metrics, indent=2))
            (stage / CONFUSION_FILE).write_bytes(png)
    return out


def classify_folder(
    model: str | os.PathLike | Embedder,
    folder: str | os.PathLike,
    classifier: str | os.PathLike,
    *,
    device: str = "auto",
) -> dict[str, Any]:
    """``zeroshot``'s result for a class-folder tree, classified by a probe's classifier
    instead of the class names (``coembed zeroshot --classifier``)."""
    from coembed.embedder import as_embedder
    from coembed.evaluate import zeroshot_scores
    from coembed.index.store import model_identity

    probe = LinearProbe.load(classifier)
    embedder = as_embedder(model, device)
    check_probe_model(probe, model_identity(embedder), os.fspath(classifier))
    images = read_labelled(folder, classnames=probe.classnames)
    x, y, skipped = embed_labelled(embedder, images, os.fspath(folder))
    folded_x, folded_w = probe.folded(x)
    result = zeroshot_scores(folded_x, y, folded_w, probe.classnames)
    result["per_class"] = [row for row in result["per_class"] if row["images"]]
    result["classes"] = len(result["per_class"])
    return {
        **result,
        "templates": 0,
        "classifier": os.fspath(classifier),
        "skipped_images": skipped,
    }
