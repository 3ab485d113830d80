"""The gateway: a real HTTP/1.1 server on loopback that forwards to an OTA service and records.

    with MockOneNet() as onenet, Gateway(onenet.url, Timeline(path)) as gateway:
        armed = gateway.arm(Fault(FaultKind.STALL, phase=Endpoint.DOWNLOAD, seconds=2.0))
        ...the board downloads through gateway.url...
        assert armed.hits == 1

It runs on the mock's machinery: ``BackgroundServer`` (an event loop on a thread of its own,
uvloop where there is one) with the shared ``RequestReader`` parsing requests, and one
``UpstreamConnection`` per device connection for the service's answers. Each device connection
serves its requests in order (pipelined ones wait their turn), each through ``_serve``: target
the armed faults, run the request-side ones, forward (or answer in the service's place), change
and deliver the answer as the plan says (``hil.gateway.faults``), and record one ``Exchange``.

Every exchange the service saw is recorded, with how it ended for the device (``ended``):
``answered``, ``device gone`` (it left before or while its answer went out: its HTTP timeout, a
power cut; no error for ``raise_errors``, the device's retry will show), or ``cut by fault``. A
device that half-closes after its requests is answered, then closed. What a device costs is
bounded: the next request is forwarded only once the device has read enough of the answers
before it, parsing stops while ``_QUEUE_HIGH`` requests wait, and a service's answer is held up
to ``max_answer_head``/``max_answer_body`` (a 502 past them); connections and request time are
bounded as ``hil.service.http`` bounds them.

Forwarding is faithful: the request goes with its method, target (after the base URL's path),
HTTP version, headers (names, order and repeats as sent; values without surrounding blanks) and
body, only ``Host`` rewritten to the service's (kept as sent with ``keep_host``); the device gets
the service's status line and headers byte for byte and its body. Two things cannot be passed
through as bytes and are re-framed: a chunked request body goes with a Content-Length, a chunked
answer as one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import orjson

from hil.errors import ProtocolError, ServiceCrashed
from hil.gateway.faults import (
    Armed,
    Fault,
    FaultKind,
    Plan,
    Seen,
    alter_authorization,
    corrupt,
    shift_content_range,
    widen_range,
)
from hil.gateway.upstream import (
    MAX_ANSWER_BODY,
    MAX_ANSWER_HEAD,
    UpstreamAnswer,
    UpstreamConnection,
    UpstreamError,
    UpstreamURL,
    frame,
)
from hil.onenet.auth import redact_authorization
from hil.onenet.codes import DownloadError, ErrorBodyForm, decode_error_body
from hil.onenet.messages import Endpoint, Route, parse_result, parse_step, route
from hil.onenet.ranges import resolve_range
from hil.service.http import BackgroundServer, HttpRequest, HttpResponse, HttpServer, RequestReader
from hil.service.timeline import Began, Exchange, Timeline

log = logging.getLogger(__name__)

_BODY_IN_TIMELINE = 512     # as the mock: request bodies are short JSON, a longer one is cut
_UNKNOWN_SIZE = 10**20      # a package whose size no detect answer told: any offset may be in it
_QUEUE_HIGH, _QUEUE_LOW = 16, 4   # pipelined requests waiting: stop reading above, resume below
_NO_PLAN = Plan()           # shared by every request no fault fired on; never changed
_CONNECTION_NUMBERS = itertools.count(1)
_PLAIN = (("Content-Type", "text/plain"),)
_ACK_WAIT = 5.0             # seconds a device that sent its FIN has to acknowledge an answer
_TCP_CLOSE = 7              # Linux's TCP_CLOSE state (tcp_states.h): the peer reset

# How an exchange ended for the device (``Exchange.ended``).
ANSWERED = "answered"           # the answer went out whole (a fault may have changed or slowed it)
DEVICE_GONE = "device gone"     # it left before or while its answer went out
CUT_BY_FAULT = "cut by fault"   # a fault withheld or cut the answer (drop, stall, limit, ...)


@dataclass(frozen=True, slots=True)
class _Item:
    """A request as it came, waiting its turn on its connection."""

    request: HttpRequest
    raw_headers: tuple[tuple[bytes, bytes], ...]   # as sent: names' case, order, repeats
    version: str
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class _Token:
    dev_id: str
    size: int | None = None    # the package's, from the detect answer or a Content-Range


class Gateway:
    """A recording, fault-injecting HTTP gateway in front of ``upstream``. A context manager."""

    def __init__(self, upstream: str, timeline: Timeline | None = None, host: str = "127.0.0.1",
                 port: int = 0, upstream_timeout: float = 10.0, *,
                 keep_host: bool = False, max_connections: int = 512,
                 request_timeout: float = 30.0, max_answer_head: int = MAX_ANSWER_HEAD,
                 max_answer_body: int = MAX_ANSWER_BODY) -> None:
        """``max_connections``, ``request_timeout``: the device side's limits, as
        ``hil.service.http.HttpServer``'s (512 devices' connections at once; 30 s for a
        request to arrive whole). ``max_answer_head``/``max_answer_body``: the most of a
        service's answer it holds (64 KiB of head, 64 MiB of body: a whole package fetched at
        once fits); a larger answer is a 502 to the device, recorded."""
        self.upstream = upstream
        self.max_answer_head = max_answer_head
        self.max_answer_body = max_answer_body
        # The device's Host header goes upstream unchanged: a board with a hard-coded host
        # (hil's DNS sent it here) names the service's host itself, as the service must see it.
        self.keep_host = keep_host
        self.timeline = timeline if timeline is not None else Timeline()
        self.upstream_timeout = upstream_timeout
        self._armed: tuple[Armed, ...] = ()   # replaced whole, never changed: read lock-free
        self._epoch = 0   # counts clear()s: a stall decided before the last one holds nothing
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._tokens: dict[str, _Token] = {}
        self._connections: set[_GatewayConnection] = set()
        self._held: set[_GatewayConnection] = set()
        self._hooks: ThreadPoolExecutor | None = None
        # Answers on their way to a device whose exchange is not recorded yet (see
        # ``wait_recorded``), and the condition a waiting thread sleeps on.
        self._unrecorded = 0
        self._recorded = threading.Condition(threading.Lock())
        self._server = BackgroundServer(host=host, port=port, thread_name="hil-gateway",
                                        max_requests=sys.maxsize,
                                        max_connections=max_connections,
                                        request_timeout=request_timeout,
                                        connection=lambda http: _GatewayConnection(http, self))

    def __repr__(self) -> str:
        return f"Gateway(upstream={self.upstream!r}, url={self.url!r})"

    # ---------------------------------------------------------------- the public face
    @property
    def url(self) -> str:
        return self._server.url

    @property
    def upstream(self) -> str:
        return self._upstream.url

    @upstream.setter
    def upstream(self, url: str) -> None:
        # Device connections notice the new URL on their next request and reconnect.
        self._upstream = UpstreamURL.parse(url)

    def start(self) -> Gateway:
        self._hooks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hil-gateway-hook")
        self._server.start()
        return self

    def stop(self) -> None:
        """Close every connection (held stalls too), end the loop's thread and the hook threads."""
        if self._server.loop.is_running():
            self._server.call(self._close_all())
        self._server.stop()
        if self._hooks is not None:
            self._hooks.shutdown(wait=True, cancel_futures=True)
            self._hooks = None

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def arm(self, fault: Fault) -> Armed:
        """Arm ``fault`` from now on; faults act in arming order (``hil.gateway.faults``)."""
        armed = Armed(fault)
        with self._lock:
            self._armed = (*self._armed, armed)
        return armed

    def clear(self) -> None:
        """Disarm every fault and drop the connections held by stalls (between tests)."""
        with self._lock:
            self._armed = ()
            self._epoch += 1
        if self._server.loop.is_running():
            self._server.call(self._release_held())

    def recording(self) -> bool:
        """Whether an answer a device may already have is not in the timeline yet."""
        with self._recorded:
            return self._unrecorded > 0

    def wait_recorded(self, timeout: float) -> bool:
        """Wait until every answer that has begun to reach its device is in the timeline (False
        after ``timeout``). A device acts on its answer at once (a board prints ``ota end``
        when its 201 is answered) while the gateway records the exchange a moment later, once
        it knows how it ended for the device: up to seconds later for a device that closed its
        side (``_taken``). Whoever reads the timeline because a device said it is done waits
        here first. Answers held by a fault (a stall) have not begun and are not waited for."""
        with self._recorded:
            return self._recorded.wait_for(lambda: self._unrecorded == 0, timeout)

    def _answering(self, change: int) -> None:
        with self._recorded:
            self._unrecorded += change
            if not self._unrecorded:
                self._recorded.notify_all()

    def raise_errors(self) -> None:
        """Re-raise, on the caller's thread, what failed on the gateway's thread or in a hook."""
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise ServiceCrashed(f"{len(errors)} error(s) in the gateway or its hooks; "
                                 f"first: {errors[0]!r}") from errors[0]

    # ---------------------------------------------------------------- on the loop's thread
    async def _close_all(self) -> None:
        workers = [c.worker for c in self._connections if c.worker is not None]
        for connection in list(self._connections):
            connection.shutdown()
        await asyncio.gather(*workers, return_exceptions=True)

    async def _release_held(self) -> None:
        for connection in list(self._held):
            connection.release()

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self._errors.append(error)

    def _identify(self, request: HttpRequest, target: Route) -> tuple[str | None, Seen]:
        """The device behind a request, learning token -> device from token-bearing requests."""
        dev_id = request.query.get("dev_id") or None
        phase = target.endpoint
        token = target.token or (request.query.get("token") if phase is Endpoint.REPORT else None)
        known = self._tokens.get(token) if token else None
        if token and dev_id and known is None:
            self._tokens[token] = known = _Token(dev_id)
        if known is not None and dev_id is None:
            dev_id = known.dev_id
        if phase is not Endpoint.DOWNLOAD:
            return dev_id, Seen(phase, dev_id)
        size = (known.size if known else None) or _UNKNOWN_SIZE
        wanted = resolve_range(request.header("range"), size)
        span = (wanted.start, wanted.end) if wanted else (0, size - 1)
        return dev_id, Seen(phase, dev_id, span)

    def _learn(self, target: Route, dev_id: str | None, answer: UpstreamAnswer,
               data: dict[str, Any] | None) -> None:
        """Tokens from detect answers (with their package size), sizes from Content-Range."""
        if target.endpoint is Endpoint.DETECT and dev_id and data is not None:
            task = data.get("data")
            if isinstance(task, dict) and isinstance(task.get("token"), str):
                size = task.get("size")
                self._tokens[task["token"]] = _Token(
                    dev_id, size if isinstance(size, int) and size > 0 else None)
        elif target.endpoint is Endpoint.DOWNLOAD and target.token:
            known = self._tokens.get(target.token)
            content_range = answer.headers.get("content-range", "")
            if known is not None and known.size is None and "/" in content_range:
                with contextlib.suppress(ValueError):
                    self._tokens[target.token] = _Token(known.dev_id,
                                                        int(content_range.rsplit("/", 1)[1]))

    def _fire(self, seen: Seen) -> list[Armed]:
        return [armed for armed in self._armed if armed.consider(seen)]

    async def _run_hook(self, action: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._hooks, action)
        except Exception as error:   # the test's own code: kept for raise_errors, then on
            log.warning("gateway hook %r raised %r", action, error)
            self._failed(error)


