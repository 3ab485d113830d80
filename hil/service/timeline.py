"""The timeline: every exchange the OTA service answered, in order, per device.

It is the source of truth of a test: assertions read it, the report draws it. Each exchange is
appended to a JSON-lines file the moment it is answered (one ``write`` per line, flushed), so a
crash of the run loses nothing that a device already saw.

Tests wait on it from their own thread while the server thread records into it::

    timeline.wait_for(lambda e: e.phase == "report" and e.result == 201, dev_id="527776559")

Besides the exchanges it holds the **fault hits** a scenario's faults record where no exchange
shows them (``FaultHit``: a power cut at a console event, the battery lowered before detect, a
task shaped before it was offered). A gateway fault's hit is the exchange it hit (its ``fault``
field), not a second record. In the JSON-lines file a hit is a line with ``"kind":
"fault-hit"`` and, like an exchange, a ``seq``, an ``at``, a ``dev_id`` and a ``phase``; an
exchange's line has no ``kind``.

``seq`` numbers every record of a file once: a timeline opened on a file that already holds one
(a restarted ``hil serve --timeline``, a second pytest run on the same timeline directory) numbers
on from its last record, and ``clear`` (a test's reset) forgets the records it holds in memory,
not the numbers. A last line torn by a crash (no newline: a full disk, a power loss) is not a
record: it is cut off on reopening, so that every line of the file stays one JSON record.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import orjson

from hil.errors import ConfigError, ServiceFault
from hil.onenet.codes import Errno
from hil.onenet.messages import Endpoint


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request and its answer, as the service saw them."""

    seq: int
    at: float                                  # service clock, Unix seconds
    dev_id: str | None                         # None when the request named no known device
    phase: Endpoint
    method: str
    target: str                                # path and query as sent
    request_headers: dict[str, str]            # Authorization's signature redacted
    request_body: str
    status: int
    errno: int | None = None                   # JSON answers
    answer: dict[str, Any] | None = None       # JSON answers, whole
    result: int | None = None                  # a report's result, or a progress step
    range: str | None = None                   # download: the Range header as sent
    content_range: str | None = None           # download: what was answered
    length: int | None = None                  # download: body bytes sent
    error_byte: int | None = None              # download: the one-byte error answer
    task_id: int | None = None
    task_state: str | None = None              # the task's state after this exchange
    reason: str | None = None                  # why a request was refused, for humans
    duration_ms: float = 0.0
    fault: str | None = None                   # what the gateway did to it ("stall 2s"); mock: None
    # The gateway's number for the device's TCP connection it came on (mock: None): a board
    # that reboots cannot keep one, so it tells requests before a reboot from those after.
    connection: int | None = None
    # The gateway's: how the exchange ended for the device: "answered" (its answer went out),
    # "device gone" (it left first), "cut by fault" (a fault withheld or cut it). Mock: None.
    ended: str | None = None

    @property
    def started(self) -> float:
        """When the service began serving the request (``at`` is when its exchange was over):
        exactly the moment ``Began`` read, so requests served one after the other on one
        connection are ordered by it."""
        return self.at - self.duration_ms / 1000

    @property
    def accepted(self) -> bool:
        """The service said yes: errno 0, or a download that carried package bytes."""
        if self.phase is Endpoint.DOWNLOAD:
            return self.error_byte is None and self.status in (200, 206)
        return self.errno == Errno.OK

    def to_json(self) -> bytes:
        """One JSON line (without its newline), fields that do not apply left out. Shallow and
        orjson: dataclasses.asdict with json.dumps was the mock's biggest cost per request."""
        return orjson.dumps({name: value for name in _FIELD_NAMES
                             if (value := getattr(self, name)) is not None})

    def summary(self) -> str:
        """One line for logs: when, who, what, and what came of it."""
        millis = int(self.at % 1 * 1000)
        clock = time.strftime("%H:%M:%S", time.localtime(self.at)) + f".{millis:03d}"
        outcome = (f"{self.status} {self.content_range or ''}".strip() if self.error_byte is None
                   else f"{self.status} error-byte={self.error_byte}")
        if self.errno is not None:
            outcome = f"errno={self.errno}"
        if self.result is not None:
            outcome += f" result={self.result}"
        state = f" task={self.task_state}" if self.task_state else ""
        fault = f" [{self.fault}]" if self.fault else ""
        if self.ended not in (None, "answered"):
            fault += f" ({self.ended})"
        return (f"{clock} {self.dev_id or '-'} {self.phase.value:<8} {self.method} "
                f"{self.target} -> {outcome}{state}{fault}")


