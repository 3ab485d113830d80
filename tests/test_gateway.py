"""The gateway on the wire: a real MockOneNet behind it, real clients (requests, raw sockets).

What a device sees through the gateway (status line, headers, body, how the connection ends) and
what the gateway's timeline records, for: faithful forwarding, recording (the same exchanges the
mock records, token -> device learning), every fault kind, targeting, hooks, upstream failures
(502/504), TLS upstreams, and a stop that leaves nothing behind. Timings are floors only.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from test_service_flow import CHUNK, Device, package_of
from test_service_http import RawConnection, detect_target, embedded_request

from hil.errors import ServiceCrashed
from hil.gateway import Fault, FaultKind, Gateway
from hil.onenet.codes import ErrorBodyForm
from hil.onenet.messages import Endpoint
from hil.service.http import BackgroundServer
from hil.service.server import MockOneNet
from hil.service.timeline import Began, Exchange, Timeline

DEV, OTHER = "527776559", "527776560"
BASE, TARGET = "1.0.0", "1.1.0"
SIZE = 5 * CHUNK + 100                  # six chunks, the last one short
TIMEOUT = 5


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


@pytest.fixture
def package() -> bytes:
    return package_of(SIZE)


def device(mock: MockOneNet, gateway: Gateway, dev_id: str = DEV) -> Device:
    client = Device(mock, dev_id)
    client.url = gateway.url
    return client


def start_task(mock: MockOneNet, package: bytes, dev_id: str = DEV) -> str:
    return mock.service.create_task(dev_id, TARGET, package).token


def ranged(mock: MockOneNet, token: str, start: int = 0, size: int = CHUNK, *,
           close: bool = True) -> bytes:
    """A download of ``size`` bytes from ``start``; ``close``: the device's last request."""
    extra = (f"Range:bytes={start}-{start + size - 1}",) + (("Connection:close",) if close
                                                             else ())
    return embedded_request("GET", f"/ota/south/download/{token}", auth=mock.authorization(),
                            extra=extra)


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def exchange_once(url: str, request: bytes, wait: float = 0.0) -> tuple[bytes, str, float]:
    """Send ``request`` on a new connection and read until the gateway ends it: the bytes, how
    it ended ("eof" or "reset"), and the seconds until then."""
    began = time.monotonic()
    with socket.create_connection(address(url), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        if wait:
            time.sleep(wait)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            return data, "reset", time.monotonic() - began
    return data, "eof", time.monotonic() - began


def split_answer(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def last(gateway: Gateway) -> Exchange:
    """The last exchange recorded, once what the client already has is recorded (the record
    follows the answer: a 504 once read off too soon on a loaded host was not there yet)."""
    assert gateway.wait_recorded(TIMEOUT)
    return gateway.timeline.exchanges()[-1]


# ------------------------------------------------------------------------------ forwarding
class TestForwarding:
    def test_answers_are_byte_identical_to_the_mocks(self, mock, gateway, package):
        token = start_task(mock, package)
        requests_ = [
            embedded_request("GET", detect_target(cdn="true"), auth=mock.authorization()),
            ranged(mock, token, 0, close=False),
            ranged(mock, token, 5 * CHUNK, close=False),   # the short tail
            embedded_request("GET", f"/ota/south/download/{token}", auth=mock.authorization()),
            embedded_request("POST", f"/ota/south/report?dev_id={DEV}&token={token}",
                             auth=mock.authorization(), body=b'{"result":101}'),
        ]
        for request in requests_:
            with RawConnection(mock.url) as direct, RawConnection(gateway.url) as through:
                direct.send(request)
                expected = direct.reply()
                through.send(request)
                got = through.reply()
            if b"report" in request:   # the second 101 of the same task is refused (21)
                assert got.json()["errno"] == 21
                continue
            assert (got.status_line, got.headers, got.body) == \
                (expected.status_line, expected.headers, expected.body)
            got.assert_strict_client_can_parse()

    @pytest.mark.parametrize(("form", "wire"), [(ErrorBodyForm.RAW, b"\x03"),
                                                (ErrorBodyForm.ASCII, b"3")])
    def test_the_length_less_error_byte_stays_length_less_and_closes(self, mock, gateway, form,
                                                                      wire):
        """Passed on as the service wrote it, and recorded as the code in either form."""
        mock.service.error_body = form
        request = embedded_request("GET", "/ota/south/download/ota_unknown",
                                   auth=mock.authorization())
        data, ended, _ = exchange_once(gateway.url, request)
        assert data == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + wire
        assert ended == "eof"
        assert last(gateway).error_byte == 3
        assert not last(gateway).accepted

    def test_host_is_rewritten_the_rest_goes_as_sent(self, mock, gateway):
        mock.service.add_device(DEV)
        with RawConnection(gateway.url) as connection:
            connection.send(embedded_request(
                "POST", f"/ota/device/version?dev_id={DEV}", auth=mock.authorization(),
                body=b'{"s_version":"1.0.0"}', extra=("X-Board:nrf52 rev3",)))
            assert connection.reply().json()["errno"] == 0
        seen = mock.timeline.exchanges()[-1].request_headers
        assert seen["host"] == "{}:{}".format(*address(mock.url))
        assert seen["x-board"] == "nrf52 rev3"
        assert seen["content-length"] == "21"
        assert mock.timeline.exchanges()[-1].request_body == '{"s_version":"1.0.0"}'
        # The gateway's own record keeps what the device sent, Host included.
        assert last(gateway).request_headers["host"] == "ota.heclouds.com"

    def test_pipelined_requests_are_answered_in_order(self, mock, gateway, package):
        token = start_task(mock, package)
        with RawConnection(gateway.url) as connection:
            connection.send(b"".join(ranged(mock, token, offset, 10, close=False)
                                     for offset in (0, 100, 7)))
            bodies = [connection.reply().body for _ in range(3)]
        assert bodies == [package[0:10], package[100:110], package[7:17]]

    def test_a_path_prefix_goes_in_front_of_the_target(self, mock, tmp_path):
        with Gateway(mock.url + "/prefix/", Timeline()) as gw:
            reply = requests.get(gw.url + "/ota/south/check?dev_id=1", timeout=TIMEOUT)
        assert reply.status_code == 404   # the mock has no /prefix: it says so
        assert mock.timeline.exchanges()[-1].target == "/prefix/ota/south/check?dev_id=1"

    def test_the_upstreams_close_after_its_last_request_reaches_the_device(self, mock):
        mock.service.add_device(DEV)
        with BackgroundServer(mock.service.handle, max_requests=2) as limited, \
                Gateway(limited.url) as gw, RawConnection(gw.url) as connection:
            request = embedded_request("GET", detect_target(), auth=mock.authorization())
            connection.send(request)
            assert connection.reply().header("Connection") is None
            connection.send(request)
            assert connection.reply().header("Connection") == "close"
            assert connection.closed_by_server()

    def test_a_closed_upstream_connection_is_reopened(self, mock):
        mock.service.add_device(DEV)
        with BackgroundServer(mock.service.handle, idle_timeout=0.1) as idle, \
                Gateway(idle.url) as gw, requests.Session() as session:
            for _ in range(2):
                reply = session.get(gw.url + detect_target(), timeout=TIMEOUT,
                                    headers={"Authorization": mock.authorization()})
                assert reply.json()["errno"] == 11
                time.sleep(0.3)   # the upstream closes its idle connection meanwhile
            assert [e.fault for e in gw.timeline] == [None, None]

    def test_the_upstream_can_change_between_tests(self, mock, gateway):
        with MockOneNet() as second:
            second.service.add_device(DEV)
            gateway.upstream = second.url
            reply = requests.get(gateway.url + detect_target(), timeout=TIMEOUT,
                                 headers={"Authorization": second.authorization()})
            assert reply.json()["errno"] == 11
            assert len(second.timeline) == 1
        assert gateway.upstream == second.url


class TestUpstreamFailures:
    def test_an_unreachable_upstream_answers_502_and_is_recorded(self, tmp_path):
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        with Gateway(f"http://127.0.0.1:{port}") as gw:
            reply = requests.get(gw.url + "/ota/south/check?dev_id=7", timeout=TIMEOUT)
            recorded = last(gw)
        assert reply.status_code == 502
        assert reply.text.count("\n") == 1
        assert "unreachable" in reply.text
        assert recorded.status == 502
        assert recorded.dev_id == "7"
        assert recorded.fault is not None
        assert recorded.fault.startswith("upstream: ")

    def test_a_silent_upstream_answers_504_after_the_timeout(self):
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            with Gateway(f"http://127.0.0.1:{silent.getsockname()[1]}",
                         upstream_timeout=0.3) as gw:
                began = time.monotonic()
                reply = requests.get(gw.url + "/ota/south/check", timeout=TIMEOUT)
                assert time.monotonic() - began >= 0.3
                recorded = last(gw)
        assert reply.status_code == 504
        assert "did not answer within 0.3 s" in reply.text
        assert recorded.fault is not None
        assert recorded.fault.startswith("upstream: ")

    def test_a_bad_upstream_url_is_refused(self):
        with pytest.raises(ValueError, match="not an http"):
            Gateway("ftp://example.com")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_an_https_upstream_is_reached_over_tls(tmp_path, monkeypatch):
    """A TLS terminator answering like OneNET; the gateway trusts it through SSL_CERT_FILE."""
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    answer = b'{"errno":11,"error":"no task"}'
    seen: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def serve() -> None:
            raw, _ = listener.accept()
            with context.wrap_socket(raw, server_side=True) as tls:
                seen.append(tls.recv(65536))
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))

        server = threading.Thread(target=serve)
        server.start()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with Gateway(f"https://127.0.0.1:{port}") as gw:
            reply = requests.get(gw.url + "/ota/south/check?dev_id=1", timeout=TIMEOUT)
            recorded = last(gw)
        server.join(TIMEOUT)
    assert reply.content == answer
    assert recorded.errno == 11
    assert seen[0].startswith(b"GET /ota/south/check?dev_id=1 HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % port in seen[0]


# ------------------------------------------------------------------------------ recording
def _documented_update(client: Device, package: bytes) -> None:
    data = client.detect(BASE)["data"]
    assert client.check_token(data["token"]) == 0
    assert client.download(data["token"], data["size"]) == package
    assert client.report(data["token"], 101) == 0
    assert client.report(data["token"], 201) == 0


def _vendor_sdk_update(client: Device, package: bytes) -> None:
    data = client.detect(BASE, manuf=None, model=None)["data"]
    assert client.download(data["token"], data["size"], prefix="",
                           check_every_chunk=True) == package
    assert client.progress(data["token"], 101) == 0
    assert client.progress(data["token"], 201) == 0


COMPARED = ("dev_id", "phase", "method", "target", "status", "errno", "answer", "result",
            "range", "content_range", "length", "error_byte")


@pytest.mark.parametrize("update", [_documented_update, _vendor_sdk_update],
                         ids=["documented", "vendor-sdk"])
def test_an_unfaulted_update_records_what_the_mock_records(mock, gateway, package, update):
    start_task(mock, package)
    client = device(mock, gateway)
    update(client, package)
    client.close()
    assert gateway.timeline.reported_codes(DEV) == mock.timeline.reported_codes(DEV) \
        == [101, 201]
    ours, theirs = gateway.timeline.exchanges(), mock.timeline.exchanges()
    assert [[getattr(e, name) for name in COMPARED] for e in ours] == \
        [[getattr(e, name) for name in COMPARED] for e in theirs]
    assert all(e.dev_id == DEV and e.fault is None for e in ours)
    assert all(e.task_id is None and e.task_state is None for e in ours)
    assert [e.seq for e in ours] == list(range(1, len(ours) + 1))
    assert "sign=<redacted>" in ours[0].request_headers["authorization"]
    # The JSON-lines file holds the same records.
    assert gateway.timeline.path is not None
    assert len(gateway.timeline.path.read_text().splitlines()) == len(ours)


def test_downloads_learn_their_device_from_a_token_check(mock, package, tmp_path):
    token = start_task(mock, package)
    with Gateway(mock.url) as gw:   # it never saw the detect answer
        client = device(mock, gw)
        assert client.check_token(token) == 0
        client.chunk(token, 0, SIZE)
        client.close()
        assert [e.dev_id for e in gw.timeline] == [DEV, DEV]


def test_a_report_answered_by_the_gateway_is_not_an_accepted_code(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.HTTP_5XX, phase=Endpoint.REPORT))
    client = device(mock, gateway)
    with pytest.raises(AssertionError):   # the device helper wants a 200
        client.report(token, 101)
    client.close()
    recorded = last(gateway)
    assert (recorded.status, recorded.result, recorded.errno) == (503, 101, None)
    assert gateway.timeline.reported_codes(DEV) == []
    assert mock.timeline.exchanges(phase="report") == []   # not forwarded


