"""The board under test, as a test speaks to it: the console contract over the rig's parts.

    board.point_at(gateway_url)        # ota server <url>
    board.start_update()               # ota check
    events = board.wait_update_end()   # every `ota ...` line up to `ota end`
    board.reboot()                     # sys reboot, then the boot line's version

A board without a shell (``console.shell: none``) is never typed at: ``command`` refuses (a
RigFault), ``start_update`` pulls the rig's ``ota.trigger`` (a reset through the flasher, a power
cycle through the supply, or nothing: the firmware's own timer), and ``point_at`` tells a
simulated bench's network which DNS server answers the firmware's hard-coded host (hil's; on a
lab network the router hands hil's DNS out). Its version comes from its boot-log line
(``console.events.boot``) when the rig gives one, else from the service (``watch_service``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from hil.boards.images import UnknownImage, read_image
from hil.drivers.base import ConsoleProtocol, Progress
from hil.drivers.contract import Event, parse_event
from hil.drivers.hooks import ConsoleHookSpace
from hil.drivers.power import power_cycle
from hil.errors import CommandRefused, ExpectTimeout, RigFault
from hil.rig.parts import RigParts

# The board's versions as the service heard them (version reports, detect queries), each with
# when its request came in: what a shell-less board without a boot-log line is read by.
ServiceVersions = Callable[[], list[tuple[float, str]]]

BOOT_TIMEOUT_S = 30.0
HUNG_AFTER_S = 3.0       # a board whose shell is this long silent has hung
WATCH_S = 0.5            # how often a wait for the board's events lets its watch look
# A board busy with an attempt a previous test left running is asked again this long at most.
BUSY_WAIT_S, BUSY_POLL_S = 60.0, 0.5
POWER_OFF_S = 0.5        # how long a power cycle keeps the board dark
# A halted board's log has settled when it stays the same SETTLE_POLLS polls in a row.
SETTLE_POLL_S, SETTLE_POLLS, SETTLE_MAX_S = 0.05, 3, 2.0


class Board:
    def __init__(self, parts: RigParts) -> None:
        self.parts = parts
        self.rig = parts.rig
        self.contract = parts.contract
        # The version the last restore left running: its boot line's, else (a shell-less board
        # whose log names none) the version inside the image it flashed. None: no restore yet.
        self.restored_version: str | None = None

    @property
    def console(self) -> ConsoleProtocol:
        return self.parts.console()

    @property
    def shell_less(self) -> bool:
        return self.rig.shell_less

    @property
    def boot_line(self) -> bool:
        """The rig names this firmware's boot-log line (``console.events.boot``): a shell-less
        board's boots are read from its console; else from the service."""
        return not self.shell_less or "boot" in self.rig.console.events

    @property
    def narrates(self) -> bool:
        """Its log prints the contract's phase lines as they happen: always with a shell; a
        shell-less board's rig says so by naming the pattern (``console.events.phase``), and
        then a scenario acts on them (a power cut timed by ``ota phase=flash bytes=N``)."""
        return not self.shell_less or "phase" in self.rig.console.events

    def watch_service(self, versions: ServiceVersions) -> None:
        """Where a shell-less board's boots are heard when its log has no boot line (the
        scenario's gateway timeline)."""
        self._service_versions = versions

    _service_versions: ServiceVersions | None = None

    def command(self, name: str, timeout: float = 10.0, **values: object) -> list[str]:
        if self.shell_less:
            raise RigFault("console", f"the board has no shell (console.shell: none): "
                           f"{self.contract.command(name, **values)!r} is not sent",
                           self.rig.name)
        return self.console.command(self.contract.command(name, **values), timeout=timeout)

    def version(self, timeout: float = 10.0) -> str:
        """``sys version``; a board without a shell: the last boot line its log holds (what it
        runs now), else what a reset makes it say."""
        if self.shell_less:
            return self._last_boot() or self._boot_version(max(timeout, BOOT_TIMEOUT_S))
        for line in self.command("version", timeout=timeout):
            match = self.contract.events["version"].search(line)
            if match:
                return match.group("version")
        raise RigFault("console", f"{self.contract.command('version')!r} printed no version "
                       "line before OK", self.rig.name)

    def point_at(self, url: str, dns: tuple[str, int] | None = None) -> None:
        """``ota server <url>``. The rig's provider may tell the board itself (a host build gets
        ``HIL_OTA_URL`` at its next start, which begins a shell-less board's attempt). Else a
        board without a shell reaches its hard-coded host: a simulated bench's network is told
        the DNS server that answers it (hil's, ``dns``) and the gateway's port; a lab
        network's DNS is the rig's own setup (README)."""
        told = self.parts.point_at(url)
        if not self.shell_less:
            self.command("server", url=url)
        elif not told and self.parts.bench is not None:
            self.parts.bench.route_ota_host(url, dns)

    def start_update(self) -> None:
        """``ota check``; a board without a shell: the rig's ``ota.trigger``."""
        if not self.shell_less:
            self.command("check")
        elif self.rig.trigger == "reset":
            self.reset()
        elif self.rig.trigger == "power-cycle":
            self.power_cycle()
        # "wait": the firmware's own timer starts it

    def reset(self) -> None:
        """A reset through the rig's flasher (SWD, or the ESP32's EN line through the serial
        adapter's RTS as esptool does): the board boots its application."""
        flasher_kind = self.rig.flasher.kind
        if flasher_kind == "esp":
            # The ESP32's reset lines are its console's port: the flasher takes it meanwhile.
            self.parts.release("console")
        flasher = self.parts.flasher()
        if flasher is None:
            raise RigFault("flasher", "the rig has no flasher to reset the board through "
                           "(flasher.kind: none)", self.rig.name)
        flasher.reset()
        if flasher_kind == "esp":
            self.parts.release("flasher")
            self.parts.console()            # the log goes on (what came meanwhile is lost)

    def power_cycle(self) -> None:
        """The rig's supply off, then on again: the board boots from cold."""
        supply = self.parts.power()
        if supply is None or not supply.can_cut:
            raise RigFault("power", "the rig has no supply that can cut the board's power",
                           self.rig.name)
        power_cycle(supply, POWER_OFF_S)

    def _last_boot(self) -> str | None:
        """The version of the last boot line in the log: no reset needed to learn what runs
        (a reset would cut short the check the board makes at boot, mid-request)."""
        if not self.boot_line:
            return None
        pattern = self.contract.events["boot"]
        for line in reversed(self.console.lines()):
            booted = None if line.sent else pattern.search(line.text)
            if booted:
                return booted.group("version")
        return None

    def _boot_version(self, timeout: float) -> str:
        """A shell-less board's version: reset it and read the boot that follows, in its boot
        log or at the service."""
        if not self.boot_line and self._service_versions is None:
            raise RigFault("console", "the board has no shell and its log no boot line "
                           "(console.events.boot): its version is read at the OTA service, "
                           "and none is watched yet", self.rig.name)
        since, started = self.console.mark(), time.time()
        self.reset() if self.rig.flasher.kind != "none" else self.power_cycle()
        if self.boot_line:
            return self.wait_boot(timeout, since=since)
        assert self._service_versions is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            heard = [version for at, version in self._service_versions() if at >= started]
            if heard:
                return heard[0]
            time.sleep(0.05)
        raise ExpectTimeout(f"rig {self.rig.name}: no version report or detect at the service "
                            f"within {timeout:g} s of a reset")

    def wait_update_end(self, timeout: float = 300.0, *,
                        on_event: Callable[[Event], None] | None = None,
                        until_boot: bool = False,
                        watch: Callable[[], None] | None = None) -> list[Event]:
        """The attempt's events (``ota phase=...`` lines) until ``ota end``, which must come
        within ``timeout`` seconds in all (not per event: a board that trickles events forever
        must still fail).

        ``on_event`` sees every event as it comes, boot lines (tag ``boot``) included: a test
        acts on the board's own narration (cut the power at ``ota phase=flash``). With
        ``until_boot`` the wait also ends at the first boot line (an attempt cut short by a
        power cut or a reboot never prints ``ota end``). ``watch`` is called at least every
        ``WATCH_S`` while waiting, and may end the wait by raising (a crash seen through the
        debug probe, where the console stays silent)."""
        contract = self.contract.events
        pattern = f"(?:{contract['phase'].pattern})|(?:{contract['end'].pattern})|" \
                  f"(?:{contract['boot'].pattern})"
        deadline = time.monotonic() + timeout
        events: list[Event] = []
        while True:
            remaining = max(deadline - time.monotonic(), 0.0)
            if watch is not None:
                watch()
                try:
                    line = self.console.expect(pattern, min(remaining, WATCH_S)).string
                except ExpectTimeout:
                    if time.monotonic() < deadline:
                        continue
                    raise
            else:
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

    def wait_boot(self, timeout: float = BOOT_TIMEOUT_S, *, since: int | None = None) -> str:
        return self.console.expect(self.contract.events["boot"], timeout,
                                   since=since).group("version")

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
        a RigFault if it stays silent or the rig cannot cut its power. A board without a
        shell cannot be asked: it is left to ``restore_base`` (flashed and reset)."""
        if self.shell_less:
            return False
        try:
            self.version(timeout=HUNG_AFTER_S)
            return False
        except ExpectTimeout as silent:
            self._power_cycle_to_boot(f"the board does not answer: {silent}")
        return True

    def _power_cycle_to_boot(self, why: str) -> None:
        """Power-cycle a board left in a state its shell cannot get it out of (hung, or still
        busy with an attempt a previous test began) and wait for it to boot again."""
        supply = self.parts.power() if "power_cut" in self.rig.capabilities else None
        if supply is None:
            raise RigFault("console", f"{why}; the rig has no supply to power-cycle it",
                           self.rig.name)
        since = self.console.mark()
        power_cycle(supply, POWER_OFF_S)
        try:
            self.console.expect(self.contract.events["boot"], BOOT_TIMEOUT_S, since=since)
        except ExpectTimeout as dead:
            raise RigFault("console", f"{why}; it did not boot after a power cycle: {dead}",
                           self.rig.name) from None

    def restore_base(self, firmware: Path | None, progress: Progress | None = None, *,
                     full: bool = False) -> str | None:
        """Back to the base state: flash ``firmware`` where the rig has a flasher, else the
        firmware's factory reset. Returns the version the board boots.

        The flasher writes only the sectors that do not hold the image already (pyocd's smart
        flash; esptool after the chip's MD5 of its sectors): after a test that changed
        nothing, nothing is written. The flash ends the same as after a full write, and the
        rest of the restore (the settings erased, the reset, the boot) is the same either way.
        ``full`` writes the whole image whatever the flash holds (``--hil-full-restore``).

        A board without a shell has no factory reset: it is flashed (a simulated one with its
        factory image when no ``firmware`` is given, and its
        settings partition erased, as a full chip erase does: its OTA state goes with it; a
        real board's base image must clear its OTA state itself, or the rig's flasher erase
        the whole chip). Returns its boot line's version, or None when only the service can
        tell (its log has none)."""
        self.restored_version = None
        if self.shell_less:
            return self._restore_shell_less(firmware, progress, full=full)
        version = self._restore_with_shell(firmware, progress, full=full)
        self.restored_version = version
        return version

    def _restore_with_shell(self, firmware: Path | None, progress: Progress | None, *,
                            full: bool) -> str:
        if firmware is None or self.rig.flasher.kind == "none":
            self._factory_reset()
            return self.version()
        if self.rig.flasher.kind == "esp":
            # The ESP32 is flashed through its console's own serial port: let go of it first.
            self.parts.release("console")
        else:
            console = self.console    # open before the reset, or the boot line is missed
        flasher = self.parts.flasher()
        assert flasher is not None
        flasher.program(firmware, progress=progress, full=full)
        if self.parts.bench is not None:
            # MCUboot's trailers too (nothing pending, nothing to revert), while the flashed
            # board is held stopped; a lab board's rig erases them with its flasher.
            self.parts.bench.erase_boot_state()
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

    def _factory_reset(self) -> None:
        """``test factory``, on a board that may still be busy with what a previous test left
        running (an attempt whose service is gone, retrying): a power cycle ends it, as a QA
        engineer's would; the boot after it may resume the attempt it cut (its offset and token
        are saved), so a busy answer is asked again until that attempt gives up."""
        deadline = time.monotonic() + BUSY_WAIT_S
        cycled = False
        while True:
            try:
                self.command("factory")
                return
            except CommandRefused as refused:
                if not refused.reason.startswith("busy") or time.monotonic() > deadline:
                    raise
                if not cycled and "power_cut" in self.rig.capabilities:
                    self._power_cycle_to_boot(
                        f"the factory reset was refused ({refused.reason})")
                    cycled = True
                else:
                    time.sleep(BUSY_POLL_S)

    def _factory_image(self) -> Path | None:
        """The image the board came with, where hil knows it: a simulated board's, a host
        build's (``factory_image`` of its provider); None for a lab board."""
        if self.parts.bench is not None:
            factory: Path = self.parts.bench.factory_image
            return factory
        image: Path | None = getattr(self.parts.provider, "factory_image", None)
        return image

    def _restore_shell_less(self, firmware: Path | None, progress: Progress | None, *,
                            full: bool = False) -> str | None:
        if firmware is None:
            firmware = self._factory_image()
        bench = self.parts.bench
        if bench is not None:
            # Off the network until the test points it: the boot after the restore checks at
            # the service, and on a loaded host that check came after the test's own reset
            # had begun the attempt (two boots where the test made one).
            bench.offline()
        if firmware is not None and self.rig.flasher.kind == "esp":
            # The ESP32's flasher is its console's port: a console a previous restore (or the
            # test) opened must let go of it first.
            self.parts.release("console")
        flasher = self.parts.flasher() if firmware is not None else None
        if firmware is None or flasher is None:
            raise RigFault("flasher", "a board without a shell has no factory reset: give "
                           "the rig a flasher and the base image (--hil-firmware)",
                           self.rig.name)
        # Smart or full, program() leaves the board stopped (its core halted, or in its serial
        # bootloader) with its image in place, even when it wrote nothing: the settings are
        # erased while nothing runs, however much was written.
        flasher.program(firmware, progress=progress, full=full)
        generation = 0
        if bench is not None:
            bench.erase_settings()    # while the flashed board is held stopped
            bench.erase_boot_state()  # MCUboot's trailers: nothing pending, nothing to revert
            # Counted from here, not from before the flash: esptool's connect may boot the
            # application on the way (a reset whose boot-mode strap it missed on a loaded
            # host, then retried), and that boot, done at once offline, would be taken for
            # the restore's, whose own came later, online, checking at the test's service.
            generation = bench.boot_generation()
        if self.rig.flasher.kind == "esp":
            flasher.reset()
            self.parts.release("flasher")
            self.console.mark()                  # the log goes on; the boot line came unheard
            version = None
        else:
            since = self._settled_mark()
            flasher.reset()
            version = self.wait_boot(BOOT_TIMEOUT_S, since=since) if self.boot_line else None
        if bench is not None and not bench.wait_boot_done(generation, BOOT_TIMEOUT_S):
            raise RigFault("flasher", f"the simulated board did not finish booting within "
                           f"{BOOT_TIMEOUT_S:g} s of its restore", self.rig.name)
        self.restored_version = version or _image_version(firmware)
        return version

    def _settled_mark(self) -> int:
        """A mark in the log of a halted board once what it printed before the halt has all
        arrived: its last lines may still be on their way (a host build's output goes through
        a pipe and a pty, each read by a thread of its own; slow on a loaded host), and its
        last boot line, read after the mark, would be taken for the boot that follows."""
        deadline = time.monotonic() + SETTLE_MAX_S
        mark, steady = self.console.mark(), 0
        while steady < SETTLE_POLLS and time.monotonic() < deadline:
            time.sleep(SETTLE_POLL_S)
            now = self.console.mark()
            mark, steady = now, (steady + 1 if now == mark else 0)
        return mark


def _image_version(path: Path) -> str | None:
    """The version inside the firmware image at ``path`` (None: a format that has none)."""
    try:
        return read_image(path.read_bytes()).version
    except (OSError, UnknownImage):
        return None
