"""The gateway's client side: keep-alive connections to the OTA service, answers parsed by llhttp.

``UpstreamURL`` is a base URL taken apart (scheme, host, port, path prefix, the Host header to
send, TLS for https). ``UpstreamConnection`` sends one request at a time and returns the whole
``UpstreamAnswer``: its head exactly as the service wrote it (status line and headers, byte for
byte, so a device gets what the service sent) and its body. Framing follows the service: a
Content-Length, chunks (decoded here; ``Answer.wire_body`` frames them again as one chunk), or
the end of the connection (OneNET's one-byte download error has no Content-Length).
Interim answers (``100 Continue``, any 1xx but 101) are read past: the device gets the final one.

What it holds is bounded: an answer's head to ``max_head`` bytes, its body to ``max_body``
(announced larger, or grown larger, the exchange fails with a 502 naming the limit).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

MAX_ANSWER_HEAD = 64 * 1024            # OneNET's heads are a few hundred bytes
MAX_ANSWER_BODY = 64 * 1024 * 1024     # above a whole OTA package (a few MB) fetched at once


class UpstreamError(Exception):
    """The service could not be reached or did not answer: ``status`` is what the device gets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class UpstreamURL:
    """A base URL such as ``http://ota.heclouds.com`` or ``https://host:8443/prefix``."""

    url: str
    scheme: str
    host: str
    port: int
    prefix: str            # joined in front of every request target ("" for none)
    host_header: bytes     # host[:port] as the Host header names it

    @classmethod
    def parse(cls, url: str) -> UpstreamURL:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream {url!r} is not an http:// or https:// base URL")
        if parts.query or parts.fragment:
            raise ValueError(f"upstream {url!r}: a base URL takes no query or fragment")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        host_header = host if port == default else f"{host}:{port}"
        return cls(url, parts.scheme, parts.hostname, port, parts.path.rstrip("/"),
                   host_header.encode("idna"))


@dataclass
class UpstreamAnswer:
    """One answer of the service: its head as sent, its (decoded) body, how it was framed."""

    status: int
    head: bytes                             # status line and headers, up to the blank line
    headers: dict[str, str]                 # lower-cased names, first value
    body: bytes
    chunked: bool = False                   # sent with Transfer-Encoding: chunked
    close_delimited: bool = False           # no length: the body ended with the connection
    keep_alive: bool = True                 # the service keeps the connection open after it

    @property
    def wire_body(self) -> bytes:
        """The body as it goes on the wire after this head."""
        return frame(self.body, chunked=self.chunked)


def frame(body: bytes, *, chunked: bool) -> bytes:
    """A body as it goes on the wire: as is, or (chunked) as one chunk and the last chunk."""
    if not chunked:
        return body
    chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b""
    return chunk + b"0\r\n\r\n"


@dataclass
class _Pending:
    future: asyncio.Future[UpstreamAnswer]
    no_body: bool                           # a HEAD: the answer ends with its head
    received: int = 0                       # bytes of this answer so far
    body_bytes: int = 0
    head: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)   # bytes until the head is complete
    headed: bool = False
    interim: bool = False                   # the head just parsed was a 1xx: not the answer