# ------------------------------------------------------------------------------ fault kinds
def test_latency_delays_the_answer(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.LATENCY, ms=150, jitter_ms=20))
    data, _, took = exchange_once(gateway.url, ranged(mock, token))
    assert took >= 0.13
    assert split_answer(data)[2] == package[:CHUNK]
    assert last(gateway).fault == "latency 150±20ms"


def test_bandwidth_paces_the_answer(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.BANDWIDTH, rate=20_000))
    data, _, took = exchange_once(gateway.url, ranged(mock, token))
    assert took >= (len(data) - 200) / 20_000 - 0.01
    assert split_answer(data)[2] == package[:CHUNK]


def test_slicer_writes_small_pieces_apart(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.SLICER, size=512, delay_ms=10))
    data, _, took = exchange_once(gateway.url, ranged(mock, token))
    assert took >= (len(data) // 512 - 1) * 0.010
    assert split_answer(data)[2] == package[:CHUNK]
    assert last(gateway).fault == "slicer 512B/10ms"


def test_stall_sends_nothing_then_closes(mock, gateway, package):
    token = start_task(mock, package)
    armed = gateway.arm(Fault(FaultKind.STALL, phase=Endpoint.DOWNLOAD, seconds=0.3))
    data, ended, took = exchange_once(gateway.url, ranged(mock, token))
    assert (data, ended) == (b"", "eof")
    assert took >= 0.3
    assert armed.hits == 1
    recorded = last(gateway)
    assert (recorded.status, recorded.length, recorded.fault) == (206, 0, "stall 0.3s")
    assert armed.seqs == [recorded.seq]
    assert len(mock.timeline.exchanges(phase="download")) == 1   # the service did answer


def test_clear_drops_a_held_stall(mock, gateway, package):
    token = start_task(mock, package)
    armed = gateway.arm(Fault(FaultKind.STALL, seconds=30))
    result: list[tuple[bytes, str, float]] = []
    client = threading.Thread(target=lambda: result.append(
        exchange_once(gateway.url, ranged(mock, token))))
    client.start()
    _wait(lambda: armed.hits == 1)
    gateway.clear()
    client.join(TIMEOUT)
    assert result[0][:2] == (b"", "eof")
    assert result[0][2] < 10
    assert armed.seqs == [last(gateway).seq]


@pytest.mark.parametrize("sent", [0, 50])
def test_reset_sends_some_bytes_then_a_tcp_rst(mock, gateway, package, sent):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.RESET, bytes=sent))
    data, ended, _ = exchange_once(gateway.url, ranged(mock, token), wait=0.1)
    assert ended == "reset"
    assert len(data) <= sent
    assert data == b"HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet"[:len(data)]
    assert last(gateway).fault == f"reset@{sent}"


