"""Caption tokenizer: CLIP's BPE (token-identical to ``open_clip.tokenize``) or a BPE trained on captions.

Both kinds are one HF ``tokenizers`` pipeline stored as a ``tokenizer.json``:

    caption ─► clean_text (ftfy, HTML unescape ×2, whitespace, lower-case: coembed.text_cleanup)
            ─► split into words with CLIP's word pattern ─► bytes as printable characters
            ─► BPE with an end-of-word suffix ``</w>``
            ─► [SOT, tokens..., EOT, pad...] truncated/padded to ``context_length``

The word pattern is the one open_clip uses (``'s|'t|...|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``,
case-insensitive). HF runs it with Oniguruma, whose Unicode tables are older than those of the
``regex`` module open_clip uses, so the letter/number/other classes are written out as explicit
code point ranges computed with ``regex`` when the tokenizer is built.

A tokenizer.json written for use without coembed (``Tokenizer.standalone_json``, as an ONNX
export ships it) also carries the clean-up's whitespace and case steps as its normalizer.

CLIP's tokenizer is converted once from the merges file open_clip_torch ships and stored gzipped
in ``coembed/assets``; :func:`build_clip_asset` regenerates it (see its docstring).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from coembed.errors import ConfigError, ModelDirError, UsageError
from coembed.files import atomic_write_bytes
from coembed.text_cleanup import clean_text
from coembed.text_cleanup import skips_ftfy as skips_ftfy  # re-exported, as before its move

SOT = "<start_of_text>"
EOT = "<end_of_text>"
PAD = "<pad>"
END_OF_WORD = "</w>"
TOKENIZER_FILE = "tokenizer.json"

CLIP_ASSET = Path(__file__).parent / "assets" / "clip_tokenizer.json.gz"
CLIP_CONTEXT_LENGTH = 77
# CLIP's vocabulary is 256 bytes + 256 bytes with </w> + 48,894 merges + 2 special tokens = 49,408;
# the merges file holds more lines than that, of which CLIP uses the first 48,894.
CLIP_NUM_MERGES = 49408 - 512 - 2
_BASE_SIZE = 512  # bytes, and bytes ending a word
_CHUNK_CACHE_SIZE = 1 << 18  # distinct space-separated chunks remembered (tens of MB at most)


def byte_alphabet() -> list[str]:
    """Return the 256 characters standing for bytes 0..255, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen) are
    shifted to U+0100 onwards so every byte is a visible, non-space character. The order is the
    printable bytes first, then the shifted ones, which is how CLIP numbers its first 256 tokens.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(0x100 + i) for i in range(len(shifted))]


def _code_point_class(members: Iterable[str]) -> str:
    """Return an Oniguruma character class ``[...]`` matching exactly the given characters."""
    ranges: list[list[int]] = []
    for cp in sorted(ord(c) for c in members):
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    parts = (f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges)
    return "[" + "".join(parts) + "]"


@functools.lru_cache(maxsize=1)  # ~1 s of scanning every code point; the answer never changes
def word_pattern() -> str:
    """Return CLIP's word-splitting regex, rewritten for HF tokenizers (Oniguruma).

    open_clip matches ``<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
    [^\\s\\p{L}\\p{N}]+`` with ``regex.IGNORECASE``. Every class and case-insensitive literal is
    expanded here into the exact set of characters ``regex`` matches, because Oniguruma's Unicode
    tables differ (about 17,000 newer letters) and case folding adds members (``'ſ`` matches
    ``'s``; U+0345 matches neither ``[\\p{L}]`` nor its complement).
    """
    import regex  # open_clip's regex engine; only needed when building a tokenizer

    code_points = "".join(chr(i) for i in range(0x110000) if not 0xD800 <= i < 0xE000)

    def members(pattern: str) -> set[str]:
        return set(regex.findall(pattern, code_points, flags=regex.IGNORECASE))

    def literal(word: str) -> str:
        # Each character becomes the class of everything it matches case-insensitively.
        out = []
        for ch in word:
            variants = members(regex.escape(ch))
            out.append(re.escape(ch) if variants == {ch} else _code_point_class(variants))
        return "".join(out)

    literals = [SOT, EOT, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    letters = _code_point_class(members(r"[\p{L}]"))
    number = _code_point_class(members(r"[\p{N}]"))
    other = _code_point_class(members(r"[^\s\p{L}\p{N}]"))
    return "|".join([*map(literal, literals), letters + "+", number, other + "+"])


@functools.lru_cache(maxsize=1)
def shipped_word_pattern() -> str:
    """``word_pattern()`` as stored in the shipped CLIP tokenizer: the same string, without the
    seconds of scanning every code point (a test checks the asset against a fresh build)."""
    spec = json.loads(gzip.decompress(CLIP_ASSET.read_bytes()))
    return spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]


