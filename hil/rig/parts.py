"""A rig's parts as drivers: built from the rig file, opened when first asked for, closed together.

Drivers are imported where they are built: a test that needs no flasher never pays for pyocd's
import, and ``hil rigs`` lists rigs without loading any tool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hil.drivers.base import ConsoleProtocol, FlasherProtocol, PowerProtocol, RfProtocol
from hil.drivers.contract import Contract
from hil.errors import ConfigError, RigFault
from hil.rig.model import Rig


class RigParts:
    """The open drivers of one rig. A RigFault raised by any of them names this rig.

    A simulated rig (``sim:`` in its file) brings its bench up before the first part opens and
    takes it down after the last one closes (``hil.sim.bench``): the drivers then find a board,
    a console and instruments where the rig file says they are, as on a real bench."""

    def __init__(self, rig: Rig, *, console_log: Path | None = None) -> None:
        self.rig = rig
        self.console_log = console_log   # where the console's log is written as it comes
        self.contract = Contract.with_overrides(rig.console.commands, rig.console.events)
        self._open: dict[str, Any] = {}
        self.bench: Any = None   # the SimBench of a simulated rig, while it runs

    # Each accessor opens its part once; a fault on opening names the rig and the part.
    def console(self) -> ConsoleProtocol:
        console: ConsoleProtocol = self._get("console", self._build_console)
        return console

    def flasher(self) -> FlasherProtocol | None:
        if self.rig.flasher.kind == "none":
            return None
        flasher: FlasherProtocol = self._get("flasher", self._build_flasher)
        return flasher

    def power(self) -> PowerProtocol | None:
        if self.rig.power.kind == "none":
            return None
        power: PowerProtocol = self._get("power", self._build_power)
        return power

    def rf(self) -> RfProtocol | None:
        if self.rig.rf.kind == "none":
            return None
        rf: RfProtocol = self._get("rf", self._build_rf)
        return rf

    def opened(self, part: str) -> Any | None:
        """The driver of ``part`` if it is open, without opening it."""
        return self._open.get(part)

    def release(self, part: str) -> None:
        """Close one part (an ESP32's console must let go of the port for the flasher)."""
        driver = self._open.pop(part, None)
        if driver is not None:
            driver.close()

    def close(self) -> None:
        try:
            for part in reversed(list(self._open)):
                self.release(part)
        finally:
            bench, self.bench = self.bench, None
            if bench is not None:
                bench.stop()

    def start_sim(self) -> None:
        """Bring a simulated rig's bench up (once); nothing for a real rig."""
        if self.rig.sim is None or self.bench is not None:
            return
        from hil.sim.bench import SimBench

        self.bench = SimBench(self.rig).start()

    def __enter__(self) -> RigParts:
        self.start_sim()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ building
    def _get(self, part: str, build: Any) -> Any:
        if part not in self._open:
            self.start_sim()
            try:
                driver = build()
                driver.open()
            except RigFault as fault:
                raise fault.for_rig(self.rig.name) from None
            except (ConfigError, ValueError) as error:
                # A setting the rig file let through but the driver refuses: still the rig's.
                raise RigFault(part, str(error), self.rig.name) from None
            self._open[part] = driver
        return self._open[part]

    def _build_console(self) -> Any:
        from hil.drivers.console import SerialConsole

        spec = self.rig.console
        return SerialConsole(port=spec.port, url=spec.url, serial_number=spec.serial_number,
                             baudrate=spec.baudrate, ok_pattern=spec.ok, err_pattern=spec.err,
                             log_path=self.console_log)

    def _build_flasher(self) -> Any:
        spec, family = self.rig.flasher, self.rig.family
        if spec.kind == "swd":
            from hil.drivers.swd import SwdFlasher

            # Pack-based targets are named by their part number (gd32f103c8); builtin by family.
            target = spec.target or (self.rig.part_number if family.needs_pack
                                     else family.pyocd_target)
            assert target is not None
            # A raw .bin has no address: it is the application, so it goes to the app slot.
            return SwdFlasher(probe=spec.probe, target=target, pack=spec.pack,
                              frequency=spec.frequency, base_address=family.app_address)
        if spec.kind == "esp":
            from hil.drivers.esp import EspFlasher

            port = spec.port or self.rig.console.port or self.rig.console.url
            if port is None:
                raise RigFault("flasher", "the console is found by USB serial number: give "
                               "flasher.port for the ESP32 bootloader", self.rig.name)
            return EspFlasher(port=port, baudrate=spec.baudrate, app_offset=family.app_offset)
        raise AssertionError(f"no flasher of kind {spec.kind}")

    def _build_power(self) -> Any:
        spec = self.rig.power
        if spec.kind == "scpi":
            from hil.drivers.power import ChannelScpiPower, ScpiPower

            # Output 1 speaks the common subset; other outputs need per-channel commands.
            supply = ScpiPower if spec.channel == 1 else ChannelScpiPower
            return supply(spec.url, channel=spec.channel, current_limit=spec.current_limit,
                          empty_volts=spec.empty_volts, full_volts=spec.full_volts)
        from hil.drivers.hooks import ConsoleHookPower

        return ConsoleHookPower(self.console(), command=self.contract.commands["power"])

    def _build_rf(self) -> Any:
        spec = self.rig.rf
        if spec.kind == "attenuator":
            from hil.drivers import rf

            dialect = rf.MiniCircuitsAttenuator if spec.dialect == "minicircuits" \
                else rf.Attenuator
            return dialect(spec.url, max_db=spec.max_db, step_db=spec.step_db,
                           signal_at_0db=spec.signal_at_0db, db_per_level=spec.db_per_level)
        from hil.drivers.hooks import ConsoleHookRf

        return ConsoleHookRf(self.console(), command=self.contract.commands["signal"])
