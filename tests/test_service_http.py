"""The mock service on the wire: what embedded OTA clients send, and what they can parse back.

Raw sockets, because here the bytes are the behaviour: ONENET.md's "What real device clients do"
(a new TCP connection per request, ``Host: ota.heclouds.com``, ``Name:value`` headers, a
right-aligned ``Content-Length``) and the strict parsers on the other end (a literal
``HTTP/1.1 <code>`` status line, case-sensitive ``Content-Length``/``Content-Range``, at most 10
headers, JSON answers under 512 bytes). Then keep-alive, pipelining, the 1000-request limit, and
requests that are not HTTP at all. Every socket has a timeout: a server that hangs fails the test.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import requests
import urllib3.util.connection

from hil.onenet.codes import ErrorBodyForm, TaskState
from hil.service.http import BackgroundServer, HttpServer
from hil.service.server import MockOneNet

TIMEOUT = 5
DEV = "527776559"
TARGET = "V2"
STRICT_STATUS_LINE = re.compile(r"HTTP/1\.1 [1-5][0-9]{2} [A-Za-z][A-Za-z -]*")


# ------------------------------------------------------------------------------ raw HTTP client
@dataclass
class Reply:
    status_line: str
    headers: list[tuple[str, str]]   # names exactly as the server wrote them
    body: bytes
    raw_size: int                    # head and body, in bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ")[1])

    def header(self, name: str) -> str | None:
        """The value of header ``name``, matched case-sensitively as strict clients do."""
        values = [value.strip() for key, value in self.headers if key == name]
        assert len(values) <= 1, f"header {name} sent {len(values)} times"
        return values[0] if values else None

    def json(self) -> dict[str, Any]:
        assert self.header("Content-Type") == "application/json"
        payload = json.loads(self.body)
        assert isinstance(payload["errno"], int)
        assert isinstance(payload["error"], str)
        return payload

    def assert_strict_client_can_parse(self) -> None:
        """What the small embedded parsers of ONENET.md need from any answer."""
        assert STRICT_STATUS_LINE.fullmatch(self.status_line), self.status_line
        assert len(self.headers) <= 10, self.headers
        for name, _ in self.headers:
            if name.lower() == "content-length":
                assert name == "Content-Length"
            if name.lower() == "content-range":
                assert name == "Content-Range"
        if self.header("Content-Length") is not None:
            assert int(self.header("Content-Length")) == len(self.body)
        if self.header("Content-Type") == "application/json":
            assert self.raw_size < 512, f"a JSON answer of {self.raw_size} bytes"


class RawConnection:
    """One TCP connection to the service, reading answers framed by Content-Length or by close."""

    def __init__(self, url: str, timeout: float = TIMEOUT, host: str | None = None) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((host or parts.hostname, parts.port),
                                             timeout=timeout)
        self._buffer = b""

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self._buffer += chunk
        return bool(chunk)

    def reply(self) -> Reply:
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                raise EOFError(f"connection closed before an answer; got {self._buffer!r}")
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = [(name, value) for name, _, value in (line.partition(":") for line in lines[1:])]
        lengths = [value for name, value in headers if name.lower() == "content-length"]
        if lengths:
            size = int(lengths[0])
            while len(self._buffer) < size:
                if not self._fill():
                    raise EOFError("connection closed in the middle of a body")
            body, self._buffer = self._buffer[:size], self._buffer[size:]
        else:   # no Content-Length: the body ends when the server closes
            while self._fill():
                pass
            body, self._buffer = self._buffer, b""
        return Reply(lines[0], headers, body, len(head) + 4 + len(body))

    def read_until_close(self) -> bytes:
        """Every byte the server sends until it closes: the answer exactly as it went out."""
        while self._fill():
            pass
        data, self._buffer = self._buffer, b""
        return data

    def closed_by_server(self, wait: float = TIMEOUT) -> bool:
        """True once the server has closed (EOF or reset); False if it is still open after wait."""
        if self._buffer:
            return False
        self.sock.settimeout(wait)
        try:
            return not self._fill() and not self._buffer
        except TimeoutError:
            return False


def embedded_request(method: str, target: str, *, auth: str | None = None,
                     body: bytes | None = None, extra: tuple[str, ...] = ()) -> bytes:
    """A request as the vendor C SDK writes it: ``Name:value``, a right-aligned length."""
    lines = [f"{method} {target} HTTP/1.1", "Host:ota.heclouds.com"]
    if auth is not None:
        lines.append(f"Authorization:{auth}")
    lines.append("Content-Type:application/json")
    lines.extend(extra)
    if body is not None:
        lines.append(f"Content-Length:{len(body):>7}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def one_shot(url: str, request: bytes) -> Reply:
    """A fresh TCP connection for one request, as embedded clients do."""
    with RawConnection(url) as connection:
        connection.send(request)
        return connection.reply()


def detect_target(dev_id: str = DEV, **extra: str) -> str:
    query = {"dev_id": dev_id, "type": "2", "version": "V1", "cdn": "false", **extra}
    return "/ota/south/check?" + urlencode(query)


@pytest.fixture
def port(mock_onenet: MockOneNet) -> int:
    return urlsplit(mock_onenet.url).port


def package_of(size: int) -> bytes:
    return bytes((i * 7 + i // 256) % 256 for i in range(size))


# ------------------------------------------------------------------------ embedded client style
class TestEmbeddedClient:
    def test_version_post_with_right_aligned_content_length(self, mock_onenet):
        mock_onenet.service.create_task(DEV, TARGET, b"\x01" * 100)
        body = b'{"f_version":"V1","s_version":"V1"}'
        request = embedded_request("POST", f"/ota/device/version?dev_id={DEV}",
                                   auth=mock_onenet.authorization(), body=body)
        assert b"\r\nContent-Length:     35\r\n" in request
        assert b"\r\nHost:ota.heclouds.com\r\n" in request
        reply = one_shot(mock_onenet.url, request)
        reply.assert_strict_client_can_parse()
        assert reply.status_line == "HTTP/1.1 200 OK"
        assert reply.json()["errno"] == 0
        assert mock_onenet.service.device_version(DEV) == "V1"
        assert mock_onenet.timeline.exchanges()[-1].request_body == body.decode()

    def test_every_phase_one_connection_each_answers_a_strict_client(self, mock_onenet):
        package = package_of(10_000)
        task = mock_onenet.service.create_task(DEV, TARGET, package, manuf="102", model="10201")
        auth = mock_onenet.authorization(encoded=False)   # devices also send it raw

        def call(method: str, target: str, body: bytes | None = None,
                 extra: tuple[str, ...] = ()) -> Reply:
            reply = one_shot(mock_onenet.url, embedded_request(method, target, auth=auth,
                                                               body=body, extra=extra))
            reply.assert_strict_client_can_parse()
            return reply

        found = call("GET", detect_target()).json()   # no manuf/model, like the vendor SDK
        assert found["errno"] == 0
        assert found["data"]["token"] == task.token
        received = bytearray()
        for start in range(0, found["data"]["size"], 4096):
            checked = call("GET", f"/ota/south/download/{task.token}/check?dev_id={DEV}")
            assert checked.json()["errno"] == 0
            chunk = call("GET", f"/ota/south/download/{task.token}",
                         extra=(f"Range:{start}-{start + 4095}",))
            end = min(start + 4095, len(package) - 1)
            assert chunk.status_line == "HTTP/1.1 206 Partial Content"
            assert chunk.header("Content-Range") == f"bytes {start}-{end}/{len(package)}"
            received += chunk.body
        assert hashlib.md5(received).hexdigest() == found["data"]["md5"]
        for step in (101, 201):
            progressed = call("POST", f"/ota/south/device/download/{task.token}/progress"
                              f"?dev_id={DEV}", body=json.dumps({"step": step}).encode())
            assert progressed.json()["errno"] == 0
        assert mock_onenet.service.task(DEV).state is TaskState.SUCCEEDED
        assert mock_onenet.timeline.reported_codes(DEV) == [101, 201]

    def test_json_answers_carry_no_padding_headers(self, mock_onenet):
        mock_onenet.service.create_task(DEV, TARGET, b"\x01" * 100)
        reply = one_shot(mock_onenet.url, embedded_request(
            "GET", detect_target(), auth=mock_onenet.authorization()))
        names = {name for name, _ in reply.headers}
        assert names <= {"Content-Type", "Content-Length", "Connection"}, names

    def test_largest_detect_answer_fits_in_512_bytes(self, mock_onenet):
        target = "V" * 10 + "1234567890"   # 20 characters, the longest valid version
        size = 10_000_000                   # an 8-digit size
        mock_onenet.service.create_task(DEV, target, b"\xa5" * size, manuf="103", model="10301",
                                        signal=100, power=100, retry=99, interval=86400)
        reply = one_shot(mock_onenet.url, embedded_request(
            "GET", detect_target(manuf="103", model="10301", signal="100", power="100"),
            auth=mock_onenet.authorization()))
        data = reply.json()["data"]
        assert len(data["target"]) == 20
        assert {"ip", "ipPort"} <= data.keys()   # cdn=false: the longest form of the answer
        assert data["size"] == size
        reply.assert_strict_client_can_parse()   # includes: head and body under 512 bytes
        assert reply.raw_size < 512

    @pytest.mark.parametrize(("form", "wire"), [(None, b"\x03"), (ErrorBodyForm.ASCII, b"3")])
    @pytest.mark.parametrize("state", [TaskState.SUCCEEDED, TaskState.CANCELLED])
    def test_error_byte_answer_is_literal_and_length_less(self, mock_onenet, state, form, wire):
        """OneNET's raw byte by default (the vendor client compares its value and, with no
        Content-Length, would wait for atoi("3") bytes of a digit); the digit when asked."""
        if form is not None:
            mock_onenet.service.error_body = form
        task = mock_onenet.service.create_task(DEV, TARGET, b"\x01" * 100)
        if state is TaskState.CANCELLED:
            mock_onenet.service.cancel(DEV)
        else:
            auth = mock_onenet.authorization()
            for body in (b'{"result":101}', b'{"result":201}'):
                reply = one_shot(mock_onenet.url, embedded_request(
                    "POST", f"/ota/south/report?dev_id={DEV}&token={task.token}", auth=auth,
                    body=body))
                assert reply.json()["errno"] == 0
        with RawConnection(mock_onenet.url) as connection:
            connection.send(embedded_request("GET", f"/ota/south/download/{task.token}",
                                             auth=mock_onenet.authorization(),
                                             extra=("Range:0-4095",)))
            reply = connection.reply()   # read until the server closes
            assert connection.closed_by_server()
        reply.assert_strict_client_can_parse()
        assert reply.status_line == "HTTP/1.1 200 OK"
        assert reply.body == wire
        assert reply.header("Content-Length") is None
        assert reply.header("Content-Range") is None
        # The timeline records the code, whichever form went on the wire.
        assert mock_onenet.timeline.exchanges()[-1].error_byte == 3

    def test_error_body_is_the_raw_byte_again_after_a_test_asked_for_the_digit(self, mock_onenet):
        mock_onenet.service.error_body = ErrorBodyForm.ASCII
        mock_onenet.service.reset()   # what the mock_onenet fixture does between tests
        answer = one_shot(mock_onenet.url, embedded_request(
            "GET", "/ota/south/download/ota_unknown", auth=mock_onenet.authorization()))
        assert answer.body == b"\x03"

    @pytest.mark.parametrize(("form", "body"), [(None, b"\x03"), (ErrorBodyForm.ASCII, b"3"),
                                                ("ascii", b"3"), ("raw", b"\x03")])
    def test_error_body_form_chosen_when_the_mock_is_made(self, form, body):
        """Exactly these bytes on the wire, read by requests as the simulated firmware does."""
        options = {} if form is None else {"error_body": form}
        with MockOneNet(**options) as onenet:
            onenet.service.reset()   # the form outlives a reset: it is the mock's own
            reply = requests.get(f"{onenet.url}/ota/south/download/ota_unknown",
                                 headers={"Authorization": onenet.authorization()},
                                 timeout=TIMEOUT)
            with RawConnection(onenet.url) as connection:
                connection.send(embedded_request("GET", "/ota/south/download/ota_unknown",
                                                 auth=onenet.authorization()))
                raw = connection.read_until_close()
        assert (reply.status_code, reply.content) == (200, body)
        assert "Content-Length" not in reply.headers
        assert raw == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body


# ------------------------------------------------------------------------------------ ranges
SIZE = 10_000
RANGE_CASES = [
    # (Range header, status, first byte, last byte)
    ("0-4095", 206, 0, 4095),
    ("bytes=0-4095", 206, 0, 4095),
    ("4096-8191", 206, 4096, 8191),
    ("8192-12287", 206, 8192, SIZE - 1),            # the last 4 KiB chunk asks past the end
    ("bytes=8192-12287", 206, 8192, SIZE - 1),
    ("0-9999", 206, 0, SIZE - 1),                   # the whole file, still ranged
    ("bytes=0-", 206, 0, SIZE - 1),
    ("0-", 206, 0, SIZE - 1),
    ("bytes=9999-", 206, SIZE - 1, SIZE - 1),
    ("bytes=10000-", 206, 0, SIZE - 1),             # start >= len: start = 0
    ("bytes=20-10", 206, 0, 10),                    # start > end: start = 0
    ("bytes=-100", 206, SIZE - 100, SIZE - 1),
    ("-100", 206, SIZE - 100, SIZE - 1),
    ("bytes=-20000", 206, 0, SIZE - 1),             # n > len: the whole file
    ("bytes=0100-0199", 206, 100, 199),             # leading zeros
    ("bytes=5-5", 206, 5, 5),
    ("bytes=" + "9" * 30 + "-", 206, 0, SIZE - 1),  # a huge start is still start >= len
    ("bytes=" + "9" * 5000 + "-", 206, 0, SIZE - 1),
    ("0-" + "9" * 5000, 206, 0, SIZE - 1),
    (None, 200, 0, SIZE - 1),
    ("bytes=-0", 200, 0, SIZE - 1),
    ("bytes=-", 200, 0, SIZE - 1),
    ("bytes=abc", 200, 0, SIZE - 1),
    ("items=0-99", 200, 0, SIZE - 1),
    ("bytes=0-9,20-29", 200, 0, SIZE - 1),
    ("bytes=\u0661-\u0662", 200, 0, SIZE - 1),      # Arabic-Indic digits are not digits
]


class TestRanges:
    @pytest.mark.parametrize(("range_", "status", "first", "last"), RANGE_CASES,
                             ids=[str(case[0])[:40] for case in RANGE_CASES])
    def test_range_answer(self, mock_onenet, range_, status, first, last):
        package = package_of(SIZE)
        task = mock_onenet.service.create_task(DEV, TARGET, package)
        extra = () if range_ is None else (f"Range:{range_}",)
        reply = one_shot(mock_onenet.url, (embedded_request(
            "GET", f"/ota/south/download/{task.token}", auth=mock_onenet.authorization(),
            extra=extra)))
        mock_onenet.service.raise_crashes()
        reply.assert_strict_client_can_parse()
        assert reply.status == status
        assert reply.body == package[first:last + 1]
        assert reply.header("Content-Length") == str(last - first + 1)
        if status == 206:
            assert reply.status_line == "HTTP/1.1 206 Partial Content"
            assert reply.header("Content-Range") == f"bytes {first}-{last}/{SIZE}"
        else:
            assert reply.status_line == "HTTP/1.1 200 OK"
            assert reply.header("Content-Range") is None
        disposition = reply.header("Content-Disposition")
        assert disposition is not None
        assert "filename=" in disposition
        exchange = mock_onenet.timeline.exchanges()[-1]
        assert (exchange.phase, exchange.status, exchange.length) == ("download", status,
                                                                      last - first + 1)

    def test_requests_library_reads_ranged_chunks(self, mock_onenet):
        package = package_of(SIZE)
        task = mock_onenet.service.create_task(DEV, TARGET, package)
        url = f"{mock_onenet.url}/ota/south/download/{task.token}"
        received = b""
        with requests.Session() as session:
            session.headers["Authorization"] = mock_onenet.authorization()
            for start in range(0, SIZE, 4096):
                response = session.get(url, headers={"Range": f"{start}-{start + 4095}"},
                                       timeout=TIMEOUT)
                assert response.status_code == 206
                received += response.content
            whole = session.get(url, timeout=TIMEOUT)
        assert received == package
        assert whole.status_code == 200
        assert whole.content == package
        assert "Content-Disposition" in whole.headers


# --------------------------------------------------------------------- keep-alive, pipelining
def _detect_no_task(mock_onenet: MockOneNet, dev_id: str = DEV) -> bytes:
    return embedded_request("GET", detect_target(dev_id), auth=mock_onenet.authorization())


class TestConnections:
    def test_requests_session_reuses_one_connection(self, mock_onenet, monkeypatch):
        opened: list[object] = []
        original = urllib3.util.connection.create_connection

        def counting(*args: Any, **kwargs: Any) -> socket.socket:
            opened.append(args[0])
            return original(*args, **kwargs)

        monkeypatch.setattr(urllib3.util.connection, "create_connection", counting)
        task = mock_onenet.service.create_task(DEV, TARGET, package_of(SIZE))
        with requests.Session() as session:
            session.headers["Authorization"] = mock_onenet.authorization()
            for _ in range(60):
                found = session.get(mock_onenet.url + detect_target(), timeout=TIMEOUT).json()
                assert found["errno"] == 0
                chunk = session.get(f"{mock_onenet.url}/ota/south/download/{task.token}",
                                    headers={"Range": "bytes=0-99"}, timeout=TIMEOUT)
                assert chunk.status_code == 206
                assert "Connection" not in chunk.headers
        assert len(opened) == 1
        assert len(mock_onenet.timeline) == 120

    def test_sequential_requests_on_one_raw_connection(self, mock_onenet):
        mock_onenet.service.add_device(DEV)
        with RawConnection(mock_onenet.url) as connection:
            for _ in range(25):
                connection.send(_detect_no_task(mock_onenet))
                reply = connection.reply()
                assert reply.json()["errno"] == 11
                assert reply.header("Connection") is None
            assert not connection.closed_by_server(wait=0.2)

    def test_pipelined_requests_are_answered_in_order(self, mock_onenet):
        package = package_of(SIZE)
        task = mock_onenet.service.create_task(DEV, TARGET, package)
        mock_onenet.service.add_device("other")
        auth = mock_onenet.authorization()
        requests_ = [
            embedded_request("GET", f"/ota/south/download/{task.token}", auth=auth,
                             extra=("Range:0-9",)),
            embedded_request("GET", detect_target("other"), auth=auth),
            embedded_request("GET", f"/ota/south/download/{task.token}", auth=auth,
                             extra=("Range:bytes=10-19",)),
            embedded_request("GET", "/no/such/path", auth=auth),
            embedded_request("GET", detect_target(), auth=auth),
        ]
        with RawConnection(mock_onenet.url) as connection:
            connection.send(b"".join(requests_))
            replies = [connection.reply() for _ in requests_]
        assert replies[0].body == package[0:10]
        assert replies[1].json()["errno"] == 11
        assert replies[2].body == package[10:20]
        assert replies[3].status == 404
        assert replies[4].json()["data"]["token"] == task.token
        phases = [e.phase for e in mock_onenet.timeline]
        assert phases == ["download", "detect", "download", "unknown", "detect"]

    def test_two_requests_in_one_send(self, mock_onenet):
        mock_onenet.service.add_device(DEV)
        mock_onenet.service.add_device("second")
        with RawConnection(mock_onenet.url) as connection:
            connection.send(_detect_no_task(mock_onenet) + _detect_no_task(mock_onenet, "second"))
            first, second = connection.reply(), connection.reply()
        assert first.json()["errno"] == 11
        assert second.json()["errno"] == 11
        assert [e.dev_id for e in mock_onenet.timeline] == [DEV, "second"]

    def test_default_limit_is_1000_requests_per_connection(self, mock_onenet):
        assert HttpServer(lambda request: None).max_requests == 1000   # type: ignore[arg-type]
        mock_onenet.service.add_device(DEV)
        request = _detect_no_task(mock_onenet)
        with RawConnection(mock_onenet.url) as connection:
            for number in range(1, 1001):
                connection.send(request)
                reply = connection.reply()
                assert reply.json()["errno"] == 11
                if number < 1000:
                    assert reply.header("Connection") is None, number
            assert reply.header("Connection") == "close"
            assert connection.closed_by_server()
        assert len(mock_onenet.timeline) == 1000

    def test_a_server_with_max_requests_5_closes_after_the_fifth(self, mock_onenet):
        mock_onenet.service.add_device(DEV)
        with BackgroundServer(mock_onenet.service.handle, max_requests=5) as server, \
                RawConnection(server.url) as connection:
            # Seven pipelined requests: five answers, then the close.
            connection.send(_detect_no_task(mock_onenet) * 7)
            replies = [connection.reply() for _ in range(5)]
            assert connection.closed_by_server()
        assert [r.json()["errno"] for r in replies] == [11] * 5
        assert [r.header("Connection") for r in replies] == [None] * 4 + ["close"]
        assert len(mock_onenet.timeline) == 5

    @pytest.mark.parametrize("sent", [b"", b"GET /ota/south/check?dev_id=1 HTTP/1.1\r\nHost:"],
                             ids=["silent", "half-a-request"])
    def test_an_idle_connection_is_closed_never_held(self, mock_onenet, sent):
        with BackgroundServer(mock_onenet.service.handle, idle_timeout=0.3) as server, \
                RawConnection(server.url) as connection:
            connection.send(sent)
            began = time.monotonic()
            assert connection.closed_by_server(wait=TIMEOUT)
            assert time.monotonic() - began < 2
        assert len(mock_onenet.timeline) == 0

    def test_a_client_asking_to_close_is_closed(self, mock_onenet):
        mock_onenet.service.add_device(DEV)
        with RawConnection(mock_onenet.url) as connection:
            connection.send(embedded_request("GET", detect_target(),
                                             auth=mock_onenet.authorization(),
                                             extra=("Connection:close",)))
            assert connection.reply().json()["errno"] == 11
            assert connection.closed_by_server()


# ------------------------------------------------------------------------------ bad requests
GARBAGE = {
    "binary": b"\x00\x01\x02\x03garbage\r\n\r\n",
    "tls-client-hello": bytes.fromhex("160301020001000001fc0303") + b"\x00" * 64,
    "not-a-method": b"HELLO\r\n\r\n",
    "header-without-colon": b"GET /ota/south/check HTTP/1.1\r\nNoColonHere\r\n\r\n",
    "unknown-http-version": b"GET /ota/south/check HTTP/9.9\r\n\r\n",
    "spaces-in-target": b"GET /ota/south check HTTP/1.1\r\n\r\n",
    "negative-length": b"POST /ota/south/report HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    "two-lengths": b"POST /ota/south/report HTTP/1.1\r\nContent-Length: 1\r\n"
                   b"Content-Length: 2\r\n\r\nab",
    "bad-chunk": b"POST /ota/south/report HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "connect": b"CONNECT ota.heclouds.com:443 HTTP/1.1\r\nHost: ota.heclouds.com\r\n\r\n",
}


class TestBadRequests:
    @pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
    def test_garbage_is_answered_400_and_closed(self, mock_onenet, garbage):
        with RawConnection(mock_onenet.url) as connection:
            connection.send(garbage)
            reply = connection.reply()
            assert connection.closed_by_server()
        assert reply.status_line == "HTTP/1.1 400 Bad Request"
        reply.assert_strict_client_can_parse()

    def test_garbage_after_a_good_request_answers_both(self, mock_onenet):
        mock_onenet.service.add_device(DEV)
        with RawConnection(mock_onenet.url) as connection:
            connection.send(_detect_no_task(mock_onenet) + b"\x00\xffnonsense\r\n\r\n")
            assert connection.reply().json()["errno"] == 11
            assert connection.reply().status == 400
            assert connection.closed_by_server()

    def test_oversized_body_is_answered_413(self, mock_onenet):
        body = b"{" + b" " * 70_000 + b"}"
        with RawConnection(mock_onenet.url) as connection:
            connection.send(embedded_request("POST", f"/ota/device/version?dev_id={DEV}",
                                             auth=mock_onenet.authorization(), body=body))
            reply = connection.reply()
            assert connection.closed_by_server()
        assert reply.status_line == "HTTP/1.1 413 Request Entity Too Large"
        reply.assert_strict_client_can_parse()
        assert len(mock_onenet.timeline) == 0   # refused before it reached the service

    def test_body_just_under_the_limit_is_served(self, mock_onenet):
        mock_onenet.service.add_device(DEV)
        body = b'{"s_version":"V7"' + b" " * (64 * 1024 - 20) + b"}"
        reply = one_shot(mock_onenet.url, embedded_request(
            "POST", f"/ota/device/version?dev_id={DEV}", auth=mock_onenet.authorization(),
            body=body))
        assert reply.json()["errno"] == 0
        assert mock_onenet.service.device_version(DEV) == "V7"

    @pytest.mark.parametrize("where", ["header", "target"])
    def test_oversized_head_is_answered_431(self, mock_onenet, where):
        filler = "a" * 20_000
        if where == "header":
            request = embedded_request("GET", detect_target(), auth=mock_onenet.authorization(),
                                       extra=(f"X-Filler:{filler}",))
        else:
            request = embedded_request("GET", detect_target(pad=filler),
                                       auth=mock_onenet.authorization())
        with RawConnection(mock_onenet.url) as connection:
            connection.send(request)
            reply = connection.reply()
            assert connection.closed_by_server()
        assert reply.status_line == "HTTP/1.1 431 Request Header Fields Too Large"
        assert len(mock_onenet.timeline) == 0

    @pytest.mark.parametrize("path", ["/", "/ota", "/ota/south", "/ota/south/checks",
                                      "/ota/south/download/", "/ota/south/download/a/b/c",
                                      "/ota/south/download/" + "t" * 65,
                                      "/OTA/SOUTH/CHECK", "/favicon.ico"])
    def test_unknown_path_is_404_json(self, mock_onenet, path):
        reply = one_shot(mock_onenet.url, embedded_request("GET", path,
                                                           auth=mock_onenet.authorization()))
        assert reply.status_line == "HTTP/1.1 404 Not Found"
        reply.assert_strict_client_can_parse()
        assert reply.json()["errno"] != 0
        exchange = mock_onenet.timeline.exchanges()[-1]
        assert (exchange.phase, exchange.status) == ("unknown", 404)

    @pytest.mark.parametrize(("method", "path"), [
        ("POST", "/ota/south/check"), ("PUT", "/ota/check"),
        ("POST", "/ota/south/download/ota_x/check"), ("DELETE", "/ota/south/download/ota_x"),
        ("GET", "/ota/south/device/download/ota_x/progress"), ("GET", "/ota/south/report"),
        ("GET", "/ota/device/version"), ("HEAD", "/ota/south/check"),
    ])
    def test_wrong_method_is_405_json(self, mock_onenet, method, path):
        mock_onenet.service.create_task(DEV, TARGET, b"\x01" * 10)
        with RawConnection(mock_onenet.url) as connection:
            connection.send(embedded_request(method, f"{path}?dev_id={DEV}",
                                             auth=mock_onenet.authorization(), body=b"{}"))
            reply = connection.reply() if method != "HEAD" else None
            if method == "HEAD":   # an answer to HEAD has a length but no body
                head = connection.sock.recv(4096)
                assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
        if reply is not None:
            assert reply.status_line == "HTTP/1.1 405 Method Not Allowed"
            reply.assert_strict_client_can_parse()
            assert reply.json()["errno"] != 0
        assert mock_onenet.service.task(DEV).state is TaskState.PENDING
        assert mock_onenet.timeline.exchanges()[-1].status == 405

    @pytest.mark.parametrize(("path", "body", "errnos"), [
        # Not JSON (unterminated, and nested deeper than a recursive parser goes): 24, or 2 for
        # the version POST, like any other body that is not JSON.
        ("/ota/south/report?dev_id={dev}&token={token}", b"[" * 60_000, {24}),
        ("/ota/south/report?dev_id={dev}&token={token}", b'{"a":' * 12_000, {24}),
        ("/ota/south/device/download/{token}/progress?dev_id={dev}", b"[" * 60_000, {24}),
        ("/ota/device/version?dev_id={dev}", b"[" * 60_000, {2}),
        # Valid JSON, nested deep: the result is missing, or the body is no JSON object.
        ("/ota/south/report?dev_id={dev}&token={token}",
         b"[" * 20_000 + b"]" * 20_000, {24}),
        ("/ota/device/version?dev_id={dev}", b"[" * 20_000 + b"]" * 20_000, {2}),
        # A 5000-digit number: an unknown code (2) or a value no parser takes (24); never 7.
        ("/ota/south/report?dev_id={dev}&token={token}", b'{"result":1' + b"0" * 5000 + b"}",
         {2, 24}),
        ("/ota/south/device/download/{token}/progress?dev_id={dev}",
         b'{"step":' + b"9" * 5000 + b"}", {2, 24}),
        ("/ota/south/report?dev_id={dev}&token={token}", b'{"result":1e400}', {24}),
        ("/ota/south/report?dev_id={dev}&token={token}", b'{"result":NaN}', {24}),
    ], ids=["deep-array-report", "deep-object-report", "deep-array-progress",
            "deep-array-version", "deep-valid-report", "deep-valid-version", "huge-int-result",
            "huge-step", "huge-float-result", "nan-result"])
    def test_hostile_bodies_get_their_errno_never_an_internal_error(self, mock_onenet, path,
                                                                    body, errnos):
        task = mock_onenet.service.create_task(DEV, TARGET, b"\x01" * 10)
        auth = mock_onenet.authorization()
        one_shot(mock_onenet.url, embedded_request(
            "GET", f"/ota/south/download/{task.token}/check?dev_id={DEV}", auth=auth))
        reply = one_shot(mock_onenet.url, embedded_request(
            "POST", path.format(dev=DEV, token=task.token), auth=auth, body=body))
        mock_onenet.service.raise_crashes()   # first: a crash is the failure to report
        assert reply.status == 200
        assert reply.json()["errno"] in errnos
        assert mock_onenet.service.task(DEV).state is TaskState.DOWNLOADING

    @pytest.mark.parametrize("target", [
        "/ota/south/check?dev_id=%ff%fe&type=2&version=V1",
        "/ota/south/check?dev_id=%zz&type=%00&version=%",
        "/ota/south/check?dev_id=" + DEV + "&type=" + "2" * 5000 + "&version=V1",
        "/ota/south/check?dev_id=" + DEV + "&type=2&version=V1&signal=" + "9" * 5000,
        "/ota/south/check?dev_id=a&dev_id=b&type=2&type=1&version=V1",
        "/ota/south/check?&&&=&==",
        "/ota/south/download/..%2F..%2Fetc%2Fpasswd/check?dev_id=" + DEV,
        "/ota/south/download/ota_%00",
        "/ota/south/report?dev_id=" + DEV + "&token=%ff",
        "http://ota.heclouds.com/ota/south/check?dev_id=" + DEV + "&type=2&version=V1",
        "*",
    ])
    def test_odd_targets_never_crash_the_service(self, mock_onenet, target):
        mock_onenet.service.create_task(DEV, TARGET, b"\x01" * 10)
        with RawConnection(mock_onenet.url) as connection:
            connection.send(embedded_request("GET", target, auth=mock_onenet.authorization()))
            reply = connection.reply()
        mock_onenet.service.raise_crashes()
        assert reply.status in (200, 400, 404, 405)
        if reply.header("Content-Type") == "application/json":
            assert reply.json()["errno"] != 7
        assert all(e.status != 500 and e.errno != 7 for e in mock_onenet.timeline)

    @pytest.mark.parametrize("authorization", [
        "\xff\xfe\xfd", "version=2018-10-31&res=products%2F" + "9" * 5000,
        "&" * 1000, "=" * 1000, "version=2018-10-31&" * 200,
        "version=2018-10-31&res=products/245528&et=99999999999999999999&method=sha1&sign=x",
        "version=2018-10-31&res=%ff%fe&et=1&method=sha1&sign=%zz",
    ], ids=["latin1", "huge-res", "ampersands", "equals", "repeated", "huge-et",
            "bad-escapes"])
    def test_odd_authorizations_are_refused_never_crash(self, mock_onenet, authorization):
        mock_onenet.service.create_task(DEV, TARGET, b"\x01" * 10)
        request = (f"GET {detect_target()} HTTP/1.1\r\nHost:ota.heclouds.com\r\n"
                   f"Authorization:{authorization}\r\n\r\n").encode("latin-1")
        reply = one_shot(mock_onenet.url, request)
        mock_onenet.service.raise_crashes()
        assert reply.json()["errno"] == 1


# --------------------------------------------------------------------------------- binding
class TestBinding:
    def test_mock_binds_loopback_only_by_default(self, mock_onenet, port):
        assert mock_onenet.url == f"http://127.0.0.1:{port}"
        # 127.0.0.2 reaches this host too, but not a socket bound to 127.0.0.1 alone.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=TIMEOUT).close()

    def test_background_server_binds_loopback_by_default(self, mock_onenet):
        with BackgroundServer(mock_onenet.service.handle) as server:
            server_port = urlsplit(server.url).port
            assert server.url == f"http://127.0.0.1:{server_port}"
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.2", server_port), timeout=TIMEOUT).close()
            mock_onenet.service.add_device(DEV)
            assert one_shot(server.url, _detect_no_task(mock_onenet)).json()["errno"] == 11

    def test_detect_gives_the_address_the_device_connected_to(self, mock_onenet, port):
        mock_onenet.service.create_task(DEV, TARGET, b"\x01" * 10)
        data = one_shot(mock_onenet.url, embedded_request(
            "GET", detect_target(), auth=mock_onenet.authorization())).json()["data"]
        # Strings, as the platform's API has them (the vendor client string-copies ipPort).
        assert (data["ip"], data["ipPort"]) == ("127.0.0.1", str(port))


# --------------------------------------------------------------------------- never a 500
def test_no_exchange_of_a_busy_session_was_a_500(mock_onenet):
    """A mixed burst of good and bad requests: every answer is a 2xx or 4xx, none crashed."""
    task = mock_onenet.service.create_task(DEV, TARGET, package_of(SIZE))
    auth = mock_onenet.authorization()
    burst = [
        embedded_request("GET", detect_target(), auth=auth),
        embedded_request("GET", f"/ota/south/download/{task.token}/check?dev_id={DEV}",
                         auth=auth),
        embedded_request("GET", f"/ota/south/download/{task.token}", auth=auth,
                         extra=("Range:bytes=0-4095",)),
        embedded_request("POST", f"/ota/south/device/download/{task.token}/progress?dev_id={DEV}",
                         auth=auth, body=b'{"step":"x"}'),
        embedded_request("POST", f"/ota/south/report?dev_id={DEV}&token={task.token}",
                         auth=auth, body=b"not json"),
        embedded_request("POST", f"/ota/device/version?dev_id={DEV}", auth=auth, body=b"{}"),
        embedded_request("GET", "/nowhere", auth=auth),
        embedded_request("POST", "/ota/south/check", auth=None, body=b"x"),
    ]
    started = time.monotonic()
    with RawConnection(mock_onenet.url) as connection:
        connection.send(b"".join(burst))
        statuses = [connection.reply().status for _ in burst]
    assert time.monotonic() - started < TIMEOUT
    assert statuses == [200, 200, 206, 200, 200, 200, 404, 405]
    assert all(e.status < 500 for e in mock_onenet.timeline)
    mock_onenet.service.raise_crashes()

