"""hil's DNS for firmware with a hard-coded OneNET host, on loopback: real sockets, real clients.

The server (``hil.gateway.dns.DnsServer``) answers its names over UDP and TCP and nothing else
unless told to forward; it stops with no thread and no socket left. A device-like client
resolves ``ota.heclouds.com`` through it, reaches the gateway on the firmware's port and the
mock behind it, and the mock sees the device's own Host. The rig keys and the plugin wiring
(``ota.host``: the session's gateway on that port, hil's DNS beside it) are checked too.
"""

from __future__ import annotations

import copy
import socket
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from dnslib import RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.errors import ConfigError, RigFault
from hil.gateway import Gateway
from hil.gateway.dns import DnsServer, ResolveError, check_no_loop, resolve
from hil.rig.model import load_rig
from hil.service.server import MockOneNet

HOST = "ota.heclouds.com"
DEV = "527776559"
TIMEOUT = 5.0


def free_port() -> int:
    """A TCP port free now on loopback (the tests' stand-in for the firmware's port 80)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ask(server: tuple[str, int], name: str, qtype: str = "A", *, tcp: bool = False) -> DNSRecord:
    """The whole answer to one question, as a stub resolver gets it."""
    packet = DNSRecord.question(name, qtype).send(*server, tcp=tcp, timeout=TIMEOUT)
    return DNSRecord.parse(packet)


def hil_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("hil-dns")]


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer({"OTA.HeClouds.com": "192.168.1.10"}) as server:
        yield server


# ------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_the_onenet_host_is_answered_with_the_gateways_address(dns, tcp):
    for name in (HOST, "OTA.HECLOUDS.COM", "ota.heclouds.com."):
        answer = ask(dns.address, name, tcp=tcp)
        assert answer.header.rcode == RCODE.NOERROR
        assert answer.header.aa == 1
        assert [(str(rr.rdata), rr.ttl) for rr in answer.rr] == [("192.168.1.10", 5)]
        assert resolve(name, dns.address, tcp=tcp) == "192.168.1.10"


def test_other_types_of_the_host_have_no_records_so_the_board_falls_back_to_a(dns):
    answer = ask(dns.address, HOST, "AAAA")
    assert answer.header.rcode == RCODE.NOERROR
    assert answer.rr == []


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_other_names_are_refused_without_a_forwarder(dns, tcp):
    assert ask(dns.address, "example.com", tcp=tcp).header.rcode == RCODE.REFUSED
    with pytest.raises(ResolveError, match=r"example\.com at 127\.0\.0\.1:\d+: REFUSED"):
        resolve("example.com", dns.address, tcp=tcp)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_other_names_go_to_the_forwarder_and_the_host_stays_hils(tcp):
    # The "lab resolver" is another DnsServer: it knows example.com and has its own idea of
    # the OneNET host, which hil must not ask about.
    with DnsServer({"example.com": "93.184.215.14", HOST: "203.0.113.1"}) as lab, \
            DnsServer({HOST: "192.168.1.10"}, forward=lab.address) as dns:
        assert resolve("example.com", dns.address, tcp=tcp) == "93.184.215.14"
        assert resolve(HOST, dns.address, tcp=tcp) == "192.168.1.10"
        assert ask(dns.address, "nowhere.example", tcp=tcp).header.rcode == RCODE.REFUSED


def test_a_dead_forwarder_is_a_servfail_not_a_lie():
    with DnsServer({}, forward=("127.0.0.1", free_port()), forward_timeout=0.5) as dns:
        assert ask(dns.address, "example.com").header.rcode == RCODE.SERVFAIL


def test_resolve_takes_an_address_as_it_is_and_says_when_nobody_answers():
    assert resolve("10.0.0.7", ("127.0.0.1", 9)) == "10.0.0.7"
    with DnsServer({}) as dns:
        address = dns.address
    with pytest.raises(ResolveError, match=HOST):
        resolve(HOST, address, timeout=1.0)


# ------------------------------------------------------------------------------ lifecycle
def test_stop_leaves_no_thread_and_frees_both_sockets():
    before = set(threading.enumerate())
    silent = socket.socket()
    with DnsServer({HOST: "127.0.0.1"}) as dns:
        host, port = dns.address
        for _ in range(5):
            resolve(HOST, dns.address)
            resolve(HOST, dns.address, tcp=True)
        silent.connect((host, port))   # a TCP client that never asks holds a handler thread
        assert len(hil_threads()) >= 2
    silent.close()
    assert set(threading.enumerate()) <= before
    assert hil_threads() == []
    # The port is free again, for UDP and TCP alike.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind((host, port))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, port))


def test_a_taken_port_is_a_rig_fault_naming_it():
    with DnsServer({}) as first:
        port = first.address[1]
        with pytest.raises(RigFault, match=rf"dns: cannot listen on UDP 127\.0\.0\.1:{port}"):
            DnsServer({}, port=port).start()
    assert hil_threads() == []


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def onenet() -> Iterator[MockOneNet]:
    with MockOneNet() as mock:
        yield mock


def test_a_device_resolving_through_hils_dns_reaches_the_gateway_and_the_mock(onenet):
    """The shipped firmware's path: ask hil's DNS for the hard-coded host, connect to the
    address on the firmware's port, send Host: the hard-coded host. The mock answers, and it
    sees the device's Host, not the gateway's."""
    onenet.service.reset()
    onenet.service.add_device(DEV)
    port = free_port()
    with Gateway(onenet.url, host="127.0.0.1", port=port, keep_host=True) as gateway, \
            DnsServer({HOST: "127.0.0.1"}) as dns:
        address = resolve(HOST, dns.address)
        response = requests.post(
            f"http://{address}:{port}/ota/device/version", params={"dev_id": DEV},
            json={"s_version": "1.0.0"},
            headers={"Host": HOST, "Authorization": onenet.authorization()}, timeout=TIMEOUT)
        gateway.raise_errors()
    assert response.status_code == 200
    assert response.json()["errno"] == 0
    assert onenet.timeline.exchanges()[-1].request_headers["host"] == HOST
    assert gateway.timeline.exchanges()[-1].request_headers["host"] == HOST
    onenet.service.raise_crashes()


def test_the_hil_hosts_own_resolver_pointed_at_hil_is_a_rig_fault():
    # localhost resolves to 127.0.0.1 here (/etc/hosts): as if hil's DNS had answered it.
    with pytest.raises(RigFault, match=r"resolves localhost to 127\.0\.0\.1, the gateway itself"):
        check_no_loop("localhost", {"LocalHost": "127.0.0.1"})
    check_no_loop("localhost", {"localhost": "192.0.2.1"})   # resolved elsewhere: no loop
    check_no_loop("127.0.0.1", {HOST: "127.0.0.1"})          # the mock's URL: not a served name


# ------------------------------------------------------------------------------ rig keys
RIG: dict[str, Any] = {
    "name": "bench-dns",
    "board": "nrf52832",
    "identity": {"product_id": "245528", "dev_id": DEV},
    "console": {"port": "/dev/ttyACM0"},
}


def rig_with(tmp_path: Path, ota: dict[str, Any]) -> Path:
    doc = copy.deepcopy(RIG)
    doc["ota"] = ota
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_hard_coded_host_rig_loads_with_its_defaults(tmp_path):
    rig = load_rig(rig_with(tmp_path, {"host": "OTA.heclouds.com", "gateway_host": "10.0.0.2"}))
    assert rig.ota.host == HOST
    assert rig.ota.gateway_port == 80
    dns = rig.ota.dns_config
    assert dns is not None
    assert dns.listen_address("10.0.0.2") == ("10.0.0.2", 53)
    assert dns.forward_address is None
    off = load_rig(rig_with(tmp_path, {"host": HOST, "port": 8080, "dns": False}))
    assert (off.ota.dns_config, off.ota.gateway_port) == (None, 8080)
    plain = load_rig(rig_with(tmp_path, {"service": "mock"}))
    assert (plain.ota.dns_config, plain.ota.gateway_port) == (None, 0)
    full = load_rig(rig_with(tmp_path, {"host": HOST, "dns": {
        "listen": "0.0.0.0:5353", "forward": "192.168.1.1", "ttl": 30}}))
    assert full.ota.dns_config is not None
    assert full.ota.dns_config.listen_address("127.0.0.1") == ("0.0.0.0", 5353)
    assert full.ota.dns_config.forward_address == ("192.168.1.1", 53)


@pytest.mark.parametrize(("ota", "key", "message"), [
    ({"host": "192.168.1.10"}, "ota.host", "is an IP address"),
    ({"host": "ota..heclouds.com"}, "ota.host", "is not a DNS name"),
    ({"host": "-ota.heclouds.com"}, "ota.host", "is not a DNS name"),
    ({"host": HOST, "port": 70000}, "ota.port", "less than or equal to 65535"),
    ({"host": HOST, "port": "80"}, "ota.port", "valid integer"),
    ({"dns": {"listen": "127.0.0.1:53"}}, "ota.dns", "give the host"),
    ({"host": HOST, "gateway_host": "0.0.0.0"}, "ota.gateway_host", "no address a board"),
    ({"host": HOST, "gateway_host": "hil.lab"}, "ota.gateway_host", "give an IPv4 address"),
    ({"host": HOST, "dns": {"listen": "127.0.0.1"}}, "ota.dns.listen", "give host:port"),
    ({"host": HOST, "dns": {"listen": "dns.lab:53"}}, "ota.dns.listen", "not an IP address"),
    ({"host": HOST, "dns": {"forward": "8.8.8.8:0"}}, "ota.dns.forward", "port 0"),
    ({"host": HOST, "dns": {"ttl": 0}}, "ota.dns.ttl", "greater than or equal to 1"),
    ({"host": HOST, "dns": {"upstream": "8.8.8.8"}}, "ota.dns.upstream", "Extra inputs"),
])
def test_a_mistake_is_one_line_naming_file_and_key(tmp_path, ota, key, message):
    path = rig_with(tmp_path, ota)
    with pytest.raises(ConfigError) as caught:
        load_rig(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: {key}: ")
    assert message in text
    assert "\n" not in text
    assert "(and " not in text   # one mistake, one message


@settings(max_examples=60, deadline=None)
@given(port=st.integers(min_value=-70000, max_value=140000),
       name=st.from_regex(r"[a-zA-Z0-9-]{1,70}(\.[a-zA-Z0-9-]{1,70}){0,3}", fullmatch=True))
def test_any_host_and_port_loads_or_is_one_line(tmp_path_factory, port, name):
    path = rig_with(tmp_path_factory.mktemp("rig"), {"host": name, "port": port})
    labels = name.lower().split(".")
    valid_name = all(len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
                     for label in labels) and not labels[-1].isdigit()
    if valid_name and 0 <= port <= 65535:
        rig = load_rig(path)
        assert rig.ota.host == name.lower()
        assert rig.ota.gateway_port == port
    else:
        with pytest.raises(ConfigError) as caught:
            load_rig(path)
        assert "\n" not in str(caught.value)
        assert str(caught.value).startswith(f"{path}: ota.")


# ------------------------------------------------------------------------------ the plugin
def test_a_rig_with_a_hard_coded_host_gets_its_gateway_on_that_port_and_hils_dns(
        pytester, monkeypatch):
    monkeypatch.setenv("HIL_ACCESS_KEY", "c2VjcmV0c2VjcmV0c2VjcmV0")
    port = free_port()
    (pytester.path / "rigs").mkdir()
    (pytester.path / "rigs" / "bench-dns.yaml").write_text(textwrap.dedent(f"""
        name: bench-dns
        board: nrf52832
        identity: {{product_id: "245528", dev_id: "{DEV}"}}
        console: {{url: "loop://"}}
        ota: {{host: ota.heclouds.com, port: {port}, dns: {{listen: "127.0.0.1:0"}}}}
    """))
    pytester.makepyfile(test_x=f"""
        import requests
        from hil.gateway.dns import resolve

        def test_first(gateway, ota_dns, ota_service):
            assert gateway.url == "http://127.0.0.1:{port}"
            address = resolve("ota.heclouds.com", ota_dns.address)
            assert address == "127.0.0.1"
            ota_service.service.add_device("{DEV}")
            answer = requests.post(
                "http://" + address + ":{port}/ota/device/version",
                params={{"dev_id": "{DEV}"}}, json={{"s_version": "1.0.0"}},
                headers={{"Host": "ota.heclouds.com",
                          "Authorization": ota_service.authorization()}}, timeout=5)
            assert answer.json()["errno"] == 0
            assert ota_service.timeline.exchanges()[-1].request_headers["host"] == \\
                "ota.heclouds.com"

        def test_second_shares_them(gateway, ota_dns):
            assert gateway.url == "http://127.0.0.1:{port}"
            assert resolve("OTA.heclouds.com", ota_dns.address, tcp=True) == "127.0.0.1"
    """)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly",
        "--hil-lease-dir", str(pytester.path / "leases"), "--hil-rig", "bench-dns", "-v")
    result.assert_outcomes(passed=2)