class UpstreamConnection(asyncio.Protocol):
    """A connection to the service; ``exchange`` sends a request and awaits its answer."""

    def __init__(self, url: UpstreamURL, *, max_head: int = MAX_ANSWER_HEAD,
                 max_body: int = MAX_ANSWER_BODY) -> None:
        self.url = url
        self.max_head = max_head
        self.max_body = max_body
        self.used = 0                       # answers received on it
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._pending: _Pending | None = None
        self._last_received = 0
        self.closed = False

    @classmethod
    async def open(cls, url: UpstreamURL, timeout: float, *, max_head: int = MAX_ANSWER_HEAD,
                   max_body: int = MAX_ANSWER_BODY) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if url.scheme == "https" else None
        try:
            _, connection = await asyncio.wait_for(loop.create_connection(
                lambda: cls(url, max_head=max_head, max_body=max_body), url.host, url.port,
                ssl=context,
                server_hostname=url.host if context else None), timeout)
        except TimeoutError:
            raise UpstreamError(504, f"connecting to {url.url} timed out after "
                                     f"{timeout:g} s") from None
        except (OSError, ssl.SSLError) as error:
            raise UpstreamError(502, f"{url.url} is unreachable: {error}") from None
        return connection

    async def exchange(self, request: bytes, timeout: float, *,
                       no_body: bool = False) -> UpstreamAnswer:
        if self.closed or self._transport is None:
            raise UpstreamError(502, "the service closed the connection")
        loop = asyncio.get_running_loop()
        pending = self._pending = _Pending(loop.create_future(), no_body)
        self._transport.write(request)
        # A timer rather than wait_for: no extra task on the path every request takes.
        timer = loop.call_later(timeout, self._fail, UpstreamError(
            504, f"{self.url.url} did not answer within {timeout:g} s"))
        try:
            return await pending.future
        finally:
            timer.cancel()
            self._last_received = pending.received
            self._pending = None

    @property
    def answered_nothing(self) -> bool:
        """Not a byte of the last exchange's answer came (a retry on a new connection is safe)."""
        return self._last_received == 0

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        pending = self._pending
        if pending is None or pending.future.done():   # bytes nobody asked for
            self.close()
            return
        pending.received += len(data)
        if not pending.headed:
            pending.raw += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            # llhttp wraps what a callback raised: an UpstreamError there is a limit of ours.
            over = error.__cause__ or error.__context__
            self._fail(over if isinstance(over, UpstreamError) else
                       UpstreamError(502, f"the service's answer is not HTTP: {error}"))
            return
        if not pending.headed and len(pending.raw) > self.max_head:
            self._fail(UpstreamError(502, f"the service's answer head is over {self.max_head} "
                                          f"bytes"))

    def eof_received(self) -> bool | None:
        self._ended()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    # -- llhttp callbacks --------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._pending is not None
        key = name.decode("latin-1").lower()
        self._pending.headers.setdefault(key, value.decode("latin-1").strip())

    def on_headers_complete(self) -> None:
        pending = self._pending
        assert pending is not None
        raw = pending.raw
        end = raw.find(b"\r\n\r\n", raw.find(b"HTTP/"))
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 102 Processing): the final one follows, and may
            # have come in the same read, after this head.
            pending.interim = True
            pending.raw = raw[end + 4:] if end >= 0 else bytearray()
            pending.headers = {}
            return
        pending.head = bytes(raw[:end + 4] if end >= 0 else raw)
        pending.raw = bytearray()
        pending.headed = True
        if pending.no_body:
            self._complete(self._parser.should_keep_alive())
            return
        length = pending.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise self._over_body()

    def on_body(self, body: bytes) -> None:
        pending = self._pending
        assert pending is not None
        pending.body_bytes += len(body)
        if pending.body_bytes > self.max_body:
            raise self._over_body()
        pending.body.append(body)

    def on_message_complete(self) -> None:
        pending = self._pending
        if pending is not None and pending.interim:
            pending.interim = False
        elif pending is not None and not pending.future.done():
            self._complete(self._parser.should_keep_alive())

    # -- helpers -----------------------------------------------------------------------------
    def _over_body(self) -> UpstreamError:
        return UpstreamError(502, f"the service's answer body is over {self.max_body} bytes")

    def _complete(self, keep_alive: bool, *, close_delimited: bool = False) -> None:
        pending = self._pending
        assert pending is not None
        headers = pending.headers
        self.used += 1
        pending.future.set_result(UpstreamAnswer(
            self._parser.get_status_code(), pending.head, headers, b"".join(pending.body),
            chunked="chunked" in headers.get("transfer-encoding", "").lower(),
            close_delimited=close_delimited, keep_alive=keep_alive and not close_delimited))
        if not keep_alive or close_delimited:
            self.close()
        elif pending.no_body:   # llhttp would wait for a body a HEAD answer never has
            self._parser = httptools.HttpResponseParser(self)

    def _ended(self) -> None:
        self.closed = True
        pending = self._pending
        if pending is None or pending.future.done():
            return
        headers = pending.headers
        if pending.headed and "content-length" not in headers \
                and "transfer-encoding" not in headers:
            self._complete(False, close_delimited=True)   # the body ends with the connection
        elif pending.headed:
            self._fail(UpstreamError(502, "the service closed the connection mid-answer"))
        else:
            self._fail(UpstreamError(502, "the service closed the connection without an answer"))

    def _fail(self, error: UpstreamError) -> None:
        pending = self._pending
        if pending is not None and not pending.future.done():
            pending.future.set_exception(error)
        self.close()
