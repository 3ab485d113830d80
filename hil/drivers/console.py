"""The board's serial console over pyserial: the console contract spoken line by line, logged whole.

A ``SerialConsole`` opens a port by device path (``/dev/ttyUSB0``), by any pyserial URL
(``socket://host:port`` for a ser2net bench, ``rfc2217://``, ``loop://``, or a scheme of our own
registered in ``serial.protocol_handler_packages``, which is how a simulated board plugs in) or by
the USB serial number of its adapter (stable across re-enumeration, unlike ``ttyUSB<n>``).

One daemon thread reads the port for the whole session: raw bytes in chunks, split into lines,
each stamped when it arrived and appended to a log that is never trimmed (it is what the report
attaches). The test thread only ever looks at that log: ``expect`` scans it from a cursor,
``command`` sends and waits for the contract's answer line. Reading never depends on someone
waiting, so a burst at 921600 baud is drained while the test thread is busy elsewhere.

When the port goes away while open (USB re-enumeration, a pulled cable, ser2net restarting), the
reader records why and stops; every wait in progress and every later use raises ``RigFault`` at
once. A test must end "broken" then, not "failed" after a timeout that blames the firmware.
"""

from __future__ import annotations

import codecs
import contextlib
import re
import threading
import time
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import IO, Any, TypeVar

# pyserial ships no annotations; types-pyserial provides them where it is installed.
import serial
import serial.tools.list_ports

from hil.drivers.base import DriverBase, LogLine, format_log
from hil.errors import CommandRefused, ConfigError, ExpectTimeout, RigFault

PART = "console"

# The reader's read timeout. It bounds how late a line is seen (and stamped) when the port
# trickles: pyserial's read(n) returns early only once n bytes are in, and some transports
# (socket://) cannot say how many are waiting. 10 ms is far below any firmware timing we assert.
_POLL_S = 0.01
_CHUNK = 64 * 1024
# A device that never sends a newline (binary garbage, a wrong baud rate) must not grow one
# unbounded line; past this size the pending bytes are logged as a line of their own.
_MAX_LINE = 64 * 1024
_TAIL_LINES = 20
_JOIN_S = 2.0
# A port that is not there when opened may be re-enumerating (a USB adapter that dropped off the
# bus comes back within a second or two, at the same path or serial number): wait this long.
REAPPEAR_S = 5.0

_T = TypeVar("_T")


def _compile(pattern: str | re.Pattern[str], what: str) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(what, f"not a regular expression: {pattern!r}: {error}") from None


def find_port_by_serial_number(serial_number: str) -> str:
    """The device path of the one USB serial port with this serial number (RigFault else)."""
    ports = list(serial.tools.list_ports.comports())
    found = [str(port.device) for port in ports if port.serial_number == serial_number]
    if len(found) == 1:
        return found[0]
    if not found:
        seen = ", ".join(f"{port.device} ({port.serial_number or 'no serial number'})"
                         for port in ports) or "none"
        raise RigFault(PART, f"no serial port with USB serial number {serial_number}; "
                             f"ports seen: {seen}")
    # Multi-channel adapters (FT2232 on an ESP-Prog) give every channel the same number.
    raise RigFault(PART, f"USB serial number {serial_number} has {len(found)} ports "
                         f"({', '.join(found)}); name the port by its path instead")


class _Missing(Exception):
    """The port is not there (yet): ``fault`` is what to raise if it stays away."""

    def __init__(self, fault: RigFault) -> None:
        super().__init__(str(fault))
        self.fault = fault


