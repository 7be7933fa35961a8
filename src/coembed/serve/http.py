"""HTTP limits and errors: the body-size limit, the one error shape, and the exception handlers;
the connection guard for slow clients; indexed files sent from an already opened descriptor.

Every client mistake (bad JSON, a missing or extra field, k out of range, an empty query, a body
over the limit, a non-image or corrupt upload, too many pixels, a URL naming no item, a malformed
request line, header or Range) is a 4xx with one JSON object ``{"error": "..."}``; only a bug in
the server is a 500.

Slow clients (slowloris): a request head must be complete within ``ConnectionLimits.head_timeout``
of connecting (or of the previous response), and a body must keep coming (no silence over that
long, all of it within ``body_timeout``): else 408 and the connection is closed. A process holds at
most ``max_connections``; one more evicts the connection that has waited longest for a request
head (an idle keep-alive or a slow client), and only when every one is busy with a request is the
newcomer refused with a 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, BinaryIO

import anyio
import h11
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from coembed.errors import CoembedError
from coembed.serve.schemas import ErrorBody

log = logging.getLogger("coembed.serve")

MAX_BODY_BYTES = 16 * 1024 * 1024  # a 12 MB image in base64, or a multipart upload of 16 MB


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take over a request, and how many connections one process holds."""

    # From connecting (or the previous response) to a complete request line and headers; also
    # the longest silence allowed inside a body. Browsers send a head in one packet.
    head_timeout: float = 10.0
    # A whole body: 16 MB, the largest allowed, needs 2.2 Mbit/s; a 3 MB photo 0.4 Mbit/s.
    body_timeout: float = 60.0
    # Lowered to fit the process's open-file limit (see connection_cap); asyncio holds a waiting
    # connection for ~10 KB, so a thousand take ~10 MB.
    max_connections: int = 1000
    # Connections the kernel queues before they are accepted; asyncio accepts up to this many at
    # once, before any is counted against max_connections.
    backlog: int = 128


def connection_cap(limits: ConnectionLimits) -> int:
    """``limits.max_connections``, lowered so the connections, a backlog accepted at once and
    100 files for the index, the model and the images fit in the process's open-file limit: a
    server out of files can accept no one, not even to close an idle connection for them."""
    try:
        import resource
    except ImportError:  # not on Windows
        return limits.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    return max(1, min(limits.max_connections, soft - 100 - 2 * limits.backlog))


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
    """Refuse request bodies over ``max_bytes`` with a 413, declared or streamed (chunked), and
    bodies slower than ``limits`` with a 408.

    A declared Content-Length over the limit is refused before reading anything; a streamed
    body is counted as the endpoint reads it. (Plain ASGI, so it works with every FastAPI.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int, limits: ConnectionLimits = ConnectionLimits()):
        self.app = app
        self.max_bytes = max_bytes
        self.limits = limits

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
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout

        async def counted() -> Message:
            nonlocal seen, complete
            if complete:  # after the body, receive() waits for a disconnect: no time limit
                return await receive()
            message = await self._timed(receive, deadline)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message(seen, at_least=True))
            return message

        await self.app(scope, counted, send)

    async def _timed(self, receive: Receive, deadline: float) -> Message:
        """The next message of a body, or a 408 when it is slower than the limits allow."""
        left = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(receive(), min(left, self.limits.head_timeout))
        except asyncio.TimeoutError:
            raise HTTPException(
                408,
                f"the request body came too slowly (a body must arrive within "
                f"{self.limits.body_timeout:g} s, with no pause over "
                f"{self.limits.head_timeout:g} s)",
                headers={"Connection": "close"},  # the rest of the body is not wanted
            ) from None

    def _message(self, size: int, at_least: bool = False) -> str:
        return (
            f"request body of {'over ' if at_least else ''}{size:,} bytes is over the limit of "
            f"{self.max_bytes:,}; send a smaller image"
        )


class HeadWithoutBody:
    """HEAD answers without their body (the headers, Content-Length included, stay those of a
    GET): uvicorn drops such a body itself, other servers and test clients may not."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, headers_only)


def error_bytes(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response in the error shape that closes the connection, for answers
    written to a socket before (or instead of) any request the app would see."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


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
    response = error_response(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})  # Allow for a 405, Content-Range for a 416
    return response


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