def test_limit_sends_that_many_bytes_then_closes(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.LIMIT, bytes=300))
    data, ended, _ = exchange_once(gateway.url, ranged(mock, token))
    assert (len(data), ended) == (300, "eof")
    head_size = data.index(b"\r\n\r\n") + 4
    assert data[head_size:] == package[:300 - head_size]
    assert last(gateway).length == 300 - head_size


def test_truncate_cuts_the_body_and_keeps_the_promise(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.TRUNCATE, phase=Endpoint.DOWNLOAD, bytes=1000, count=2))
    data, ended, _ = exchange_once(gateway.url, ranged(mock, token))
    status, headers, body = split_answer(data)
    assert (status, headers["Content-Length"], body, ended) == \
        ("HTTP/1.1 206 Partial Content", str(CHUNK), package[:1000], "eof")
    recorded = last(gateway)
    assert (recorded.length, recorded.fault) == (1000, "truncate@1000")
    with device(mock, gateway) as client, \
            pytest.raises(requests.exceptions.ChunkedEncodingError):   # what requests makes of it
        client.chunk(token, 0, SIZE)


def test_content_range_is_shifted_on_a_206(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.CONTENT_RANGE, bytes=16))
    reply = requests.get(f"{gateway.url}/ota/south/download/{token}", timeout=TIMEOUT,
                         headers={"Authorization": mock.authorization(), "Range": "0-4095"})
    assert reply.headers["Content-Range"] == f"bytes 16-4111/{SIZE}"
    assert reply.content == package[:CHUNK]
    assert last(gateway).content_range == f"bytes 16-4111/{SIZE}"
    assert mock.timeline.exchanges()[-1].content_range == f"bytes 0-4095/{SIZE}"


