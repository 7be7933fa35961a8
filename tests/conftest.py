"""Shared fixtures: tiny models and model directories, built in memory (nothing is downloaded).

Plain helpers (paths, the tiny shapes, the CLI in a subprocess, ...) live in tests/helpers.py.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import tiny_clip_model

os.environ.setdefault("COEMBED_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def clip_tokenizer():
    from coembed.tokenizer import Tokenizer

    return Tokenizer.clip(context_length=16)


@pytest.fixture
def tiny_model_dir(tmp_path, clip_tokenizer):
    from coembed.checkpoint import save_model_dir

    model = tiny_clip_model()
    return save_model_dir(model, clip_tokenizer, tmp_path / "model")
