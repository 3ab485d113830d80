"""Bench power supplies spoken to in SCPI over any pyserial URL (the link: scpi.py).

The supply stands in for the board's battery: ``set_level(percent)`` sets the voltage a Li-ion cell
shows at that charge, so the firmware's own battery check (report codes 105 and 202) sees a low
battery for real, and ``output(False)`` cuts power in the middle of a flash.

Dialects differ in command spelling only, so the commands are class attributes (format strings)
and a dialect is a subclass that overrides them: ``ScpiPower`` speaks the subset common to the
Rigol DP800, Keysight E36xx and Siglent SPD series for a single-output supply (or the selected
output); ``ChannelScpiPower`` addresses one output of a multi-output Rigol DP800 in every command.

Power that is switched rather than set (a USB hub port, a relay) is ``hil.drivers.switched``;
``power_cycle`` here cycles any PowerProtocol part, in one step where the part has its own.
"""

from __future__ import annotations

import re
import time
from typing import ClassVar

from hil.drivers.base import PowerProtocol
from hil.drivers.scpi import ScpiInstrument

_ERROR_CODE = re.compile(r"\s*([+-]?\d+)")
# A misbehaving instrument could keep its error queue non-empty forever; stop reading after this.
_MAX_QUEUED_ERRORS = 16


def check_percent(percent: int) -> None:
    """A battery level is 0..100 %; anything else is a mistake in the test, not a fault."""
    if not 0 <= percent <= 100:
        raise ValueError(f"battery level {percent} % is outside 0..100 %")


def power_cycle(supply: PowerProtocol, off_s: float) -> None:
    """Off, dark, on. A part with a ``cycle()`` of its own (a USB hub port, a relay command,
    ``hil.drivers.switched``) does it in one step and keeps the board dark as long as its rig
    file says (``off_s``: a dev board's capacitors may outlast a short blink); any other is
    switched off, kept dark ``off_s`` seconds, and on."""
    cycle = getattr(supply, "cycle", None)
    if callable(cycle):
        cycle()
        return
    supply.output(False)
    time.sleep(off_s)
    supply.output(True)


