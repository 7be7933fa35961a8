"""The request and response bodies of the HTTP API; they are its OpenAPI schema.

The bounds a request must keep (k, text length, how many texts or images to embed) are declared
here, on the fields, so that FastAPI refuses a body over them with a 422 before any work starts.
"""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel, ConfigDict, Field

from coembed.errors import UsageError

MAX_K = 1000
DEFAULT_K = 10
MAX_TEXT_CHARS = 2_000  # the model reads ~77 tokens at most; longer only costs cleaning time
MAX_EMBED_TEXTS = 256
MAX_EMBED_IMAGES = 16


class SearchRequest(BaseModel):
    """Exactly one of ``text``, ``query``, ``image`` or ``id``, and ``k``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="a text, verbatim")
    query: str | None = Field(
        None,
        max_length=MAX_TEXT_CHARS,
        description='a compositional query, e.g. "a red circle" - "red" + "blue" or image:17 - "cat"',
    )
    image: str | None = Field(None, description="an image file, base64 (a data: URL is fine)")
    id: int | None = Field(None, ge=0, description="an indexed item: more like this one")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="how many results")


# One result row. (The name is the schema's component name, kept so clients' generated code
# stays valid; the library's own ``coembed.index.SearchResult`` is a whole search.)
class SearchResult(BaseModel):
    rank: int
    id: int
    score: float
    item: str = Field(
        description="the text, or the image file relative to the indexed folder "
        "(its absolute path when the server runs with --show-paths)"
    )
    name: str = Field(description="the text, or the image file relative to the indexed folder")
    url: str | None = None
    thumbnail: str | None = None
    captions: list[str] | None = None


class SearchResponse(BaseModel):
    query: str
    k: int
    took_ms: float
    results: list[SearchResult]


class FilterRequest(SearchRequest):
    """Exactly one of ``text``, ``query``, ``image`` or ``id``, and ``min_score``, ``k`` or both."""

    min_score: float | None = Field(
        None, ge=-1, le=1, description="every item whose cosine similarity reaches this"
    )
    k: int | None = Field(  # type: ignore[assignment]
        None, ge=1, le=MAX_K, description="at most this many items (alone: the k best)"
    )


class FilterResponse(BaseModel):
    query: str
    min_score: float | None
    k: int | None
    count: int
    truncated: bool = Field(
        description=f"more items matched than were returned (k, at most {MAX_K})"
    )
    took_ms: float
    results: list[SearchResult]


class ClassifyRequest(BaseModel):
    """Exactly one of ``image`` (base64) or ``id``, and ``k``: the k likeliest classes."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="an image file, base64 (a data: URL is fine)")
    id: int | None = Field(None, ge=0, description="an indexed item")
    k: int = Field(5, ge=1, le=MAX_K, description="how many classes")


class ClassScore(BaseModel):
    rank: int
    label: str = Field(description="the class name")
    probability: float


class ClassifyResponse(BaseModel):
    took_ms: float
    classes: list[ClassScore]


class EmbedRequest(BaseModel):
    """Exactly one of ``texts`` or ``images`` (base64)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] | None = Field(None, min_length=1, max_length=MAX_EMBED_TEXTS)
    images: list[str] | None = Field(None, min_length=1, max_length=MAX_EMBED_IMAGES)


class EmbedResponse(BaseModel):
    dim: int
    vectors: list[list[float]]


class Health(BaseModel):
    status: str
    items: int
    modality: str
    kind: str
    dim: int


# Every 4xx and 5xx answer: one object with one key (see coembed.serve.http).
class ErrorBody(BaseModel):
    error: str


def decode_base64(data: str, field: str) -> bytes:
    """Bytes of a base64 string or a ``data:...;base64,`` URL; UsageError if it is neither."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(
            f"{field}: not valid base64; send the image file's bytes base64-encoded"
        ) from None
    if not raw:
        raise UsageError(f"{field}: empty image")
    return raw
