"""What a run tells: metrics.jsonl and TensorBoard, validation recall and zero-shot accuracy,
the lines printed at the start and the end of a run, and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from coembed import process
from coembed.files import atomic_write_text
from coembed.names import escape_name
from coembed.training.run import TrainRun


class Logger:
    """JSONL metrics and TensorBoard events, written by rank 0 only.

    A resumed run starts logging at its checkpoint's step: lines a killed run wrote after that
    step (and a line it was cut off in the middle of) are dropped, and TensorBoard purges them.
    """

    def __init__(self, output: Path, enabled: bool, start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if start_step > 0 or self.path.exists():
            self._truncate(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output / "tensorboard"), purge_step=start_step or None)
        except ImportError:
            self.tb = None

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, **values: object) -> None:
        """One JSON line; numbers also go to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key.replace("@", "_at_"), value, step)
            self.tb.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def validate_run(run: TrainRun) -> dict[str, float]:
    """Retrieval recall@1/5/10 and ranks both ways on the validation set, with the current
    weights (their moving average when the run keeps one)."""
    from coembed.data.formats import caption_ids_of
    from coembed.evaluate import retrieval_metrics

    model = run.evaluated_model
    training = model.training  # the moving average stays in eval mode
    model.eval()
    images, texts = [], []
    for start in range(0, len(run.val.pixels), 256):
        batch = (
            run.val.pixels[start : start + 256]
            .to(run.device)
            .contiguous(memory_format=torch.channels_last)
        )
        images.append(model.encode_image(batch).float().cpu())
    for start in range(0, len(run.val.captions), 512):
        tokens = run.tokenizer(run.val.captions[start : start + 512]).to(run.device)
        texts.append(model.encode_text(tokens).float().cpu())
    model.train(training)
    return retrieval_metrics(
        torch.cat(images).numpy(),
        torch.cat(texts).numpy(),
        run.val.text_to_image,
        caption_ids=caption_ids_of(run.val.captions),
    )


@torch.no_grad()
def zeroshot_run(run: TrainRun) -> dict[str, float]:
    """Zero-shot top-1/top-5 accuracy on the class folder, with the current weights (their moving
    average when the run keeps one)."""
    from coembed.data.transforms import Preprocess
    from coembed.embedder import Embedder
    from coembed.evaluate import zeroshot_classifier, zeroshot_scores

    zs, model = run.zeroshot, run.evaluated_model
    training = model.training
    embedder = Embedder(model, run.tokenizer, Preprocess(model.cfg.image.image_size), run.device)
    model.eval()
    try:
        images = np.concatenate(
            [embedder.embed_pixels(zs.pixels[i : i + 256]) for i in range(0, len(zs.pixels), 256)]
        )
        classifier = zeroshot_classifier(embedder, zs.classnames, zs.templates)
    finally:
        model.train(training)
    scores = zeroshot_scores(images, zs.labels, classifier, zs.classnames)
    return {"zeroshot_top1": scores["top1"], "zeroshot_top5": scores["top5"]}


def validation_line(metrics: dict[str, float]) -> str:
    """R@1 and the median and mean rank both ways, as the per-validation line shows them."""
    return "  ".join(
        f"{short} R@1 {metrics[f'{d}_R@1']:.3f} rank median {metrics[f'{d}_median_rank']:g} "
        f"mean {metrics[f'{d}_mean_rank']:.1f}"
        for short, d in (("i2t", "image_to_text"), ("t2i", "text_to_image"))
    )


def evaluate_and_log(run: TrainRun, logger: Logger, epoch: int, say) -> dict[str, float]:
    """Validation recall and zero-shot accuracy (those the run has), logged to metrics.jsonl
    and told through ``say`` (one line each); returns them."""
    metrics: dict[str, float] = {}
    if run.val is not None:
        metrics.update(validate_run(run))
        say(f"step {run.step} val: {validation_line(metrics)}")
    if run.zeroshot is not None:
        metrics.update(zeroshot_run(run))
        say(
            f"step {run.step} zero-shot: top-1 {metrics['zeroshot_top1']:.3f}  "
            f"top-5 {metrics['zeroshot_top5']:.3f}"
        )
    # metrics.jsonl keys: val/image_to_text_R@1, ..., zeroshot/top1, zeroshot/top5
    logged = {
        (f"zeroshot/{k.removeprefix('zeroshot_')}" if k.startswith("zeroshot_") else f"val/{k}"): v
        for k, v in metrics.items()
    }
    logger.log(run.step, epoch=epoch, **logged)
    return metrics


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def data_skipped(run: TrainRun) -> dict[str, int]:
    """Images skipped so far, by reason (only reasons that happened)."""
    return {k: v for k, v in sorted(run.data.skipped.items()) if v}


def report_start(run: TrainRun, logger: Logger) -> None:
    """The opening lines: model and data sizes, skipped images, what was read, the CPU settings."""
    report = run.read_report
    print(
        f"training {sum(p.numel() for p in run.raw_model.parameters()) / 1e6:.1f}M parameters on "
        f"{len(run.data)} pairs, {run.total_steps} steps of {run.cfg.train.batch_size} "
        f"({run.dist.world} process{'es' if run.dist.world > 1 else ''}, {run.device})"
        + (f", resuming at step {run.step}" if run.step else ""),
        flush=True,
    )
    trainable, frozen = parameter_counts(run.raw_model)
    print(f"parameters: {trainable:,} trainable, {frozen:,} frozen", flush=True)
    skipped = data_skipped(run)
    if skipped:
        print("images skipped: " + ", ".join(f"{v} {k}" for k, v in skipped.items()))
    print(f"data: {report.summary()}", flush=True)
    threads = f"{torch.get_num_threads()} threads, OpenMP waiting: {process.openmp_waiting()}"
    print(f"CPU: {threads}", flush=True)
    logger.log(run.step, data=report.summary(), empty_captions=report.empty_captions, cpu=threads)


def run_summary(run: TrainRun, metrics: dict, seconds: float) -> dict:
    """What summary.json holds: steps, seconds, skipped images, empty and cut captions, last
    recall."""
    summary = {
        "steps": run.step,
        "seconds": round(seconds, 1),
        "skipped_images": data_skipped(run),
        "empty_captions": run.read_report.empty_captions,
        "long_captions_truncated": run.read_report.long_captions_truncated,
    }
    summary.update(metrics)
    return summary


def report_end(run: TrainRun, summary: dict, seconds: float) -> None:
    """Write summary.json and print the end-of-run lines: steps, skipped data, recall."""
    report = run.read_report
    notes = []
    if report.empty_captions:
        notes.append(f"{report.empty_captions} empty captions skipped")
    if report.long_captions_truncated:
        notes.append(f"{report.long_captions_truncated} long captions truncated")
    skipped = summary["skipped_images"]
    if skipped:
        notes.append("images skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
    atomic_write_text(run.output / "summary.json", json.dumps(summary, indent=2))
    print(f"done: {run.step} steps in {seconds:.0f} s; model in {escape_name(run.output)}")
    if notes:
        print("data: " + "; ".join(notes))
    if "image_to_text_R@1" in summary:
        print(
            "val recall@1/5/10  image->text "
            + " / ".join(f"{summary[f'image_to_text_R@{k}']:.3f}" for k in (1, 5, 10))
            + "   text->image "
            + " / ".join(f"{summary[f'text_to_image_R@{k}']:.3f}" for k in (1, 5, 10))
        )
    if "zeroshot_top1" in summary:
        print(
            f"zero-shot top-1 {summary['zeroshot_top1']:.3f}  top-5 {summary['zeroshot_top5']:.3f}"
        )
