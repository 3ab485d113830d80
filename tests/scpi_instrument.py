"""Emulated bench instruments for the driver tests: a SCPI supply and a step attenuator.

Each instrument is a line handler with inspectable state; a server puts it on a real transport the
drivers open by URL, exactly as they open lab instruments:

- ``PtyServer``: a pseudo-terminal (``os.openpty()``); the driver opens the slave path, as it would
  ``/dev/ttyUSB0``.
- ``TcpServer``: 127.0.0.1 on a free port; the driver opens ``socket://127.0.0.1:<port>``, as it
  would a LAN instrument's raw SCPI socket.

Servers run on a thread, are context managers, and re-raise on ``stop()`` whatever their thread
raised, so an emulator bug fails the test instead of looking like a silent instrument. Every wait
is a ``select`` with a short timeout, so ``stop()`` is prompt and nothing can hang.

Fault modes, settable at any time: ``silent`` (commands are logged, nothing is answered),
``garbage`` (every answer replaced by these bytes), ``delay`` (answers come this many seconds
late), and an error queue (``queue_error``) that ``SYST:ERR?`` reads.
"""

from __future__ import annotations

import collections
import math
import os
import re
import select
import socket
import threading
import tty
from dataclasses import dataclass
from typing import Literal, Self

POLL = 0.2   # seconds a server thread waits for input before looking at its stop flag anyway
NO_ERROR = '0,"No error"'


class EmulatedInstrument:
    """Line handling shared by the emulated instruments: the log and the fault modes."""

    terminator = b"\n"

    def __init__(self) -> None:
        self.log: list[str] = []        # every command line received, in order
        self.silent = False
        self.garbage: bytes | None = None
        self.delay = 0.0
        self.errors: collections.deque[str] = collections.deque()   # read by SYST:ERR?
        self.lock = threading.Lock()

    def handle(self, line: str) -> str | None:
        """The answer to one command line (without terminator), None for no answer."""
        raise NotImplementedError

    def respond(self, line: str) -> bytes | None:
        """What goes back on the wire for ``line``: the answer with its terminator, or None."""
        with self.lock:
            self.log.append(line)
            if self.silent:
                return None
            answer = self.handle(line)
            if answer is None:
                return None
            if self.garbage is not None:
                return self.garbage
            return answer.encode("ascii") + self.terminator

    def queue_error(self, entry: str) -> None:
        """Put an entry such as ``-222,"Data out of range"`` in the error queue."""
        with self.lock:
            self.errors.append(entry)

    def on_pty(self) -> PtyServer:
        return PtyServer(self)

    def on_tcp(self) -> TcpServer:
        return TcpServer(self)

    def serve(self, transport: Literal["pty", "tcp"]) -> Server:
        return self.on_pty() if transport == "pty" else self.on_tcp()


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------- the supply
@dataclass
class SupplyChannel:
    volts: float = 0.0
    current_limit: float = 3.0
    output: bool = False
    load_ohms: float = 20.0   # the board, as the supply sees it

    def measured_volts(self) -> float:
        return self.volts if self.output else 0.0

    def measured_amps(self) -> float:
        return min(self.volts / self.load_ohms, self.current_limit) if self.output else 0.0


_SUPPLY_COMMANDS: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(pattern)) for name, pattern in [
        ("idn", r"\*IDN\?"),
        ("cls", r"\*CLS"),
        ("volts", r"(?::?SOUR(\d+):)?VOLT\s+(\S+)"),
        ("amps", r"(?::?SOUR(\d+):)?CURR\s+(\S+)"),
        ("output", r":?OUTP\s+(?:CH(\d+),)?(ON|OFF|1|0)"),
        ("measure_volts", r":?MEAS:VOLT\?(?:\s+CH(\d+))?"),
        ("measure_amps", r":?MEAS:CURR\?(?:\s+CH(\d+))?"),
        ("error", r":?SYST:ERR\?"),
    ]
]


