"""Power that is switched, not set: a USB hub port (uhubctl) or a relay or PDU's own command line.

Most lab benches are dev boards on USB with no bench supply. Their power is the hub port they
are plugged into: a hub that switches VBUS port by port (uhubctl's list of compatible hubs)
cuts it for real, as labgrid's USB power driver does. A relay board or a network PDU is
switched by the tool that came with it. Both are ``PowerProtocol`` parts that can cut
(``can_cut``) but set no level: ``set_level`` goes to the firmware's ``test power`` hook where
the board has a shell (the ``level`` callable the rig gives), and is refused, saying what the
rig lacks, where it has none.

Every command runs as a real subprocess, without a shell, with a timeout. A failure is one
``RigFault`` line naming the rig key and what the tool said (uhubctl's own error line, or a
relay script's last line of output). uhubctl exits 0 even when it could not switch the port
(no permission to open the hub), so the port's state it prints after switching is read and
checked: a port still on after ``off`` is a fault, never a cut that did not happen.

``open()`` checks that the programs are there; ``identify()``, what ``hil rigs check`` prints,
asks the state without switching: uhubctl's status of the port, or the rig's ``status``
command. ``cycle()`` is off, ``off_s`` dark, on in one step: uhubctl's ``-a cycle -d``, or
the rig's ``cycle`` command (``hil.drivers.power.power_cycle`` uses it where a part has one).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hil.drivers.base import DriverBase
from hil.drivers.power import check_percent
from hil.errors import RigFault

PART = "power"
LevelHook = Callable[[int], None]   # sets the battery level the firmware reads (`test power`)

# Debian installs uhubctl in /usr/sbin, which a non-root user's PATH often lacks.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_program(name: str) -> str | None:
    """The path ``name`` runs as: on PATH, or in the sbin directories; None if nowhere."""
    path = os.environ.get("PATH", os.defpath)
    return shutil.which(name, path=os.pathsep.join([path, *_SBIN]))


def said(output: str, *, ignore: Sequence[str] = ()) -> str:
    """What a tool's output comes to, in one line: its last line (a script's error, a Python
    tool's exception), with lines in ``ignore`` left out (a usage hint)."""
    lines = [line.strip() for line in output.splitlines()
             if line.strip() and line.strip() not in ignore]
    return lines[-1] if lines else "no output"


@dataclass(frozen=True)
class Ran:
    """A command that ran to its end with exit status 0."""

    stdout: str
    stderr: str


def run(argv: Sequence[str], *, key: str, timeout: float,
        ignore: Sequence[str] = ()) -> Ran:
    """Run ``argv`` (no shell); a RigFault line naming ``key`` (the rig file's) unless it
    exits 0 within ``timeout`` seconds."""
    command = shlex.join(argv)
    try:
        # Its own process group: a relay script's children (a `sleep`, a hung client) go with
        # it on a timeout; else they would hold its output open and the wait would go on.
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,  # noqa: S603 (the rig's)
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    except FileNotFoundError:
        raise RigFault(PART, f"{key}: {argv[0]} not found") from None
    except PermissionError:
        raise RigFault(PART, f"{key}: {argv[0]} is not an executable program") from None
    with process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise RigFault(PART, f"{key}: {command} did not finish within {timeout:g} s "
                           "(stopped)") from None
    if process.returncode != 0:
        what = said(stderr, ignore=ignore)
        if what == "no output":
            what = said(stdout, ignore=ignore)
        raise RigFault(PART, f"{key}: {command} failed with status {process.returncode}: "
                       f"{what}")
    return Ran(stdout, stderr)


class SwitchedPower(DriverBase):
    """PowerProtocol for a switch: it cuts, and leaves the level to the firmware's hook."""

    part = PART
    can_cut: bool = True
    what = "a power switch"   # for messages: what this part is

    def __init__(self, *, off_s: float, timeout: float, level: LevelHook | None = None
                 ) -> None:
        if not off_s > 0 or not timeout > 0:
            raise ValueError(f"off_s and timeout must be positive, not {off_s} and {timeout}")
        self.off_s = off_s
        self.timeout = timeout
        self.level = level

    def close(self) -> None:
        """Nothing held between commands; the power stays as it is (the rig decides)."""

    @abstractmethod
    def identify(self) -> str: ...

    @abstractmethod
    def output(self, on: bool) -> None: ...

    def set_level(self, percent: int) -> None:
        check_percent(percent)
        if self.level is None:
            raise RigFault(PART, f"{self.what} switches the board's power and sets no battery "
                           "level: a low-battery test needs a bench supply (power.kind: scpi) "
                           "or a firmware with the `test power` hook")
        self.level(percent)

    def cycle(self) -> None:
        """Off, the rig's ``off_s`` seconds dark (long enough for the board's capacitors to
        drain: a short blink may not reset it), then on."""
        self.output(False)
        time.sleep(self.off_s)
        self.output(True)

    def _level_note(self) -> str:
        return "; battery level through the firmware's `test power`" if self.level else ""


