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
    ├── FirmwareFault          the device under test misbehaved: wrong or missing report code
    └── ServiceFault           the OTA service or the infrastructure around it failed
        └── ServiceCrashed     the mock raised on its server thread (re-raised on the test thread)
"""

from __future__ import annotations


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
    """The bench could not run the test (Allure: broken)."""


class FirmwareFault(HilError):
    """The device under test did the wrong thing (Allure: failed)."""


class ServiceFault(HilError):
    """The OTA service or the infrastructure between device and service failed."""


class ServiceCrashed(ServiceFault):
    """A request handler of the mock service raised; the device got errno 7 (internal error)."""
