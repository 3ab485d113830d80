"""hil's DNS: the answer that sends a board's hard-coded OneNET host to the gateway.

Shipped firmware talks to the host its build names (``ota.heclouds.com:80``), not to a URL a test
shell was given. On the rig's network the access point or router asks hil for that name (its DNS
server, DHCP option 6, or a dnsmasq ``server=/ota.heclouds.com/<hil host>``), and ``DnsServer``
answers with the gateway's address::

    with DnsServer({"ota.heclouds.com": "192.168.1.10"}, host="0.0.0.0", port=53) as dns:
        ...the board resolves ota.heclouds.com to 192.168.1.10 and talks to the gateway there...

    resolve("ota.heclouds.com", server=dns.address)   # "192.168.1.10": as the board would

Names are matched without regard to case (DNS names are case-insensitive) and answered with a
short TTL, so a board does not keep the gateway's address past the session. For any other name
the server forwards the question to ``forward`` (a lab AP that uses hil for every name needs
that) or, with no ``forward``, answers REFUSED: it is authoritative only for its names and
recursive for none, and REFUSED says so, where NXDOMAIN would claim the name does not exist.

The wire format and the UDP/TCP servers are dnslib's (``dnslib.server``): a well-kept library of
DNS packets, pinned in pyproject.toml. hil owns the lifecycle: ``stop`` closes both sockets and
joins the serving threads and every handler thread, so nothing is left running after it.

hil's own look-ups do not go through this server: the gateway resolves its upstream (a real
``http://ota.heclouds.com``) with the operating system's resolver, which is the hil host's own
DNS. ``check_no_loop`` says so before a session starts when the hil host's resolver has been
pointed at hil too.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Mapping
from typing import Any, cast

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord
from dnslib.server import DNSHandler, DNSLogger

from hil.errors import RigFault

log = logging.getLogger(__name__)

DEFAULT_TTL = 5            # seconds: a board re-asks soon, so a stale gateway address dies fast
_TCP_IDLE = 3.0            # a TCP client that sends nothing is dropped after this (seconds)
_BIND_TRIES = 20           # port 0: attempts to find a port free for both UDP and TCP


class ResolveError(OSError):
    """A name could not be resolved through the given server (as ``socket.gaierror`` for the
    system's resolver: a board's network error, not a bug)."""


def _normal(name: str) -> str:
    """A name as compared: lower case, no root dot (``OTA.HeClouds.com.``: ``ota.heclouds.com``)."""
    return name.strip().rstrip(".").lower()


def resolve(name: str, server: tuple[str, int], *, timeout: float = 2.0,
            tcp: bool = False) -> str:
    """The IPv4 address ``name`` has at the DNS server ``server`` ((host, port)), as dotted text.

    Asks over UDP (``tcp=True``: over TCP) and waits ``timeout`` seconds for the answer; follows
    a CNAME within the answer. An IP address is returned as it is, as a resolver would. Raises
    ``ResolveError`` when the server does not answer in time, answers an error (REFUSED, NXDOMAIN,
    SERVFAIL), or has no address for the name.
    """
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    host, port = server
    question = DNSRecord.question(name, "A")
    try:
        packet = question.send(host, port, tcp=tcp, timeout=timeout, ipv6=":" in host)
        answer = DNSRecord.parse(packet)
    except (OSError, DNSError, struct.error) as error:   # socket.timeout is an OSError;
        # struct.error: a TCP answer cut short before its length
        raise ResolveError(f"resolving {name} at {host}:{port}: {error or 'timed out'}") from None
    if answer.header.id != question.header.id:
        raise ResolveError(f"resolving {name} at {host}:{port}: an answer to another question")
    if answer.header.rcode != RCODE.NOERROR:
        raise ResolveError(f"resolving {name} at {host}:{port}: "
                           f"{RCODE.get(answer.header.rcode)}")
    wanted = _normal(name)
    for record in answer.rr:   # in order: a CNAME comes before the A records of its target
        if _normal(str(record.rname)) != wanted:
            continue
        if record.rtype == QTYPE.CNAME:
            wanted = _normal(str(record.rdata))
        elif record.rtype == QTYPE.A:
            return str(record.rdata)
    raise ResolveError(f"resolving {name} at {host}:{port}: no address for it")


class _Resolver:
    """dnslib's resolver interface: one question in, one answer out (on handler threads)."""

    def __init__(self, names: Mapping[str, str], ttl: int, forward: tuple[str, int] | None,
                 forward_timeout: float) -> None:
        self.names = {_normal(name): str(ipaddress.IPv4Address(address))
                      for name, address in names.items()}
        self.ttl = ttl
        self.forward = forward
        self.forward_timeout = forward_timeout

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()   # id, question, QR and RD copied; AA and RA set below
        name = _normal(str(request.q.qname))
        address = self.names.get(name)
        if address is not None:
            reply.header.aa = 1
            if request.q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=self.ttl))
            # Any other type (AAAA first of all): no records, NOERROR, so the board uses A.
            return reply
        if self.forward is None:
            reply.header.rcode = RCODE.REFUSED
            return reply
        host, port = self.forward
        tcp = getattr(handler, "protocol", "udp") == "tcp"
        try:
            return DNSRecord.parse(request.send(host, port, tcp=tcp, ipv6=":" in host,
                                                timeout=self.forward_timeout))
        except (OSError, DNSError, struct.error) as error:
            log.warning("DNS: forwarding %s to %s:%d failed: %s", name, host, port, error)
            reply.header.rcode = RCODE.SERVFAIL
            return reply


