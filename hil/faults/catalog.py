"""Every fault a scenario injects, named once: where it is injected, what it needs, how.

A conformance scenario reads as one line per fault::

    ota.inject("stall")                        # once, at the download's third chunk
    ota.inject("stall", persistent=True)       # every request of that range: the board gives up
    ota.inject("error-byte", code=3)
    ota.inject("power-cut", during="flash")

Three places inject faults (``Where``):

- the **gateway**, on the wire between board and service, whatever service is behind it (the
  mock or the real OneNET): transport faults in Toxiproxy's vocabulary and HTTP faults. They
  hit the download's third chunk (the range holding byte ``at``, ``DEFAULT_AT``) unless
  ``phase=`` (and ``at=None``) says otherwise; ``persistent=True`` makes them hit every request
  for it instead of the first only;
- the **service**, on the task (thresholds, token expiry, cancel, pause, mismatches, no task):
  only the mock takes them, because on the real platform the operator owns the tasks;
- the **rig**: the bench supply or the ``test power`` hook, the attenuator or ``test signal``,
  ``test space``, the supply's output (a power cut) and ``sys reboot``; the moment is a
  gateway trigger (the n-th chunk) or a console event (``ota phase=flash``).

``needs`` lists the rig capabilities (``hil.pytest_plugin.CAPABILITIES``) and ``mock`` (the mock
service) a fault requires; a scenario skips, naming the fault and what is missing, elsewhere.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from hil.errors import Unsupported
from hil.gateway import Armed, Fault, FaultKind
from hil.onenet.messages import Endpoint

CHUNK = 4096                    # the chunk size of the reference agents (ONENET.md: 4 KiB)
DEFAULT_AT = 2 * CHUNK          # gateway faults hit the range holding this byte: the third chunk


class Where(enum.StrEnum):
    GATEWAY = "gateway"
    SERVICE = "service"
    RIG = "rig"


class Injection(Protocol):
    """What a fault is injected through: one scenario's gateway, service, rig and board."""

    @property
    def dev_id(self) -> str: ...

    @property
    def device_timeout(self) -> float:
        """How long the board waits for an HTTP answer (stall faults outlast it)."""

    def arm(self, fault: Fault) -> Armed:
        """Arm a gateway fault for this scenario (targeted at this board's requests)."""

    @property
    def base_package(self) -> Any:
        """The base build the board starts from (a ``Package``), or None."""

    def shape_task(self, **options: Any) -> None:
        """Options for the task the scenario creates (before it is created); ``task=None``:
        no task at all."""

    def operate(self, action: str) -> None:
        """An operator action on the live task: cancel, pause, expire-token, finish."""

    def set_power(self, percent: int) -> None: ...

    def set_signal(self, level: int) -> None: ...

    def set_free_space(self, size: int) -> None: ...

    def power_cycle(self) -> None:
        """Bench supply output off, then on again after a short dark period."""

    def send_console(self, command: str, **values: object) -> None:
        """A contract command, sent without waiting for its answer (from a trigger)."""

    def on_event(self, phase: str, action: Callable[[], None]) -> None:
        """Run ``action`` on the test's thread when the board prints ``ota phase=<phase>``."""


Params = dict[str, Any]
Inject = Callable[[Injection, Params], None]


@dataclass(frozen=True)
class FaultSpec:
    name: str
    where: Where
    summary: str
    inject: Inject
    needs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()         # what ``ota.inject(name, ...)`` takes besides targeting

    def label(self, params: Mapping[str, Any]) -> str:
        """The fault as a report shows it: ``stall persistent``, ``error-byte code=3``."""
        shown = [f"{key}={value}" for key, value in sorted(params.items())
                 if key not in ("persistent",) and not callable(value)]
        return " ".join([self.name, *(["persistent"] if params.get("persistent") else []),
                         *shown])


# ---------------------------------------------------------------------------------- gateway
_TARGETING = ("phase", "at", "persistent", "index", "probability", "seed")