# ------------------------------------------------------------------------------ uhubctl
_HUB_LINE = re.compile(r"^(Current|New) status for hub (\S+) \[(.*)\]\s*$")
_PORT_LINE = re.compile(r"^\s+Port (\d+): ([0-9a-fA-F]{4})(.*)$")
_PORTS = re.compile(r", (\d+) ports, (ppps|ganged|nops)$")
USAGE_HINT = "Run with -h to get usage info."


@dataclass(frozen=True)
class PortReading:
    """One port line of uhubctl's output, under its hub's heading."""

    new: bool             # under "New status" (after a switch), not "Current status"
    hub: str
    description: str      # the hub's: "2109:2817 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports,
    #                       ppps" (ppps: each port switched on its own; ganged: all together)
    port: int
    bits: str             # the port status word, hex
    flags: str            # "power highspeed enable connect"
    device: str           # what is plugged in, as uhubctl describes it ("" when nothing)

    @property
    def powered(self) -> bool:
        words = self.flags.split()
        return "off" not in words and "power" in words


def parse_uhubctl(output: str) -> tuple[dict[str, str], list[PortReading]]:
    """uhubctl's stdout -> (the hubs it showed, location to description; every port line).
    Sans-IO: the output of a real hub, of a fake one in a test, of a log."""
    hubs: dict[str, str] = {}
    readings: list[PortReading] = []
    heading: tuple[bool, str, str] | None = None
    for line in output.splitlines():
        hub = _HUB_LINE.match(line)
        if hub:
            heading = (hub.group(1) == "New", hub.group(2), hub.group(3))
            hubs[hub.group(2)] = hub.group(3)
            continue
        port = _PORT_LINE.match(line)
        if port and heading is not None:
            flags, _, device = port.group(3).partition(" [")
            readings.append(PortReading(heading[0], heading[1], heading[2], int(port.group(1)),
                                        port.group(2), flags.strip(), device.rstrip("]")))
    return hubs, readings


class UsbHubPortPower(SwitchedPower):
    """One port of a USB hub, switched by ``uhubctl -l <hub> -p <port> -a off|on|cycle``."""

    def __init__(self, hub: str, port: int, *, uhubctl: Sequence[str] = ("uhubctl",),
                 off_s: float = 2.0, timeout: float = 10.0, level: LevelHook | None = None
                 ) -> None:
        super().__init__(off_s=off_s, timeout=timeout, level=level)
        if not uhubctl:
            raise ValueError("uhubctl: an empty command")
        self.hub = hub
        self.port = port
        self.uhubctl = tuple(uhubctl)
        self.what = f"USB hub {hub} port {port}"
        self._argv: tuple[str, ...] | None = None

    def open(self) -> None:
        program = find_program(self.uhubctl[0])
        if program is None:
            raise RigFault(PART, f"power.uhubctl: {self.uhubctl[0]} not found (install "
                           "Debian's uhubctl package: apt-get install uhubctl)")
        self._argv = (program, *self.uhubctl[1:], "-l", self.hub, "-p", str(self.port))

    def identify(self) -> str:
        """The port's state as uhubctl reads it, without switching it."""
        reading = self._reading(self._uhubctl(), new=False)
        state = "on" if reading.powered else "off"
        device = f", {reading.device} attached" if reading.device else ", nothing attached"
        # A ganged hub switches all its ports at once: another board on it goes dark too.
        ganged = ("; ganged: every port of this hub is cut together"
                  if reading.description.endswith(", ganged") else "")
        return (f"{self.what}: power {state} ({reading.flags}){device}; hub "
                f"{reading.description}{ganged}{self._level_note()}")

    def output(self, on: bool) -> None:
        self._switch("on" if on else "off", on)

    def cycle(self) -> None:
        self._switch("cycle", True, "-d", f"{self.off_s:g}", extra_time=self.off_s)

    # ------------------------------------------------------------------------------ internals
    def _switch(self, action: str, want_on: bool, *more: str, extra_time: float = 0.0) -> None:
        reading = self._reading(self._uhubctl("-a", action, *more, extra_time=extra_time),
                                new=True)
        if reading.powered != want_on:
            # uhubctl exits 0 when it could not open the hub to switch it.
            raise RigFault(PART, f"power.port: uhubctl -a {action} left {self.what} "
                           f"{'on' if reading.powered else 'off'} ({reading.flags}): no "
                           "permission to switch it (run as root, or install uhubctl's udev "
                           "rule), or the hub does not switch this port")

    def _uhubctl(self, *args: str, extra_time: float = 0.0) -> str:
        if self._argv is None:
            raise RigFault(PART, f"{self.what}: not open (open() it, or use it in a with block)")
        return run([*self._argv, *args], key="power.hub",
                   timeout=self.timeout + extra_time, ignore=(USAGE_HINT,)).stdout

    def _reading(self, output: str, *, new: bool) -> PortReading:
        """Our port's last line (after the switch, where ``new``); a RigFault saying why it is
        missing: the hub not listed, no such port, or a hub uhubctl could not open."""
        hubs, readings = parse_uhubctl(output)
        ours = [reading for reading in readings
                if reading.hub == self.hub and reading.port == self.port and reading.new == new]
        if ours:
            return ours[-1]
        if self.hub not in hubs:
            listed = ", ".join(hubs) or "none"
            raise RigFault(PART, f"power.hub: uhubctl did not list hub {self.hub} (hubs "
                           f"listed: {listed})")
        ports = _PORTS.search(hubs[self.hub])
        if ports and self.port > int(ports.group(1)):
            raise RigFault(PART, f"power.port: hub {self.hub} has {ports.group(1)} ports, no "
                           f"port {self.port}")
        raise RigFault(PART, f"power.port: uhubctl could not read {self.what} (no permission "
                       "to open the hub? run as root, or install uhubctl's udev rule)")