class EmulatedSupply(EmulatedInstrument):
    """A multi-output bench supply: the common SCPI subset and the Rigol per-channel forms.

    Commands without a channel act on output 1. Measurements answer in the Keysight number style
    (``+3.70000000E+00``), settings answer nothing, mistakes go to the error queue with the SCPI
    error a real supply would queue.
    """

    def __init__(
        self,
        *,
        channels: int = 3,
        max_volts: float = 32.0,
        max_amps: float = 3.2,
        idn: str = "EMU,SUPPLY-3,0001,1.0",
    ) -> None:
        super().__init__()
        self.channels = {number: SupplyChannel() for number in range(1, channels + 1)}
        self.max_volts = max_volts
        self.max_amps = max_amps
        self.idn = idn

    # Output 1, the one a single-output driver talks to.
    @property
    def volts(self) -> float:
        return self.channels[1].volts

    @property
    def current_limit(self) -> float:
        return self.channels[1].current_limit

    @property
    def output(self) -> bool:
        return self.channels[1].output

    def handle(self, line: str) -> str | None:
        command = line.strip().upper()
        for name, pattern in _SUPPLY_COMMANDS:
            match = pattern.fullmatch(command)
            if match is not None:
                return self._do(name, match.groups())
        self.errors.append('-113,"Undefined header"')
        return None

    def _do(self, name: str, groups: tuple[str | None, ...]) -> str | None:
        if name == "idn":
            return self.idn
        if name == "cls":
            self.errors.clear()
            return None
        if name == "error":
            return self.errors.popleft() if self.errors else NO_ERROR
        channel = self.channels.get(int(groups[0] or 1))
        if channel is None:
            self.errors.append('-224,"Illegal parameter value"')
            return None
        if name == "measure_volts":
            return f"{channel.measured_volts():+.8E}"
        if name == "measure_amps":
            return f"{channel.measured_amps():+.8E}"
        if name == "output":
            channel.output = groups[1] in ("ON", "1")
            return None
        value = _number(groups[1] or "")
        if value is None:
            self.errors.append('-104,"Data type error"')
        elif not 0 <= value <= (self.max_volts if name == "volts" else self.max_amps):
            self.errors.append('-222,"Data out of range"')
        elif name == "volts":
            channel.volts = value
        else:
            channel.current_limit = value
        return None


# ---------------------------------------------------------------------------------- the attenuator
class EmulatedAttenuator(EmulatedInstrument):
    """A step attenuator in the SCPI-style dialect or the Mini-Circuits RCDAT one.

    ``stuck`` makes it acknowledge settings without taking them (a relay that no longer switches).
    """

    def __init__(
        self,
        dialect: Literal["scpi", "minicircuits"] = "scpi",
        *,
        max_db: float = 95.0,
        step_db: float = 0.25,
        model: str = "RCDAT-6000-95",
        idn: str = "EMU,ATTENUATOR,0002,1.0",
    ) -> None:
        super().__init__()
        self.dialect = dialect
        self.max_db = max_db
        self.step_db = step_db
        self.model = model
        self.idn = idn
        self.attenuation = 0.0
        self.stuck = False

    def handle(self, line: str) -> str | None:
        command = line.strip().upper()
        if self.dialect == "scpi":
            return self._scpi(command)
        return self._minicircuits(command)

    def _scpi(self, command: str) -> str | None:
        if command == "*IDN?":
            return self.idn
        if command == "ATT?":
            return f"{self.attenuation:.2f}"
        if command.startswith("ATT "):
            value = _number(command[4:])
            if value is None or not 0 <= value <= self.max_db:
                self.errors.append('-222,"Data out of range"')
            else:
                self._set(value)
            return None
        self.errors.append('-113,"Undefined header"')
        return None

    def _minicircuits(self, command: str) -> str | None:
        if command == ":MN?":
            return f"MN={self.model}"
        if command == ":ATT?":
            return f"{self.attenuation:.2f}"
        if command.startswith(":SETATT="):
            value = _number(command.removeprefix(":SETATT="))
            if value is None or value < 0:
                return "0"
            if value > self.max_db:   # what the RCDAT does: sets its maximum, answers 2
                self._set(self.max_db)
                return "2"
            self._set(value)
            return "1"
        return None   # the RCDAT ignores what it does not know

    def _set(self, value: float) -> None:
        if not self.stuck:
            self.attenuation = round(value / self.step_db) * self.step_db


# ---------------------------------------------------------------------------------- transports
class _Lines:
    """Splits a byte stream into command lines (CR before LF tolerated)."""

    def __init__(self, terminator: bytes) -> None:
        self.terminator = terminator
        self.pending = b""

    def feed(self, data: bytes) -> list[str]:
        self.pending += data
        *lines, self.pending = self.pending.split(self.terminator)
        return [line.rstrip(b"\r").decode("ascii", errors="replace") for line in lines]


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

    def _answer(self, lines: _Lines, data: bytes) -> list[bytes]:
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
        lines = _Lines(self.instrument.terminator)
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
        self._clients: dict[socket.socket, _Lines] = {}

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
                    self._clients[client] = _Lines(self.instrument.terminator)
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


def free_tcp_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port

