"""Clients that abuse a connection, against the mock and the gateway on real loopback sockets.

Issue 14, items 1 and 2. A device that goes away before its answer (its HTTP timeout, a power
cut) or half-closes after its requests; a client that pipelines and never reads its answers; a
request head that trickles in a byte at a time; more connections than the service takes; a
service that answers ``100 Continue`` first, or an answer too big to hold. Each test asserts
what the services do about it (what a client reads, what the timeline records), never how fast.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_gateway import address, split_answer
from test_service_http import RawConnection, detect_target, embedded_request

from hil.gateway import Fault, FaultKind, Gateway
from hil.onenet.messages import Endpoint
from hil.service.http import BackgroundServer, HttpServer
from hil.service.server import MockOneNet
from hil.service.timeline import Exchange, Timeline

DEV = "527776559"
TIMEOUT = 10
ANSWER = 64 * 1024                        # each pipelined download asks for this many bytes
PACKAGE = bytes(range(256)) * (ANSWER // 256)
PIPELINED = 1000


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def onenet() -> Iterator[MockOneNet]:
    with MockOneNet() as mock:
        yield mock


@pytest.fixture
def mock(onenet: MockOneNet) -> Iterator[MockOneNet]:
    onenet.service.reset()
    yield onenet
    onenet.service.raise_crashes()


@pytest.fixture
def gateway(mock: MockOneNet, tmp_path: Path) -> Iterator[Gateway]:
    timeline = Timeline(tmp_path / "gateway.jsonl")
    with Gateway(mock.url, timeline) as gw:
        yield gw
        gw.raise_errors()
    timeline.close()


def download(mock: MockOneNet, token: str, size: int = ANSWER) -> bytes:
    return embedded_request("GET", f"/ota/south/download/{token}", auth=mock.authorization(),
                            extra=(f"Range:bytes=0-{size - 1}",))


def unread_client(url: str) -> socket.socket:
    """A client whose kernel takes in little of what it is sent: it never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.settimeout(TIMEOUT)
    sock.connect(address(url))
    return sock


def kernel_room() -> int:
    """The most a server's kernel keeps for a client that does not read (the largest send
    buffer): answers there have left the service, so they are not the service's to bound."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return 4 * 1024 * 1024


def settled(count: Callable[[], int], *, quiet: float = 1.0, limit: float = 60.0) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds (``limit`` at most)."""
    deadline = time.monotonic() + limit
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def read_answers(sock: socket.socket, expected: int) -> list[tuple[str, bytes]]:
    """Read ``expected`` Content-Length framed answers: (status line, body) each."""
    connection = RawConnection.__new__(RawConnection)
    connection.sock, connection._buffer = sock, b""
    sock.settimeout(TIMEOUT)
    return [(reply.status_line, reply.body)
            for reply in (connection.reply() for _ in range(expected))]


def wait_until(condition: Callable[[], bool], what: str, limit: float = TIMEOUT) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit} s: {what}")
        time.sleep(0.02)


def only(timeline: Timeline) -> Exchange:
    exchanges = timeline.exchanges()
    assert len(exchanges) == 1, [e.summary() for e in exchanges]
    return exchanges[0]


# ------------------------------------------------------------------ a client that never reads
# Bound: what the kernel holds for the unread client, plus a few dozen held by the server.
BOUND = kernel_room() // ANSWER + 64


@pytest.mark.parametrize("via", ["mock", "gateway"])
def test_a_client_that_pipelines_and_never_reads_stops_being_served(mock, tmp_path, via):
    token = mock.service.create_task(DEV, "1.1.0", PACKAGE).token
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(Gateway(mock.url, Timeline())) if via == "gateway" \
            else None
        served = gateway.timeline if gateway is not None else mock.timeline
        with unread_client(gateway.url if gateway else mock.url) as sock:
            sock.sendall(download(mock, token) * PIPELINED)
            processed = settled(lambda: len(served))
            assert processed <= BOUND, \
                f"{processed} of {PIPELINED} answered to a client that read none"
            # Nothing was lost: once it reads, it gets every answer, in order.
            answers = read_answers(sock, PIPELINED)
        assert {answer for answer in answers} == {("HTTP/1.1 206 Partial Content", PACKAGE)}
        assert len(served) == PIPELINED
        if gateway is not None:
            assert {e.ended for e in served} == {"answered"}
            gateway.raise_errors()


