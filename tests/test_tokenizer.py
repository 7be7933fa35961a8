"""Tokenizer: token parity with open_clip, the ftfy fast path, the shipped asset, training, files."""

from __future__ import annotations

import gzip
import json
import pickle
import random
import string

import ftfy
import pytest
import torch

from coembed import tokenizer as tokenizer_module
from coembed.errors import ConfigError, ModelDirError
from coembed.tokenizer import EOT, SOT, Tokenizer, clean_text, skips_ftfy

open_clip = pytest.importorskip("open_clip")

WORDS = (
    "a an the dog cat photo of on in with red blue small large man woman child sitting standing "
    "beach park street kitchen table two three it's don't we're they've i'm you'll he'd cafe "
    "running airplane giraffe umbrella"
).split()
# fmt: off
FRAGMENTS = [
    # accents, composed and decomposed (ftfy's NFC joins the latter)
    "café", "cafe\u0301", "naïve", "Zürich", "São Paulo", "Ångström", "Å", "ÉCOLE", "straße", "İstanbul",
    # other scripts: CJK, kana, Hangul, Cyrillic, Greek (final sigma), Arabic, Hebrew, Devanagari, Thai
    "東京の夜景", "强大的模型", "ｶﾀｶﾅ", "한국어 문장", "Привет мир", "ΟΔΟΣ Σίσυφος", "مرحبا بالعالم",
    "שלום", "नमस्ते दुनिया", "ภาษาไทย",
    # emoji: single, ZWJ sequences, skin tones, flags, keycaps
    "😀", "🐶🐱", "👩\u200d👩\u200d👧", "👍🏽", "🇯🇵", "1\ufe0f\u20e3", "❤️",
    # punctuation and symbols, curly quotes, dashes, ellipsis, ligatures, fullwidth
    "!!!", "?!", "...", "…", "—", "–", "“quoted”", "it’s", "‘single’", "«guillemets»", "(parens)",
    "[brackets]", "{braces}", "@user", "#hashtag", "$19.99", "50%", "C++", "a/b\\c", "e-mail",
    "ﬁne ﬂower", "ＬＯＵＤ　ＮＯＩＳＥＳ", "©®™", "°C", "½", "x²", "→⇒", "_under_score_",
    # numbers in many forms
    "0", "42", "3.14159", "1,000,000", "2024-05-01", "12:30pm", "٣٤٥", "१२३", "Ⅻ", "①②",
    # HTML entities, single and double escaped, unknown and unterminated
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&quot;hi&quot;", "&#39;", "&#x263a;", "&nbsp;", "&amp;amp;",
    "&eacute;", "&EACUTE;", "&not that", "AT&T", "&#128512;", "&bogus;", "&", "<b>tag</b> &amp;",
    # whitespace of all kinds, controls, terminal escapes, C1 controls
    "\t", "\n", "\r\n", "\r", "  ", "\x0b", "\x0c", "\u00a0", "\u2003", "\u3000", "\u2028",
    "\x00", "\x07", "\x1b[31mred\x1b[0m", "\x7f", "\x1c", "\x85", "\x9d", "\u200b", "\ufeff",
    "\u2066", "\ufffd",
    # mojibake that ftfy repairs
    "cafÃ©", "â€™", "Ã¼ber", "Ã ", "Ã\xa0 la",
    # contractions, case-folded contraction letters, special token spellings
    "it'S", "IT'LL", "it'ſ", "'re", "''", "<start_of_text>", "<end_of_text>", "!<end_of_text>",
    "x<end_of_text>y", "<END_OF_TEXT>", "<ſtart_of_text>", "<start_of_text",
    # characters that Oniguruma's older Unicode tables do not know, and U+0345
    "\u0558", "\u088f", "\U00011de0", "\U0001246f", "a\u0345b",
]
# fmt: on


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """Return n deterministic, varied captions; the first few are the edge cases."""
    rng = random.Random(seed)
    corpus = ["", " ", "\n\t ", "a", "A", "!", "a dog", "a" * 1000, "dog " * 400, "é" * 300]
    corpus += FRAGMENTS
    while len(corpus) < n:
        kind = rng.random()
        if kind < 0.4:  # ordinary captions
            parts = [rng.choice(WORDS) for _ in range(rng.randint(1, 15))]
        elif kind < 0.9:  # captions with fragments mixed in
            parts = [rng.choice(WORDS + FRAGMENTS) for _ in range(rng.randint(1, 12))]
        else:  # random printable / unicode noise, including very long lines
            alphabet = string.printable + "".join(FRAGMENTS)
            parts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))]
        separator = rng.choice([" ", " ", " ", "", "\t", "\n", "  ", ","])
        text = separator.join(parts)
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        corpus.append(text)
    return corpus