class SerialConsole(DriverBase):
    """The firmware's test shell on a serial port (../shared/DESIGN.md, the console contract).

    Exactly one of ``port`` (device path), ``url`` (pyserial URL) or ``serial_number`` (USB
    serial number of the adapter) says where. ``ok_pattern`` and ``err_pattern`` recognise the
    shell's answers; ``err_pattern`` may capture ``(?P<reason>...)``. Constructing does no I/O.
    """

    name: str

    def __init__(self, *, port: str | None = None, url: str | None = None,
                 serial_number: str | None = None, baudrate: int = 115200,
                 ok_pattern: str = r"^OK$", err_pattern: str = r"^ERR (?P<reason>.*)$",
                 newline: str = "\n", encoding: str = "utf-8",
                 write_timeout: float = 5.0, log_path: Path | None = None) -> None:
        given = {key: value for key, value in
                 (("port", port), ("url", url), ("serial_number", serial_number))
                 if value}
        if len(given) != 1:
            raise ConfigError(PART, "give exactly one of port, url or serial_number, "
                                    f"got {', '.join(given) or 'none'}")
        self.port, self.url, self.serial_number = port or None, url or None, serial_number or None
        self.name = next(iter(given.values()))
        self.baudrate = baudrate
        self.ok_pattern = _compile(ok_pattern, f"{PART}.ok_pattern")
        self.err_pattern = _compile(err_pattern, f"{PART}.err_pattern")
        self.newline = newline
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ConfigError(f"{PART}.encoding", f"unknown encoding {encoding!r}") from None
        self.encoding = encoding
        self.write_timeout = write_timeout
        self.device: str | None = None   # what was opened: the path a serial number led to

        self._serial: Any = None          # the pyserial port while open
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._write_lock = threading.Lock()
        # Guards everything below; the reader notifies it on every new line and when the port
        # vanishes, which is what wakes expect() and command().
        self._changed = threading.Condition()
        self._log: list[LogLine] = []
        self._cursor = 0
        self._vanished: str | None = None   # why the port went away, once it did
        self._last_at = 0.0
        self._pending = b""                 # bytes of a line not ended yet (reader thread only)
        self._pending_at = 0.0              # when the last of them came
        # Every line also goes to this file as it is logged, one unbuffered write each: the log
        # of a test survives the kill of the process running it (appended across reopenings).
        self.log_path = log_path
        self._sink: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "open" if self._serial is not None else "closed"
        return f"<SerialConsole {self.name} {state}>"

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        """Open the port and start logging. Reopening after ``close()`` continues the same log."""
        if self._serial is not None:
            return
        deadline = time.monotonic() + REAPPEAR_S
        while True:
            try:
                target, port = self._open_port()
                break
            except _Missing as missing:
                if time.monotonic() > deadline:
                    raise missing.fault from None
                time.sleep(0.1)
        self.device = target
        with self._changed:
            self._vanished = None
        self._stopping.clear()
        self._pending = b""
        self._serial = port
        self._reader = threading.Thread(target=self._read_loop, args=(port,), daemon=True,
                                        name=f"console reader {self.name}")
        self._reader.start()

    def _open_port(self) -> tuple[str, Any]:
        """The port opened, or _Missing (worth waiting for) or RigFault (not)."""
        # One of the three is set; a serial number is looked up at each open (USB ports move).
        if self.serial_number is not None and self.url is None and self.port is None:
            try:
                target = find_port_by_serial_number(self.serial_number)
            except RigFault as not_found:
                raise _Missing(not_found) from None
        else:
            target = str(self.url or self.port)
        options: dict[str, Any] = {}
        if self.url is None:
            # Lock device paths (flock) so a second session on this rig cannot open the console
            # too and silently steal half of its lines.
            options["exclusive"] = True
        try:
            return target, serial.serial_for_url(target, baudrate=self.baudrate,
                                                 timeout=_POLL_S,
                                                 write_timeout=self.write_timeout, **options)
        except (OSError, ValueError) as error:   # SerialException is an OSError
            cannot = RigFault(PART, f"{self.name}: cannot open: {error}")
            if self.url is None and not Path(target).exists():
                raise _Missing(cannot) from error
            raise cannot from error

    def close(self) -> None:
        """Stop the reader and give the port back; the log stays readable. Safe to repeat."""
        port, reader = self._serial, self._reader
        if port is None:
            return
        self._stopping.set()
        if reader is not None:
            reader.join(_JOIN_S)   # it notices within one read timeout
        # A port that vanished may fail to close; it is given back all the same.
        with contextlib.suppress(OSError):
            port.close()
        if reader is not None and reader.is_alive():
            reader.join(_JOIN_S)   # a handler that ignored its read timeout wakes on close
        with self._changed:
            self._serial = self._reader = None
            self._flush_pending()
            if self._sink is not None:
                self._sink.close()
                self._sink = None
            self._changed.notify_all()

    # -- the reader thread -------------------------------------------------------------------
    def _read_loop(self, port: Any) -> None:
        try:
            while not self._stopping.is_set():
                # Where the transport knows how much is buffered (a tty does), take exactly
                # that without waiting; otherwise take a chunk or whatever came within _POLL_S.
                waiting = int(port.in_waiting)
                data = port.read(waiting if waiting > 1 else _CHUNK)
                if data:
                    self._take(bytes(data))
        except Exception as error:   # whatever the handler raised, the port is gone for us
            if not self._stopping.is_set():
                reason = str(error) or type(error).__name__
                with self._changed:
                    self._flush_pending()
                    self._vanished = reason
                    self._changed.notify_all()

    def _take(self, data: bytes) -> None:
        arrived = time.time()
        parts = (self._pending + data).split(b"\n")
        self._pending = parts.pop()
        self._pending_at = arrived
        if len(self._pending) > _MAX_LINE:
            parts.append(self._pending)
            self._pending = b""
        if not parts:
            return
        texts = [self._decode(part) for part in parts]
        with self._changed:
            # Stamps never go backwards, even when the wall clock is stepped (NTP): the log's
            # order is the order of arrival, and a report sorts by stamp.
            at = self._last_at = max(arrived, self._last_at)
            self._record([LogLine(at, text) for text in texts])
            self._changed.notify_all()

    def _record(self, lines: list[LogLine]) -> None:
        """Append to the log and its file (call with the lock held)."""
        self._log.extend(lines)
        if self.log_path is not None:
            try:
                if self._sink is None:
                    self.log_path.parent.mkdir(parents=True, exist_ok=True)
                    self._sink = self.log_path.open("ab", buffering=0)
                self._sink.write(format_log(lines).encode("utf-8", "replace"))
            except OSError:
                self.log_path = None     # a full disk must not end the test: memory still has it

    def _flush_pending(self) -> None:
        """Log what came after the last newline (call with the lock held, reader stopped)."""
        if self._pending:
            at = self._last_at = max(self._pending_at, self._last_at)
            self._record([LogLine(at, self._decode(self._pending))])
            self._pending = b""

    def _decode(self, raw: bytes) -> str:
        # strip("\r"): both CRLF and the "\n\r" some vendor shells send end up as plain lines.
        return raw.decode(self.encoding, "replace").strip("\r")

    # -- the test thread's side --------------------------------------------------------------
    def send(self, line: str) -> None:
        """Write ``line`` and the line ending."""
        if "\n" in line or "\r" in line:
            raise ValueError(f"one line at a time: {line!r}")
        with self._changed:
            port = self._usable_port(f"sending {line!r}")
        data = (line + self.newline).encode(self.encoding, "replace")
        with self._changed:
            # Logged before it is written, so the answer can never come before its command.
            at = self._last_at = max(time.time(), self._last_at)
            self._record([LogLine(at, line, sent=True)])
        try:
            with self._write_lock:   # lines from two threads must not interleave
                port.write(data)
        except serial.SerialTimeoutException as error:
            raise RigFault(PART, f"{self.name}: sending {line!r} stalled for "
                                 f"{self.write_timeout:g} s (the device is not reading, or "
                                 f"flow control holds the line): {error}") from error
        except OSError as error:
            raise RigFault(PART, f"{self.name}: port vanished while sending {line!r}: "
                                 f"{error}") from error

    def mark(self) -> int:
        """A position in the log (its length now), for ``expect(..., since=mark)``."""
        with self._changed:
            return len(self._log)

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 10.0, *,
               since: int | None = None) -> re.Match[str]:
        """The first line after the cursor (or after ``since``, a ``mark()``) that matches;
        the cursor moves past it, so a line is matched once. On timeout raises ExpectTimeout
        naming the console and the pattern and showing the log's tail."""
        regex = re.compile(pattern)
        if since is not None and since < 0:
            raise ValueError(f"since is a mark(), a position in the log, not {since}")
        with self._changed:
            start = self._cursor if since is None else since
        index, match = self._wait_for(start, regex.search, timeout,
                                      waiting_for=f"a line matching '{regex.pattern}'")
        with self._changed:
            self._cursor = index + 1
        return match

    def command(self, line: str, timeout: float = 10.0, *,
                keep_cursor: bool = False) -> list[str]:
        """Send a contract command; return the lines printed before its OK, or raise
        CommandRefused on ERR. Earlier output is skipped: the cursor moves to the end first.

        The cursor is left where the answer began, not past the OK, so an event the firmware
        printed while answering (``ota phase=detect`` racing ``OK``) is still found by the next
        ``expect``.
        """
        with self._changed:
            self._usable_port(f"sending {line!r}")
            start = len(self._log)
            if not keep_cursor:
                self._cursor = start
        self.send(line)

        def answer(text: str) -> re.Match[str] | None:
            return self.ok_pattern.search(text) or self.err_pattern.search(text)

        index, match = self._wait_for(
            start, answer, timeout,
            waiting_for=f"an answer to {line!r} ('{self.ok_pattern.pattern}' "
                        f"or '{self.err_pattern.pattern}')")
        if match.re is self.err_pattern:
            reason = match.groupdict().get("reason") or match.string
            raise CommandRefused(line, reason)
        with self._changed:
            return [logged.text for logged in self._log[start:index] if not logged.sent]

    def _wait_for(self, start: int, test: Callable[[str], _T | None], timeout: float, *,
                  waiting_for: str) -> tuple[int, _T]:
        """The first log line from ``start`` on that ``test`` accepts, as (index, result)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._usable_port(f"waiting for {waiting_for}", check_vanished=False)
            scanned = start
            while True:
                # Lines that arrived before a cut still count: search first, then give up.
                for index in range(scanned, len(self._log)):
                    if self._log[index].sent:   # our own commands are not the device's output
                        continue
                    result = test(self._log[index].text)
                    if result is not None:
                        return index, result
                scanned = max(scanned, len(self._log))
                self._usable_port(f"waiting for {waiting_for}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ExpectTimeout(f"{self.name}: timed out after {timeout:g} s waiting "
                                        f"for {waiting_for}{self._tail()}")
                self._changed.wait(remaining)

    def _usable_port(self, doing: str, *, check_vanished: bool = True) -> Any:
        """The open port, or RigFault saying why there is none (call with the lock held)."""
        if self._serial is None:
            raise RigFault(PART, f"{self.name}: not open ({doing})")
        if check_vanished and self._vanished is not None:
            raise RigFault(PART, f"{self.name}: port vanished ({self._vanished}) while "
                                 f"{doing}{self._tail()}")
        return self._serial

    def _tail(self) -> str:
        """The last lines of the log for an error message (call with the lock held)."""
        if not self._log:
            return "; nothing was received"
        tail = self._log[-_TAIL_LINES:]
        return (f"; the last {len(tail)} of {len(self._log)} lines:\n"
                + format_log(tail).rstrip("\n"))

    # -- the log -----------------------------------------------------------------------------
    def lines(self) -> list[LogLine]:
        """The whole log so far (a copy)."""
        with self._changed:
            return list(self._log)

    def log_text(self) -> str:
        """The whole log, one timestamped line per line: what a report attaches."""
        return format_log(self.lines())

    def save_log(self, path: str | PathLike[str]) -> Path:
        target = Path(path)
        target.write_text(self.log_text(), encoding="utf-8")
        return target