@functools.lru_cache(maxsize=1)  # a scan of every assigned code point: about a second
def cleanup_normalizer() -> normalizers.Normalizer:
    """Return the HF normalizer doing the part of ``clean_text`` that HF can express.

    In order: NFC (ftfy's last step), every run of the characters ``str.split`` splits on to one
    space, the ends stripped, then ``str.lower``. HF lower-cases one character at a time, so
    Python's final sigma (Σ ending a word becomes ς) is a Replace before it, its context classes
    taken from Python's own tables as for ``word_pattern``: a cased, not case-ignorable letter
    before the Σ (case-ignorable ones between), none after.
    """
    # Planes 4-13 are unassigned and 15-16 private use: no spaces, no cased letters there.
    assigned = chain(range(1, 0xD800), range(0xE000, 0x40000), range(0xE0000, 0xF0000))
    code_points = list(map(chr, assigned))
    spaces = [c for c in code_points if c.isspace()]
    # Only runs and spaces other than " " are replaced: HF rebuilds the string per replacement.
    space_runs = f"{_code_point_class(spaces)}{{2,}}|{_code_point_class(set(spaces) - {' '})}"

    def sigma_ends(prefix: str) -> set[str]:
        # Each x as prefix + x + "Σ", lower-cased in one call: NUL (neither cased nor
        # case-ignorable) separates them as the end of the text would.
        lowered = "\0".join(prefix + c + "Σ" for c in code_points).lower().split("\0")
        return {c for c, low in zip(code_points, lowered) if low[-1] == "ς"}

    # Python's lower-case of "xΣ" ends in ς exactly when x is cased and not case-ignorable;
    # of "AxΣ" when x is case-ignorable or cased.
    cased = sigma_ends("")
    ignorable = sigma_ends("A") - cased
    letter, skip = _code_point_class(cased), _code_point_class(ignorable)
    final_sigma = f"(?<={letter}{skip}*)\u03a3(?!{skip}*{letter})"
    return normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex(space_runs), " "),
            normalizers.Strip(),
            normalizers.Replace(Regex(final_sigma), "\u03c2"),
            normalizers.Lowercase(),
        ]
    )


def _pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    # invert=True + "removed" keeps the regex matches as words and drops the rest (spaces), like
    # re.findall; ByteLevel then maps each UTF-8 byte to its printable stand-in.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _assemble(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    pattern: str,
    pad_token: str,
    context_length: int,
) -> HFTokenizer:
    """Return an HF tokenizer with our pipeline around a BPE of ``vocab`` and ``merges``."""
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD))
    hf.pre_tokenizer = _pre_tokenizer(pattern)
    # SOT/EOT are plain vocabulary entries, not HF "added tokens": HF would cut added tokens out
    # of the raw text anywhere, while open_clip only recognizes them where its word regex starts
    # a match (see Tokenizer._special_chunk_ids).
    hf.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    hf.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " ")])
    _set_context_length(hf, context_length, vocab[pad_token], pad_token)
    return hf


def _set_context_length(hf: HFTokenizer, context_length: int, pad_id: int, pad_token: str) -> None:
    if not isinstance(context_length, int) or context_length < 2:
        raise ConfigError(
            f"context_length must be an integer >= 2 (room for start and end tokens), got {context_length!r}"
        )
    # Truncation counts the two tokens the post-processor adds, so a long caption keeps
    # [SOT, first L-2 tokens, EOT]: what open_clip gets by cutting at L and rewriting the last id.
    hf.enable_truncation(max_length=context_length)
    hf.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)