def test_a_pipelining_client_that_half_closes_gets_every_answer_of_the_mock(mock):
    token = mock.service.create_task(DEV, "1.1.0", PACKAGE).token
    with unread_client(mock.url) as sock:
        sock.sendall(download(mock, token) * 200)
        sock.shutdown(socket.SHUT_WR)
        settled(lambda: len(mock.timeline))   # held: answers wait for the client to read
        answers = read_answers(sock, 200)
        assert sock.recv(1) == b""            # then the mock closes
    assert {answer for answer in answers} == {("HTTP/1.1 206 Partial Content", PACKAGE)}


# ------------------------------------------------------------------ a device that goes away
@pytest.mark.parametrize("via", ["mock", "gateway"])
def test_a_client_that_half_closes_after_its_requests_gets_every_answer(mock, gateway, via):
    mock.service.add_device(DEV)
    request = embedded_request("GET", detect_target(DEV), auth=mock.authorization())
    with socket.create_connection(address(gateway.url if via == "gateway" else mock.url),
                                  timeout=TIMEOUT) as sock:
        sock.sendall(request * 20)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 20
    assert data.count(b'"errno":11') == 20
    if via == "gateway":
        assert [e.ended for e in gateway.timeline] == ["answered"] * 20
    assert len(mock.timeline) == 20


