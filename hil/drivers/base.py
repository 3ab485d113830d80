"""What the plugin, the suite and the CLI may ask of each rig part: small protocols.

Every driver has an explicit lifecycle: constructing one does no I/O; ``open()`` takes the port,
probe or socket (and raises ``RigFault`` naming the part when it cannot); ``close()`` gives it
back and may be called twice. Drivers are context managers. A simulated part implements the same
protocol as the real one, so nothing above this layer knows which it drives.
"""

from __future__ import annotations

import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, Self, TypeGuard, runtime_checkable


@runtime_checkable
class Driver(Protocol):
    def open(self) -> None: ...

    def close(self) -> None: ...


class DriverBase(ABC):
    """Context-manager plumbing for drivers: ``with Driver(...) as d:`` opens and closes."""

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class LogLine:
    """One console line: when (Unix seconds), what (without its line ending), and whether the
    host sent it (a command) rather than the device (``expect`` only ever matches the latter)."""

    at: float
    text: str
    sent: bool = False


def format_log(lines: Iterable[LogLine]) -> str:
    """One line per log line, stamped with local time to the millisecond and its UTC offset;
    what the host sent is marked ``>``::

        2025-03-01T14:02:07.101+01:00 > sys version
        2025-03-01T14:02:07.123+01:00   version=1.2.0

    Every console's ``log_text``."""
    return "".join(
        f"{datetime.fromtimestamp(line.at).astimezone().isoformat(timespec='milliseconds')}"
        f" {'>' if line.sent else ' '} {line.text}\n"
        for line in lines)


@runtime_checkable
class ConsoleProtocol(Driver, Protocol):
    """A line console: the firmware's test shell (../shared/DESIGN.md, the console contract).

    The log keeps every line of the session, the host's own (``sent``) included. A cursor
    marks how far ``expect`` has read: each device line is matched at most once, and lines
    the host sent are never matched. A port that vanishes is a RigFault, never a timeout.
    """

    name: str   # for messages: the port path, URL or serial number it was opened by

    def send(self, line: str) -> None:
        """Write ``line`` and the line ending (and log it as sent)."""
        ...

    def mark(self) -> int:
        """A position in the log, for ``expect(..., since=mark)``."""
        ...

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 10.0, *,
               since: int | None = None) -> re.Match[str]:
        """The first device line after the cursor (or after ``since``) that matches; the cursor
        moves past it. On timeout raises ExpectTimeout naming the console and showing the
        log's tail."""
        ...

    def command(self, line: str, timeout: float = 10.0, *,
                keep_cursor: bool = False) -> list[str]:
        """Send a contract command and wait for its ``OK`` (the device lines printed before it
        are returned) or ``ERR <reason>`` (raises CommandRefused). Earlier output is skipped;
        the cursor is left where the answer began, so an event printed while answering is
        still found by the next ``expect``. ``keep_cursor`` leaves the cursor alone: for a
        command sent from another thread while a test waits on events (a fault hook)."""
        ...

    def lines(self) -> list[LogLine]:
        """The whole log so far (a copy)."""
        ...

    def log_text(self) -> str:
        """The whole log, one timestamped line per line: what a report attaches."""
        ...


Progress = Callable[[int, int], None]   # (done, total) as the tool reports it


@runtime_checkable
class FlasherProtocol(Driver, Protocol):
    """Puts an image on the board and restarts it (SWD probe or the ESP32 serial bootloader)."""

    def program(self, image: Path, *, progress: Progress | None = None,
                full: bool = False) -> None:
        """Put ``image`` in flash, writing only what differs from what the flash holds;
        ``full``: write all of it whatever the flash holds."""
        ...

    def reset(self) -> None: ...


@runtime_checkable
class PowerProtocol(Driver, Protocol):
    """What the board runs on: a bench supply, or the firmware's ``test power`` hook."""

    can_cut: bool   # True when output() really removes power (a supply, not a hook)

    def identify(self) -> str: ...

    def set_level(self, percent: int) -> None:
        """Make the board see this battery level (a supply sets the matching voltage)."""
        ...

    def output(self, on: bool) -> None:
        """Power on or off (RigFault where the part cannot, see ``can_cut``)."""
        ...


@runtime_checkable
class CurrentMeter(Protocol):
    """A power part that can also measure what the board draws (a bench supply's MEAS:CURR?).
    Only such parts have it: ``measures_current`` tells; a hook, a hub port or a relay do not."""

    can_measure: bool   # True when measure_amps() reads a real measurement

    def measure_amps(self) -> float:
        """The current the board draws now, in amps (RigFault when the part cannot answer)."""
        ...


def measures_current(part: object) -> TypeGuard[CurrentMeter]:
    """Whether ``part`` (a power part, or None) can measure the board's current."""
    return bool(getattr(part, "can_measure", False)) and isinstance(part, CurrentMeter)


@runtime_checkable
class RfProtocol(Driver, Protocol):
    """The board's radio link: an attenuator in the RF path, or the firmware's ``test signal``."""

    def identify(self) -> str: ...

    def set_signal(self, level: int) -> None:
        """Make the board see this signal level (the value it reports at detect)."""
        ...


@contextmanager
def rfc2217_quiet() -> Iterator[None]:
    """Around opening a pyserial port that may be ``rfc2217://``: pyserial 3.5's rfc2217 client
    starts its reader with Thread.setDaemon() and setName(), deprecated since Python 3.10
    (warnings hil's tests make errors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(setDaemon|setName)\(\) is deprecated",
                                DeprecationWarning)
        yield
