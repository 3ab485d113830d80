"""SCPI instruments over any pyserial URL: the transport and what every instrument driver shares.

One transport for every instrument: ``serial.serial_for_url`` takes a device path
(``/dev/ttyUSB0``, an RS-232 or USB-CDC port) or ``socket://host:5025`` (the raw SCPI socket of
LAN instruments), so a serial supply, a LAN supply and an emulated one on a pty or a local TCP port
all go through the same lines below. ``ScpiLink`` is that transport; ``ScpiInstrument`` adds the
identity asked for at open. The bench supply (power.py) and the attenuators (rf.py) build on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import socket
import threading
from typing import ClassVar, Protocol

import serial

from hil.drivers.base import DriverBase
from hil.errors import RigFault

log = logging.getLogger(__name__)

# SCPI's "not a number" (IEEE 488.2): what a supply answers for a measurement it cannot make.
_SCPI_NAN = 9.91e37
# Longer than any answer these drivers ask for; an instrument streaming noise stops here.
_MAX_ANSWER = 4096

# What a port that vanished raises: pyserial's own error, the OS error under it, and on POSIX the
# termios error (not an OSError) that flushing a pty or USB port whose other end is gone raises.
_PORT_ERRORS: tuple[type[BaseException], ...] = (serial.SerialException, OSError)
try:
    import termios
except ImportError:   # Windows
    pass
else:
    _PORT_ERRORS += (termios.error,)
# Opening also meets ValueError: a URL pyserial cannot parse (socket://host without a port).
_OPEN_ERRORS: tuple[type[BaseException], ...] = (*_PORT_ERRORS, ValueError)


class _Port(Protocol):
    """The part of a pyserial port object that ``ScpiLink`` uses."""

    def write(self, data: bytes) -> int | None: ...

    def read_until(self, expected: bytes = ..., size: int | None = ...) -> bytes: ...

    def reset_input_buffer(self) -> None: ...

    def close(self) -> None: ...


class ScpiLink:
    """A line-oriented command channel to one instrument, over any pyserial URL.

    Commands are written with ``terminator``; a query waits ``timeout`` seconds for its answer
    line (pyserial's ``read_until`` bounds the whole line, so an instrument trickling bytes holds
    it at most twice that), and an answer is at most ``_MAX_ANSWER`` bytes. Every failure is a
    ``RigFault`` naming ``part`` and the URL: the instrument is part of the bench, so a silent,
    garbled or vanished one means the bench, not the firmware, is broken.
    """

    def __init__(
        self,
        url: str,
        *,
        part: str,
        timeout: float = 2.0,
        baudrate: int = 9600,
        terminator: str = "\n",
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.url = url
        self.part = part
        self.timeout = timeout
        self.baudrate = baudrate
        self.terminator = terminator
        self._port: _Port | None = None
        # A query is a write and the read of its answer: two threads (a test setting a level, an
        # energy sampler measuring) must not read each other's answers. Reentrant: a driver may
        # hold it around a setting and the queries that check it.
        self.lock = threading.RLock()

    @property
    def is_open(self) -> bool:
        return self._port is not None

    def open(self) -> None:
        if self._port is not None:
            return
        try:
            # baudrate only matters on a real serial port; URL handlers ignore it.
            self._port = serial.serial_for_url(
                self.url, baudrate=self.baudrate, timeout=self.timeout,
                write_timeout=self.timeout,
            )
        except _OPEN_ERRORS as exc:
            raise self.fault(f"cannot open: {exc}") from exc
        sock = _socket_of(self._port)
        if sock is not None:
            # A setting is a command line and then SYST:ERR?: two small writes in a row, which
            # Nagle's algorithm would hold back for the instrument's delayed ACK (~40 ms each).
            # Should this fail, the connection is already broken and the first query says so.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        port, self._port = self._port, None
        if port is None:
            return
        sock = _socket_of(port)
        try:
            port.close()
        except _PORT_ERRORS as exc:
            # The port is gone either way; closing must not hide the error that led here.
            log.warning("%s: closing failed: %s", self.url, exc)
        if sock is not None:
            # pyserial 3.5's socket:// close skips socket.close() when shutdown() fails, as it
            # does after the instrument reset the connection: the descriptor would leak.
            sock.close()

    def write(self, command: str) -> None:
        port = self._require_open()
        log.debug("%s <- %s", self.url, command)
        try:
            port.write((command + self.terminator).encode("ascii"))
        except _PORT_ERRORS as exc:
            raise self.fault(f"cannot send {command}: {exc}") from exc

    def query(self, command: str) -> str:
        """Send ``command`` and return its answer line, without the terminator and blanks."""
        with self.lock:
            return self._query(command)

    def _query(self, command: str) -> str:
        port = self._require_open()
        try:
            # An answer that came after an earlier query had given up would otherwise be read as
            # the answer to this one, and every later answer would be off by one.
            port.reset_input_buffer()
        except _PORT_ERRORS as exc:
            raise self.fault(f"cannot send {command}: {exc}") from exc
        self.write(command)
        ending = self.terminator.encode("ascii")
        try:
            raw = port.read_until(ending, _MAX_ANSWER)
        except _PORT_ERRORS as exc:
            raise self.fault(f"no answer to {command}: {exc}") from exc
        if not raw:
            raise self.fault(f"no answer to {command} within {self.timeout:g} s")
        if not raw.endswith(ending):
            raise self.fault(f"incomplete answer to {command} within {self.timeout:g} s: {raw!r}")
        answer = raw[: -len(ending)].decode("ascii", errors="backslashreplace").strip()
        log.debug("%s -> %s", self.url, answer)
        return answer

    def query_float(self, command: str) -> float:
        """The number ``command`` answers; garbage or SCPI's not-a-number is a RigFault."""
        answer = self.query(command)
        try:
            value = float(answer)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or abs(value) >= _SCPI_NAN:
            raise self.fault(f"{command} answered {answer!r}, not a number")
        return value

    def fault(self, message: str) -> RigFault:
        """A RigFault for this instrument: ``<part>: <url>: <message>``."""
        return RigFault(self.part, f"{self.url}: {message}")

    def _require_open(self) -> _Port:
        if self._port is None:
            raise self.fault("not open (open() it, or use it in a with block)")
        return self._port