def _gateway(kind: FaultKind, **defaults: Any) -> Inject:
    """Arm ``kind`` at the gateway; the scenario's parameters over ``defaults``."""

    def inject(injection: Injection, params: Params) -> None:
        values = {**defaults, **params}
        for name, value in values.items():
            if callable(value) and name != "action":
                values[name] = value(injection)      # defaults that depend on the rig
        phase = Endpoint(values.pop("phase", Endpoint.DOWNLOAD))
        at = values.pop("at", DEFAULT_AT if phase is Endpoint.DOWNLOAD else None)
        persistent = bool(values.pop("persistent", False))
        injection.arm(Fault(kind, phase=phase, dev_id=injection.dev_id, offset=at,
                            index=values.pop("index", 1),
                            count=None if persistent else 1,
                            probability=values.pop("probability", 1.0),
                            seed=values.pop("seed", 0), **values))
    return inject


def _outlasting(injection: Injection) -> float:
    """A stall longer than the board waits: its HTTP timeout fires first."""
    return injection.device_timeout + 1.0


# ---------------------------------------------------------------------------------- service
def _task(**options: Any) -> Inject:
    def inject(injection: Injection, params: Params) -> None:
        injection.shape_task(**{**options, **params})
    return inject


def _operator(action: str, default_phase: Endpoint) -> Inject:
    """The operator acts on the task just before the board's request of ``phase`` (the token
    check, or the download's third chunk) reaches the service."""

    def inject(injection: Injection, params: Params) -> None:
        phase = Endpoint(params.get("during", default_phase))
        at = params.get("at", DEFAULT_AT if phase is Endpoint.DOWNLOAD else None)
        injection.arm(Fault(FaultKind.HOOK, phase=phase, dev_id=injection.dev_id, offset=at,
                            action=lambda: injection.operate(action)))
    return inject


def _wrong_version(injection: Injection, params: Params) -> None:
    """The task says the new version but its package is the base build: the board installs
    it, boots, and runs a version that is not the target."""
    if injection.base_package is None:
        raise Unsupported("fault wrong-version: no base build (--hil-firmware) to deliver")
    injection.shape_task(package=injection.base_package)


# ---------------------------------------------------------------------------------- rig
def _low_power(injection: Injection, params: Params) -> None:
    level = int(params.get("level", 20))
    if params.get("during", "detect") == "flash":
        # When the board's 101 reaches the service: the battery sags between download and flash.
        injection.arm(Fault(FaultKind.HOOK, phase=Endpoint.REPORT, dev_id=injection.dev_id,
                            action=lambda: injection.set_power(level)))
    else:
        injection.set_power(level)


def _bad_signal(injection: Injection, params: Params) -> None:
    injection.set_signal(int(params.get("level", 5)))


def _no_space(injection: Injection, params: Params) -> None:
    injection.set_free_space(int(params.get("free", 1000)))


def _power_cut(injection: Injection, params: Params) -> None:
    during = params.get("during", "download")
    if during == "download":
        injection.arm(Fault(FaultKind.HOOK, phase=Endpoint.DOWNLOAD, dev_id=injection.dev_id,
                            offset=params.get("at", DEFAULT_AT), action=injection.power_cycle))
    elif during == "flash":
        injection.on_event("flash", injection.power_cycle)
    else:
        raise ValueError(f"power-cut: during={during!r}; give download or flash")


def _reboot(injection: Injection, params: Params) -> None:
    injection.arm(Fault(FaultKind.HOOK, phase=Endpoint.DOWNLOAD, dev_id=injection.dev_id,
                        offset=params.get("at", DEFAULT_AT),
                        action=lambda: injection.send_console("reboot")))


_G, _S, _R = Where.GATEWAY, Where.SERVICE, Where.RIG