@pytest.fixture(scope="module")
def clip() -> Tokenizer:
    return Tokenizer.clip()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus(12_000)


@pytest.fixture(scope="module")
def expected(corpus: list[str]) -> torch.Tensor:
    return open_clip.tokenize(corpus)


def test_parity_with_open_clip_on_varied_corpus(
    clip: Tokenizer, corpus: list[str], expected: torch.Tensor
):
    assert len(set(corpus)) >= 10_000
    got = clip(corpus)
    assert got.dtype == torch.long and got.shape == (len(corpus), 77)
    bad = [corpus[i] for i in (got != expected).any(dim=1).nonzero().flatten().tolist()]
    assert not bad, f"{len(bad)} captions differ from open_clip, e.g. {bad[:3]!r}"
    # The corpus reaches the slow paths too, or this test would prove little.
    assert sum(not skips_ftfy(t) for t in corpus) > 3000
    assert ((expected == clip.eot_id).sum(dim=1) >= 2).any()  # an EOT spelled in a caption
    assert (expected[:, -1] == clip.eot_id).sum() > 100  # truncated captions


def test_tokenizer_json_alone_matches_open_clip(
    clip: Tokenizer, corpus: list[str], expected: torch.Tensor
):
    # The saved pipeline (split, bytes, BPE, SOT/EOT, truncation, padding) run by HF itself, for
    # users of the tokenizer.json without coembed: only clean-up and special spellings are ours.
    cleaned = [clean_text(t) for t in corpus]
    keep = [i for i, t in enumerate(cleaned) if SOT not in t and EOT not in t]
    hf = tokenizer_module.HFTokenizer.from_str(clip._hf.to_str())
    ids = torch.tensor([e.ids for e in hf.encode_batch([cleaned[i] for i in keep])])
    assert torch.equal(ids, expected[keep])


def test_parity_with_repeats_and_across_calls(clip: Tokenizer, corpus: list[str]):
    rng = random.Random(1)
    batch = [rng.choice(corpus[:300]) for _ in range(2000)]
    assert torch.equal(clip(batch), open_clip.tokenize(batch))
    assert torch.equal(clip(batch[:7]), open_clip.tokenize(batch[:7]))  # cached chunks reused


def test_bounded_chunk_cache_stays_exact(corpus: list[str], expected: torch.Tensor, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_CHUNK_CACHE_SIZE", 50)
    tok = Tokenizer.clip()
    assert torch.equal(tok(corpus[:2000]), expected[:2000])
    assert len(tok._cache) <= 50 + 400  # cleared whenever full; one caption may overshoot


def test_ftfy_fast_path_is_exact(corpus: list[str]):
    skipped = [t for t in corpus if skips_ftfy(t)]
    assert len(skipped) > 3000
    assert all(ftfy.fix_text(t) == t for t in skipped)
    # Random strings over the allowed ASCII alphabet, including the characters ftfy looks at
    # in context ("<", ";", "#", digits, "\t", "\n", "\x0c").
    rng = random.Random(2)
    allowed = [chr(c) for c in range(128) if skips_ftfy(chr(c))]
    assert len(allowed) == 94 + 3  # printable ASCII but "&"; \t, \n, \x0c
    for _ in range(3000):
        text = "".join(rng.choice(allowed) for _ in range(rng.randint(1, 40)))
        assert ftfy.fix_text(text) == text, repr(text)
    # Every ASCII character kept out of the fast path is one ftfy can change.
    for c in (chr(c) for c in range(128) if not skips_ftfy(chr(c))):
        assert any(ftfy.fix_text(t) != t for t in (f"a{c}b", f"a{c}amp;", f"a{c}[1mb")), repr(c)


@pytest.mark.parametrize("context_length", [2, 5, 16, 77])
def test_truncation_keeps_end_token(context_length: int):
    tok = Tokenizer.clip(context_length=context_length)
    texts = ["a dog on a beach " * 30, "short", "", "one two three four five six"]
    ids = tok(texts)
    assert ids.shape == (4, context_length)
    assert torch.equal(ids, open_clip.tokenize(texts, context_length=context_length))
    assert ids[0, -1] == tok.eot_id and ids[0, 0] == tok.sot_id


def test_empty_and_single_string(clip: Tokenizer):
    ids = clip("")
    assert ids.shape == (1, 77)
    assert ids[0, :2].tolist() == [clip.sot_id, clip.eot_id] and (ids[0, 2:] == clip.pad_id).all()
    assert torch.equal(clip(" \t\n "), ids)
    assert (clip.sot_id, clip.eot_id, clip.pad_id, clip.vocab_size) == (49406, 49407, 0, 49408)
    assert clip.decode(clip(["A Dog's  DAY!"])[0]) == "a dog 's day !"
    with pytest.raises(TypeError):
        clip(["a dog", None])


def test_special_token_spellings_follow_open_clip(clip: Tokenizer):
    texts = ["a <end_of_text> b", "!<end_of_text>", "<start_of_text>", "x <START_OF_TEXT>y"]
    ids = clip(texts)
    assert torch.equal(ids, open_clip.tokenize(texts))
    assert ids[0, 2] == clip.eot_id  # a real end token in the middle, as in open_clip
    assert (ids[1] == clip.eot_id).nonzero()[0] > 2  # "<" joined "!", so no special token


def test_shipped_clip_asset_equals_fresh_conversion(tmp_path):
    output = tmp_path / "clip.json.gz"
    assert tokenizer_module.build_clip_asset(output=output) == output
    fresh = gzip.decompress(output.read_bytes())
    assert fresh == gzip.decompress(tokenizer_module.CLIP_ASSET.read_bytes())
    model = json.loads(fresh)["model"]
    assert len(model["vocab"]) == 49408 and len(model["merges"]) == 48894


def train_captions() -> list[str]:
    rng = random.Random(3)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]