def test_whole_file_answers_a_ranged_download_with_the_file(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.WHOLE_FILE))
    reply = requests.get(f"{gateway.url}/ota/south/download/{token}", timeout=TIMEOUT,
                         headers={"Authorization": mock.authorization(),
                                  "Range": "bytes=4096-8191"})
    assert (reply.status_code, reply.content) == (200, package)
    assert "Content-Range" not in reply.headers
    recorded = last(gateway)
    assert (recorded.range, recorded.status, recorded.length) == ("bytes=4096-8191", 200, SIZE)
    assert mock.timeline.exchanges()[-1].range is None


@pytest.mark.parametrize("asked", ["bytes=4096-8191", "4096-8191"])
def test_oversize_answers_a_ranged_download_with_more_than_was_asked(mock, gateway, package,
                                                                     asked):
    # The service is asked for more (a server widening ranges): a true 206, longer than asked.
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.OVERSIZE, bytes=CHUNK))
    reply = requests.get(f"{gateway.url}/ota/south/download/{token}", timeout=TIMEOUT,
                         headers={"Authorization": mock.authorization(), "Range": asked})
    assert (reply.status_code, reply.content) == (206, package[CHUNK:3 * CHUNK])
    assert reply.headers["Content-Range"] == f"bytes 4096-12287/{SIZE}"
    assert reply.headers["Content-Length"] == str(2 * CHUNK)
    recorded = last(gateway)
    assert (recorded.range, recorded.length, recorded.fault) == (asked, 2 * CHUNK,
                                                                 "oversize +4096B")


