"""The board under test, as a test speaks to it: the console contract over the rig's parts.

    board.point_at(gateway_url)        # ota server <url>
    board.start_update()               # ota check
    events = board.wait_update_end()   # every `ota ...` line up to `ota end`
    board.reboot()                     # sys reboot, then the boot line's version
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from hil.drivers.base import ConsoleProtocol, Progress
from hil.drivers.contract import Event, parse_event
from hil.drivers.hooks import ConsoleHookSpace
from hil.errors import ExpectTimeout, RigFault
from hil.rig.parts import RigParts

BOOT_TIMEOUT_S = 30.0
HUNG_AFTER_S = 3.0       # a board whose shell is this long silent has hung
POWER_OFF_S = 0.5        # how long a power cycle keeps the board dark


class Board:
    def __init__(self, parts: RigParts) -> None:
        self.parts = parts
        self.rig = parts.rig
        self.contract = parts.contract

    @property
    def console(self) -> ConsoleProtocol:
        return self.parts.console()

    def command(self, name: str, timeout: float = 10.0, **values: object) -> list[str]:
        return self.console.command(self.contract.command(name, **values), timeout=timeout)

    def version(self, timeout: float = 10.0) -> str:
        for line in self.command("version", timeout=timeout):
            match = self.contract.events["version"].search(line)
            if match:
                return match.group("version")
        raise RigFault("console", f"{self.contract.command('version')!r} printed no version "
                       "line before OK", self.rig.name)

    def point_at(self, url: str) -> None:
        self.command("server", url=url)

    def start_update(self) -> None:
        self.command("check")

    def wait_update_end(self, timeout: float = 300.0, *,
                        on_event: Callable[[Event], None] | None = None,
                        until_boot: bool = False) -> list[Event]:
        """The attempt's events (``ota phase=...`` lines) until ``ota end``, which must come
        within ``timeout`` seconds in all (not per event: a board that trickles events forever
        must still fail).

        ``on_event`` sees every event as it comes, boot lines (tag ``boot``) included: a test
        acts on the board's own narration (cut the power at ``ota phase=flash``). With
        ``until_boot`` the wait also ends at the first boot line (an attempt cut short by a
        power cut or a reboot never prints ``ota end``)."""
        contract = self.contract.events
        pattern = f"(?:{contract['phase'].pattern})|(?:{contract['end'].pattern})|" \
                  f"(?:{contract['boot'].pattern})"
        deadline = time.monotonic() + timeout
        events: list[Event] = []
        while True:
            remaining = max(deadline - time.monotonic(), 0.0)
            line = self.console.expect(pattern, remaining).string
            if contract["end"].search(line):
                return events
            booted = contract["boot"].search(line)
            # A shell whose phase lines are not key=value still yields its line, as a tag.
            event = Event("boot", {"version": booted.group("version")}) if booted \
                else parse_event(line) or Event(line.strip(), {})
            if not booted:
                events.append(event)
            if on_event is not None:
                on_event(event)
            if booted and until_boot:
                return events

    def reboot(self, timeout: float = BOOT_TIMEOUT_S) -> str:
        """Reboot and return the version the boot line reports."""
        self.command("reboot")
        return self.wait_boot(timeout)

    def wait_boot(self, timeout: float = BOOT_TIMEOUT_S) -> str:
        return self.console.expect(self.contract.events["boot"], timeout).group("version")

    # Fault hooks and rig instruments: the rig decides which one serves.
    def set_power(self, percent: int) -> None:
        power = self.parts.power()
        if power is None:
            raise RigFault("power", "the rig has no power part (power.kind: none)", self.rig.name)
        power.set_level(percent)

    def set_signal(self, level: int) -> None:
        rf = self.parts.rf()
        if rf is None:
            raise RigFault("rf", "the rig has no rf part (rf.kind: none)", self.rig.name)
        rf.set_signal(level)

    def set_free_space(self, size: int) -> None:
        ConsoleHookSpace(self.console, self.contract.commands["space"]).set_free_space(size)

    def revive(self) -> bool:
        """Make sure the board answers: one whose shell is silent for ``HUNG_AFTER_S`` is
        power-cycled through the rig's supply and must boot again. True if it had to be;
        a RigFault if it stays silent or the rig cannot cut its power."""
        try:
            self.version(timeout=HUNG_AFTER_S)
            return False
        except ExpectTimeout as silent:
            supply = self.parts.power() if "power_cut" in self.rig.capabilities else None
            if supply is None:
                raise RigFault("console", "the board does not answer and the rig has no "
                               f"supply to power-cycle it: {silent}", self.rig.name) from None
        since = self.console.mark()
        supply.output(False)
        time.sleep(POWER_OFF_S)
        supply.output(True)
        try:
            self.console.expect(self.contract.events["boot"], BOOT_TIMEOUT_S, since=since)
        except ExpectTimeout as dead:
            raise RigFault("console", f"the board hung and did not boot after a power cycle: "
                           f"{dead}", self.rig.name) from None
        return True

    def restore_base(self, firmware: Path | None, progress: Progress | None = None) -> str:
        """Back to the base state: flash ``firmware`` where the rig has a flasher, else the
        firmware's factory reset. Returns the version the board boots."""
        if firmware is None or self.rig.flasher.kind == "none":
            self.command("factory")
            return self.version()
        if self.rig.flasher.kind == "esp":
            # The ESP32 is flashed through its console's own serial port: let go of it first.
            self.parts.release("console")
        else:
            console = self.console    # open before the reset, or the boot line is missed
        flasher = self.parts.flasher()
        assert flasher is not None
        flasher.program(firmware, progress=progress)
        if self.rig.flasher.kind != "esp":
            since = console.mark()
            flasher.reset()
            return console.expect(self.contract.events["boot"], BOOT_TIMEOUT_S,
                                  since=since).group("version")
        flasher.reset()
        # The boot line came while the flasher held the port; ask the booted firmware instead,
        # again while it is still in reset or booting (a UART in reset drops what it hears).
        self.parts.release("flasher")
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            try:
                return self.version(timeout=1.0)
            except ExpectTimeout:
                if time.monotonic() > deadline:
                    raise
