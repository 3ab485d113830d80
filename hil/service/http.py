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

What one client can hold is bounded (``HttpServer``'s fields, with defaults no device comes
near: a device sends one request at a time, a few hundred bytes, and reads its answer):

- connections: past ``max_connections`` a new one is answered ``503`` and closed;
- time: a request must arrive whole within ``request_timeout`` seconds of its first byte, else
  ``408`` and the connection closes (a head trickling in a byte at a time would reset the idle
  timer forever);
- memory: a client that pipelines and does not read its answers stops being read. llhttp parses
  whatever it is given at once, so a read takes at most ``READ_SIZE`` bytes (into one buffer the
  server's connections share) and is parsed ``FEED_STEP`` bytes at a time; once the connection
  is busy (its answers are above the transport's high-water mark, or the gateway has enough
  requests queued) parsing stops, the rest of the read waits, reading pauses, and all of it goes
  on when the client has read. A connection's buffers go with it.

A client that half-closes (``shutdown(SHUT_WR)``) after its requests still gets their answers:
the connection closes once it owes none.

The request side of a connection (``RequestReader``: llhttp callbacks, size limits, timers,
back-pressure) is shared: the mock's ``_Connection`` answers each request at once through a
synchronous handler, the gateway's connection (``hil.gateway``) forwards it and answers later.
``BackgroundServer`` runs either on an event loop of its own thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

import httptools

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
READ_SIZE = 16 * 1024     # the most one read takes from a client: a head fits, bodies take several
FEED_STEP = 1024          # parsing stops within this many bytes of the connection turning busy


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


class RequestReader(asyncio.BufferedProtocol):
    """One client connection's request side: llhttp calls the ``on_*`` methods while
    ``buffer_updated`` feeds it, and each whole request goes to ``on_request``, which subclasses
    define (answering through ``_send`` or their own writes).

    Back-pressure: a subclass says when the connection is busy (``_busy``); parsing stops there,
    what was read and not parsed waits in ``_inbox`` with reading paused, and the subclass calls
    ``_resume`` when it is less busy. ``_owes`` says whether answers are still owed (a client
    that half-closed is answered, then closed).
    """

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
        self._closing = False          # nothing more is read from this client
        self._eof = False              # the client has sent its last byte (it half-closed or left)
        self._inbox = b""              # read, not parsed yet: the connection was busy
        self._reading_paused = False
        self._write_paused = False     # the transport holds more than its high-water mark
        self._last_activity = 0.0      # loop time of the last byte received
        self._request_started: float | None = None   # loop time of the current request's 1st byte
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._unsent = 0               # the transport's write buffer at the last timer check
        self._held_back = False        # back-pressure held this client once: it had big buffers

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's TCPTransport is a transport without being that class.
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self._peer = f"{peer[0]}:{peer[1]}"
        sock = transport.get_extra_info("sockname") or ("", 0)
        self._local = (str(sock[0]), int(sock[1]))
        server = self._server
        if len(server._connections) >= server.max_connections:
            self._closing = True
            server._refuse_connection(self._peer)
            transport.write(_over_capacity(server.max_connections))
            transport.close()
            return
        server._accepted()
        server._connections.add(self)
        self._last_activity = now = server._loop_time()
        self._arm_timer(now + server.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._closing = True
        self._inbox = b""
        if self._held_back:
            self._server._release_memory_soon()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def get_buffer(self, sizehint: int) -> memoryview:
        # One buffer for every connection of the server: a read is parsed (or what is left of it
        # copied to _inbox) before the loop reads again, so no connection keeps a buffer idle.
        return self._server._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        self._last_activity = now = self._server._loop_time()
        if self._request_started is None:
            self._request_started = now
        data = self._server._read_buffer[:nbytes]
        if self._inbox:   # a read already under way when reading paused: it waits its turn
            self._inbox += data
            return
        self._feed(data)
        started = self._request_started
        if started is not None and not self._closing \
                and self._timer_due > started + self._server.request_timeout:
            self._arm_timer(started + self._server.request_timeout)

    def eof_received(self) -> bool:
        self._eof = True
        # True keeps the transport open for what is owed: a client that half-closed after its
        # requests reads their answers; the connection closes after the last (``_resume``).
        return self._owes()

    def pause_writing(self) -> None:
        self._write_paused = self._held_back = True

    def resume_writing(self) -> None:
        self._write_paused = False

    # -- llhttp callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._body = []
        self._body_bytes = 0
        if self._request_started is None:   # pipelined: it began in the read that ended the last
            self._request_started = self._last_activity

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
        self._request_started = None
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
        self._body = []
        self._served += 1
        keep_alive = (self._parser.should_keep_alive()
                      and self._served < self._server.max_requests)
        self.on_request(request, keep_alive)

    def on_request(self, request: HttpRequest, keep_alive: bool) -> None:
        """A whole request; ``keep_alive``: the connection may serve another after it."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Close the connection now (the server is stopping); answers a client has not read are
        dropped, or the close would wait for it."""
        self._closing = True
        if self._transport is not None:
            if self._transport.get_write_buffer_size():
                self._transport.abort()
            else:
                self._transport.close()

    # -- back-pressure -----------------------------------------------------------------------
    def _busy(self) -> bool:
        """Whether to stop parsing this client's requests until ``_resume``."""
        return False

    def _owes(self) -> bool:
        """Whether requests read from this client still wait for their answers."""
        return bool(self._inbox)

    def _feed(self, data: memoryview | bytes) -> None:
        """Parse ``data`` a step at a time while the connection is not busy; the rest waits in
        ``_inbox`` with reading paused."""
        size, at = len(data), 0
        while at < size and not self._closing:
            if self._busy():
                self._inbox = bytes(data[at:])
                if not self._reading_paused and self._transport is not None:
                    self._reading_paused = self._held_back = True
                    self._transport.pause_reading()
                return
            try:
                self._parser.feed_data(data[at:at + FEED_STEP] if size - at > FEED_STEP
                                       else data[at:] if at else data)
            except httptools.HttpParserUpgrade:
                self._refuse(400, "protocol upgrades are not served")
            except httptools.HttpParserError as error:
                # llhttp wraps what a callback raised; a _Refused there is our own size limit.
                refused = error.__cause__ or error.__context__
                if isinstance(refused, _Refused):
                    self._refuse(refused.status, refused.reason)
                else:
                    self._refuse(400, f"not an HTTP/1.1 request: {error}")
            at += FEED_STEP

    def _resume(self) -> None:
        """The connection may be less busy: parse what waits, read again, or (the client has
        half-closed and is owed nothing more) close."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._inbox and not self._busy() and not self._closing:
            data, self._inbox = self._inbox, b""
            if self._request_started is not None:   # the wait was the server's, not the client's
                self._request_started = self._server._loop_time()
            self._feed(data)
        if self._reading_paused and not self._inbox and not self._busy() and not self._closing:
            self._reading_paused = False
            if not self._eof:
                transport.resume_reading()
        if self._eof and not self._owes():
            self._closing = True
            transport.close()

    # -- helpers -----------------------------------------------------------------------------
    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refused(431, f"request head over {MAX_HEAD_BYTES} bytes")

    def _send(self, response: HttpResponse, *, keep_alive: bool) -> None:
        transport = self._transport
        assert transport is not None
        if transport.is_closing():   # the client is gone: nobody to answer
            return
        transport.write(response.encode(keep_alive=keep_alive))
        if not keep_alive or response.close or response.close_delimited:
            self._closing = True
            transport.close()   # close() sends what is buffered first

    def _refuse(self, status: int, reason: str) -> None:
        if not self._closing:
            self._send(_plain(status, reason + "\n"), keep_alive=False)

    def _arm_timer(self, due: float) -> None:
        loop = self._server._loop
        assert loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = loop.call_at(due, self._check_time)

    def _check_time(self) -> None:
        """The idle and request deadlines: one timer a connection, armed for the nearer, running
        until the connection is gone (a close waits for the answers to be read)."""
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        server = self._server
        now = server._loop_time()
        unsent = transport.get_write_buffer_size()
        if unsent < self._unsent:   # the client read some of its answers: it is not idle
            self._last_activity = now
        self._unsent = unsent
        idle_due = self._last_activity + server.idle_timeout
        if now >= idle_due:
            self._closing = True
            if unsent:   # it neither sent nor read a byte: what it was owed goes with it
                transport.abort()
            elif not transport.is_closing():
                transport.close()
            return
        due = idle_due
        started = self._request_started
        if started is not None and not self._reading_paused and not self._closing:
            if now >= started + server.request_timeout:
                self._refuse(408, f"the request was not whole within {server.request_timeout:g} s")
            else:
                due = min(due, started + server.request_timeout)
        self._arm_timer(due)


class _Connection(RequestReader):
    """The mock's connection: each request answered at once by the server's handler; while the
    client has not read the answers already written (the transport is above its high-water
    mark), the requests parsed meanwhile wait in order, and parsing stops."""

    def __init__(self, server: HttpServer, handler: Handler) -> None:
        super().__init__(server)
        self._handler = handler
        # Requests waiting for the client to read, or the refusal that ends the connection.
        self._waiting: deque[tuple[HttpRequest, bool] | HttpResponse] = deque()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._waiting.clear()

    def on_request(self, request: HttpRequest, keep_alive: bool) -> None:
        if self._write_paused or self._waiting:
            self._waiting.append((request, keep_alive))
            if not keep_alive:
                self._closing = True   # what the client sends after its last request is not read
        else:
            self._answer(request, keep_alive)

    def resume_writing(self) -> None:
        super().resume_writing()
        transport = self._transport
        assert transport is not None
        while self._waiting and not self._write_paused and not transport.is_closing():
            item = self._waiting.popleft()
            if isinstance(item, HttpResponse):
                self._send(item, keep_alive=False)
            else:
                self._answer(*item)
        self._resume()

    def _busy(self) -> bool:
        return self._write_paused or bool(self._waiting)

    def _owes(self) -> bool:
        return bool(self._inbox or self._waiting)

    def _refuse(self, status: int, reason: str) -> None:
        if self._closing:
            return
        if self._waiting:   # after the answers it owes
            self._closing = True
            self._waiting.append(_plain(status, reason + "\n"))
        else:
            self._send(_plain(status, reason + "\n"), keep_alive=False)

    def _answer(self, request: HttpRequest, keep_alive: bool) -> None:
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


def _over_capacity(limit: int) -> bytes:
    return HttpResponse(503, f"over {limit} connections: try again later\n".encode(),
                        (("Content-Type", "text/plain"), ("Retry-After", "1")),
                        close=True).encode(keep_alive=False)


ConnectionFactory = Callable[["HttpServer"], RequestReader]


@dataclass
class HttpServer:
    """An HTTP/1.1 server for ``handler``; ``start``/``stop`` run it on the calling event loop.

    ``connection`` serves requests another way than a synchronous handler (the gateway's): it
    makes the ``RequestReader`` of each new connection, and ``handler`` is then not needed.

    Limits, each far from what a device needs:
    ``max_requests`` (1000, as OneNET) on one connection, then it is closed;
    ``idle_timeout`` (60 s) without a byte from the client, then it is closed;
    ``request_timeout`` (30 s) from a request's first byte to its last, else ``408`` and a close
    (a device sends its few hundred bytes at once);
    ``max_connections`` (512) open at once, past which a new one is answered ``503`` and closed
    (a lab has far fewer boards, each with one connection). A connection holds at most one
    answer beyond the transport's high-water mark (64 KiB), a 16 KiB read and the few requests
    of one 1 KiB parsing step: with 4 KiB ranged answers, 512 connections that never read hold
    under 50 MB.
    """

    handler: Handler | None = None
    host: str = "127.0.0.1"
    port: int = 0
    max_requests: int = 1000
    idle_timeout: float = 60.0
    connection: ConnectionFactory | None = None
    request_timeout: float = 30.0
    max_connections: int = 512
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _server: asyncio.base_events.Server | None = field(default=None, init=False, repr=False)
    _connections: set[RequestReader] = field(default_factory=set, init=False, repr=False)
    _read_buffer: memoryview = field(default_factory=lambda: memoryview(bytearray(READ_SIZE)),
                                     init=False, repr=False)
    _refusing: bool = field(default=False, init=False, repr=False)
    _release: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)

    def _loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _refuse_connection(self, peer: str) -> None:
        if not self._refusing:   # once a burst: a flood of refusals is not a flood of lines
            self._refusing = True
            log.warning("%s: refusing connections (%s first): %d open, max_connections",
                        self.url, peer, len(self._connections))

    def _accepted(self) -> None:
        self._refusing = False

    def _release_memory_soon(self) -> None:
        """A client that held big buffers has gone: hand the memory back in a second (once for a
        burst of them)."""
        if self._release is None and self._loop is not None:
            self._release = self._loop.call_later(1.0, self._release_memory)

    def _release_memory(self) -> None:
        self._release = None
        release_freed_memory()

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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return cast(Callable[[int], int], ctypes.CDLL(None).malloc_trim)
    except (AttributeError, OSError):   # not glibc
        return None


def release_freed_memory() -> None:
    """Give memory freed by Python back to the OS. glibc keeps what a burst freed in its arenas
    (a server's thread has one of its own): a server that held 100 MB for clients that pipelined
    and never read would keep it after they left. A no-op where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