_FIELD_NAMES = tuple(f.name for f in fields(Exchange))


@dataclass(frozen=True, slots=True)
class Began:
    """When a service began serving a request, read once on both clocks: the wall clock
    (``Exchange.at`` is in it) and the monotonic one (the duration). ``span()`` gives the
    record's ``at`` and ``duration_ms`` from one reading of the monotonic clock, so that
    ``at - duration`` is the moment read here whatever the thread did in between. Reading the
    wall clock for ``at`` and the monotonic one for the duration at two moments let a thread
    switch between them (milliseconds on a loaded host) stretch the duration alone: a request
    then seemed to begin before the one served ahead of it on its connection."""

    wall: float
    monotonic: float

    @classmethod
    def now(cls, clock: Callable[[], float] = time.time) -> Began:
        return cls(clock(), time.perf_counter())

    def span(self) -> tuple[float, float]:
        """(``at``, ``duration_ms``) for a record made now."""
        elapsed = time.perf_counter() - self.monotonic
        return self.wall + elapsed, round(elapsed * 1000, 3)


@dataclass(frozen=True, slots=True)
class FaultHit:
    """One hit of an injected fault that no exchange records: which fault, in which OTA phase,
    when, and where exactly (the exchange it came with, the byte offset, the console event)."""

    seq: int
    at: float                                  # host clock, Unix seconds
    dev_id: str | None
    fault: str                                 # the fault's label: "power-cut during=flash"
    phase: str                                 # the OTA phase it hit: "flash", "detect"...
    exchange: int | None = None                # the seq of the exchange it came with
    offset: int | None = None                  # the byte offset it hit (a download)
    event: str | None = None                   # the console event it hit at
    detail: str | None = None                  # for humans: what was done ("supply off 0.3 s")
    kind: str = "fault-hit"

    def to_json(self) -> bytes:
        return orjson.dumps({name: value for name in _HIT_FIELD_NAMES
                             if (value := getattr(self, name)) is not None})

    def summary(self) -> str:
        millis = int(self.at % 1 * 1000)
        clock = time.strftime("%H:%M:%S", time.localtime(self.at)) + f".{millis:03d}"
        where = " ".join(part for part in (
            f"exchange #{self.exchange}" if self.exchange is not None else "",
            f"offset {self.offset}" if self.offset is not None else "",
            f"at {self.event!r}" if self.event else "", self.detail or "") if part)
        return f"{clock} {self.dev_id or '-'} {self.phase:<8} fault hit [{self.fault}] {where}"


_HIT_FIELD_NAMES = tuple(f.name for f in fields(FaultHit))
Predicate = Callable[[Exchange], bool]