class _Handler(DNSHandler):  # type: ignore[misc]   # dnslib is untyped
    def setup(self) -> None:
        # dnslib's handler reads a TCP question with no timeout: one silent client would hold
        # a handler thread, and stop() joins them all.
        if isinstance(self.request, socket.socket):
            self.request.settimeout(_TCP_IDLE)


class _Quiet(DNSLogger):  # type: ignore[misc]
    """dnslib's logger prints every packet to stdout; hil's goes to logging, at debug level."""

    def __init__(self) -> None:
        super().__init__(log="request,reply,truncated,error", prefix=False,
                         logf=lambda text: log.debug("DNS: %s", text))


class _ServerMixin:
    """Handler threads are joined on close (``block_on_close``, not daemons): no thread is left
    after ``stop``. A broken packet is logged, not printed to stderr as socketserver does."""

    daemon_threads = False
    block_on_close = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("DNS: a question from %s could not be answered", client_address,
                  exc_info=True)


class _UDPServer(_ServerMixin, socketserver.ThreadingMixIn, socketserver.UDPServer):
    allow_reuse_address = False   # on UDP, SO_REUSEADDR lets a second server share the port


class _TCPServer(_ServerMixin, socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True    # a restart within TIME_WAIT binds again


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class DnsServer:
    """An authoritative DNS server for ``names`` (name -> IPv4 address) on ``host:port``, over
    UDP and TCP (one port for both). A context manager; ``start``/``stop`` otherwise.

    ``port=0`` picks a port free for both; ``address`` tells it once started. Other names go to
    ``forward`` ((host, port) of a resolver) or are REFUSED when it is None. ``ttl`` is the TTL
    of the answers, in seconds.
    """

    def __init__(self, names: Mapping[str, str], host: str = "127.0.0.1", port: int = 0, *,
                 forward: tuple[str, int] | None = None, ttl: int = DEFAULT_TTL,
                 tcp: bool = True, forward_timeout: float = 2.0) -> None:
        self.resolver = _Resolver(names, ttl, forward, forward_timeout)
        self.host = host
        self.port = port
        self.tcp = tcp
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"DnsServer({self.resolver.names!r}, {self.host}:{self.port})"

    @property
    def names(self) -> dict[str, str]:
        return dict(self.resolver.names)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to ask, once started (the port picked, for port 0)."""
        if not self._servers:
            raise RuntimeError("the DNS server is not started")
        return self.host, self.port

    def start(self) -> DnsServer:
        if self._servers:
            return self
        servers = self._bind()
        for server in servers:
            server.resolver = self.resolver   # type: ignore[attr-defined]   # dnslib reads these
            server.logger = _Quiet()          # type: ignore[attr-defined]
        self._servers = list(servers)
        self._threads = [threading.Thread(target=server.serve_forever,
                                          kwargs={"poll_interval": 0.2},
                                          name=f"hil-dns-{kind}", daemon=True)
                         for server, kind in zip(servers, ("udp", "tcp"), strict=False)]
        for thread in self._threads:
            thread.start()
        log.info("DNS: answering %s on %s:%d", ", ".join(
            f"{name} -> {address}" for name, address in self.resolver.names.items()),
            self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving, close the sockets, join every thread (serving and handling)."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
            server.server_close()   # joins the handler threads (block_on_close)
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _bind(self) -> tuple[socketserver.BaseServer, ...]:
        """The UDP server, and the TCP one on the same port; port 0: a port free for both."""
        for _ in range(_BIND_TRIES if self.port == 0 else 1):
            udp = self._server(_UDPServer, self.port)
            port = cast(tuple[str, int], udp.server_address)[1]
            if not self.tcp:
                self.port = port
                return (udp,)
            try:
                tcp = self._server(_TCPServer, port)
            except OSError as error:
                udp.server_close()
                if self.port == 0:
                    continue   # that UDP port's TCP twin is taken: another one
                raise RigFault("dns", f"cannot listen on TCP {self.host}:{port}: "
                               f"{error.strerror or error}") from None
            self.port = port
            return (udp, tcp)
        raise RigFault("dns", f"no port on {self.host} is free for both UDP and TCP")

    def _server(self, kind: type[socketserver.BaseServer], port: int) -> socketserver.BaseServer:
        class Bound(kind):  # type: ignore[valid-type,misc]
            address_family = _family(self.host)
        try:
            return cast(socketserver.BaseServer, Bound((self.host, port), _Handler))
        except OSError as error:
            hint = (" (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
                    if 0 < port < 1024 and error.errno == 13 else "")
            if kind is _TCPServer:
                raise
            raise RigFault("dns", f"cannot listen on UDP {self.host}:{port}: "
                           f"{error.strerror or error}{hint}") from None


def check_no_loop(upstream_host: str, names: Mapping[str, str]) -> None:
    """Raise a ``RigFault`` when the hil host's own resolver answers ``upstream_host`` (the
    real service the gateway forwards to) with an address hil's DNS gives for it: the gateway
    would forward to itself (the hil host's resolver was pointed at hil's DNS, as the board's)."""
    served = {_normal(name): address for name, address in names.items()}
    gateway_address = served.get(_normal(upstream_host))
    if gateway_address is None:
        return
    try:
        infos = socket.getaddrinfo(upstream_host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return   # unresolvable here: the gateway's first request says so, with the reason
    if any(info[4][0] == gateway_address for info in infos):
        raise RigFault("dns", f"this host resolves {upstream_host} to {gateway_address}, the "
                       "gateway itself: hil's own resolver must not use hil's DNS (give this "
                       "host another DNS server than the rig's network hands out)")