@pytest.mark.parametrize("code", [1, 3, 6])
def test_error_byte_answers_like_onenet_without_forwarding(mock, gateway, package, code):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.ERROR_BYTE, code=code))
    data, ended, _ = exchange_once(gateway.url, ranged(mock, token))
    assert data == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + bytes([code])   # raw
    assert ended == "eof"
    recorded = last(gateway)
    assert (recorded.error_byte, recorded.errno) == (code, None)
    assert recorded.fault == f"error-byte {code}"
    assert not recorded.accepted
    assert len(mock.timeline) == 0


def test_error_byte_in_the_ascii_form_other_servers_send(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.ERROR_BYTE, code=3, form="ascii"))
    data, ended, _ = exchange_once(gateway.url, ranged(mock, token))
    assert data == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n3"
    assert ended == "eof"
    recorded = last(gateway)
    assert (recorded.error_byte, recorded.fault) == (3, "error-byte 3 ascii")
    with pytest.raises(ValueError, match=r"Fault\.form: must be one of raw, ascii"):
        Fault(FaultKind.ERROR_BYTE, code=3, form="hex")


def test_corrupt_flips_bytes_where_the_seed_says(mock, package, tmp_path):
    token = start_task(mock, package)
    bodies = []
    for _ in range(2):   # two gateways, the same seed: the same positions
        with Gateway(mock.url) as gw, device(mock, gw) as client:
            gw.arm(Fault(FaultKind.CORRUPT, bytes=3, seed=7))
            bodies.append(client.chunk(token, 0, SIZE))
    flipped = [at for at in range(CHUNK) if bodies[0][at] != package[at]]
    assert len(flipped) == 3
    assert all(bodies[0][at] == package[at] ^ 0xFF for at in flipped)
    assert bodies[0] == bodies[1]


