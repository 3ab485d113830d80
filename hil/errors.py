"""The one exception tree of hil.

Every error hil raises on purpose is a ``HilError``. The branches say whose fault it is, because
that decides how a test ends in the report: a rig fault is "broken" (the bench could not run the
test), a firmware fault is "failed" (the board did the wrong thing), a service fault points at the
OTA service or the network between.

::

    HilError
    ├── ConfigError            a rig, task or command-line input is wrong (names file and key)
    ├── ProtocolError          a OneNET message broke the protocol; carries the errno to answer
    │   └── AuthorizationError the Authorization header is missing, garbled, expired or forged
    ├── RigFault               the bench failed: probe missing, port gone, instrument silent
    │                          (names the rig and the part)
    ├── FirmwareFault          the device under test misbehaved: wrong or missing report code
    │   ├── CommandRefused     the firmware answered a console command with ``ERR <reason>``
    │   ├── ExpectTimeout      the firmware did not print what the test waited for
    │   ├── BootLoop           a host build kept exiting by itself (names the exit statuses)
    │   ├── FirmwareCrash      the board crashed mid-update (a HardFault, a panic): carries the
    │   │                      decoded evidence (hil.drivers.crash.Crash); Allure "firmware crash"
    │   └── ConformanceFailure an OTA phase ended with other report codes than the profile's
    ├── ServiceFault           the OTA service or the infrastructure around it failed
    │   └── ServiceCrashed     the mock raised on its server thread (re-raised on the test thread)
    ├── FaultNotLanded         a scenario's injected fault never hit where and when it asked:
    │                          the test proved nothing (Allure: broken, pytest: ERROR)
    └── Unsupported            this rig or service cannot run the scenario (a skip, with why)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hil.drivers.crash import Crash


class HilError(Exception):
    """Base of every error hil raises on purpose."""


class ConfigError(HilError):
    """Bad user input: a file, a key in it, or a command-line value.

    The message is one line that names where the mistake is, e.g.
    ``tasks.yaml: devices[0].tasks[0].retry: Input should be a valid integer``.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


class ProtocolError(HilError):
    """A request broke the OneNET protocol; ``errno`` is what the service answers."""

    def __init__(self, errno: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = errno
        self.reason = reason


class AuthorizationError(ProtocolError):
    """The Authorization value is missing, malformed, expired or its signature is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(1, reason)


class RigFault(HilError):
    """The bench could not run the test (Allure: broken).

    ``part`` is the rig part that failed (console, flasher, power, rf, lease...); ``rig`` the rig's
    name, filled in by whoever knows it (drivers do not): ``rig bench-01: console: port vanished``.
    """

    def __init__(self, part: str, message: str, rig: str | None = None) -> None:
        super().__init__(message)
        self.part = part
        self.message = message
        self.rig = rig

    def for_rig(self, rig: str) -> RigFault:
        """The same fault, naming ``rig`` (keeps the subclass)."""
        if self.rig is None:
            self.rig = rig
        return self

    def __str__(self) -> str:
        where = f"rig {self.rig}: " if self.rig else ""
        return f"{where}{self.part}: {self.message}"


class FirmwareFault(HilError, AssertionError):
    """The device under test did the wrong thing (Allure: failed). An ``AssertionError`` too:
    pytest and Allure count it as a failed check, where any other error is "broken"."""


class CommandRefused(FirmwareFault):
    """A console command was answered ``ERR <reason>``."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"{command!r} answered ERR {reason}")
        self.command = command
        self.reason = reason


class ExpectTimeout(FirmwareFault):
    """The console did not show the expected pattern in time; the message ends with the log tail."""


class BootLoop(FirmwareFault):
    """A host build run as a board (``hil.drivers.process``) exited by itself again and again
    right after starting: the board does not boot. The message names the exit statuses."""


class FirmwareCrash(FirmwareFault):
    """The board crashed: a Cortex-M fault read through the debug probe, an ESP32 panic read on
    its console. ``crash`` is the decoded evidence (``hil.drivers.crash.Crash``: cause, PC and
    function, fault status in words); the message is its summary line, then its report."""

    def __init__(self, crash: Crash) -> None:
        super().__init__(f"firmware crash: {crash.summary()}\n{crash.report()}")
        self.crash = crash


class ConformanceFailure(FirmwareFault):
    """The device's reports (or requests) broke the expectation profile; ``phase`` is the OTA
    phase the outcome is about, ``expected`` and ``received`` the report codes."""

    def __init__(self, phase: str, message: str, expected: tuple[int, ...] = (),
                 received: tuple[int, ...] = ()) -> None:
        super().__init__(f"{phase} phase: {message}")
        self.phase = phase
        self.expected = expected
        self.received = received


class ServiceFault(HilError):
    """The OTA service or the infrastructure between device and service failed."""


class ServiceCrashed(ServiceFault):
    """A request handler of the mock service raised; the device got errno 7 (internal error)."""


class FaultNotLanded(HilError):
    """A fault a scenario injected did not hit where and when it asked (a power cut meant for
    the flash write that came after the board had booted, a gateway fault whose range was never
    asked for): whatever the board did, the test did not test what it says. Neither the
    firmware's failure (not an ``AssertionError``) nor the bench's (the rig worked; the fault's
    timing or target did not meet the board's behaviour): the test is broken, an ERROR.

    ``fault`` is the fault's label (``power-cut during=flash``), ``reason`` what happened
    instead (``the board printed ota end first``)."""

    def __init__(self, fault: str, reason: str) -> None:
        super().__init__(f"fault {fault} never hit: {reason}")
        self.fault = fault
        self.reason = reason


class Unsupported(HilError):
    """The rig or the service cannot run this scenario (no power-cut supply, the real service
    where the task must be shaped): the test is skipped with this reason, not failed."""