def test_trained_tokenizer_vocab_size_and_round_trip(tmp_path):
    captions = train_captions()
    tok = Tokenizer.train(captions, vocab_size=600, context_length=32)
    assert tok.vocab_size == 600
    assert (tok.pad_id, tok.sot_id, tok.eot_id, tok.context_length) == (0, 1, 2, 32)
    texts = captions[:50] + ["unseen 東京 😀 words", "", "Photo OF a DOG!!"]
    ids = tok(texts)
    assert ids.shape == (len(texts), 32) and int(ids.max()) < 600
    assert (ids[:, 0] == tok.sot_id).all() and ((ids == tok.eot_id).sum(dim=1) == 1).all()
    # Decoding joins words with spaces, so only captions without "it's"-style splits come back.
    plain = [i for i, c in enumerate(captions[:50]) if "'" not in c]
    assert plain and all(tok.decode(ids[i]) == clean_text(captions[i]) for i in plain)
    assert tok.decode(ids[-3]) == "unseen 東京 😀 words"  # bytes cover what training never saw
    # Frequent words became single tokens: fewer tokens than bytes.
    assert int((ids[:50] != tok.pad_id).sum()) < sum(len(c) for c in captions[:50]) / 2

    path = tok.save(tmp_path / "model")
    assert path == tmp_path / "model" / "tokenizer.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]  # no temp files
    loaded = Tokenizer.load(tmp_path / "model")
    assert torch.equal(loaded(texts), ids)
    assert repr(loaded) == repr(tok)
    assert torch.equal(pickle.loads(pickle.dumps(tok))(texts), ids)  # DataLoader workers


def test_training_on_little_data_and_bad_sizes():
    tok = Tokenizer.train(["a dog", "a cat"], vocab_size=5000, context_length=8)
    assert 515 < tok.vocab_size < 530  # stops when no pair repeats
    assert tok.decode(tok("a dog")[0]) == "a dog"
    with pytest.raises(ConfigError):
        Tokenizer.train(["a dog"], vocab_size=100)
    with pytest.raises(ConfigError):
        Tokenizer.clip(context_length=1)


def test_clip_save_load_keeps_context_length(tmp_path):
    tok = Tokenizer.clip(context_length=16)
    tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.context_length == 16 and loaded.vocab_size == 49408
    texts = make_corpus(300, seed=4)
    assert torch.equal(loaded(texts), open_clip.tokenize(texts, context_length=16))


def test_load_errors_name_the_file(tmp_path):
    good = Tokenizer.clip(context_length=8).save(tmp_path / "good.json").read_text()
    cases = {
        "missing.json": None,
        "truncated.json": good[: len(good) // 2],
        "empty.json": "",
        "other.json": json.dumps({"weights": [1, 2, 3]}),
        "plain_hf.json": tokenizer_module.HFTokenizer(tokenizer_module.models.BPE()).to_str(),
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ModelDirError) as info:
            Tokenizer.load(tmp_path / name)
        message = str(info.value)
        assert name in message and "\n" not in message, message
    with pytest.raises(ModelDirError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "no_such_model_dir")


def test_trained_tokenizer_uses_the_same_word_pattern_as_a_fresh_build():
    from coembed.tokenizer import shipped_word_pattern, word_pattern

    assert shipped_word_pattern() == word_pattern()
