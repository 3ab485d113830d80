"""A small HTTP/1.1 server on asyncio with llhttp (httptools) parsing the requests.

Why not a full framework: the mock must answer byte for byte the way embedded OTA clients need
(ONENET.md, "What real device clients do"): a literal ``HTTP/1.1 <code>`` status line, exactly
cased ``Content-Length``/``Content-Range``, no ``Server``/``Date`` padding that pushes a JSON answer
past 512 bytes, and OneNET's one-byte error answer that has no Content-Length at all and ends by
closing the connection. Frameworks add headers and turn a length-less HTTP/1.1 body into chunked
encoding. So the parsing, the part where HTTP is hard, is llhttp (the parser behind uvicorn and
Node.js); writing an answer is the few lines of ``HttpResponse.encode``.

Keep-alive and pipelining are served; a connection is closed after ``max_requests`` requests (the
real OneNET server does so after 1000), after ``idle_timeout`` seconds without a byte, or on a
request that is not HTTP.

The request side of a connection (``RequestReader``: llhttp callbacks, size limits, idle timer) is
shared: the mock's ``_Connection`` answers each request at once through a synchronous handler,
the gateway's connection (``hil.gateway``) forwards it and answers later. ``BackgroundServer``
runs either on an event loop of its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

import httptools

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str                           # the raw request target, path and query
    path: str
    query: dict[str, str]                 # first value of each name, percent-decoded
    headers: dict[str, str]               # lower-cased names; values as sent, OWS stripped
    body: bytes = b""
    peer: str = ""                        # "host:port" of the client
    local: tuple[str, int] = ("", 0)      # the address the client connected to

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()   # written exactly as given, in order
    close_delimited: bool = False   # no Content-Length: the body ends when the connection closes
    close: bool = False

    def encode(self, *, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_reason(self.status)}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if not self.close_delimited:
            lines.append(f"Content-Length: {len(self.body)}")
        if not keep_alive or self.close_delimited or self.close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


_REASONS = {status.value: status.phrase for status in HTTPStatus}


def _reason(status: int) -> str:
    return _REASONS.get(status, "Status")


Handler = Callable[[HttpRequest], HttpResponse]


def _plain(status: int, text: str) -> HttpResponse:
    return HttpResponse(status, text.encode(), (("Content-Type", "text/plain"),), close=True)


class RequestReader(asyncio.Protocol):
    """One client connection's request side: llhttp calls the ``on_*`` methods while
    ``data_received`` feeds it, and each whole request goes to ``on_request``, which subclasses
    define (answering through ``_send`` or their own writes)."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._local: tuple[str, int] = ("", 0)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._served = 0
        self._closing = False
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's TCPTransport is a transport without being that class.
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self._peer = f"{peer[0]}:{peer[1]}"
        sock = transport.get_extra_info("sockname") or ("", 0)
        self._local = (str(sock[0]), int(sock[1]))
        self._server._connections.add(self)
        self._last_activity = self._server._loop_time()
        self._arm_idle_timer(self._server.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._closing = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = self._server._loop_time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not served")
        except httptools.HttpParserError as error:
            # llhttp wraps what a callback raised; a _Refused there is our own size limit.
            refused = error.__cause__ or error.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.status, refused.reason)
            else:
                self._refuse(400, f"not an HTTP/1.1 request: {error}")

    def pause_writing(self) -> None:
        # A client that stops reading stops being read: answers never pile up without bound.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    # -- llhttp callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        key = name.decode("latin-1").lower()
        if key not in self._headers:   # a repeated header: the first one counts
            self._headers[key] = value.decode("latin-1").strip()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            raise _Refused(413, f"request body over {MAX_BODY_BYTES} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing or self._transport is None:
            return
        try:
            parsed = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise _Refused(400, "the request target is not a URL path") from None
        path = (parsed.path or b"/").decode("latin-1")
        query_text = (parsed.query or b"").decode("utf-8", "replace")
        query: dict[str, str] = {}
        if query_text:
            for name, value in parse_qsl(query_text, keep_blank_values=True):
                query.setdefault(name, value)
        request = HttpRequest(
            method=self._parser.get_method().decode("latin-1"),
            target=self._url.decode("latin-1"), path=path, query=query,
            headers=self._headers, body=b"".join(self._body), peer=self._peer, local=self._local)
        self._served += 1
        keep_alive = (self._parser.should_keep_alive()
                      and self._served < self._server.max_requests)
        self.on_request(request, keep_alive)

    def on_request(self, request: HttpRequest, keep_alive: bool) -> None:
        """A whole request; ``keep_alive``: the connection may serve another after it."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Close the connection now (the server is stopping)."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # -- helpers -----------------------------------------------------------------------------
    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refused(431, f"request head over {MAX_HEAD_BYTES} bytes")

    def _send(self, response: HttpResponse, *, keep_alive: bool) -> None:
        assert self._transport is not None
        self._transport.write(response.encode(keep_alive=keep_alive))
        if not keep_alive or response.close or response.close_delimited:
            self._closing = True
            self._transport.close()   # close() sends what is buffered first

    def _refuse(self, status: int, reason: str) -> None:
        if not self._closing:
            self._send(_plain(status, reason + "\n"), keep_alive=False)

    def _arm_idle_timer(self, delay: float) -> None:
        loop = self._server._loop
        assert loop is not None
        self._idle_timer = loop.call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        if self._closing or self._transport is None:
            return
        idle = self._server._loop_time() - self._last_activity
        if idle >= self._server.idle_timeout:
            self._closing = True
            self._transport.close()
        else:
            self._arm_idle_timer(self._server.idle_timeout - idle)


class _Connection(RequestReader):
    """The mock's connection: each request answered at once by the server's handler."""

    def __init__(self, server: HttpServer, handler: Handler) -> None:
        super().__init__(server)
        self._handler = handler

    def on_request(self, request: HttpRequest, keep_alive: bool) -> None:
        try:
            response = self._handler(request)
        except Exception:
            # The handler is meant never to raise (the mock answers errno 7 itself); this is the
            # last line, so a bug shows as a logged 500 instead of a silently dropped connection.
            log.exception("handler failed on %s %s", request.method, request.target)
            response = _plain(500, "internal error")
        self._send(response, keep_alive=keep_alive)


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


ConnectionFactory = Callable[["HttpServer"], RequestReader]


@dataclass
class HttpServer:
    """An HTTP/1.1 server for ``handler``; ``start``/``stop`` run it on the calling event loop.

    ``connection`` serves requests another way than a synchronous handler (the gateway's): it
    makes the ``RequestReader`` of each new connection, and ``handler`` is then not needed.
    """

    handler: Handler | None = None
    host: str = "127.0.0.1"
    port: int = 0
    max_requests: int = 1000
    idle_timeout: float = 60.0
    connection: ConnectionFactory | None = None
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _server: asyncio.base_events.Server | None = field(default=None, init=False, repr=False)
    _connections: set[RequestReader] = field(default_factory=set, init=False, repr=False)

    def _loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def start(self) -> None:
        factory: Callable[[], RequestReader]
        if self.connection is not None:
            make = self.connection
            factory = lambda: make(self)   # noqa: E731
        elif self.handler is not None:
            handler = self.handler
            factory = lambda: _Connection(self, handler)   # noqa: E731
        else:
            raise ValueError("HttpServer needs a handler or a connection factory")
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            factory, self.host, self.port, reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.shutdown()
        await self._server.wait_closed()
        self._server = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it exists (Linux, macOS): the same server, a quarter more requests a second."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


_T = TypeVar("_T")


class BackgroundServer:
    """Runs an ``HttpServer`` on an event loop of its own thread, for tests and the CLI.

    A context manager: ``with BackgroundServer(handler) as server: requests.get(server.url)``.
    """

    def __init__(self, handler: Handler | None = None, host: str = "127.0.0.1", port: int = 0,
                 *, thread_name: str = "hil-http", **options: Any) -> None:
        self.http = HttpServer(handler, host, port, **options)
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=thread_name,
                                        daemon=True)

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (running on the server's thread once started)."""
        return self._loop

    def call(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 10) -> _T:
        """Run ``coroutine`` on the server's loop and wait for it; its exception raises here."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout)

    def start(self) -> BackgroundServer:
        self._thread.start()
        # Raises here, on the caller's thread, if the port cannot be bound.
        self.call(self.http.start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.call(self.http.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
