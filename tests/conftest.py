"""Shared fixtures: tiny models and model directories, built in memory (nothing is downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("COEMBED_NO_PROGRESS", "1")
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "synthetic"

# Small shapes so the whole suite stays fast on two cores.
TINY = [
    "model.embed_dim=32",
    "model.text.width=32",
    "model.text.layers=2",
    "model.text.heads=2",
    "model.text.context_length=16",
    "model.image.width=8",
    "model.image.layers=[1,1,1,1]",
    "model.image.image_size=32",
    "model.image.heads=4",
]


def tiny_config(*extra: str):
    from coembed.config import load_config

    return load_config("tiny", [*TINY, *extra])


@pytest.fixture(scope="session")
def clip_tokenizer():
    from coembed.tokenizer import Tokenizer

    return Tokenizer.clip(context_length=16)


def tiny_clip_model(*extra: str, seed: int = 0):
    """A tiny random model on CLIP's tokenizer (vocab 49408, EOT 49407)."""
    from coembed.model import CoEmbed

    cfg = tiny_config(
        "model.tokenizer=clip", "model.text.vocab_size=49408", "model.text.eot_id=49407", *extra
    )
    torch.manual_seed(seed)
    return CoEmbed(cfg.model)


@pytest.fixture
def tiny_model_dir(tmp_path, clip_tokenizer):
    from coembed.checkpoint import save_model_dir

    model = tiny_clip_model()
    return save_model_dir(model, clip_tokenizer, tmp_path / "model")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run the real ``coembed`` command in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "COEMBED_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "coembed", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env=full_env,
    )


def assert_one_line_error(proc, code: int | None = None, contains: str = "") -> None:
    """A user's mistake: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("coembed: error:"), proc.stderr
    assert contains.lower() in lines[0].lower(), (contains, proc.stderr)