# ------------------------------------------------------------------------------ any command line
class CommandLinePower(SwitchedPower):
    """A relay or PDU switched by its own commands: ``on``, ``off``, optionally ``cycle`` and
    ``status`` (each an argument list, run without a shell)."""

    what = "a relay command (power.kind: command)"

    def __init__(self, on: Sequence[str], off: Sequence[str], *,
                 cycle: Sequence[str] | None = None, status: Sequence[str] | None = None,
                 off_s: float = 2.0, timeout: float = 10.0, level: LevelHook | None = None
                 ) -> None:
        super().__init__(off_s=off_s, timeout=timeout, level=level)
        self.commands: dict[str, tuple[str, ...]] = {"on": tuple(on), "off": tuple(off)}
        if cycle is not None:
            self.commands["cycle"] = tuple(cycle)
        if status is not None:
            self.commands["status"] = tuple(status)
        for key, argv in self.commands.items():
            if not argv:
                raise ValueError(f"power.{key}: an empty command")
        self._opened = False

    def open(self) -> None:
        """Every program must be there before a test counts on it (it is run only when asked)."""
        for key, argv in self.commands.items():
            program = argv[0]
            found = shutil.which(program) if os.sep not in program else (
                program if os.access(program, os.X_OK) and os.path.isfile(program) else None)
            if found is None:
                why = "not found" if os.sep not in program or not os.path.exists(program) \
                    else "not an executable program"
                raise RigFault(PART, f"power.{key}: {program} {why}")
        self._opened = True

    def identify(self) -> str:
        """The ``status`` command's first line of output; without one, which commands the
        rig switches by (the check switches nothing)."""
        status = self.commands.get("status")
        if status is None:
            found = ", ".join(f"{key}={shlex.join(argv)}" for key, argv in self.commands.items())
            return f"power commands found ({found}); no status command to ask{self._level_note()}"
        ran = self._run("status")
        first = next((line.strip() for line in ran.stdout.splitlines() if line.strip()),
                     "no output")
        return f"{shlex.join(status)}: {first}{self._level_note()}"

    def output(self, on: bool) -> None:
        self._run("on" if on else "off")

    def cycle(self) -> None:
        if "cycle" in self.commands:
            self._run("cycle", extra_time=self.off_s)
        else:
            super().cycle()

    def _run(self, key: str, *, extra_time: float = 0.0) -> Ran:
        if not self._opened:
            raise RigFault(PART, f"power.{key}: not open (open() it, or use it in a with block)")
        return run(self.commands[key], key=f"power.{key}", timeout=self.timeout + extra_time)