def test_an_answer_the_device_has_is_in_the_timeline_once_waited_for(mock, gateway):
    """A device acts on its answer at once (a board prints ``ota end`` on its 201); the gateway
    records the exchange when it knows how it ended, later for a device that half-closed (the
    kernel's acknowledgement of the answer). A reader told "done" by the device waits for the
    record (``wait_recorded``), as a scenario does before it reads an attempt's exchanges:
    reading at once missed a board's 201 on a loaded host."""
    mock.service.add_device(DEV)
    request = embedded_request("GET", detect_target(DEV), auth=mock.authorization())
    for _ in range(20):
        with socket.create_connection(address(gateway.url), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while b'"errno":11' not in data:        # the device has its answer: it is done
                data += sock.recv(65536)
            assert gateway.wait_recorded(TIMEOUT)
            recorded = len(gateway.timeline)
        assert recorded == len(mock.timeline)
    assert [e.ended for e in gateway.timeline] == ["answered"] * 20
    assert not gateway.recording()


@pytest.mark.parametrize(("leaving", "written"), [("close", 4096), ("reset", 0)])
def test_a_device_gone_while_latency_holds_its_answer_is_recorded_not_a_crash(mock, gateway,
                                                                             leaving, written):
    token = mock.service.create_task(DEV, "1.1.0", PACKAGE).token
    device = socket.create_connection(address(gateway.url), timeout=TIMEOUT)
    if leaving == "reset":   # a close with unread data, or a power cut the TCP noticed
        device.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # The device gives up once the gateway has its request (its HTTP timeout), the answer
    # held by a latency fault that starts after it.
    gateway.arm(Fault(FaultKind.HOOK, action=device.close))
    gateway.arm(Fault(FaultKind.LATENCY, ms=300))
    device.sendall(download(mock, token, 4096))
    recorded = gateway.timeline.wait_for(lambda e: e.phase == Endpoint.DOWNLOAD,
                                         timeout=TIMEOUT)
    assert recorded.ended == "device gone"
    # After a FIN the gateway cannot know the device left until an answer is written (the
    # device's TCP resets it); after a reset it writes nothing.
    assert (recorded.status, recorded.length) == (206, written)
    assert "latency" in (recorded.fault or "")
    assert len(mock.timeline.exchanges(phase="download")) == 1   # the service did answer
    gateway.raise_errors()   # a device's timeout is no gateway crash


@pytest.mark.parametrize("leaving", ["close", "reset"])
def test_a_device_that_gives_up_during_a_stall_ends_it_at_once(mock, gateway, leaving):
    token = mock.service.create_task(DEV, "1.1.0", PACKAGE).token
    device = socket.create_connection(address(gateway.url), timeout=TIMEOUT)
    if leaving == "reset":
        device.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gateway.arm(Fault(FaultKind.STALL, seconds=120))
    device.sendall(download(mock, token, 4096))
    wait_until(lambda: len(mock.timeline) == 1, "the service answered")
    device.close()   # its HTTP timeout: the retry that follows must find the exchange recorded
    recorded = gateway.timeline.wait_for(lambda e: e.phase == Endpoint.DOWNLOAD,
                                         timeout=TIMEOUT)
    assert (recorded.ended, recorded.fault) == ("cut by fault", "stall 120s")


@pytest.mark.parametrize("kind", [FaultKind.LIMIT, FaultKind.STALL, FaultKind.DROP])
def test_an_answer_a_fault_cuts_is_recorded_cut_by_the_fault(mock, gateway, kind):
    token = mock.service.create_task(DEV, "1.1.0", PACKAGE).token
    gateway.arm(Fault(kind, **({"bytes": 100} if kind is FaultKind.LIMIT else
                               {"seconds": 0.1} if kind is FaultKind.STALL else {})))
    with socket.create_connection(address(gateway.url), timeout=TIMEOUT) as sock:
        sock.sendall(download(mock, token, 4096))
        while sock.recv(65536):
            pass
    assert only(gateway.timeline).ended == "cut by fault"


def test_an_answered_exchange_is_recorded_answered(mock, gateway):
    mock.service.add_device(DEV)
    with socket.create_connection(address(gateway.url), timeout=TIMEOUT) as sock:
        sock.sendall(embedded_request("GET", detect_target(DEV), auth=mock.authorization(),
                                      extra=("Connection:close",)))
        while sock.recv(65536):
            pass
    assert only(gateway.timeline).ended == "answered"
    assert mock.timeline.exchanges()[0].ended is None   # the mock delivers what it answers


# ------------------------------------------------------------------ a head that never ends
def trickle(url: str, data: bytes, gap: float = 0.1, limit: float = 30.0) -> bytes:
    """Send ``data`` a byte every ``gap`` seconds (cycling), until the server answers and
    closes; what it sent back."""
    with socket.create_connection(address(url), timeout=TIMEOUT) as sock:
        deadline = time.monotonic() + limit
        at = 0
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], gap)
            if readable:
                answer = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := sock.recv(65536):
                        answer += chunk
                return answer
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data[at % len(data):at % len(data) + 1])
            at += 1
    raise AssertionError(f"the server still reads a head trickling in after {limit} s")


SLOW_HEAD = b"GET /ota/south/check?dev_id=1&type=2&version=1.0.0 HTTP/1.1\r\nX-Pad: " + \
    b"x" * 4000


def test_the_mock_answers_408_to_a_request_that_never_completes(mock):
    with BackgroundServer(mock.service.handle, request_timeout=0.5, idle_timeout=60) as server:
        answer = trickle(server.url, SLOW_HEAD)
    status, headers, body = split_answer(answer)
    assert status == "HTTP/1.1 408 Request Timeout"
    assert headers["Connection"] == "close"
    assert b"0.5 s" in body
    assert len(mock.timeline) == 0


def test_the_gateway_answers_408_to_a_request_that_never_completes(mock):
    with Gateway(mock.url, request_timeout=0.5) as gateway:
        answer = trickle(gateway.url, SLOW_HEAD)
        gateway.raise_errors()
    assert split_answer(answer)[0] == "HTTP/1.1 408 Request Timeout"
    assert len(mock.timeline) == 0


def test_a_request_deadline_is_documented_and_generous():
    server = HttpServer(lambda request: None)   # type: ignore[arg-type,return-value]
    assert server.request_timeout >= 10
    assert server.max_connections >= 256


