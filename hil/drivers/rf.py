"""Programmable step attenuators in the board's RF path, over any pyserial URL.

An attenuator between the board's antenna port and the antenna (or the base station simulator)
makes a weak signal for real: the firmware reads its own signal level, reports it at detect, and
refuses to download below its threshold (report code 106). ``set_signal(level)`` turns a signal
level into decibels with a per-rig calibration: at 0 dB the board sees ``signal_at_0db``, and every
``db_per_level`` dB more takes one level off. Measure both on the rig once (read the level the board
reports at a few settings) and write them in the rig file.

Dialects differ in spelling and in whether a setting is acknowledged, so both are class attributes:
``Attenuator`` speaks a SCPI style (``ATT <db>``, unacknowledged), ``MiniCircuitsAttenuator`` the
Mini-Circuits RCDAT ASCII commands (``:SETATT=<db>`` answered ``1``). Every setting is read back:
an attenuator that silently stayed where it was would make a "bad signal" test pass on a good
signal.
"""

from __future__ import annotations

import logging
import re
from typing import ClassVar

from hil.drivers.scpi import ScpiInstrument

log = logging.getLogger(__name__)


class Attenuator(ScpiInstrument):
    """A step attenuator (RfProtocol) in a SCPI-style dialect: ``*IDN?``, ``ATT <db>``, ``ATT?``."""

    part: ClassVar[str] = "rf"

    SET: ClassVar[str] = "ATT {db}"
    SET_ACK: ClassVar[str | None] = None      # the answer a setting gets; None: no answer
    GET: ClassVar[str] = "ATT?"

    def __init__(
        self,
        url: str,
        *,
        max_db: float,
        step_db: float,
        signal_at_0db: int = 31,
        db_per_level: float = 2.0,
        timeout: float = 2.0,
        baudrate: int = 9600,
    ) -> None:
        if not max_db > 0:
            raise ValueError(f"max_db must be positive, not {max_db} dB")
        if not 0 < step_db <= max_db:
            raise ValueError(f"step_db must be in (0, {max_db}] dB, not {step_db} dB")
        if not db_per_level > 0:
            raise ValueError(f"db_per_level must be positive, not {db_per_level} dB")
        super().__init__(url, timeout=timeout, baudrate=baudrate)
        self.max_db = max_db
        self.step_db = step_db
        self.signal_at_0db = signal_at_0db
        self.db_per_level = db_per_level

    # ------------------------------------------------------------------------------ RfProtocol
    def set_signal(self, level: int) -> None:
        """Attenuate so that the board sees signal ``level`` (per the rig's calibration).

        Levels the attenuator cannot reach are clamped to its range with a warning: the board then
        sees a stronger (or, above ``signal_at_0db``, weaker) signal than asked.
        """
        wanted = (self.signal_at_0db - level) * self.db_per_level
        db = min(max(wanted, 0.0), self.max_db)
        if db != wanted:
            log.warning(
                "%s: signal level %d needs %g dB, outside 0..%g dB; setting %g dB",
                self.url, level, wanted, self.max_db, db,
            )
        self.set_attenuation(db)

    # ------------------------------------------------------------------------------ bench API
    def set_attenuation(self, db: float) -> float:
        """Set ``db`` rounded to the nearest step, verify it by reading back; the value set."""
        if not 0 <= db <= self.max_db:
            raise ValueError(f"attenuation {db:g} dB is outside 0..{self.max_db:g} dB")
        steps = round(db / self.step_db)
        if steps * self.step_db > self.max_db:   # max_db need not be a whole number of steps
            steps -= 1
        value = round(steps * self.step_db, 6)   # 0.1 * 3 is 0.30000000000000004
        command = self.SET.format(db=f"{value:g}")
        if self.SET_ACK is None:
            self.link.write(command)
        else:
            answer = self.link.query(command)
            if answer != self.SET_ACK:
                raise self.link.fault(f"{command} answered {answer!r}, not {self.SET_ACK!r}")
        actual = self.attenuation()
        if abs(actual - value) >= self.step_db / 2:
            raise self.link.fault(f"{command} did not take: the attenuator reads {actual:g} dB")
        return value

    def attenuation(self) -> float:
        """The attenuation the instrument reports now, in dB."""
        return self.link.query_float(self.GET)


class MiniCircuitsAttenuator(Attenuator):
    """Mini-Circuits RCDAT/RUDAT programmable attenuators in their ASCII command dialect.

    ``:MN?`` answers ``MN=<model>``; ``:SETATT=<db>`` answers ``1`` when set (``0`` refused,
    ``2`` above the model's range and set to its maximum).
    """

    IDENTIFY = ":MN?"
    IDENTITY_PREFIX = "MN="
    IDENTITY_FORMAT = re.compile(r"\S+")   # a model name: RCDAT-6000-60
    SET = ":SETATT={db}"
    SET_ACK = "1"
    GET = ":ATT?"