def _socket_of(port: object) -> socket.socket | None:
    """The TCP socket under a pyserial ``socket://`` port (a private attribute), else None."""
    sock = getattr(port, "_socket", None)
    return sock if isinstance(sock, socket.socket) else None


class ScpiInstrument(DriverBase):
    """What the instrument drivers share: a ``ScpiLink``, and the identity asked for at open.

    ``open()`` requires an answer to ``IDENTIFY`` (a silent or unplugged instrument fails here,
    before any test starts), then lets the subclass ``_prepare()`` the instrument; if either fails
    the port is given back.
    """

    part: ClassVar[str]                    # the rig part RigFaults name: "power", "rf"
    IDENTIFY: ClassVar[str] = "*IDN?"
    IDENTITY_PREFIX: ClassVar[str] = ""    # stripped from the answer (Mini-Circuits: "MN=")
    # IEEE 488.2: maker,model,serial,firmware (some add a field). Anything else at the address
    # (a web server's "HTTP/1.1 400 Bad Request", a console's prompt) is not this instrument.
    IDENTITY_FORMAT: ClassVar[re.Pattern[str]] = re.compile(r"[^,]+(?:,[^,]*){2,}")

    def __init__(self, url: str, *, timeout: float, baudrate: int) -> None:
        self.url = url
        self.link = ScpiLink(url, part=self.part, timeout=timeout, baudrate=baudrate)
        self._identity: str | None = None

    def open(self) -> None:
        if self.link.is_open:
            return
        self.link.open()
        try:
            answer = self.link.query(self.IDENTIFY).strip()
            identity = answer.removeprefix(self.IDENTITY_PREFIX).strip()
            if not answer.startswith(self.IDENTITY_PREFIX) \
                    or not self.IDENTITY_FORMAT.fullmatch(identity):
                raise self.link.fault(f"{self.IDENTIFY} answered {answer[:60]!r}: not a "
                                      f"{self.part} instrument's identity")
            self._identity = identity
            self._prepare()
        except BaseException:
            self.link.close()
            raise

    def close(self) -> None:
        self.link.close()

    def identify(self) -> str:
        """The instrument's identity (``*IDN?`` answer or model), as read by ``open()``."""
        if self._identity is None or not self.link.is_open:
            raise self.link.fault("not open (open() it, or use it in a with block)")
        return self._identity

    def _prepare(self) -> None:
        """Bring the instrument to a known state once it has answered; nothing by default."""