# ------------------------------------------------------------------ more connections than taken
def served_once(url: str) -> RawConnection:
    connection = RawConnection(url)
    connection.send(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.reply().status == 404
    return connection


def first_status(url: str) -> int:
    """The status of the first answer on a new connection to ``url``."""
    with RawConnection(url) as connection:
        connection.send(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        return connection.reply().status


@pytest.mark.parametrize("via", ["mock", "gateway"])
def test_connections_over_the_cap_are_refused_with_a_clear_answer(mock, via):
    with contextlib.ExitStack() as stack:
        if via == "mock":
            server = stack.enter_context(BackgroundServer(mock.service.handle,
                                                          max_connections=2))
        else:
            server = stack.enter_context(Gateway(mock.url, max_connections=2))
        first = stack.enter_context(served_once(server.url))
        stack.enter_context(served_once(server.url))
        with RawConnection(server.url) as third:   # refused before it sends a byte
            answer = third.read_until_close().decode("latin-1")
        assert answer.startswith("HTTP/1.1 503 Service Unavailable\r\n")
        assert "Connection: close\r\n" in answer
        assert answer.endswith("over 2 connections: try again later\n")
        first.sock.close()   # one goes: a new one is served again
        wait_until(lambda: first_status(server.url) == 404,
                   "a connection served once one of the two left")


# ------------------------------------------------------------------ what the service answers
class ScriptedService:
    """A service on loopback that reads each request and answers with ``writes``, sent apart."""

    def __init__(self, writes: list[bytes], *, then_hold: bool = False) -> None:
        self.writes = writes
        self.then_hold = then_hold
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ScriptedService:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(TIMEOUT)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                sock, _ = self._listener.accept()
                with sock:
                    received = b""
                    while b"\r\n\r\n" not in received:
                        received += sock.recv(65536)
                    for write in self.writes:
                        sock.sendall(write)
                        time.sleep(0.05)
                    if self.then_hold:
                        self._stop.wait(TIMEOUT)


FINAL = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("writes", [
    [b"HTTP/1.1 100 Continue\r\n\r\n" + FINAL],
    [b"HTTP/1.1 100 Continue\r\n\r\n", FINAL],
    [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n", FINAL[:20], FINAL[20:]],
], ids=["one-write", "apart", "two-interim"])
def test_an_interim_100_continue_is_not_the_answer(writes):
    with ScriptedService(writes) as service, Gateway(service.url) as gateway, \
            RawConnection(gateway.url) as device:
        device.send(b"POST /ota/device/version?dev_id=1 HTTP/1.1\r\nHost: x\r\n"
                    b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n{}")
        reply = device.reply()
        assert (reply.status, reply.body) == (200, b"ok")
        assert only(gateway.timeline).status == 200
        gateway.raise_errors()


HUGE_HEADERS = b"HTTP/1.1 200 OK\r\n" + b"".join(
    b"X-Pad-%d: %s\r\n" % (n, b"p" * 100) for n in range(1000))


@pytest.mark.parametrize(("writes", "options", "reason"), [
    ([HUGE_HEADERS], {}, "the service's answer head is over 65536 bytes"),
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000],
     {"max_answer_body": 1 << 20}, "the service's answer body is over 1048576 bytes"),
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
      *[b"10000\r\n" + b"x" * 0x10000 + b"\r\n"] * 20],
     {"max_answer_body": 1 << 20}, "the service's answer body is over 1048576 bytes"),
], ids=["head", "announced-body", "chunked-body"])
def test_an_answer_too_big_to_hold_is_a_recorded_502(writes, options, reason):
    with ScriptedService(writes, then_hold=True) as service, \
            Gateway(service.url, upstream_timeout=TIMEOUT, **options) as gateway, \
            RawConnection(gateway.url) as device:
        device.send(b"GET /ota/south/check?dev_id=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = device.reply()
        assert reply.status == 502
        assert reason.encode() in reply.body
        recorded = only(gateway.timeline)
        assert recorded.status == 502
        assert recorded.fault == f"upstream: {reason}"
        assert recorded.ended == "answered"
        gateway.raise_errors()


def test_answer_limits_are_documented_and_generous():
    gateway = Gateway("http://127.0.0.1:9")
    assert gateway.max_answer_head >= 64 * 1024
    assert gateway.max_answer_body >= 16 * 1024 * 1024
