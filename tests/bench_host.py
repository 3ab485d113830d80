"""A lab's bench host, simulated: one process runs a simulated board's bench (``hil sim up``'s
``SimBench``) and serves its debug probe and serial lines over the network, as a bench host in a
labgrid lab serves its USB probe and USB-UART:

- ``--probe-server``: the board's SWD probe (``hil.sim.probe``) served by pyocd's remote probe
  server (``pyocd.probe.tcp_probe_server.DebugProbeServer``, what ``pyocd server`` runs), for
  pyocd's remote probe client (``remote:127.0.0.1:PORT``);
- ``--rfc2217``: an ESP32's USB serial bridge (``hilsim://``) behind an RFC 2217 server
  (pyserial's ``serial.rfc2217.PortManager``, as ser2net's ``telnet(rfc2217)`` fronts a
  USB-UART): DTR and RTS travel to the board, so esptool's reset sequences work over
  ``rfc2217://``. One client at a time; the port is opened when a client connects and closed
  when it leaves, as ser2net does.

Both must live in the bench's process: the simulated chip and its firmware model are objects of
that process (a ``pyocd server`` of its own would open a second, unhooked chip).

    python tests/bench_host.py RIG.yaml [--probe-server] [--rfc2217]

prints ``<rig>: <part> at <address>`` lines (console, power, rf, probe, serial), then
``<rig>: up (Ctrl-C or SIGTERM stops it)``. ``bench_host(rig)`` runs it for a test.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Rfc2217Server:
    """An RFC 2217 server on 127.0.0.1 for the serial port ``url`` (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="rfc2217 server", daemon=True)

    def start(self) -> Rfc2217Server:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(10)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            # A client that leaves at once (a check that the port listens) breaks its own
            # session only.
            with connection, contextlib.suppress(OSError):
                self._client(connection)

    def _client(self, connection: socket.socket) -> None:
        import serial
        import serial.rfc2217

        import hil.drivers  # noqa: F401   (registers the hilsim:// URL handler)

        port = serial.serial_for_url(self.url, timeout=0.05)
        try:
            self._session(connection, port)
        finally:
            port.close()

    def _session(self, connection: socket.socket, port: Any) -> None:
        import serial
        import serial.rfc2217

        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _Client(connection)
        manager = serial.rfc2217.PortManager(port, client)
        gone = threading.Event()

        def board_to_client() -> None:
            while not gone.is_set():
                try:
                    data = port.read(port.in_waiting or 1)
                    if data:
                        client.write(b"".join(manager.escape(data)))
                    manager.check_modem_lines()
                except (OSError, serial.SerialException):
                    break
            gone.set()

        reader = threading.Thread(target=board_to_client, name="rfc2217 board->client",
                                  daemon=True)
        reader.start()
        try:
            while not gone.is_set():
                try:
                    data = connection.recv(4096)
                except OSError:
                    break
                if not data:
                    break
                for byte in manager.filter(data):
                    port.write(byte)
        finally:
            gone.set()
            reader.join(10)


class _Client:
    """The connection as PortManager writes to it (its answers from the client's thread, the
    board's bytes from the reader's: one at a time)."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.connection.sendall(data)


def serve_probe(uid: str) -> Any:
    """The board's probe served as ``pyocd server`` serves one (its ServerSubcommand: a session
    without a probe for the options, the probe given that session, the server started)."""
    from pyocd.core.session import Session
    from pyocd.probe.aggregator import DebugProbeAggregator
    from pyocd.probe.tcp_probe_server import DebugProbeServer

    session = Session(probe=None, serve_local_only=True, options={"no_config": True})
    probe = DebugProbeAggregator.get_probe_with_id(f"hilsim:{uid}")
    if probe is None:
        raise SystemExit(f"bench_host: no simulated probe {uid}")
    probe.session = session
    server = DebugProbeServer(session, probe, port=0, serve_local_only=True)
    server.start()
    return server


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_host")
    parser.add_argument("rig", type=Path)
    parser.add_argument("--probe-server", action="store_true")
    parser.add_argument("--rfc2217", action="store_true")
    args = parser.parse_args(argv)

    from hil.rig.model import load_rig
    from hil.sim.bench import SimBench, expected_addresses

    rig = load_rig(args.rig)
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    with SimBench(rig), ExitStack() as stack:
        for key, address in expected_addresses(rig).items():
            print(f"{rig.name}: {key.split('.')[0]} at {address}", flush=True)
        if args.probe_server:
            probe = getattr(rig.flasher, "probe", None)
            assert probe is not None, "an SWD rig names its probe"
            server = serve_probe(probe)
            stack.callback(server.stop)
            # Bound at construction: the port is the socket's (the server's own copy of it is
            # filled in by its thread).
            port = server._server.socket.getsockname()[1]
            print(f"{rig.name}: probe at 127.0.0.1:{port}", flush=True)
        if args.rfc2217:
            assert rig.console.url is not None, "an ESP32 rig's console is its hilsim:// URL"
            rfc2217 = Rfc2217Server(rig.console.url).start()
            stack.callback(rfc2217.close)
            print(f"{rig.name}: serial at 127.0.0.1:{rfc2217.port}", flush=True)
        print(f"{rig.name}: up (Ctrl-C or SIGTERM stops it)", flush=True)
        stop.wait()
    print(f"{rig.name}: stopped", flush=True)
    return 0


@dataclass(frozen=True)
class BenchHost:
    pid: int
    addresses: dict[str, str]    # part -> address (console, power, rf, probe, serial)


@contextmanager
def bench_host(rig_path: Path, env: dict[str, str], *options: str) -> Iterator[BenchHost]:
    """The rig's bench host (see the module docstring) until the block ends."""
    host = subprocess.Popen([sys.executable, str(Path(__file__)), str(rig_path), *options],
                            env=env, cwd=ROOT, text=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert host.stdout is not None
    try:
        lines = []
        while not (lines and lines[-1].endswith("up (Ctrl-C or SIGTERM stops it)\n")):
            line = host.stdout.readline()
            assert line, "the bench host ended:\n" + "".join(lines) + host.stdout.read()
            lines.append(line)
        yield BenchHost(host.pid, dict(re.findall(r": (\w+) at (\S+)", "".join(lines))))
    finally:
        host.terminate()
        ended = host.wait(30)
        rest = host.stdout.read()
        host.stdout.close()
    assert ended == 0, rest


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
