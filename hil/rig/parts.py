"""A rig's parts as drivers: built from the rig file, opened when first asked for, closed together.

Where the parts come from is the rig's provider's business (``hil.rig.providers``: a lab bench,
a simulated bench, a host build run as a process): it is started before the first part opens
and stopped after the last one closes, and it supplies the drivers that differ from the rig
file's plain reading; the rest are built here.

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
from hil.rig.providers import PartsProvider, provider_for


class RigParts:
    """The open drivers of one rig. A RigFault raised by any of them names this rig.

    The rig's provider (``hil.rig.providers``) is started before the first part opens and
    stopped after the last one closes: a simulated rig's bench, a host build's process."""

    def __init__(self, rig: Rig, *, console_log: Path | None = None,
                 provider: PartsProvider | None = None) -> None:
        self.rig = rig
        self.console_log = console_log   # where the console's log is written as it comes
        self.contract = Contract.with_overrides(rig.console.commands, rig.console.events)
        self._open: dict[str, Any] = {}
        self.provider = provider or provider_for(rig)
        self._started = False

    @property
    def bench(self) -> Any:
        """The SimBench of a simulated rig while it runs; None for any other rig."""
        return getattr(self.provider, "bench", None)

    def point_at(self, url: str) -> bool:
        """Give the board the OTA service's base URL where the provider can (a host build's
        ``HIL_OTA_URL``, for its next start): True then; False where the board must be told
        by other means (its shell's ``ota server``, or a DNS answer)."""
        self.start_provider()
        return self.provider.point_at(url)

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
            if self._started:
                self._started = False
                self.provider.stop()

    def start_provider(self) -> None:
        """Start the rig's provider (once): a simulated bench, a host build's process."""
        if not self._started:
            try:
                self.provider.start()
            except RigFault as fault:
                raise fault.for_rig(self.rig.name) from None
            self._started = True

    start_sim = start_provider    # the name it had when only simulated rigs had a provider

    def __enter__(self) -> RigParts:
        self.start_provider()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ building
    def _get(self, part: str, build: Any) -> Any:
        if part not in self._open:
            self.start_provider()
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
        provided = self.provider.console(self.console_log)
        if provided is not None:
            return provided
        from hil.drivers.console import SerialConsole

        spec = self.rig.console
        return SerialConsole(port=spec.port, url=spec.url, serial_number=spec.serial_number,
                             baudrate=spec.baudrate, ok_pattern=spec.ok, err_pattern=spec.err,
                             log_path=self.console_log)

    def _build_flasher(self) -> Any:
        provided = self.provider.flasher()
        if provided is not None:
            return provided
        return build_flasher(self.rig)

    def _build_power(self) -> Any:
        provided = self.provider.power()
        if provided is not None:
            from hil.drivers.switched import SwitchedPower

            if isinstance(provided, SwitchedPower) and not self.rig.shell_less:
                # A provider's switch (a labgrid place's power port) sets no battery level
                # either: the firmware's hook does, as beside the rig file's switches.
                provided.level = self._level_hook
            return provided
        spec = self.rig.power
        if spec.kind == "scpi":
            from hil.drivers.power import ChannelScpiPower, ScpiPower

            # Output 1 speaks the common subset; other outputs need per-channel commands.
            supply = ScpiPower if spec.channel == 1 else ChannelScpiPower
            return supply(spec.url, channel=spec.channel, current_limit=spec.current_limit,
                          empty_volts=spec.empty_volts, full_volts=spec.full_volts)
        from hil.drivers.hooks import ConsoleHookPower

        if spec.kind in ("usb-hub", "command"):
            from hil.drivers import switched

            hook = None if self.rig.shell_less else self._level_hook
            if spec.kind == "usb-hub":
                return switched.UsbHubPortPower(spec.hub, spec.port, uhubctl=spec.uhubctl,
                                                off_s=spec.off_s, timeout=spec.timeout,
                                                level=hook)
            return switched.CommandLinePower(spec.on, spec.off, cycle=spec.cycle,
                                             status=spec.status, off_s=spec.off_s,
                                             timeout=spec.timeout, level=hook)

        return ConsoleHookPower(self.console(), command=self.contract.commands["power"])

    def _level_hook(self, percent: int) -> None:
        """A switch sets no battery level; a board with a shell still has its hook. The console
        is asked for at each use: an ESP32's is closed and reopened around flashing."""
        from hil.drivers.hooks import ConsoleHookPower

        ConsoleHookPower(self.console(), self.contract.commands["power"]).set_level(percent)

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


def build_flasher(rig: Rig, *, probe: str | None = None, port: str | None = None
                  ) -> FlasherProtocol:
    """The flasher ``rig.flasher`` describes (not opened). ``probe`` (an SWD probe's id) and
    ``port`` (the ESP32 bootloader's serial port) stand in where a provider found them (a
    labgrid place's pyocd server, its network serial port)."""
    spec, family = rig.flasher, rig.family
    if spec.kind == "swd":
        from hil.drivers.swd import SwdFlasher

        # Pack-based targets are named by their part number (gd32f103c8); builtin by family.
        target = spec.target or (rig.part_number if family.needs_pack else family.pyocd_target)
        probe = probe or spec.probe
        assert target is not None      # the rig model checks it
        assert probe is not None       # the rig model's, or the place's
        # A raw .bin has no address: it is the application, so it goes to the app slot.
        return SwdFlasher(probe=probe, target=target, pack=spec.pack,
                          frequency=spec.frequency, base_address=family.app_address)
    if spec.kind == "esp":
        from hil.drivers.esp import EspFlasher

        port = port or spec.port or rig.console.port or rig.console.url
        if port is None:
            raise RigFault("flasher", "the console is found by USB serial number: give "
                           "flasher.port for the ESP32 bootloader", rig.name)
        otadata = family.otadata
        if otadata is not None and spec.otadata is not None:
            otadata = (spec.otadata, otadata[1])
        return EspFlasher(port=port, baudrate=spec.baudrate, app_offset=family.app_offset,
                          otadata=otadata)
    raise AssertionError(f"no flasher of kind {spec.kind}")
