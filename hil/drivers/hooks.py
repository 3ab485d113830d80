"""Fault injection through the firmware's own test hooks, for rigs without bench instruments.

The console contract (../shared/DESIGN.md) gives test builds ``test power <percent>``,
``test signal <value>`` and ``test space <bytes>``: the firmware then believes its battery, signal
or free storage is what the test says. These drivers put those hooks behind the same protocols as
the bench supply and the attenuator, so a test asks for a low battery the same way on every rig.

What a hook cannot do: remove power. ``can_cut`` is False and ``output()`` raises, so a power-cut
test on a rig without a supply is reported broken (the rig cannot run it) rather than passing
without the cut ever happening.

The console belongs to the rig: these drivers borrow it, so their ``open()``/``close()`` leave it
alone. A hook answered ``ERR`` raises ``CommandRefused`` unchanged: a test build that refuses a
contract hook is a firmware fault.
"""

from __future__ import annotations

from hil.drivers.base import ConsoleProtocol, DriverBase
from hil.drivers.power import check_percent
from hil.errors import RigFault


class ConsoleHook(DriverBase):
    """One contract hook on a borrowed console: a command template filled in and sent."""

    def __init__(self, console: ConsoleProtocol, command: str) -> None:
        self.console = console
        self.command = command   # a format string; overridable per board in the rig file

    def open(self) -> None:
        """Nothing to take: the rig opens and closes the console."""

    def close(self) -> None:
        """Nothing to give back (see ``open``)."""

    def identify(self) -> str:
        return f"console hook ({self.console.name})"

    def _send(self, **values: object) -> None:
        # A hook may act from another thread (a gateway trigger) while a test waits on the
        # board's events: it must not move the console's cursor past them.
        self.console.command(self.command.format(**values), keep_cursor=True)


class ConsoleHookPower(ConsoleHook):
    """PowerProtocol over ``test power <percent>``: the battery level the firmware reads."""

    can_cut: bool = False

    def __init__(self, console: ConsoleProtocol, command: str = "test power {percent}") -> None:
        super().__init__(console, command)

    def set_level(self, percent: int) -> None:
        check_percent(percent)
        self._send(percent=percent)

    def output(self, on: bool) -> None:
        raise RigFault(
            "power",
            "the console hook cannot switch power; give the rig a bench supply, a USB hub port "
            "or a relay command for power cuts (power.kind: scpi, usb-hub, command)",
        )


class ConsoleHookRf(ConsoleHook):
    """RfProtocol over ``test signal <value>``: the level the firmware believes it receives."""

    def __init__(self, console: ConsoleProtocol, command: str = "test signal {value}") -> None:
        super().__init__(console, command)

    def set_signal(self, level: int) -> None:
        self._send(value=level)


class ConsoleHookSpace(ConsoleHook):
    """``test space <bytes>``: the free package storage the firmware believes it has."""

    def __init__(self, console: ConsoleProtocol, command: str = "test space {bytes}") -> None:
        super().__init__(console, command)

    def set_free_space(self, free_bytes: int) -> None:
        if free_bytes < 0:
            raise ValueError(f"free space must be 0 bytes or more, not {free_bytes}")
        self._send(bytes=free_bytes)
