"""CLIP's caption clean-up, the first stage of coembed's tokenizer, in one standalone file.

coembed cleans every caption as open_clip does before splitting it into words::

    fix_text(text)       ftfy.fix_text, then HTML unescape twice      (this file only)
    ─► whitespace runs collapsed to one space, ends stripped, lower-cased (also tokenizer.json)

An ONNX export ships this file as ``text_cleanup.py`` beside its ``tokenizer.json``, whose
normalizer does the second line (and NFC, as ftfy does). A program that tokenizes with the
exported tokenizer.json alone gets case, accents and whitespace right; calling ``fix_text``
first gives coembed's tokens::

    from text_cleanup import fix_text
    ids = tokenizers.Tokenizer.from_file("tokenizer.json").encode(fix_text(caption)).ids

They can still differ for a caption that spells ``<start_of_text>`` or ``<end_of_text>``
(coembed gives those their special ids), an HTML entity that decodes to a character NFC changes
(ftfy composes before the entities are decoded, the normalizer after), and letters newer than
this Python's Unicode database (``str.lower`` leaves them alone, tokenizers lower-cases them).

This module imports nothing from coembed (only ftfy and the standard library), so the copy in
an export runs without coembed installed.
"""

from __future__ import annotations

import html
import re

import ftfy

# ftfy.fix_text leaves a string unchanged when every fixer leaves it unchanged. For ASCII text
# only five can act: unescape_html (needs "&"), remove_terminal_escapes (needs ESC, a control
# char), fix_line_breaks (needs "\r"; NEL, LS and PS are not ASCII), remove_control_chars
# (U+00-08, U+0B, U+0E-1F, U+7F) and the mojibake fixer, which returns ASCII text as it is.
# NFC, width, quote, ligature, C1 and surrogate fixes only touch non-ASCII characters.
_NOT_FTFY_IDENTITY_ASCII = re.compile(r"[&\r\x00-\x08\x0b\x0e-\x1f\x7f]")


def skips_ftfy(text: str) -> bool:
    """Return True when ``ftfy.fix_text(text) == text`` is known without running ftfy.

    True for ASCII text without "&", "\\r" and the control characters ftfy removes.
    """
    return text.isascii() and _NOT_FTFY_IDENTITY_ASCII.search(text) is None


def fix_text(text: str) -> str:
    """Return ``text`` after ftfy.fix_text and two rounds of HTML unescaping.

    This is the part of the clean-up a tokenizer.json normalizer cannot express. ftfy is
    skipped for ASCII strings it provably leaves unchanged, which is most captions and most of
    ftfy's cost.
    """
    if not skips_ftfy(text):
        text = ftfy.fix_text(text)
    # html.unescape returns at once when there is no "&".
    return html.unescape(html.unescape(text))


def clean_text(text: str) -> str:
    """Return ``text`` cleaned exactly as open_clip's default ("lower") clean-up does.

    That is :func:`fix_text`, whitespace runs (``str.split``'s) collapsed to one space and the
    ends stripped, then lower-cased.
    """
    return " ".join(fix_text(text).split()).lower()
