"""The emulated bench instruments (``hil.sim.instruments``) on real transports, for the driver
tests: a server puts an instrument on a transport the drivers open by URL, exactly as they open lab
instruments:

- ``PtyServer``: a pseudo-terminal (``os.openpty()``); the driver opens the slave path, as it would
  ``/dev/ttyUSB0``.
- ``TcpServer``: 127.0.0.1 on a free port; the driver opens ``socket://127.0.0.1:<port>``, as it
  would a LAN instrument's raw SCPI socket.

``serve(instrument, "pty" | "tcp")`` picks one. Servers run on a thread, are context managers, and
re-raise on ``stop()`` whatever their thread raised, so an emulator bug (or an ``on_change`` that
raises) fails the test instead of looking like a silent instrument. Every wait is a ``select`` with
a short timeout, so ``stop()`` is prompt and nothing can hang. The instruments' fault modes
(``silent``, ``garbage``, ``delay``, ``queue_error``) are described in ``hil.sim.instruments``;
``delay`` is honoured here.

The instrument classes are re-exported, so tests import everything from this module.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import tty
from typing import Literal, Self

from hil.sim.instruments import (
    NO_ERROR,
    EmulatedAttenuator,
    EmulatedInstrument,
    EmulatedSupply,
    LineSplitter,
    SupplyChannel,
)

__all__ = [
    "NO_ERROR",
    "POLL",
    "EmulatedAttenuator",
    "EmulatedInstrument",
    "EmulatedSupply",
    "LineSplitter",
    "PtyServer",
    "Server",
    "SupplyChannel",
    "TcpServer",
    "free_tcp_port",
    "serve",
]

POLL = 0.2   # seconds a server thread waits for input before looking at its stop flag anyway


class Server:
    """An instrument served on a thread; ``url`` is what a driver opens."""

    url: str

    def __init__(self, instrument: EmulatedInstrument) -> None:
        self.instrument = instrument
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        # stop() writes a byte here so that the thread's select wakes at once, not after POLL.
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._stopped = False

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, join the thread, release the transport; re-raise the thread's error."""
        if not self._stopped:
            self._stopped = True
            self._stopping.set()
            os.write(self._wake_write, b"x")
            if self._thread.is_alive():
                self._thread.join(timeout=5)
                assert not self._thread.is_alive(), f"{self.url}: server thread did not stop"
            self._release()
            os.close(self._wake_read)
            os.close(self._wake_write)
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:   # handed to the test thread by stop()
            self.error = exc

    def _answer(self, lines: LineSplitter, data: bytes) -> list[bytes]:
        replies = []
        for line in lines.feed(data):
            reply = self.instrument.respond(line)
            if reply is not None:
                if self.instrument.delay:
                    self._stopping.wait(self.instrument.delay)
                replies.append(reply)
        return replies

    def _serve(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


class PtyServer(Server):
    """The instrument on a pseudo-terminal; ``url`` is the slave's path (``/dev/pts/N``)."""

    def __init__(self, instrument: EmulatedInstrument) -> None:
        super().__init__(instrument)
        self._master, self._slave = os.openpty()
        # Raw: no echo, no CR/LF translation. Holding the slave open keeps the pty alive between
        # the driver's open and close (with no slave open, reads on the master fail with EIO).
        tty.setraw(self._slave)
        self.url = os.ttyname(self._slave)

    def _serve(self) -> None:
        lines = LineSplitter(self.instrument.terminator)
        while not self._stopping.is_set():
            ready, _, _ = select.select([self._master, self._wake_read], [], [], POLL)
            if self._master in ready:
                for reply in self._answer(lines, os.read(self._master, 4096)):
                    os.write(self._master, reply)

    def _release(self) -> None:
        os.close(self._master)
        os.close(self._slave)


class TcpServer(Server):
    """The instrument on 127.0.0.1, a free port; ``url`` is ``socket://127.0.0.1:<port>``.

    Clients are served one line at a time, each connection with its own line buffer; a driver
    that closes and reopens gets a new connection, as with a LAN instrument.
    """

    def __init__(self, instrument: EmulatedInstrument) -> None:
        super().__init__(instrument)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port: int = self._listener.getsockname()[1]
        self.url = f"socket://127.0.0.1:{self.port}"
        self._clients: dict[socket.socket, LineSplitter] = {}

    def _serve(self) -> None:
        while not self._stopping.is_set():
            watched: list[socket.socket | int] = [self._listener, *self._clients, self._wake_read]
            ready, _, _ = select.select(watched, [], [], POLL)
            for sock in ready:
                if isinstance(sock, int):   # the wake pipe: the loop condition says why
                    continue
                if sock is self._listener:
                    client, _ = self._listener.accept()
                    client.settimeout(POLL * 50)   # sendall below must not hang either
                    self._clients[client] = LineSplitter(self.instrument.terminator)
                    continue
                try:
                    data = sock.recv(4096)
                except ConnectionError:
                    data = b""
                if not data:   # the driver closed its end
                    del self._clients[sock]
                    sock.close()
                    continue
                for reply in self._answer(self._clients[sock], data):
                    sock.sendall(reply)

    def _release(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        self._listener.close()


def serve(instrument: EmulatedInstrument, transport: Literal["pty", "tcp"]) -> Server:
    """``instrument`` on a new (not yet started) server of the given transport."""
    return PtyServer(instrument) if transport == "pty" else TcpServer(instrument)


def free_tcp_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port

