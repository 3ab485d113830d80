"""Emulated bench instruments: a programmable supply and a step attenuator that answer the same
command lines as the lab instruments the drivers in ``hil.drivers.power`` and ``hil.drivers.rf``
talk to.

- ``EmulatedSupply``: a multi-output bench supply speaking the common SCPI subset (Keysight style,
  ``VOLT 3.7``, ``OUTP ON``, ``MEAS:VOLT?``, output 1 implied) and the Rigol per-channel forms
  (``:SOUR2:VOLT 5``, ``:OUTP CH2,ON``, ``:MEAS:VOLT? CH2``).
- ``EmulatedAttenuator``: a step attenuator in one of two dialects, SCPI style (``ATT 12.25``,
  ``ATT?``) or Mini-Circuits RCDAT (``:SETATT=12.25``, answered ``1``, ``0`` or ``2``; ``:ATT?``).

Both are sans-IO: ``respond()`` takes one command line without its terminator and gives back the
bytes to send (the answer and the terminator), or None when the command has no answer. No sockets,
no threads: a transport (the test suite's pty and TCP servers, a simulated rig's ports) reads bytes,
cuts them into lines with ``LineSplitter``, hands each line to ``respond()`` and writes back what it
returns. A lock serializes ``respond()``, so one instrument may sit behind several connections.

The state is plain attributes to read (and to set, for a test's starting point): a supply's
``channels`` (``SupplyChannel``: volts, current limit, output on or off, the load it sees: a
resistor, or ``load_amps``, a model of what the board draws now, which MEAS:CURR? answers), with
``volts``, ``current_limit`` and ``output`` as short cuts to output 1; an attenuator's
``attenuation`` in dB. ``log`` holds every command line received, in order.

``on_change``: a callable given the instrument, called after a command line has changed its state
(a supply's volts, current limit or output on any channel; an attenuator's attenuation), never for
a query, a rejected command or a setting that leaves the value as it was. It runs on the thread
that called ``respond()`` once the lock is released, so it may read the instrument and even send it
more lines. This is how a simulated rig couples the instruments to its simulated board: the
supply's output 1 voltage and on/off state power the board, the attenuation weakens its radio.

Fault modes, settable at any time, for the drivers' error paths: ``silent`` (lines are logged,
nothing is done or answered), ``garbage`` (every answer replaced by these bytes), ``delay``
(seconds a transport waits before sending an answer) and an error queue (``queue_error``) that
``SYST:ERR?`` reads, as does every mistake a real instrument would queue.
"""

from __future__ import annotations

import collections
import math
import re
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "NO_ERROR",
    "EmulatedAttenuator",
    "EmulatedInstrument",
    "EmulatedSupply",
    "LineSplitter",
    "SupplyChannel",
]

NO_ERROR = '0,"No error"'


class LineSplitter:
    """Cuts a byte stream into lines at ``terminator``; a CR before the terminator is dropped.

    ``feed()`` returns the lines completed by the bytes given; a partial line waits in ``pending``
    for the next feed.
    """

    def __init__(self, terminator: bytes = b"\n") -> None:
        if not terminator:
            raise ValueError("a line terminator cannot be empty")
        self.terminator = terminator
        self.pending = b""

    def feed(self, data: bytes) -> list[str]:
        self.pending += data
        *lines, self.pending = self.pending.split(self.terminator)
        return [line.rstrip(b"\r").decode("ascii", errors="replace") for line in lines]


class EmulatedInstrument:
    """What the emulated instruments share: the command log, the fault modes, ``on_change``."""

    terminator = b"\n"

    def __init__(self) -> None:
        self.log: list[str] = []        # every command line received, in order
        self.silent = False
        self.garbage: bytes | None = None
        self.delay = 0.0
        self.errors: collections.deque[str] = collections.deque()   # read by SYST:ERR?
        self.lock = threading.Lock()
        self.on_change: Callable[[EmulatedInstrument], None] | None = None

    def handle(self, line: str) -> str | None:
        """The answer to one command line (without terminator), None for no answer.

        Called with ``lock`` held."""
        raise NotImplementedError

    def _state(self) -> Hashable:
        """What ``on_change`` watches, compared before and after each command line."""
        return None

    def respond(self, line: str) -> bytes | None:
        """What goes back on the wire for ``line``: the answer with its terminator, or None.

        Calls ``on_change`` afterwards, without the lock, if the line changed the state."""
        with self.lock:
            before = self._state()
            reply = self._reply(line)
            changed = self._state() != before
        if changed and self.on_change is not None:
            self.on_change(self)
        return reply

    def _reply(self, line: str) -> bytes | None:
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
    # What the board draws now, in amps, when something models it (a simulated rig: the
    # firmware's activity); else the load is the resistor above.
    load_amps: Callable[[], float] | None = field(default=None, compare=False, repr=False)

    def measured_volts(self) -> float:
        return self.volts if self.output else 0.0

    def measured_amps(self) -> float:
        if not self.output:
            return 0.0
        drawn = self.load_amps() if self.load_amps is not None else self.volts / self.load_ohms
        return min(drawn, self.current_limit)


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

    def _state(self) -> Hashable:
        return tuple((number, channel.volts, channel.current_limit, channel.output)
                     for number, channel in self.channels.items())

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

    def _state(self) -> Hashable:
        return self.attenuation

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
