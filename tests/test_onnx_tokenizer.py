"""The ONNX export's text path without coembed: text_cleanup.fix_text, then tokenizer.json (its
normalizer does whitespace and case), then text_encoder.onnx, gives coembed's ``embed_texts``."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import unicodedata

import numpy as np
import pytest
import torch

from coembed.text_cleanup import clean_text, fix_text
from coembed.tokenizer import Tokenizer, cleanup_normalizer
from tests.helpers import tiny_config

ort = pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")

# Onnxruntime against torch on the same ids: float32 rounding through a few layers.
ATOL = 1e-5

# Captions the exported tokenizer.json must clean by itself: case, accents (composed and
# decomposed), emoji, every kind of whitespace, Greek final sigma, dotted capital I.
BY_TOKENIZER_JSON = [
    "Two BLUE rhombuses!",
    "A Large RED Circle",
    "CAFÉ au lait in ZÜRICH",
    "cafe\u0301 NAI\u0308VE",
    "Ångström ÉCOLE straße",
    "🐶🐱 Dog AND cat 👍🏽 🇯🇵",
    "  tabs\tand\nnew lines\u3000and\u00a0spaces\x1c  ",
    "ΟΔΟΣ Σίσυφος ΣΑΣ",
    "İstanbul Iİ",
]
# Captions that also need fix_text: HTML entities (double-escaped too), mojibake, ligatures.
NEEDS_FIX_TEXT = [
    "Tom &amp; JERRY",
    "&lt;b&gt;BOLD&lt;/b&gt; &amp;amp; &eacute;t&eacute;",
    "A &quot;Quoted&quot; caf&#233; &#128512;",
    "cafÃ© Ã¼ber",
    "ﬁne ﬂower ＬＯＵＤ ＮＯＩＳＥ",
    "<b>TAG</b> &amp; more",
]


def random_captions(n: int, seed: int = 0) -> list[str]:
    """Mixtures of the captions above with random case changes."""
    rng = random.Random(seed)
    words = " ".join(BY_TOKENIZER_JSON + NEEDS_FIX_TEXT).split(" ")
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        out.append(text.upper() if rng.random() < 0.3 else text.title())
    return out


def trained_tokenizer() -> Tokenizer:
    """A BPE learned on mixed-case captions, as the tiny recipe trains one."""
    captions = [f"A {c} {s}, Number {i}" for i in range(30) for c in ("Red", "BLUE") for s in "ab"]
    return Tokenizer.train(captions + NEEDS_FIX_TEXT, vocab_size=600, context_length=16)


@pytest.fixture(scope="module", params=["clip", "trained"])
def tokenizer(request) -> Tokenizer:
    if request.param == "clip":
        return Tokenizer.clip(context_length=16)
    return trained_tokenizer()


def differing(hf, tokenizer: Tokenizer, texts: list[str], cleanup=lambda t: t) -> list[str]:
    """The texts whose ids from ``hf`` (after ``cleanup``) are not coembed's."""
    got = torch.tensor([e.ids for e in hf.encode_batch([cleanup(t) for t in texts])])
    return [t for t, same in zip(texts, (got == tokenizer(texts)).all(dim=1)) if not same]


def test_standalone_tokenizer_json_cleans_as_coembed(tokenizer):
    hf = tokenizers.Tokenizer.from_str(tokenizer.standalone_json())
    # Case, accents, emoji and whitespace: the tokenizer.json alone is enough.
    alone = BY_TOKENIZER_JSON + [t.upper() for t in BY_TOKENIZER_JSON]
    assert differing(hf, tokenizer, alone) == []
    # HTML entities and mojibake: fix_text first, then every caption gets coembed's ids.
    texts = alone + NEEDS_FIX_TEXT + random_captions(300)
    assert differing(hf, tokenizer, texts, fix_text) == []
    # Without fix_text they differ, which is why the export ships it.
    assert differing(hf, tokenizer, NEEDS_FIX_TEXT) == NEEDS_FIX_TEXT