class ScpiPower(ScpiInstrument):
    """A bench supply in the board's battery place (PowerProtocol), in the common SCPI dialect.

    ``set_level`` maps 0..100 % linearly onto ``empty_volts``..``full_volts`` (a Li-ion cell by
    default). ``open()`` asks ``*IDN?``, clears the error queue and sets ``current_limit``, so the
    board is protected from the first volt. ``close()`` leaves the output as it is: the rig
    decides when the board goes dark.

    Every setting is followed by ``SYST:ERR?``: a supply that rejects a command only says so in its
    error queue, and a test that ran at a voltage it never got would pass or fail for nothing.
    """

    part: ClassVar[str] = "power"
    can_cut: bool = True
    can_measure: bool = True      # CurrentMeter: MEAS:CURR? (a supply sampled during an update)

    # The dialect. Format fields: {channel}, and {volts}, {amps}, {state} where they apply.
    CLEAR_ERRORS: ClassVar[str] = "*CLS"
    SET_VOLTS: ClassVar[str] = "VOLT {volts:.3f}"
    SET_AMPS: ClassVar[str] = "CURR {amps:.3f}"
    OUTPUT: ClassVar[str] = "OUTP {state}"
    MEASURE_VOLTS: ClassVar[str] = "MEAS:VOLT?"
    MEASURE_AMPS: ClassVar[str] = "MEAS:CURR?"
    NEXT_ERROR: ClassVar[str] = "SYST:ERR?"
    ON: ClassVar[str] = "ON"
    OFF: ClassVar[str] = "OFF"

    def __init__(
        self,
        url: str,
        *,
        channel: int = 1,
        current_limit: float = 1.0,
        empty_volts: float = 3.3,
        full_volts: float = 4.2,
        timeout: float = 2.0,
        baudrate: int = 9600,
    ) -> None:
        if channel < 1:
            raise ValueError(f"channel {channel}: outputs are numbered from 1")
        per_channel = (self.SET_VOLTS, self.SET_AMPS, self.OUTPUT, self.MEASURE_VOLTS,
                       self.MEASURE_AMPS)
        if channel != 1 and not any("{channel}" in command for command in per_channel):
            raise ValueError(
                f"channel {channel}: {type(self).__name__} drives one output; "
                "use a dialect that addresses channels (ChannelScpiPower)"
            )
        if current_limit <= 0:
            raise ValueError(f"current limit must be positive, not {current_limit} A")
        if not 0 <= empty_volts < full_volts:
            raise ValueError(
                f"battery voltages must be 0 <= empty < full, not {empty_volts}..{full_volts} V"
            )
        super().__init__(url, timeout=timeout, baudrate=baudrate)
        self.channel = channel
        self.current_limit = current_limit
        self.empty_volts = empty_volts
        self.full_volts = full_volts

    def _prepare(self) -> None:
        # Errors left by the front panel or an earlier session would be blamed on our first
        # command; *CLS empties the queue (IEEE 488.2: every SCPI instrument has it).
        self.link.write(self.CLEAR_ERRORS)
        self.set_current_limit(self.current_limit)

    # ------------------------------------------------------------------------------ PowerProtocol
    def set_level(self, percent: int) -> None:
        """Set the voltage a cell shows at ``percent`` charge (linear from empty to full)."""
        check_percent(percent)
        span = self.full_volts - self.empty_volts
        self.set_voltage(self.empty_volts + span * percent / 100)

    def output(self, on: bool) -> None:
        self._set(self.OUTPUT, state=self.ON if on else self.OFF)

    # ------------------------------------------------------------------------------ bench API
    def set_voltage(self, volts: float) -> None:
        if not volts >= 0:   # also refuses NaN
            raise ValueError(f"voltage must be 0 V or more, not {volts} V")
        self._set(self.SET_VOLTS, volts=volts)

    def set_current_limit(self, amps: float) -> None:
        if not amps > 0:
            raise ValueError(f"current limit must be positive, not {amps} A")
        self._set(self.SET_AMPS, amps=amps)
        self.current_limit = amps

    def measure_voltage(self) -> float:
        return self.link.query_float(self._format(self.MEASURE_VOLTS))

    def measure_current(self) -> float:
        return self.link.query_float(self._format(self.MEASURE_AMPS))

    def measure_amps(self) -> float:
        """CurrentMeter: what the board draws now (an energy sampler calls it from its own
        thread while the test sets levels: the link serializes them)."""
        return self.measure_current()

    # ------------------------------------------------------------------------------ internals
    def _format(self, template: str, **values: object) -> str:
        return template.format(channel=self.channel, **values)

    def _set(self, template: str, **values: object) -> None:
        """Send a setting, then read the error queue: a rejected setting is a RigFault."""
        command = self._format(template, **values)
        with self.link.lock:    # the setting and its error queue, with no query between
            self.link.write(command)
            errors = self._queued_errors()
        if errors:
            raise self.link.fault(f"{command} failed: {'; '.join(errors)}")

    def _queued_errors(self) -> list[str]:
        """Read ``SYST:ERR?`` until it answers code 0 (``0,"No error"``); the errors before."""
        errors: list[str] = []
        for _ in range(_MAX_QUEUED_ERRORS):
            answer = self.link.query(self.NEXT_ERROR)
            code = _ERROR_CODE.match(answer)
            if code is None:
                raise self.link.fault(f"{self.NEXT_ERROR} answered {answer!r}, not an error entry")
            if int(code.group(1)) == 0:
                return errors
            errors.append(answer)
        return errors


class ChannelScpiPower(ScpiPower):
    """One output of a multi-output supply, addressed in every command (Rigol DP800 spelling).

    Addressing each command, rather than selecting the output once with ``INST:NSEL``, keeps
    working when someone presses another channel's key on the front panel mid-run.
    """

    SET_VOLTS = ":SOUR{channel}:VOLT {volts:.3f}"
    SET_AMPS = ":SOUR{channel}:CURR {amps:.3f}"
    OUTPUT = ":OUTP CH{channel},{state}"
    MEASURE_VOLTS = ":MEAS:VOLT? CH{channel}"
    MEASURE_AMPS = ":MEAS:CURR? CH{channel}"
