"""HTTP limits and errors: the body-size limit, the one error shape, and the exception handlers.

Every client mistake (bad JSON, a missing or extra field, k out of range, an empty query, a body
over the limit, a non-image or corrupt upload, too many pixels, a URL naming no item) is a 4xx
with one JSON object ``{"error": "..."}``; only a bug in the server is a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coembed.errors import CoembedError
from coembed.serve.schemas import ErrorBody

log = logging.getLogger("coembed.serve")

MAX_BODY_BYTES = 16 * 1024 * 1024  # a 12 MB image in base64, or a multipart upload of 16 MB

# The error answers every route may give, for the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "a bad request: invalid JSON, an empty query, an undecodable image"),
        (413, "the body or the image is over the limit"),
        (422, "a field is missing, of the wrong type or out of range"),
    )
}


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with a 413, declared or streamed (chunked).

    A declared Content-Length over the limit is refused before reading anything; a streamed
    body is counted as the endpoint reads it. (Plain ASGI, so it works with every FastAPI.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, 400, "Content-Length is not a number")
                return
            if int(declared) > self.max_bytes:
                await _send_error(send, 413, self._message(int(declared)))
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message(seen, at_least=True))
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        return (
            f"request body of {'over ' if at_least else ''}{size:,} bytes is over the limit of "
            f"{self.max_bytes:,}; send a smaller image"
        )


async def _send_error(send: Send, status: int, message: str) -> None:
    """The error shape at the ASGI level, for answers sent before the app has the request."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_response(status: int, message: str) -> JSONResponse:
    """The one error shape, ``{"error": message}``, with its status."""
    return JSONResponse({"error": message}, status_code=status)


def validation_error(exc: RequestValidationError) -> tuple[int, str]:
    """The status and message for a request FastAPI could not parse into a route's arguments."""
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            return 400, f"the request body is not valid JSON ({reason})"
    in_path = [error for error in errors if error.get("loc", ())[:1] == ("path",)]
    if in_path:
        # A URL names a resource: /images/x names no item, just as /images/-1 does.
        shown = ", ".join(str(error.get("input")) for error in in_path)
        return 404, f"no item {shown}: an id is a whole number, the id of a search result"
    parts = []
    for error in errors[:5]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(*validation_error(exc))


async def _user_error(request: Request, exc: CoembedError) -> JSONResponse:
    too_large = getattr(exc, "reason", None) == "too large"
    return error_response(413 if too_large else 400, str(exc))


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("error serving %s %s", request.method, request.url.path)
    return error_response(500, "internal server error (a bug: the server log has the details)")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception a route raises in the error shape: 4xx for a client, 500 for a bug."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(CoembedError, _user_error)
    app.add_exception_handler(Exception, _bug)