def test_cleanup_normalizer_equals_python_on_every_character():
    # Every character Python's Unicode database knows, alone and around Σ (final sigma's context
    # is cased and case-ignorable characters): the normalizer must equal NFC, str.split's
    # whitespace and str.lower. Newer characters are the documented exceptions.
    normalizer = cleanup_normalizer()
    known = [
        chr(i)
        for i in range(1, 0x110000)
        if not 0xD800 <= i < 0xE000 and unicodedata.category(chr(i)) not in ("Cn", "Co")
    ]
    assert len(known) > 140_000
    bad = []
    for c in known:
        # One short string per character: HF's Replace costs grow with matches times length.
        text = f"{c}Σ{c} A{c}Σ  {c}ΣA\ta{c}Σ{c}b {c.upper()}Σ "
        if (
            normalizer.normalize_str(text)
            != " ".join(unicodedata.normalize("NFC", text).split()).lower()
        ):
            bad.append(f"U+{ord(c):04X}")
    assert bad == []


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model on the trained BPE (as the tiny recipe has), saved and exported to ONNX."""
    from coembed.checkpoint import save_model_dir
    from coembed.interop.onnx import export_onnx
    from coembed.model import CoEmbed

    tok = trained_tokenizer()
    cfg = tiny_config(f"model.text.vocab_size={tok.vocab_size}", f"model.text.eot_id={tok.eot_id}")
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("onnx-text")
    model_dir = save_model_dir(CoEmbed(cfg.model).eval(), tok, root / "model")
    export_onnx(str(model_dir), str(root / "export"))
    return model_dir, root / "export"


def load_exported_cleanup(export_dir):
    spec = importlib.util.spec_from_file_location(
        "exported_text_cleanup", export_dir / "text_cleanup.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_onnx_text_path_matches_embed_texts(exported):
    import coembed

    model_dir, export_dir = exported
    source = (export_dir / "text_cleanup.py").read_text()
    assert not re.search(r"^\s*(from|import) coembed", source, re.M)  # runs without coembed
    cleanup = load_exported_cleanup(export_dir)
    hf = tokenizers.Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    session = ort.InferenceSession(
        str(export_dir / "text_encoder.onnx"), providers=["CPUExecutionProvider"]
    )
    spec = json.loads((export_dir / "onnx.json").read_text())
    assert "text_cleanup.py" in spec["text"]["cleanup"]["first"]

    def onnx_embed(texts: list[str], cleanup_first: bool) -> np.ndarray:
        texts = [cleanup.fix_text(t) for t in texts] if cleanup_first else texts
        ids = np.array([e.ids for e in hf.encode_batch(texts)], dtype=np.int64)
        return session.run(None, {"tokens": ids})[0]

    reference = coembed.load(model_dir, device="cpu")
    texts = BY_TOKENIZER_JSON + NEEDS_FIX_TEXT
    want = reference.embed_texts(texts)
    full = np.abs(onnx_embed(texts, cleanup_first=True) - want).max()
    n = len(BY_TOKENIZER_JSON)
    alone = np.abs(onnx_embed(BY_TOKENIZER_JSON, cleanup_first=False) - want[:n]).max()
    print(f"max abs difference: with fix_text {full:.2e}, tokenizer.json alone {alone:.2e}")
    assert full <= ATOL and alone <= ATOL
    # The case that showed the bug: mixed case, no fix_text needed.
    one = onnx_embed(["Two BLUE rhombuses!"], cleanup_first=False)
    np.testing.assert_allclose(one, reference.embed_texts(["Two BLUE rhombuses!"]), atol=ATOL)


def test_clean_text_is_fix_text_then_the_normalizer():
    texts = BY_TOKENIZER_JSON + NEEDS_FIX_TEXT + random_captions(200, seed=1)
    normalizer = cleanup_normalizer()
    assert [normalizer.normalize_str(fix_text(t)) for t in texts] == [clean_text(t) for t in texts]