@pytest.mark.parametrize(("code", "expected"), [(None, 503), (500, 500)])
def test_http_5xx_answers_without_forwarding(mock, gateway, code, expected):
    mock.service.add_device(DEV)
    gateway.arm(Fault(FaultKind.HTTP_5XX, phase=Endpoint.DETECT, code=code))
    with RawConnection(gateway.url) as connection:
        connection.send(embedded_request("GET", detect_target(), auth=mock.authorization()))
        reply = connection.reply()
        reply.assert_strict_client_can_parse()
        connection.send(embedded_request("GET", detect_target(), auth=mock.authorization()))
        assert connection.reply().json()["errno"] == 11   # the connection lives on
    assert reply.status == expected
    assert len(reply.body) < 20
    assert len(mock.timeline) == 1


def test_drop_after_k_requests_closes_with_no_answer(mock, gateway):
    mock.service.add_device(DEV)
    armed = gateway.arm(Fault(FaultKind.DROP, index=3))
    with RawConnection(gateway.url) as connection:
        for _ in range(2):
            connection.send(embedded_request("GET", detect_target(), auth=mock.authorization()))
            assert connection.reply().json()["errno"] == 11
        connection.send(embedded_request("GET", detect_target(), auth=mock.authorization()))
        assert connection.closed_by_server()
    assert armed.hits == 1
    assert len(mock.timeline) == 2
    assert (last(gateway).status, last(gateway).fault) == (0, "drop")


@pytest.mark.parametrize("variant", ["missing", "expired", "bad-sign", "garbled"])
def test_auth_faults_make_the_service_refuse(mock, gateway, package, variant):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.AUTH, variant=variant, count=2))
    client = device(mock, gateway)
    assert client.detect(BASE)["errno"] == 1
    data, _, _ = exchange_once(gateway.url, ranged(mock, token))
    assert data.endswith(b"\r\n\r\n\x03")
    assert client.detect(BASE)["errno"] == 0   # count=2: the third request goes as sent
    client.close()
    recorded = gateway.timeline.exchanges()
    assert [e.fault for e in recorded] == [f"auth {variant}"] * 2 + [None]
    assert recorded[1].error_byte == 3
    # The record keeps what the device sent; the service saw the altered header.
    assert "sign=<redacted>" in recorded[0].request_headers["authorization"]
    sent_to_mock = mock.timeline.exchanges()[0].request_headers.get("authorization")
    assert sent_to_mock != recorded[0].request_headers["authorization"] or variant == "bad-sign"


# ------------------------------------------------------------------------------ hooks
def test_a_hook_runs_before_forwarding_and_can_cancel_mid_download(mock, gateway, package):
    token = start_task(mock, package)
    forwarded_before: list[int] = []

    def cancel() -> None:
        forwarded_before.append(len(mock.timeline))
        assert threading.current_thread() is not threading.main_thread()
        mock.service.cancel(DEV)

    gateway.arm(Fault(FaultKind.HOOK, phase=Endpoint.DOWNLOAD, index=3, action=cancel))
    client = device(mock, gateway)
    client.chunk(token, 0, SIZE)
    client.chunk(token, CHUNK, SIZE)
    data, _, _ = exchange_once(gateway.url, ranged(mock, token, 2 * CHUNK))
    client.close()
    assert forwarded_before == [2]
    assert data.endswith(b"\r\n\r\n\x03")   # the task was cancelled before this chunk reached it
    assert last(gateway).fault == "hook"
    assert mock.service.task(DEV).state == "cancelled"


