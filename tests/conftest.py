"""Shared fixtures: tiny models and model directories, built in memory (nothing is downloaded).

Plain helpers (paths, the tiny shapes, the CLI in a subprocess, ...) live in tests/helpers.py.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, tiny_clip_model

os.environ.setdefault("COEMBED_NO_PROGRESS", "1")

# A shell starts a background job with Ctrl-C (SIGINT) ignored, and its children inherit that:
# under `make test &` or a CI runner that does so, a coembed process the tests interrupt would
# not see the signal. The tests' own processes take it as a terminal would deliver it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def clip_tokenizer():
    from coembed.tokenizer import Tokenizer

    return Tokenizer.clip(context_length=16)


@pytest.fixture
def tiny_model_dir(tmp_path, clip_tokenizer):
    from coembed.checkpoint import save_model_dir

    model = tiny_clip_model()
    return save_model_dir(model, clip_tokenizer, tmp_path / "model")


@pytest.fixture(scope="module")
def browser():
    """Debian's headless chromium, driven by Playwright (skips where it is not installed).
    One per test module: Playwright's sync API keeps an event loop running in the main thread
    while it is open, which would stop later modules' asyncio.run()."""
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