class _GatewayConnection(RequestReader):
    """A device's connection: requests queue in order, one worker task serves them.

    Back-pressure both ways: the worker forwards a request only once the device has read enough
    of the answers before it (the transport is under its high-water mark), and parsing stops
    while ``_QUEUE_HIGH`` requests wait.
    """

    def __init__(self, server: HttpServer, gateway: Gateway) -> None:
        super().__init__(server)
        self._gateway = gateway
        self.number = next(_CONNECTION_NUMBERS)     # Exchange.connection
        self._raw: list[tuple[bytes, bytes]] = []
        self._queue: deque[_Item | tuple[int, str]] = deque()
        self.worker: asyncio.Task[None] | None = None
        self._upstream: UpstreamConnection | None = None
        self._release: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._answering = False    # this connection's answer is counted in wait_recorded's

    # -- the request side ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._closing:   # else refused: over max_connections
            self._gateway._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._gateway._connections.discard(self)
        self.release()   # a stall holds nothing once the device is gone
        self._wake_writer()
        if self.worker is None:
            self._queue.clear()
            if self._upstream is not None:
                self._upstream.close()   # else the worker does, once the service has answered

    def eof_received(self) -> bool:
        self.release()   # a stall ends when the device has sent its last byte, as when it leaves
        return super().eof_received()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._wake_writer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._raw = []

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._raw.append((name, value))

    def on_request(self, request: HttpRequest, keep_alive: bool) -> None:
        self._enqueue(_Item(request, tuple(self._raw), self._parser.get_http_version(),
                            keep_alive))
        if not keep_alive:
            self._closing = True   # what the device sends after its last request is not read

    def _refuse(self, status: int, reason: str) -> None:
        # After the answers it owes: a bad request pipelined behind good ones waits its turn.
        if not self._closing:
            self._closing = True
            self._enqueue((status, reason))

    def _busy(self) -> bool:
        return len(self._queue) >= _QUEUE_HIGH

    def _owes(self) -> bool:
        return bool(self._inbox or self._queue) or self.worker is not None

    def _enqueue(self, item: _Item | tuple[int, str]) -> None:
        self._queue.append(item)
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work())

    def shutdown(self) -> None:
        super().shutdown()
        if self.worker is not None:
            self.worker.cancel()
        if self._upstream is not None:
            self._upstream.close()

    def release(self) -> None:
        """End a stall now (``Gateway.clear``)."""
        if self._release is not None and not self._release.done():
            self._release.set_result(None)

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def _until_writable(self, transport: asyncio.Transport) -> None:
        """Until the device has read enough of its answers (or is gone)."""
        while self._write_paused and not transport.is_closing():
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None

    async def _work(self) -> None:
        transport = self._transport
        assert transport is not None
        try:
            while self._queue and not transport.is_closing():
                await self._until_writable(transport)
                if transport.is_closing():
                    break
                item = self._queue.popleft()
                if len(self._queue) < _QUEUE_LOW and (self._inbox or self._reading_paused):
                    self._resume()
                if isinstance(item, _Item):
                    await self._serve(item)
                else:
                    status, reason = item
                    self._send(HttpResponse(status, f"{reason}\n".encode(), _PLAIN, close=True),
                               keep_alive=False)
        except Exception as crash:   # a gateway bug: the device loses its connection, not more
            log.exception("gateway crashed")
            self._gateway._failed(crash)
            super().shutdown()
        finally:
            self.worker = None
            if transport.is_closing():
                self._queue.clear()   # requests the service never saw: their device is gone
                if self._upstream is not None:
                    self._upstream.close()
            else:
                self._resume()   # a device that half-closed: closed once it is owed nothing

    # -- one request ---------------------------------------------------------------------------
    async def _serve(self, item: _Item) -> None:
        gateway = self._gateway
        request = item.request
        started = Began.now()
        epoch = gateway._epoch
        target = route(request.path)
        dev_id, seen = gateway._identify(request, target)
        fired = gateway._fire(seen) if gateway._armed else []
        plan = Plan.of(fired) if fired else _NO_PLAN
        for action in plan.hooks:
            await gateway._run_hook(action)
        labels = plan.labels
        data: dict[str, Any] | None = None
        answer: UpstreamAnswer | None = None
        if plan.answer is not None:
            answer = _own_answer(plan.answer, item.keep_alive)
        else:
            try:
                answer = await self._forward(item, plan)
            except UpstreamError as error:
                answer = _answer_of(HttpResponse(error.status, f"{error.reason}\n".encode(),
                                                 _PLAIN), item.keep_alive)
                labels = [*labels, f"upstream: {error.reason}"]
            else:
                if answer.headers.get("content-type", "").startswith("application/json"):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        loaded = orjson.loads(answer.body)
                        data = loaded if isinstance(loaded, dict) else None
                gateway._learn(target, dev_id, answer, data)
        try:
            sent_body, head, ended = await self._deliver(answer, item, plan, epoch)
            self._record(item, target, dev_id, answer, head, data, sent_body, fired,
                         ", ".join(labels) or None, started, ended)
        finally:
            if self._answering:
                self._answering = False
                gateway._answering(-1)

    async def _forward(self, item: _Item, plan: Plan) -> UpstreamAnswer:
        gateway = self._gateway
        url = gateway._upstream
        request = _encode_request(item, url, plan, keep_host=gateway.keep_host)
        no_body = item.request.method == "HEAD"
        connection = self._upstream
        reused = connection is not None and not connection.closed and connection.url is url
        if not reused:
            if connection is not None:
                connection.close()
            connection = self._upstream = await self._open_upstream(url)
        assert connection is not None
        try:
            return await connection.exchange(request, gateway.upstream_timeout, no_body=no_body)
        except UpstreamError as error:
            # A kept-alive connection the service had just closed: once more on a new one,
            # only when nothing of an answer came and the request may be sent twice.
            if not (reused and error.status == 502 and connection.answered_nothing
                    and item.request.method in ("GET", "HEAD")):
                raise
        connection = self._upstream = await self._open_upstream(url)
        return await connection.exchange(request, gateway.upstream_timeout, no_body=no_body)

    async def _open_upstream(self, url: UpstreamURL) -> UpstreamConnection:
        gateway = self._gateway
        return await UpstreamConnection.open(url, gateway.upstream_timeout,
                                             max_head=gateway.max_answer_head,
                                             max_body=gateway.max_answer_body)

    async def _deliver(self, answer: UpstreamAnswer | None, item: _Item, plan: Plan,
                       epoch: int) -> tuple[int | None, bytes, str]:
        """Send the answer as the plan says: the body bytes sent, the head as changed, and how
        the exchange ended for the device (``ANSWERED``, ``DEVICE_GONE``, ``CUT_BY_FAULT``)."""
        transport = self._transport
        assert transport is not None
        if answer is None:   # drop: no answer at all
            if plan.delay:
                await asyncio.sleep(plan.delay)
            self._answer_begins()
            self._close(transport)
            return None, b"", CUT_BY_FAULT
        head, body, cut_body = answer.head, answer.body, None
        for armed in plan.transforms:
            fault = armed.fault
            assert fault.bytes is not None
            if fault.kind is FaultKind.CONTENT_RANGE:
                head = shift_content_range(head, fault.bytes)
            elif fault.kind is FaultKind.CORRUPT:
                body = corrupt(body, fault.bytes, armed.rng)
            elif fault.kind is FaultKind.TRUNCATE:
                cut_body = fault.bytes if cut_body is None else min(cut_body, fault.bytes)
        wire_body = frame(body, chunked=answer.chunked)
        if cut_body is not None:
            wire_body = wire_body[:cut_body]
        data = head + wire_body
        close = cut_body is not None or not answer.keep_alive or not item.keep_alive
        if plan is _NO_PLAN and not self._eof:   # the path of every unfaulted exchange
            if transport.is_closing():
                return 0, head, DEVICE_GONE
            self._answer_begins()
            transport.write(data)
            if close:
                self._close(transport)
            return len(wire_body), head, ANSWERED
        if plan.delay:
            await asyncio.sleep(plan.delay)
        if plan.stall is not None:
            if epoch == self._gateway._epoch:   # else cleared while the service answered
                await self._hold(plan.stall)
            self._answer_begins()
            self._close(transport)
            return 0, head, CUT_BY_FAULT
        if transport.is_closing():   # it left while the service answered, or a fault delayed
            return 0, head, DEVICE_GONE
        cut = cut_body is not None
        if plan.cut is not None:
            data, close, cut = data[:plan.cut], True, True
        self._answer_begins()
        sent = await self._write(transport, data, plan)
        ended = CUT_BY_FAULT if cut or plan.reset else ANSWERED
        if sent < len(data) or (self._eof and not await _taken(transport)):
            ended = DEVICE_GONE
        if plan.reset:
            await _drained(transport)
            _reset(transport)
        elif close:
            self._close(transport)
        return max(0, sent - len(head)), head, ended

    def _answer_begins(self) -> None:
        """The device is about to see how its exchange ends (bytes, a close): until the record
        is made, ``Gateway.wait_recorded`` waits for it."""
        if not self._answering:
            self._answering = True
            self._gateway._answering(+1)

    async def _hold(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._release = release = loop.create_future()
        timer = loop.call_later(seconds, self.release)
        self._gateway._held.add(self)
        try:
            await release
        finally:
            timer.cancel()
            self._gateway._held.discard(self)
            self._release = None

    @staticmethod
    async def _write(transport: asyncio.Transport, data: bytes, plan: Plan) -> int:
        """Write ``data`` at the plan's pace; the bytes written before the device was gone."""
        pace = plan.pace
        if pace is None:
            transport.write(data)
            return len(data)
        for at in range(0, len(data), pace.size):
            if at:
                await asyncio.sleep(pace.gap)
            if transport.is_closing():
                return at
            transport.write(data[at:at + pace.size])
        return len(data)

    def _close(self, transport: asyncio.Transport) -> None:
        self._closing = True
        transport.close()

    def _record(self, item: _Item, target: Route, dev_id: str | None,
                answer: UpstreamAnswer | None, head: bytes, data: dict[str, Any] | None,
                sent_body: int | None, fired: list[Armed], label: str | None,
                started: Began, ended: str) -> None:
        request = item.request
        phase = target.endpoint
        headers = dict(request.headers)
        if "authorization" in headers:
            headers["authorization"] = redact_authorization(headers["authorization"])
        errno = data.get("errno") if data is not None else None
        error_byte = content_range = length = None
        if answer is not None and phase is Endpoint.DOWNLOAD:
            error_byte = _error_byte_of(answer)
            if error_byte is None:
                length = sent_body
                content_range = answer.headers.get("content-range")
                if content_range is not None and head is not answer.head:
                    content_range = _content_range_of(head) or content_range
        at, duration_ms = started.span()
        timeline = self._gateway.timeline
        seq = timeline.next_seq()
        for armed in fired:
            armed.recorded(seq)
        timeline.record(Exchange(
            seq=seq, at=at, dev_id=dev_id, phase=phase, method=request.method,
            target=request.target, request_headers=headers,
            request_body=request.body[:_BODY_IN_TIMELINE].decode("utf-8", "replace"),
            status=answer.status if answer is not None else 0,
            errno=errno if isinstance(errno, int) else None, answer=data,
            result=_result_of(phase, request.body), range=request.header("range"),
            content_range=content_range, length=length, error_byte=error_byte,
            duration_ms=duration_ms, fault=label,
            connection=self.number, ended=ended))


# ---------------------------------------------------------------------------------- helpers
def _encode_request(item: _Item, url: UpstreamURL, plan: Plan, *, keep_host: bool = False
                    ) -> bytes:
    """The request as the service gets it: as sent, but for Host (the service's, or the
    device's own with ``keep_host``) and what faults change."""
    request = item.request
    target = url.prefix + request.target if request.target.startswith("/") else request.target
    lines = [f"{request.method} {target} HTTP/{item.version}".encode("latin-1")]
    authorization: str | None = None
    altered = bool(plan.auth_variants)
    if altered:
        authorization = request.header("authorization")
        for variant in plan.auth_variants:
            authorization = alter_authorization(authorization, variant)
    host_sent = chunked = False
    for name, value in item.raw_headers:
        lower = name.lower()
        if lower == b"host":
            if host_sent:
                continue
            value, host_sent = (value if keep_host else url.host_header), True
        elif lower == b"transfer-encoding":
            chunked = chunked or b"chunked" in value.lower()
            continue
        elif lower == b"range" and plan.whole_file:
            continue
        elif lower == b"range" and plan.widen:
            value = widen_range(value, plan.widen)
        elif lower == b"authorization" and altered:
            if authorization is None:
                continue
            value, authorization = authorization.encode("latin-1"), None
        lines.append(name + b": " + value.strip())
    if not host_sent:
        lines.insert(1, b"Host: " + url.host_header)
    if altered and authorization is not None:   # garbled, where the device sent none
        lines.append(b"Authorization: " + authorization.encode("latin-1"))
    if chunked:
        lines.append(b"Content-Length: " + str(len(request.body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + request.body


def _answer_of(response: HttpResponse, keep_alive: bool) -> UpstreamAnswer:
    """An answer the gateway makes itself, in the shape of the service's."""
    wire = response.encode(keep_alive=keep_alive)
    head, _, body = wire.partition(b"\r\n\r\n")
    headers = {name.lower(): value for name, value in response.headers}
    if not response.close_delimited:
        headers["content-length"] = str(len(body))
    return UpstreamAnswer(response.status, head + b"\r\n\r\n", headers, body,
                          close_delimited=response.close_delimited,
                          keep_alive=keep_alive and not (response.close
                                                         or response.close_delimited))


def _own_answer(fault: Fault, keep_alive: bool) -> UpstreamAnswer | None:
    """The answer of drop (none), error-byte and http-5xx, in the service's place."""
    if fault.kind is FaultKind.DROP:
        return None
    assert fault.code is not None
    if fault.kind is FaultKind.ERROR_BYTE:   # OneNET's: 200, one byte, no length, then a close
        body = DownloadError(fault.code).body_in(ErrorBodyForm(fault.form or "raw"))
        return _answer_of(HttpResponse(200, body, close_delimited=True), keep_alive)
    return _answer_of(HttpResponse(fault.code, b"gateway fault\n", _PLAIN), keep_alive)


def _error_byte_of(answer: UpstreamAnswer) -> int | None:
    """The code of OneNET's error answer (200, no length, one byte: raw or the ASCII digit)."""
    code = decode_error_body(answer.body) if answer.status == 200 and answer.close_delimited \
        else None
    return None if code is None else int(code)


def _content_range_of(head: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-range":
            return value.strip().decode("latin-1")
    return None


def _result_of(phase: Endpoint, body: bytes) -> int | None:
    """A report's result or a progress step, parsed as the mock does (None if it does not parse)."""
    try:
        if phase is Endpoint.REPORT:
            return int(parse_result(body))
        if phase is Endpoint.PROGRESS:
            return parse_step(body)
    except ProtocolError:
        return None
    return None


async def _drained(transport: asyncio.Transport, timeout: float = 5.0) -> None:
    """Wait until the transport has handed every byte to the kernel."""
    deadline = time.monotonic() + timeout
    while transport.get_write_buffer_size() and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


async def _taken(transport: asyncio.Transport, timeout: float = _ACK_WAIT) -> bool:
    """Whether a device that had sent its FIN took the answer just written. A FIN alone does not
    tell a device that half-closed and reads on (its TCP acknowledges the answer) from one that
    closed and left (its TCP resets the connection); Linux shows which (TCP_INFO, SIOCOUTQ).
    Elsewhere it counts as taken; on Linux, with neither within ``timeout`` (a device powered
    off after its FIN), as gone."""
    sock = cast(socket.socket | None, transport.get_extra_info("socket"))
    if sys.platform != "linux" or sock is None:
        return True
    import fcntl
    import termios
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if transport.is_closing():   # a write failed: the device is gone
            return False
        if not transport.get_write_buffer_size():
            try:
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                unacked, = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                          b"\0\0\0\0"))
            except OSError:
                return False
            if state == _TCP_CLOSE:
                return False
            if unacked == 0:
                return True
        await asyncio.sleep(0.001)
    return False


def _reset(transport: asyncio.Transport) -> None:
    """Close with a TCP RST: SO_LINGER on with a zero timeout, then close."""
    sock = cast(socket.socket | None, transport.get_extra_info("socket"))
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()