def test_a_hook_that_raises_is_reraised_and_the_request_still_goes(mock, gateway):
    mock.service.add_device(DEV)

    def broken() -> None:
        raise RuntimeError("power supply not found")

    gateway.arm(Fault(FaultKind.HOOK, action=broken))
    client = device(mock, gateway)
    assert client.detect(BASE)["errno"] == 11
    client.close()
    with pytest.raises(ServiceCrashed, match="power supply not found") as raised:
        gateway.raise_errors()
    assert isinstance(raised.value.__cause__, RuntimeError)
    gateway.raise_errors()   # raised once, then gone


# ------------------------------------------------------------------------------ targeting
def _chunks(mock: MockOneNet, gateway: Gateway, token: str, dev_id: str = DEV) -> list[Exchange]:
    client = device(mock, gateway, dev_id)
    for offset in range(0, SIZE, CHUNK):
        exchange_once(gateway.url, ranged(mock, token, offset, min(CHUNK, SIZE - offset)))
    client.close()
    return gateway.timeline.exchanges(phase="download")


def test_targeting_by_phase_offset_index_and_count(mock, gateway, package):
    token = start_task(mock, package)
    on_detect = gateway.arm(Fault(FaultKind.LATENCY, phase=Endpoint.DETECT, ms=1))
    at_offset = gateway.arm(Fault(FaultKind.CORRUPT, offset=2 * CHUNK + 5))
    third_and_fourth = gateway.arm(Fault(FaultKind.CONTENT_RANGE, phase=Endpoint.DOWNLOAD,
                                         index=3, count=2))
    from_fifth_on = gateway.arm(Fault(FaultKind.SLICER, phase=Endpoint.DOWNLOAD, index=5,
                                      count=None, size=4096))
    downloads = _chunks(mock, gateway, token)
    assert on_detect.hits == 0
    seqs = [e.seq for e in downloads]
    assert at_offset.seqs == [seqs[2]]
    assert third_and_fourth.seqs == seqs[2:4]
    assert from_fifth_on.seqs == seqs[4:]
    assert downloads[2].fault == "corrupt 1B, content-range +1"


def test_targeting_by_device(mock, gateway, package):
    tokens = {dev_id: start_task(mock, package, dev_id) for dev_id in (DEV, OTHER)}
    armed = gateway.arm(Fault(FaultKind.LATENCY, dev_id=OTHER, ms=0, count=None))
    bytes_ = gateway.arm(Fault(FaultKind.ERROR_BYTE, dev_id=OTHER, phase=Endpoint.DOWNLOAD,
                               code=1, count=None))
    for dev_id, token in tokens.items():
        client = device(mock, gateway, dev_id)
        client.detect(BASE)   # teaches the gateway whose token it is
        exchange_once(gateway.url, ranged(mock, token))
        client.close()
    hit = [e for e in gateway.timeline if e.seq in armed.seqs]
    assert [(e.dev_id, e.phase, e.error_byte) for e in hit] == \
        [(OTHER, "detect", None), (OTHER, "download", 1)]
    assert bytes_.seqs == [hit[1].seq]


def test_probability_with_a_seed_is_reproducible(mock, package):
    token = start_task(mock, package)
    hits = []
    for seed in (1, 1, 2):
        with Gateway(mock.url) as gw:
            armed = gw.arm(Fault(FaultKind.LATENCY, ms=0, count=None, probability=0.5,
                                 seed=seed))
            with requests.Session() as session:
                for _ in range(24):
                    session.get(f"{gw.url}/ota/south/download/{token}", timeout=TIMEOUT,
                                headers={"Authorization": mock.authorization(),
                                         "Range": "0-15"})
            hits.append([e.fault is not None for e in gw.timeline])
            assert armed.hits == sum(hits[-1])
    assert hits[0] == hits[1]
    assert hits[0] != hits[2]
    assert 0 < sum(hits[0]) < 24