def read_clip_merges(merges_path: str | os.PathLike) -> list[tuple[str, str]]:
    """Return CLIP's merges from open_clip's ``bpe_simple_vocab_16e6.txt.gz``, best first."""
    lines = gzip.open(merges_path, "rt", encoding="utf-8").read().split("\n")
    # Line 0 is a version header; CLIP uses only the first CLIP_NUM_MERGES merges after it.
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_NUM_MERGES]]
    if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise UsageError(f"{merges_path} is not CLIP's BPE merges file")
    return merges  # type: ignore[return-value]


def open_clip_merges_path() -> Path:
    """Return the path of the merges file inside the installed open_clip_torch package."""
    spec = importlib.util.find_spec("open_clip")  # locate without importing torch-heavy open_clip
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "open_clip_torch is not installed; install the dev extra (pip install -e '.[dev]') "
            "to rebuild the CLIP tokenizer"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_json(merges_path: str | os.PathLike | None = None) -> str:
    """Return CLIP's tokenizer.json text, converted from open_clip's merges file."""
    merges = read_clip_merges(merges_path or open_clip_merges_path())
    alphabet = byte_alphabet()
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges]
    tokens += [SOT, EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    # CLIP pads with 0 ("!"); the model finds the end at the first EOT, so the collision is harmless.
    hf = _assemble(vocab, merges, word_pattern(), alphabet[0], CLIP_CONTEXT_LENGTH)
    return hf.to_str()


def build_clip_asset(
    merges_path: str | os.PathLike | None = None, output: str | os.PathLike = CLIP_ASSET
) -> Path:
    """Convert open_clip's merges file into the shipped gzipped tokenizer.json; return its path.

    A maintainer's step, run only when the asset must be rebuilt, from a shell::

        python -c "from coembed.tokenizer import build_clip_asset; print(build_clip_asset())"

    ``merges_path`` defaults to the file of the installed open_clip_torch (the dev extra).
    """
    data = gzip.compress(build_clip_json(merges_path).encode("utf-8"), mtime=0)
    return atomic_write_bytes(Path(output), data)


def _json_path(path: str | os.PathLike) -> Path:
    # A path ending in .json is the file itself; anything else is a (model) directory.
    path = Path(path)
    return path if path.suffix == ".json" else path / TOKENIZER_FILE


class Tokenizer:
    """Turns captions into fixed-length id rows ``[SOT, tokens..., EOT, pad...]``.

    Build with :meth:`clip`, :meth:`train` or :meth:`load`; call on a string or a list of strings.
    """

    def __init__(self, hf: HFTokenizer):
        padding = hf.padding
        sot, eot = hf.token_to_id(SOT), hf.token_to_id(EOT)
        if (
            padding is None
            or not isinstance(padding.get("length"), int)
            or sot is None
            or eot is None
        ):
            raise ValueError(
                "not a coembed tokenizer: needs <start_of_text>, <end_of_text> and a fixed length"
            )
        self._hf = hf
        # The same model and word splitting without SOT/EOT, truncation or padding: our cache works
        # on words, and rows are assembled in numpy (the HF Encoding objects are the slow part).
        self._words = HFTokenizer(hf.model)
        self._words.pre_tokenizer = hf.pre_tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}
        self.context_length: int = padding["length"]
        self.pad_id: int = padding["pad_id"]
        self.sot_id: int = sot
        self.eot_id: int = eot
        self.vocab_size: int = hf.get_vocab_size()

    @classmethod
    def clip(cls, context_length: int = CLIP_CONTEXT_LENGTH) -> Tokenizer:
        """Return CLIP's tokenizer (49,408 tokens, pad 0), token-identical to ``open_clip.tokenize``."""
        hf = HFTokenizer.from_str(gzip.decompress(CLIP_ASSET.read_bytes()).decode("utf-8"))
        _set_context_length(hf, context_length, 0, hf.id_to_token(0))
        return cls(hf)

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int, context_length: int = CLIP_CONTEXT_LENGTH
    ) -> Tokenizer:
        """Return a BPE tokenizer learned on ``captions`` with at most ``vocab_size`` tokens.

        Clean-up, word splitting and special tokens are CLIP's. Ids 0, 1, 2 are ``<pad>``,
        ``<start_of_text>``, ``<end_of_text>``; then the 512 byte tokens; then one token per merge,
        learned until ``vocab_size`` is reached or no pair of symbols repeats.
        """
        if not isinstance(vocab_size, int) or vocab_size < 3 + _BASE_SIZE:
            raise ConfigError(
                f"vocab_size must be at least {3 + _BASE_SIZE} (3 special + 512 byte tokens), got {vocab_size!r}"
            )
        pattern = shipped_word_pattern()
        learner = HFTokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
        learner.pre_tokenizer = _pre_tokenizer(pattern)
        # The trainer counts its alphabet (<= 256 bytes + <= 256 word-final bytes) in its vocabulary,
        # so this size leaves room for at least the vocab_size - 515 merges we keep.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 3,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix=END_OF_WORD,
        )
        learner.train_from_iterator((clean_text(c) for c in captions), trainer)
        learned = json.loads(learner.to_str())["model"]["merges"]

        alphabet = byte_alphabet()
        tokens = [PAD, SOT, EOT] + alphabet + [c + END_OF_WORD for c in alphabet]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges: list[tuple[str, str]] = []
        for merge in learned:
            if len(vocab) == vocab_size:
                break
            # tokenizers writes merges as ["a", "b"] (or "a b" before 0.20).
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))  # two merges may spell the same token
        return cls(_assemble(vocab, merges, pattern, PAD, context_length))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Return the tokenizer saved at ``path`` (a tokenizer.json or a directory holding one).

        Raises ModelDirError when the file is missing, truncated or not a coembed tokenizer.
        """
        file = _json_path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelDirError(f"tokenizer file {file} is missing") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelDirError(f"cannot read tokenizer file {file}: {e}") from None
        try:
            json.loads(text)
        except json.JSONDecodeError:
            raise ModelDirError(f"tokenizer file {file} is truncated or not JSON") from None
        try:
            return cls(HFTokenizer.from_str(text))
        except Exception:  # tokenizers raises a bare Exception for a malformed tokenizer.json
            raise ModelDirError(
                f"{file} is not a coembed tokenizer.json (HF tokenizers format with "
                f"{SOT}, {EOT} and a fixed padding length)"
            ) from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json (context length included) atomically; return the file's path.

        ``path`` is the file (ending in .json) or a directory to write tokenizer.json into.
        """
        return atomic_write_bytes(_json_path(path), self._hf.to_str().encode("utf-8"))

    def standalone_json(self) -> str:
        """Return this tokenizer as a tokenizer.json that also cleans captions, for use without coembed.

        Its normalizer is :func:`cleanup_normalizer`; what it cannot do is
        ``coembed.text_cleanup.fix_text`` (ftfy, HTML entities), to be called on a caption first.
        With it, HF's encoding equals this tokenizer's ids but for the few captions that module's
        docstring lists (special-token spellings, entities of non-NFC characters, letters newer
        than Python's Unicode database).
        """
        hf = HFTokenizer.from_str(self._hf.to_str())
        hf.normalizer = cleanup_normalizer()
        return hf.to_str()

    def __call__(self, texts: str | Iterable[str]) -> torch.Tensor:
        """Return a LongTensor (N, context_length) of ids; a single string gives (1, context_length)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        # Captions repeat a lot (templates, epochs, several per image): clean and encode each once.
        index: dict[str, int] = {}
        for text in texts:
            if text not in index:
                if not isinstance(text, str):
                    raise TypeError(f"captions must be strings, got {type(text).__name__}")
                index[text] = len(index)
        rows = self._rows([self._chunk_ids(clean_text(t).split(" ")) for t in index])
        if len(index) != len(texts):
            rows = rows[np.fromiter(map(index.__getitem__, texts), np.intp, len(texts))]
        return torch.from_numpy(rows)

    def _chunk_ids(self, chunks: list[str]) -> list[int]:
        """Return the BPE ids of a cleaned caption given as its space-separated chunks.

        No word of CLIP's pattern contains or crosses a space, so a caption's ids are its
        chunks' ids one after the other. Chunks ("dog", "beach,", "#12") repeat across captions far
        more than captions do, so each distinct chunk is encoded once and remembered, like
        open_clip's per-word BPE cache.
        """
        cache = self._cache
        try:
            return [i for c in chunks for i in cache[c]]
        except KeyError:
            self._fill_cache(chunks)
            return [i for c in chunks for i in cache[c]]

    def _fill_cache(self, chunks: list[str]) -> None:
        """Encode and remember every chunk of one caption that is not cached."""
        if len(self._cache) + len(chunks) > _CHUNK_CACHE_SIZE:
            self._cache.clear()  # bound memory on endless streams of new words
        for chunk in chunks:
            if chunk in self._cache:
                continue
            if SOT in chunk or EOT in chunk:
                ids = self._special_chunk_ids(chunk)
            else:
                # One encode per new chunk rather than encode_batch: no rayon thread pool, so
                # DataLoader workers forked later get no "process just got forked" warning,
                # and for single words it is as fast.
                ids = self._words.encode(chunk, add_special_tokens=False).ids
            # Tuples of ints are untracked by the garbage collector, lists would be rescanned.
            self._cache[chunk] = tuple(ids)

    def _special_chunk_ids(self, chunk: str) -> list[int]:
        """Return the ids of a chunk that spells a special token, numbered as open_clip does.

        open_clip's word regex tries the special tokens first wherever a match starts, so
        "<end_of_text>" alone is a real EOT id, while in "!<end_of_text>" the "<" joins the
        punctuation run and no special token is seen. Our word pattern reproduces that split;
        a word equal to a special token gets its id, every other word goes through BPE.
        """
        specials = {SOT: self.sot_id, EOT: self.eot_id}  # ASCII: their byte stand-ins are the same
        ids: list[int] = []
        for word, _ in self._words.pre_tokenizer.pre_tokenize_str(chunk):
            if word in specials:
                ids.append(specials[word])
            else:
                ids.extend(token.id for token in self._words.model.tokenize(word))
        return ids

    def _rows(self, seqs: list[list[int]]) -> np.ndarray:
        """Return int64 rows [SOT, seq[:L-2], EOT, pad...] (len(seqs), L); L = context_length."""
        n, length = len(seqs), self.context_length
        lens = np.fromiter(map(len, seqs), np.intp, n)
        flat = np.fromiter(chain.from_iterable(seqs), np.int64, int(lens.sum()))
        # Truncation keeps room for SOT and EOT, as open_clip's cut-at-L-then-write-EOT does.
        keep = np.minimum(lens, length - 2)
        rows = np.full((n, length), self.pad_id, dtype=np.int64)
        rows[:, 0] = self.sot_id
        # Scatter every kept id at once: token j of caption i goes to rows[i, 1 + j].
        row = np.repeat(np.arange(n), keep)  # (K,)
        col = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)  # (K,)
        rows[row, 1 + col] = flat[np.repeat(np.cumsum(lens) - lens, keep) + col]
        rows[np.arange(n), 1 + keep] = self.eot_id
        return rows

    def decode(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
        """Return the text of one id row: from after SOT up to the first EOT, words space-separated."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        # Every word ends in "</w>", now a space; the last one's is not wanted.
        return self._hf.decode(ids, skip_special_tokens=False).rstrip(" ")

    def __getstate__(self) -> str:
        # DataLoader workers and torch.save pickle the tokenizer: send the JSON once, not both
        # HF objects and the cache.
        return self._hf.to_str()

    def __setstate__(self, state: str) -> None:
        self.__init__(HFTokenizer.from_str(state))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"sot_id={self.sot_id}, eot_id={self.eot_id}, pad_id={self.pad_id})"
        )
