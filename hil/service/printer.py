"""Lines printed from a thread of their own, so that whoever prints never waits on the reader.

``hil serve`` prints a line per exchange from the server's event loop. Printed there, a stdout
that nobody drains (a subprocess started with a pipe its parent never reads, a paused ``| less``)
fills its pipe after 64 KiB and the next ``print`` blocks the loop: the service stops answering
every device. ``BackgroundPrinter`` takes the line instead (``print_line`` never blocks) and a
writer thread writes it. When the writer falls ``capacity`` lines behind, new lines are dropped
and counted; once the writer has caught up, and at ``close``, a line says how many were dropped.

    printer = BackgroundPrinter(sys.stdout).start()
    timeline.subscribe(lambda exchange: printer.print_line(exchange.summary()))
    ...
    printer.close("stopped", timeout=5.0)
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections import deque
from typing import TextIO

# About 150 KiB of exchange lines: a burst of a whole 4 MiB download in 4 KiB chunks is ~1000.
CAPACITY = 1024


class BackgroundPrinter:
    """A bounded queue of lines and the thread that writes them to ``stream``. Start it, print,
    close it."""

    def __init__(self, stream: TextIO, capacity: int = CAPACITY, *, label: str = "hil serve",
                 fallback: TextIO | None = None) -> None:
        self._stream = stream
        self._fallback = fallback
        self._in_flight = 0       # lines taken by the writer and not yet written whole
        self.capacity = capacity
        self._label = label
        self._pending: deque[str] = deque()
        self._changed = threading.Condition()
        self._closing = False
        self._unreported = 0      # dropped since the last line that said so
        self.dropped = 0          # dropped in all
        # Daemon: a writer blocked on a pipe nobody reads must not keep the process alive.
        self._thread = threading.Thread(target=self._run, name="printer", daemon=True)
        self._fd = _fileno(stream)

    def start(self) -> BackgroundPrinter:
        self._stream.flush()      # what was printed before comes first
        self._thread.start()
        return self

    def print_line(self, line: str) -> None:
        """Queue ``line``; drop it (and count it) if the writer is ``capacity`` lines behind."""
        with self._changed:
            if self._closing:
                return
            if len(self._pending) >= self.capacity:
                self._unreported += 1
                self.dropped += 1
                return
            self._pending.append(line)
            self._changed.notify()

    def close(self, *last_lines: str, timeout: float) -> bool:
        """Write what is queued, the count of dropped lines and ``last_lines``, waiting up to
        ``timeout`` seconds for a reader; True if all was written. Otherwise the writer is left
        blocked on its write (a daemon thread: it does not hold the process) and one line on
        ``fallback`` (stderr) says how many lines were never written, if that can be said within
        a second."""
        with self._changed:
            if not self._closing:
                self._closing = True
                report = self._drop_report()
                self._pending.extend([report] if report else [])
                self._pending.extend(last_lines)
                self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        if self._fallback is not None:
            with self._changed:
                unwritten = len(self._pending) + self._in_flight
            _write_or_give_up(self._fallback, f"{self._label}: stdout was not read: {unwritten} "
                              f"log lines left unwritten at exit ({self.dropped} dropped "
                              "before)\n", timeout=1.0)
        return False

    def _drop_report(self) -> str | None:
        if not self._unreported:
            return None
        count, self._unreported = self._unreported, 0
        return (f"{self._label}: {count} log lines dropped: stdout was not read as fast as they "
                f"came ({self.dropped} since start)")

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
                # Caught up: what was dropped meanwhile is said right after what was kept.
                report = None if self._closing else self._drop_report()
                if report:
                    batch.append(report)
                self._in_flight = len(batch)
            try:
                for text in _whole_lines(batch):
                    self._write(text)
                    with self._changed:
                        self._in_flight -= text.count("\n")
            except (OSError, ValueError):
                # The reader went away (a broken pipe) or the stream was closed: nothing more
                # can be said there; the count stays in ``dropped``.
                with self._changed:
                    self._closing = True
                    self.dropped += len(self._pending)
                    self._pending.clear()
                return

    def _write(self, text: str) -> None:
        if self._fd is None:
            self._stream.write(text)
            self._stream.flush()
            return
        # os.write on the descriptor, not the stream: a write blocked on a full pipe then holds
        # no lock of the stream that the interpreter's exit would wait for.
        data = text.encode("utf-8", "replace")
        while data:
            data = data[os.write(self._fd, data):]


# POSIX writes up to PIPE_BUF bytes to a pipe whole or not at all: in writes of whole lines up to
# this size, a reader that goes away (or a process that exits while blocked) cuts no line.
_ATOMIC_BYTES = 4096


def _whole_lines(lines: list[str]) -> list[str]:
    """``lines`` joined into texts of whole lines, each at most ``_ATOMIC_BYTES`` long where the
    lines allow."""
    texts: list[str] = []
    current, size = "", 0
    for line in lines:
        length = len(line.encode("utf-8", "replace")) + 1
        if current and size + length > _ATOMIC_BYTES:
            texts.append(current)
            current, size = "", 0
        current += f"{line}\n"
        size += length
    return [*texts, current] if current else texts


def _write_or_give_up(stream: TextIO, text: str, timeout: float) -> None:
    """Write ``text`` to ``stream`` unless it blocks longer than ``timeout`` (a daemon thread is
    left behind then): a last word that must not keep the process from exiting."""
    fd = _fileno(stream)

    def write() -> None:
        with contextlib.suppress(OSError, ValueError):
            if fd is None:
                stream.write(text)
                stream.flush()
            else:   # the descriptor, as in BackgroundPrinter._write: no stream lock held
                os.write(fd, text.encode("utf-8", "replace"))
    writer = threading.Thread(target=write, name="printer-fallback", daemon=True)
    writer.start()
    writer.join(timeout)


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None    # a stream without a descriptor (pytest's capture): written as a stream