def test_several_faults_compose(mock, gateway, package):
    token = start_task(mock, package)
    gateway.arm(Fault(FaultKind.LATENCY, ms=100))
    gateway.arm(Fault(FaultKind.LATENCY, ms=100))
    gateway.arm(Fault(FaultKind.LIMIT, bytes=200))
    gateway.arm(Fault(FaultKind.RESET, bytes=100))
    data, ended, took = exchange_once(gateway.url, ranged(mock, token), wait=0.3)
    assert took >= 0.2               # latencies add
    assert (len(data), ended) == (100, "reset")   # the smaller cut, and it is a reset
    assert last(gateway).fault == "latency 100ms, latency 100ms, limit@200, reset@100"


# ------------------------------------------------------------------------------ lifecycle
def _sockets() -> int:
    """Open sockets of this process (0 where /proc is not there to tell)."""
    count = 0
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        with contextlib.suppress(OSError):   # the listing's own descriptor is gone by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def _gateway_threads(besides: frozenset[threading.Thread] = frozenset()) -> list[str]:
    """Gateway threads alive now, but for ``besides`` (another gateway of this process: the
    plugin's session gateway, when a conformance test ran in this worker first)."""
    return [t.name for t in threading.enumerate()
            if t.name.startswith("hil-gateway") and t not in besides]


def _wait(condition: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_stop_leaves_no_thread_task_or_socket(mock, package):
    token = start_task(mock, package)
    before = _sockets()
    others = frozenset(threading.enumerate())
    gateway = Gateway(mock.url).start()
    held = gateway.arm(Fault(FaultKind.STALL, phase=Endpoint.DOWNLOAD, seconds=30))
    gateway.arm(Fault(FaultKind.HOOK, phase=Endpoint.DETECT, action=lambda: None))
    keep_alive = RawConnection(gateway.url)
    keep_alive.send(embedded_request("GET", detect_target(), auth=mock.authorization()))
    keep_alive.reply()
    stalled = RawConnection(gateway.url)
    stalled.send(ranged(mock, token, close=False))
    _wait(lambda: held.hits == 1)
    loop = gateway._server.loop
    assert _gateway_threads(besides=others)
    gateway.stop()
    assert stalled.closed_by_server(wait=1)
    assert keep_alive.closed_by_server(wait=1)
    keep_alive.sock.close()
    stalled.sock.close()
    assert _gateway_threads(besides=others) == []
    assert loop.is_closed()
    _wait(lambda: _sockets() <= before)
    gateway.stop()   # twice is harmless


def test_a_records_start_is_when_serving_began_whatever_came_between():
    """``at - duration`` is the moment a service began serving a request, even when its thread
    was switched out between reading the clocks for the record (milliseconds on a loaded host:
    the gateway once read the wall clock, was switched out, then read the duration, and a 101
    seemed sent before the download it followed). Scenarios order a board's requests by it."""
    began = Began.now()
    time.sleep(0.05)              # switched out while the record is being made
    at, duration_ms = began.span()
    assert duration_ms >= 50
    record = Exchange(seq=1, at=at, dev_id=DEV, phase=Endpoint.REPORT, method="POST",
                      target="/ota/south/report", request_headers={}, request_body="",
                      status=200, duration_ms=duration_ms)
    assert record.started == pytest.approx(began.wall, abs=1e-6)


def test_requests_on_one_connection_begin_in_the_order_they_were_served(mock, gateway, package):
    token = start_task(mock, package)
    with RawConnection(gateway.url) as connection:
        for index in range(50):
            connection.send(ranged(mock, token, index * 10, 10, close=False))
            assert connection.reply().status_line.startswith("HTTP/1.1 206")
    exchanges = gateway.timeline.exchanges()
    assert len(exchanges) == 50
    assert all(before.started < before.at <= after.started
               for before, after in itertools.pairwise(exchanges))