CATALOG: dict[str, FaultSpec] = {spec.name: spec for spec in (
    # transport (Toxiproxy's names)
    FaultSpec("latency", _G, "the answer delayed (ms, jitter_ms)",
              _gateway(FaultKind.LATENCY, ms=300.0, jitter_ms=100.0), params=("ms", "jitter_ms")),
    FaultSpec("bandwidth", _G, "the answer trickles at rate bytes/s",
              _gateway(FaultKind.BANDWIDTH, rate=32 * 1024), params=("rate",)),
    FaultSpec("stall", _G, "no byte of the answer until the board's timeout has passed",
              _gateway(FaultKind.STALL, seconds=_outlasting), params=("seconds",)),
    FaultSpec("reset", _G, "the connection reset (TCP RST) after bytes of the answer",
              _gateway(FaultKind.RESET, bytes=0), params=("bytes",)),
    FaultSpec("limit", _G, "the connection closed after bytes of the answer",
              _gateway(FaultKind.LIMIT, bytes=100), params=("bytes",)),
    FaultSpec("slicer", _G, "the answer in tiny writes (size bytes, delay_ms apart)",
              _gateway(FaultKind.SLICER, size=64, delay_ms=0.2), params=("size", "delay_ms")),
    # HTTP
    FaultSpec("truncate", _G, "the body cut at byte bytes, Content-Length promising more",
              _gateway(FaultKind.TRUNCATE, bytes=1000), params=("bytes",)),
    FaultSpec("content-range", _G, "a Content-Range naming other bytes than those asked for",
              _gateway(FaultKind.CONTENT_RANGE, bytes=1), params=("bytes",)),
    FaultSpec("whole-file", _G, "200 with the whole file instead of 206 with the range",
              _gateway(FaultKind.WHOLE_FILE)),
    FaultSpec("error-byte", _G, "OneNET's one-byte error body (code 1..6), no Content-Length",
              _gateway(FaultKind.ERROR_BYTE, code=4), params=("code",)),
    FaultSpec("corrupt", _G, "package bytes flipped on the way (length unchanged)",
              _gateway(FaultKind.CORRUPT, bytes=1), params=("bytes",)),
    FaultSpec("http-5xx", _G, "an HTTP 5xx from the infrastructure (code)",
              _gateway(FaultKind.HTTP_5XX, code=503), params=("code",)),
    FaultSpec("drop", _G, "the connection closed with no answer",
              _gateway(FaultKind.DROP)),
    FaultSpec("auth", _G, "the board's Authorization altered on the way (variant)",
              _gateway(FaultKind.AUTH, phase=Endpoint.DETECT, variant="bad-sign"),
              params=("variant",)),
    # service
    FaultSpec("no-task", _S, "the service has no task for the board",
              _task(task=None), needs=("mock",)),
    FaultSpec("thresholds", _S, "the task runs only above signal / power",
              _task(signal=10, power=50), needs=("mock",), params=("signal", "power")),
    FaultSpec("manuf-mismatch", _S, "the task is for another manuf/model",
              _task(manuf="100", model="10001"), needs=("mock",), params=("manuf", "model")),
    FaultSpec("version-mismatch", _S, "a delta task from a version the board does not run",
              _task(delta_from="0.9.0"), needs=("mock",), params=("delta_from",)),
    FaultSpec("wrong-version", _S, "the package boots as another version than the target",
              _wrong_version, needs=("mock",)),
    FaultSpec("token-expired", _S, "the task's token expires (at token check, or mid-download)",
              _operator("expire-token", Endpoint.TOKEN_CHECK), needs=("mock",),
              params=("during",)),
    FaultSpec("task-finished", _S, "the task finished elsewhere before the token check",
              _operator("finish", Endpoint.TOKEN_CHECK), needs=("mock",), params=("during",)),
    FaultSpec("cancel", _S, "the operator cancels the task (at token check, or mid-download)",
              _operator("cancel", Endpoint.TOKEN_CHECK), needs=("mock",), params=("during",)),
    FaultSpec("pause", _S, "the operator pauses the task mid-download",
              _operator("pause", Endpoint.DOWNLOAD), needs=("mock",), params=("during",)),
    # rig
    FaultSpec("low-power", _R, "the battery below the task's threshold (supply or test power)",
              _low_power, params=("level", "during")),
    FaultSpec("bad-signal", _R, "the signal below the task's threshold (attenuator or test "
              "signal)", _bad_signal, params=("level",)),
    FaultSpec("no-space", _R, "less free package storage than the package (test space)",
              _no_space, needs=("space",), params=("free",)),
    FaultSpec("power-cut", _R, "the supply's output off, then on (during download or flash)",
              _power_cut, needs=("power_cut",), params=("during", "at")),
    FaultSpec("reboot", _R, "sys reboot mid-download", _reboot, params=("at",)),
)}


def fault_spec(name: str) -> FaultSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise ValueError(f"unknown fault {name!r}; the catalog has: {', '.join(CATALOG)}") \
            from None


def check_params(spec: FaultSpec, params: Mapping[str, Any]) -> None:
    allowed = set(spec.params) | (set(_TARGETING) if spec.where is Where.GATEWAY else set())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"fault {spec.name}: unknown parameter {unknown[0]!r}; it takes "
                         f"{', '.join(sorted(allowed)) or 'none'}")