@dataclass
class Timeline:
    """Thread-safe, append-only list of exchanges, optionally mirrored to a JSON-lines file.

    ``keep=False`` keeps nothing in memory (only the file and the listeners see exchanges): for a
    long-running ``hil serve``, whose memory would otherwise grow by about 1 KB per request.
    """

    path: Path | None = None
    keep: bool = True
    _exchanges: list[Exchange] = field(default_factory=list, init=False)
    _changed: threading.Condition = field(default_factory=threading.Condition, init=False)
    _sink: IO[bytes] | None = field(default=None, init=False, repr=False)
    _listeners: list[Callable[[Exchange], None]] = field(default_factory=list, init=False)
    _seq: int = field(default=0, init=False)
    _hits: list[FaultHit] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered: each line is one write() to the OS, so a crash loses no answered line.
            self._sink = self.path.open("ab", buffering=0)
            try:
                self._seq = _continue_file(self._sink, self.path)
            except BaseException:
                self._sink.close()
                raise

    def next_seq(self) -> int:
        with self._changed:
            self._seq += 1
            return self._seq

    def record(self, exchange: Exchange) -> None:
        with self._changed:
            if self.keep:
                self._exchanges.append(exchange)
            if self._sink is not None:
                self._sink.write(exchange.to_json() + b"\n")
            self._changed.notify_all()
        for listener in self._listeners:
            listener(exchange)

    def record_hit(self, dev_id: str | None, fault: str, phase: str, *,
                   at: float | None = None, **where: Any) -> FaultHit:
        """Record a hit of ``fault`` (a ``FaultHit`` with the next seq, stamped ``at``, by
        default now)."""
        with self._changed:
            self._seq += 1
            hit = FaultHit(seq=self._seq, at=time.time() if at is None else at, dev_id=dev_id,
                           fault=fault, phase=phase, **where)
            if self.keep:
                self._hits.append(hit)
            if self._sink is not None:
                self._sink.write(hit.to_json() + b"\n")
            self._changed.notify_all()
        return hit

    def hits(self, dev_id: str | None = None) -> list[FaultHit]:
        """The fault hits recorded (of ``dev_id``), in order."""
        with self._changed:
            return [hit for hit in self._hits if dev_id is None or hit.dev_id == dev_id]

    def subscribe(self, listener: Callable[[Exchange], None]) -> None:
        """Call ``listener`` with every exchange recorded from now on (on the server thread)."""
        self._listeners.append(listener)

    def exchanges(self, dev_id: str | None = None, phase: Endpoint | str | None = None
                  ) -> list[Exchange]:
        with self._changed:
            return [e for e in self._exchanges if (dev_id is None or e.dev_id == dev_id)
                    and (phase is None or e.phase == phase)]

    def __iter__(self) -> Iterator[Exchange]:
        return iter(self.exchanges())

    def __len__(self) -> int:
        with self._changed:
            return len(self._exchanges)

    def reported_codes(self, dev_id: str) -> list[int]:
        """Result codes the service accepted from ``dev_id``, by /report or /progress, in order."""
        return [e.result for e in self.exchanges(dev_id)
                if e.result is not None and e.accepted
                and (e.phase is Endpoint.REPORT or e.result > 100)]

    def wait_for(self, predicate: Predicate, *, dev_id: str | None = None,
                 timeout: float = 30.0) -> Exchange:
        """The first exchange (of ``dev_id``) matching ``predicate``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for exchange in self._exchanges[seen:]:
                    if (dev_id is None or exchange.dev_id == dev_id) and predicate(exchange):
                        return exchange
                seen = len(self._exchanges)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(e.summary() for e in self._exchanges[-5:]) or "(empty)"
                    raise ServiceFault(
                        f"no matching exchange{' of ' + dev_id if dev_id else ''} within "
                        f"{timeout:g} s; the timeline ends with:\n{tail}")
                self._changed.wait(remaining)

    def clear(self) -> None:
        """Forget the records held in memory; ``seq`` numbers on (the file keeps every record,
        and two of them must never share a number)."""
        with self._changed:
            self._exchanges.clear()
            self._hits.clear()

    def close(self) -> None:
        with self._changed:
            if self._sink is not None:
                self._sink.close()
                self._sink = None


_TAIL_BLOCK = 64 * 1024
_TORN = re.compile(rb'^\{("(s(e(q("(:[0-9]*)?)?)?)?)?)?$')   # a prefix of {"seq":N


def _continue_file(sink: IO[bytes], path: Path) -> int:
    """The last ``seq`` of the timeline file ``sink`` appends to (0 for an empty file), with a torn
    last line cut off. A FIFO or a terminal (``--timeline /dev/stdout``) is written on from 0. A
    file whose last line is not a record is refused: it is not a timeline to append to."""
    status = os.fstat(sink.fileno())
    if not stat.S_ISREG(status.st_mode):
        return 0
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino):
            raise ConfigError(str(path), "was replaced while it was opened")
        seq, torn = _last_seq(fd, status.st_size, path)
    finally:
        os.close(fd)
    if torn:
        # Cut what a crash left of a line being written: appending after it would make the torn
        # piece and the next record one invalid line.
        os.ftruncate(sink.fileno(), status.st_size - torn)
    return seq


def _last_seq(fd: int, end: int, path: Path) -> tuple[int, int]:
    """The ``seq`` of the last whole line of the file ``fd`` (of ``end`` bytes), and the length of
    the torn line after it."""
    # The file may be large (a long-running service's): read back from its end to the start of
    # its last whole line, a block at a time.
    tail = b""
    start = end
    while start > 0 and tail.count(b"\n") < 2:
        start = max(0, start - _TAIL_BLOCK)
        tail = os.pread(fd, end - start, start)
    complete, newline, torn = tail.rpartition(b"\n")
    if not newline:
        complete, torn = b"", tail
    if torn and not (torn.startswith(b'{"seq":') or _TORN.match(torn)):
        raise ConfigError(str(path), "its last line is not a timeline record: not a timeline "
                                     "to append to")
    last = complete.rsplit(b"\n", 1)[-1]
    seq = 0
    if last or (start == 0 and complete):
        try:
            record = orjson.loads(last)
            seq = record["seq"]
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise TypeError(seq)
        except (orjson.JSONDecodeError, TypeError, KeyError):
            raise ConfigError(str(path), "its last line is not a timeline record: not a "
                                         "timeline to append to") from None
    return seq, len(torn)