# --- indexed files --------------------------------------------------------------------------------


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes [start, end) a Range header asks of a file of ``size`` bytes, or None for the
    whole file: no header, another unit, or several ranges (HTTP lets a server send the whole).
    HTTPException 400 for a malformed range, 416 for one that starts past the end."""
    if header is None:
        return None
    unit, equals, ranges = header.partition("=")
    if not equals:
        raise HTTPException(400, f"Range {header!r} is malformed; send Range: bytes=START-END")
    if unit.strip().lower() != "bytes" or "," in ranges:
        return None
    match = re.fullmatch(r"\s*(\d*)-(\d*)\s*", ranges)
    if not match or not any(match.groups()):
        raise HTTPException(400, f"Range {header!r} is malformed; send Range: bytes=START-END")
    first, last = match.groups()
    unsatisfiable = HTTPException(
        416,
        f"Range {header!r} asks for no byte of this file of {size:,} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
    if not first:  # bytes=-N: the last N bytes
        if int(last) == 0:
            raise unsatisfiable
        return max(0, size - int(last)), size
    start = int(first)
    if last and int(last) < start:
        raise HTTPException(400, f"Range {header!r} ends before it starts")
    if start >= size:
        raise unsatisfiable
    return start, min(size, int(last) + 1) if last else size


class OpenedFileResponse(Response):
    """A file the service has opened and checked, sent from that descriptor: nothing swapped in
    after the check can be sent instead. GET, HEAD, and one byte range (Range: bytes=...)."""

    chunk_size = 256 * 1024

    def __init__(
        self, file: BinaryIO, media_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.file = file
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        st = os.fstat(file.fileno())
        self.size = st.st_size
        self.etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        self.last_modified = formatdate(st.st_mtime, usegmt=True)
        file_headers = {
            **(headers or {}),
            "content-length": str(st.st_size),
            "accept-ranges": "bytes",
            "etag": self.etag,
            "last-modified": self.last_modified,
        }
        self.init_headers(file_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self.file:
            request = Headers(scope=scope)
            # If-Range: the range only of this version of the file, else the whole file.
            if_range = request.get("if-range")
            current = if_range in (None, self.etag, self.last_modified)
            try:
                span = byte_range(request.get("range"), self.size) if current else None
            except HTTPException as e:
                response = error_response(e.status_code, str(e.detail))
                response.headers.update(e.headers or {})
                await response(scope, receive, send)
                return
            start, end = span or (0, self.size)
            headers = self.raw_headers
            if span:
                headers = [(k, v) for k, v in headers if k != b"content-length"] + [
                    (b"content-length", str(end - start).encode()),
                    (b"content-range", f"bytes {start}-{end - 1}/{self.size}".encode()),
                ]
            status = 206 if span else 200
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if scope["method"] == "HEAD":
                end = start
            while start < end:
                chunk = await anyio.to_thread.run_sync(
                    os.pread, self.file.fileno(), min(self.chunk_size, end - start), start
                )
                if not chunk:  # the file shrank under us: end the body short, not a 500
                    break
                start += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# --- connections ----------------------------------------------------------------------------------


class _Connection(h11.Connection):
    """h11's connection state, keeping the last protocol error it found in a client's bytes."""

    error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        """h11's next event; a RemoteProtocolError is kept for the error answer, then raised."""
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.error = e
            raise


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the slow-client limits of ``ConnectionLimits`` and
    protocol errors (no Host, a bad Content-Length, a malformed request line) in the error shape.
    """

    def __init__(
        self, *args: Any, limits: ConnectionLimits = ConnectionLimits(), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        size = self.config.h11_max_incomplete_event_size
        self.conn = _Connection(h11.SERVER, **({"max_incomplete_event_size": size} if size else {}))
        self.cap = connection_cap(self.limits)
        self.waiting_since: float | None = None  # when it began waiting for a request head
        self._partial = False  # some bytes of the awaited head came
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection; over the cap, evict the longest-waiting idle one, or refuse."""
        super().connection_made(transport)
        self._await_head()
        if len(self.connections) <= self.cap:
            return
        idle = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol) and c is not self and c.waiting_since is not None
        ]
        if idle:
            oldest = min(idle, key=lambda c: c.waiting_since or 0.0)
            oldest._head_arrived()  # no longer waiting: the next newcomer evicts another
            oldest.transport.close()
        else:
            self._close_with(503, f"the server is busy with {self.cap:,} connections; try again")

    def data_received(self, data: bytes) -> None:
        """Feed uvicorn; note whether a whole request head has come."""
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:
            self._head_arrived()
        elif self.waiting_since is not None:
            self._partial = True

    def on_response_complete(self) -> None:
        """After a response, the next request head has ``head_timeout`` to come."""
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle:  # no pipelined request began
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and its timer."""
        self._head_arrived()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Answer bytes that are not HTTP/1.1 in the error shape (h11's status: 400, 431...)."""
        error = self.conn.error
        status = error.error_status_hint if error else 400
        body = json.dumps({"error": f"malformed HTTP request: {error or msg}"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # a response had begun (the error was in a body): only closing is left
        self.transport.close()

    def _await_head(self) -> None:
        self._head_arrived()
        self.waiting_since, self._partial = self.loop.time(), False
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_too_slow)

    def _head_arrived(self) -> None:
        self.waiting_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._partial:
            timeout = self.limits.head_timeout
            self._close_with(408, f"the request head did not arrive within {timeout:g} s")
        elif not self.transport.is_closing():
            self.transport.close()  # an idle connection: nothing to answer

    def _close_with(self, status: int, message: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, message))
            self.transport.close()
