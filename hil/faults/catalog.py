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
  gateway trigger (the n-th chunk) or a console event (``ota phase=flash``). A simulated
  board's bench also fails flash writes (``bad-sector``: the sector its install request is
  written to goes bad), which no real rig can do at will.

``needs`` lists the rig capabilities (``hil.pytest_plugin.CAPABILITIES``) and ``mock`` (the mock
service) a fault requires; a scenario skips, naming the fault and what is missing, elsewhere.
``during`` lists the moments a fault can be injected at; any other ``during=`` (or a ``phase=``
that is not an OTA phase) is refused at ``inject`` with the allowed values.

**Every fault proves it landed** (``InjectedFault.not_landed``, checked by the plugin when the
test is over; a fault that did not land ends the test as an ERROR, ``FaultNotLanded``): a
gateway fault must have hit a request (its hits are the exchanges carrying its label); a console
trigger must have fired, where its check says (the power cut during the flash write came before
the board booted again); a level set before the update must show in the board's detect
(``power=20``); a shaped task must have been asked for. Hits that no exchange shows are
recorded in the timeline (``hil.service.timeline.FaultHit``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from hil.drivers.contract import Event
from hil.errors import Unsupported
from hil.gateway import Armed, Fault, FaultKind
from hil.onenet.messages import Endpoint
from hil.onenet.tasks import Package
from hil.rig.board import Board
from hil.rig.model import Rig
from hil.service.timeline import Exchange, FaultHit

CHUNK = 4096                    # the chunk size of the reference agents (ONENET.md: 4 KiB)
DEFAULT_AT = 2 * CHUNK          # gateway faults hit the range holding this byte: the third chunk


class Where(enum.StrEnum):
    GATEWAY = "gateway"
    SERVICE = "service"
    RIG = "rig"


def event_text(event: Event) -> str:
    """The event as the board printed it (``ota phase=flash bytes=66192``)."""
    return " ".join([event.tag, *(f"{key}={value}" for key, value in event.fields.items())])


Landing = Callable[["InjectedFault"], "str | None"]


@dataclass
class InjectedFault:
    """One fault a scenario injected, and what shows where it hit."""

    label: str                    # "stall persistent", as the report shows it
    where: str
    armed: list[Armed] = field(default_factory=list)        # at the gateway
    hits: list[FaultHit] = field(default_factory=list)      # recorded in the timeline
    fired: list[int] = field(default_factory=list)          # trace length when a trigger fired
    landings: list[Landing] = field(default_factory=list)   # why it did not land, or None

    def not_landed(self) -> str | None:
        """Why this fault did not hit where and when it asked, or None when it did."""
        for armed in self.armed:
            if armed.hits == 0:
                return _missed(armed)
        for check in self.landings:
            reason = check(self)
            if reason is not None:
                return reason
        return None


def _missed(armed: Armed) -> str:
    fault = armed.fault
    what = f"{fault.phase.value} request" if fault.phase is not None else "request"
    if fault.offset is not None:
        what += f" holding byte {fault.offset}"
    if fault.index > 1:
        return f"it targets the {_ordinal(fault.index)} {what} and the board made " \
               f"{armed.matched}"
    return f"the board made no {what}"


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(
        number % 10, "th")
    return f"{number}{suffix}"


class Injection(Protocol):
    """What a fault is injected through: one scenario's gateway, service, rig and board."""

    @property
    def dev_id(self) -> str: ...

    @property
    def rig(self) -> Rig: ...

    @property
    def board(self) -> Board: ...

    @property
    def package(self) -> Package:
        """The package under test (the build the task delivers)."""

    @property
    def device_timeout(self) -> float:
        """How long the board waits for an HTTP answer (stall faults outlast it)."""

    def arm(self, fault: Fault) -> Armed:
        """Arm a gateway fault for this scenario (targeted at this board's requests)."""

    @property
    def target(self) -> str:
        """The version the update under test boots as."""

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

    def reboot(self) -> None:
        """The board rebooted: ``sys reboot`` through its shell, or a reset through the rig's
        flasher (a board without a shell)."""

    def on_event(self, phase: str, action: Callable[[Event], str | None], *,
                 when: Callable[[Event], bool] | None = None) -> None:
        """Run ``action`` on the test's thread when the board prints ``ota phase=<phase>`` (the
        first such event ``when`` accepts); what it returns is the hit's detail. The hit is
        recorded for the fault being injected."""

    def record_hit(self, phase: str, **where: Any) -> None:
        """Record a hit of the fault being injected (one that no exchange shows)."""

    def landing(self, check: Landing) -> None:
        """A condition the fault being injected must meet once the test is over."""

    def exchanges(self, phase: Endpoint | None = None) -> list[Exchange]: ...

    @property
    def trace(self) -> list[Event]:
        """The board's events and boot lines so far, in order."""


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
    during: tuple[str, ...] = ()         # the values ``during=`` takes (the first: the default)

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
def _detect_after(injection: Injection, what: str, shown: tuple[str, int] | None = None
                  ) -> Landing:
    """A fault applied before the update (a shaped task, a level set) lands at the board's
    next detect: there must be one, and, for a level, its query must carry it (``power=20``):
    the board read the level the fault set, not one from before."""
    before = len(injection.exchanges())

    def check(fault: InjectedFault) -> str | None:
        del fault
        detects = [e for e in injection.exchanges()[before:] if e.phase is Endpoint.DETECT]
        if not detects:
            return f"the board made no detect request after {what}"
        if shown is not None:
            key, value = shown
            said = parse_qs(urlsplit(detects[0].target).query).get(key, ["(none)"])[0]
            if said != str(value):
                return f"the board's detect (exchange #{detects[0].seq}) said {key}={said}, " \
                       f"not the {value} the fault set"
        return None
    return check


def _task(**options: Any) -> Inject:
    def inject(injection: Injection, params: Params) -> None:
        shaped = {**options, **params}
        injection.shape_task(**shaped)
        injection.record_hit("detect", detail="the task shaped before the update: " + (
            ", ".join(f"{key}={value}" for key, value in sorted(shaped.items()))
            if shaped != {"task": None} else "no task"))
        injection.landing(_detect_after(injection, "the task was shaped"))
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
    _task(package=injection.base_package)(injection, {})


def _oversized_image(injection: Injection, params: Params) -> None:
    """The task delivers the package under test with its image's header saying it fills twice
    the board's slot: the transfer and the md5 are good, the image cannot be installed."""
    from hil.sim.images import SLOT_SIZE, claim_span

    board = injection.rig.board
    package = injection.package
    try:
        data = claim_span(board, package.data, 2 * SLOT_SIZE[board])
    except (KeyError, ValueError) as error:
        raise Unsupported(f"fault oversized-image: the package under test is no {board} image "
                          f"whose header hil can rewrite ({error})") from None
    _task(package=Package(data, f"oversized-{package.filename}"))(injection, {})


def _boot_package(injection: Injection, fault: str, version: str, **build: Any) -> Package:
    """A build of ``version`` for the rig's simulated board, made as ``build`` asks
    (``hil.sim.images.build_image``): only hil's own images can be rebuilt so (signed with its
    keys: imgtool's for MCUboot, Secure Boot V2's for the ESP32); a scenario skips elsewhere,
    naming what it needs."""
    from hil.sim.images import build_image

    rig = injection.rig
    if injection.board.parts.bench is None:
        where = f"rig {rig.name} has no shell: fault {fault}" if injection.board.shell_less \
            else f"fault {fault}: rig {rig.name} is no simulated board; it"
        raise Unsupported(f"{where} needs a simulated board's bootloader (MCUboot or ESP-IDF's, "
                          "with test/confirm/revert, signature check and downgrade prevention) "
                          "and the images hil builds for it (sim-esp32, sim-nrf52832, sim-gd32)")
    try:
        data = build_image(rig.board, version, **build)
    except ValueError as error:
        raise Unsupported(f"fault {fault}: cannot build a {rig.board} image of version "
                          f"{version}: {error}") from None
    return Package(data, f"{fault}-{version}.bin")


def _booted_after(injection: Injection, what: str) -> Landing:
    """Lands when the board booted again after the fault was injected: it ran the package
    through its bootloader (``what`` says what that proves)."""
    def check(fault: InjectedFault) -> str | None:
        del fault
        if not any(event.tag == "boot" for event in injection.trace):
            return f"the board never rebooted to install the package ({what})"
        return None
    return check


def _fails_self_test(injection: Injection, params: Params) -> None:
    """The task delivers a build of the target version whose self-test fails: it boots, resets
    before confirming itself, and a bootloader that tests upgrades reverts it. Lands when the
    board booted that build."""
    package = _boot_package(injection, "fails-self-test", injection.target,
                               fails_self_test=True)
    _task(package=package)(injection, {})
    target = injection.target

    def check(fault: InjectedFault) -> str | None:
        if injection.board.shell_less:
            # Its boots are the versions the service heard, and the failing build resets
            # before it says anything: a reboot after the download is what shows.
            return _booted_after(injection, "and ran the build that fails its self-test")(fault)
        if not any(event.tag == "boot" and event.fields.get("version") == target
                   for event in injection.trace):
            return f"the board never booted the build that fails its self-test ({target})"
        del fault
        return None
    injection.landing(check)


def _wrong_key(injection: Injection, params: Params) -> None:
    """The task delivers a build of the target version signed with an imgtool key the board's
    bootloader does not trust (``hil.sim.images.SIGNING_KEYS``: imgtool's for MCUboot, Secure Boot
    V2's for the ESP32)."""
    package = _boot_package(injection, "wrong-key", injection.target, key="other")
    _task(package=package)(injection, {})
    injection.landing(_booted_after(injection, "its bootloader checks the signature"))


def older_version(version: str) -> str | None:
    """A version below ``version`` (MAJOR.MINOR.REVISION): the revision one less, else the
    minor, else the major one less with minor 9 (1.0.0 gives 0.9.0); None below 0.0.1."""
    parts = version.split("+")[0].split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        return None
    major, minor, revision = (int(part) for part in parts)
    if revision:
        return f"{major}.{minor}.{revision - 1}"
    if minor:
        return f"{major}.{minor - 1}.0"
    return f"{major - 1}.9.0" if major else None


def _downgrade(injection: Injection, params: Params) -> None:
    """The task offers a signed build older than the version the board runs (its base build),
    as its target: an operator's mistake, or an old build replayed."""
    from hil.sim.images import ESP32_SECURE_VERSION, image_version

    base = injection.base_package
    if base is None:
        raise Unsupported("fault downgrade: no base build (--hil-firmware) to be older than")
    try:
        running = image_version(injection.rig.board, base.data)
    except (KeyError, ValueError) as error:
        raise Unsupported(f"fault downgrade: the base build's version cannot be read "
                          f"({error})") from None
    older = older_version(running)
    if older is None:
        raise Unsupported(f"fault downgrade: no version is older than the base's {running}")
    # ESP-IDF's anti-rollback compares the images' secure_version, not their versions: the
    # older build is one with a lower secure_version, as a build before a security fix is.
    build = {"secure_version": ESP32_SECURE_VERSION - 1} if injection.rig.board == "esp32" \
        else {}
    package = _boot_package(injection, "downgrade", older, **build)
    _task(package=package, target=older)(injection, {})
    injection.landing(_booted_after(injection, "its bootloader compares the versions"))


# ---------------------------------------------------------------------------------- rig
def _low_power(injection: Injection, params: Params) -> None:
    """The battery below the task's threshold: before the update (the board's detect carries
    the level), while the download is under way (when its third chunk is asked for: the board
    must not write its flash on a sagging battery, 105), or between download and flash (when
    its 101 reaches the service: 202)."""
    level = int(params.get("level", 20))
    during = params.get("during", "detect")
    if during == "download":
        injection.arm(Fault(FaultKind.HOOK, phase=Endpoint.DOWNLOAD, dev_id=injection.dev_id,
                            offset=params.get("at", DEFAULT_AT),
                            action=lambda: injection.set_power(level)))
    elif during == "flash":
        injection.arm(Fault(FaultKind.HOOK, phase=Endpoint.REPORT, dev_id=injection.dev_id,
                            action=lambda: injection.set_power(level)))
    else:
        injection.set_power(level)
        injection.record_hit("detect", detail=f"battery at {level} % before the update")
        injection.landing(_detect_after(injection, "the battery was lowered", ("power", level)))


def _bad_signal(injection: Injection, params: Params) -> None:
    level = int(params.get("level", 5))
    injection.set_signal(level)
    injection.record_hit("detect", detail=f"signal at {level} before the update")
    injection.landing(_detect_after(injection, "the signal was lowered", ("signal", level)))


def _no_space(injection: Injection, params: Params) -> None:
    free = int(params.get("free", 1000))
    injection.set_free_space(free)
    injection.record_hit("detect", detail=f"free package storage {free} bytes (the board "
                         "acknowledged test space)")
    injection.landing(_detect_after(injection, "the free space was lowered"))


def _power_cut(injection: Injection, params: Params) -> None:
    during = params.get("during", "download")
    if during == "download":
        injection.arm(Fault(FaultKind.HOOK, phase=Endpoint.DOWNLOAD, dev_id=injection.dev_id,
                            offset=params.get("at", DEFAULT_AT), action=injection.power_cycle))
        injection.landing(_boots_again(injection))
        return

    # during=flash: held until the write is under way. The board announces the write as it
    # starts it (``ota phase=flash bytes=N``, printed by the installer just before its first
    # erase, hil.sim.firmware); the cut comes at that line, while the write goes on for its
    # page erases and word writes (hundreds of ms on the real parts).
    def cut(event: Event) -> str:
        injection.power_cycle()
        return "supply output off while the image was being written, then on"

    injection.on_event("flash", cut, when=lambda event: "bytes" in event.fields)
    injection.landing(_cut_mid_write(injection))


def _boots_again(injection: Injection) -> Landing:
    def check(fault: InjectedFault) -> str | None:
        del fault
        if not any(event.tag == "boot" for event in injection.trace):
            return "the board never booted again after it (no boot line)"
        return None
    return check


def _cut_mid_write(injection: Injection) -> Landing:
    """The cut came between the write's start and the end of that write: after it, the board
    did not boot the target before it announced a write again (the installer starting the
    interrupted copy over); or it booted its old image (the install did not take), or went
    silent (a board the cut left without a bootable image). A boot of the target first means
    the write was over when the cut came."""
    def check(fault: InjectedFault) -> str | None:
        trace = injection.trace
        if not fault.fired:
            last = next((event_text(e) for e in reversed(trace)), "nothing")
            return f"the board never announced a flash write (ota phase=flash bytes=...); " \
                   f"its last event was {last!r}, then it printed ota end first"
        after = trace[fault.fired[0]:]
        first = next((e for e in after if e.tag == "boot" or e.fields.get("phase") == "flash"),
                     None)
        if first is not None and first.tag == "boot" \
                and first.fields.get("version") == injection.target:
            return f"the cut came after the write: the board printed {event_text(first)!r} " \
                   "before the cut took it"
        return None
    return check


def _bad_sector(injection: Injection, params: Params) -> None:
    """The sector a simulated board writes its install request to (MCUboot's image trailer, its
    secondary slot's last; the ESP32's otadata sector its switch writes) goes bad: every erase
    and program of it fails. Lands when the board tried to write it. It does not outlive the
    test: a simulated bench, its flash with it, lives for one test, and the landing check makes
    the sector good again all the same."""
    rig, bench = injection.rig, injection.board.parts.bench
    if bench is None:
        if injection.board.shell_less:
            raise Unsupported(f"rig {rig.name} has no shell: fault bad-sector needs a simulated "
                              "board's flash (a sim rig): the console contract has no hook "
                              "that fails a flash write")
        raise Unsupported(f"fault bad-sector: rig {rig.name} is not simulated (no sim: "
                          "section); a bad sector can only be injected into a simulated "
                          "board's flash")
    from hil.sim.firmware import install_request_at
    from hil.sim.layout import layout_of

    layout = layout_of(rig.board)
    flash = bench.flash(layout.secondary.chip)
    at = install_request_at(layout, flash)
    flash.mark_bad(at)
    injection.record_hit("flash", detail=f"sector {at:#x} of the {layout.secondary.chip} flash "
                         "(the install request's) made bad before the update")

    refused: list[int] = []         # read once: the sector is good again after the first check

    def check(fault: InjectedFault) -> str | None:
        del fault
        if not refused:
            refused.append(flash.refused(at))
            flash.mark_good(at)
        if refused[0] == 0:
            return f"the board never wrote to sector {at:#x}, which the fault made bad"
        return None
    injection.landing(check)


def _reboot(injection: Injection, params: Params) -> None:
    injection.arm(Fault(FaultKind.HOOK, phase=Endpoint.DOWNLOAD, dev_id=injection.dev_id,
                        offset=params.get("at", DEFAULT_AT),
                        action=injection.reboot))
    injection.landing(_boots_again(injection))


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
    FaultSpec("oversize", _G, "a 206 longer than the range asked (bytes more than the board's "
              "chunk, its receive buffer)", _gateway(FaultKind.OVERSIZE, bytes=CHUNK),
              params=("bytes",)),
    FaultSpec("error-byte", _G, "OneNET's one-byte error body (code 1..6), no Content-Length; "
              "form=raw (the platform's byte) or ascii (the digit other servers send)",
              _gateway(FaultKind.ERROR_BYTE, code=4), params=("code", "form")),
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
    FaultSpec("oversized-image", _S, "the package's image says it is larger than the slot",
              _oversized_image, needs=("mock",)),
    FaultSpec("fails-self-test", _S, "the package is a build of the target that fails its "
              "self-test (resets before confirming itself)", _fails_self_test, needs=("mock",)),
    FaultSpec("wrong-key", _S, "the package is signed with a key the bootloader does not trust",
              _wrong_key, needs=("mock",)),
    FaultSpec("downgrade", _S, "the task's package is older than the version the board runs",
              _downgrade, needs=("mock",)),
    FaultSpec("token-expired", _S, "the task's token expires (at token check, or mid-download)",
              _operator("expire-token", Endpoint.TOKEN_CHECK), needs=("mock",),
              params=("during", "at"), during=("token", "download")),
    FaultSpec("task-finished", _S, "the task finished elsewhere before the token check",
              _operator("finish", Endpoint.TOKEN_CHECK), needs=("mock",),
              params=("during", "at"), during=("token", "download")),
    FaultSpec("cancel", _S, "the operator cancels the task (at token check, or mid-download)",
              _operator("cancel", Endpoint.TOKEN_CHECK), needs=("mock",),
              params=("during", "at"), during=("token", "download")),
    FaultSpec("pause", _S, "the operator pauses the task mid-download",
              _operator("pause", Endpoint.DOWNLOAD), needs=("mock",),
              params=("during", "at"), during=("download", "token")),
    # rig
    FaultSpec("low-power", _R, "the battery below the task's threshold (supply or test power)"
              ": before detect, mid-download or before the flash", _low_power,
              params=("level", "during", "at"), during=("detect", "download", "flash")),
    FaultSpec("bad-signal", _R, "the signal below the task's threshold (attenuator or test "
              "signal)", _bad_signal, params=("level",)),
    FaultSpec("no-space", _R, "less free package storage than the package (test space)",
              _no_space, needs=("space",), params=("free",)),
    FaultSpec("power-cut", _R, "the supply's output off, then on (during download or flash)",
              _power_cut, needs=("power_cut",), params=("during", "at"),
              during=("download", "flash")),
    FaultSpec("reboot", _R, "sys reboot (or a reset through the flasher) mid-download", _reboot,
              params=("at",)),
    FaultSpec("bad-sector", _R, "the flash sector of the install request goes bad (a simulated "
              "board)", _bad_sector),
)}


def needs_a_shell(name: str, params: Mapping[str, Any], *, power: str, rf: str,
                  flasher: str = "none", narrates: bool = False) -> str | None:
    """What fault ``name`` needs of a firmware with the console contract's shell on a rig
    whose power, rf and flasher parts are of these kinds (``narrates``: the firmware's log
    prints the contract's phase lines, ``console.events.phase``), or None when the gateway, the
    rig's instruments and the log do it all. A board without a shell cannot give it: the
    scenario skips, saying so (``OtaScenario.inject``)."""
    if name == "no-space":
        return "the firmware hook `test space`"
    if name == "reboot" and flasher == "none":      # else a reset through the flasher
        return "the firmware hook `sys reboot`"
    if name == "low-power" and power != "scpi":
        # A USB hub port or a relay (power.kind usb-hub, command) cuts, but sets no voltage.
        return ("a bench supply that sets a level (power.kind: scpi) or the firmware hook "
                "`test power`")
    if name == "bad-signal" and rf != "attenuator":
        return "an attenuator (rf.kind: attenuator) or the firmware hook `test signal`"
    if name == "power-cut" and params.get("during") == "flash" and not narrates:
        # The cut is timed to the write by the board's own line (``ota phase=flash bytes=N``):
        # the service sees nothing between the 101 and the reboot to time it by.
        return ("the firmware hook `ota phase=flash bytes=N` (the contract's flash-write line, "
                "which the cut is timed by)")
    return None


def fault_spec(name: str) -> FaultSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise ValueError(f"unknown fault {name!r}; the catalog has: {', '.join(CATALOG)}") \
            from None


# The OTA phases a gateway fault's ``phase=`` may name: the requests a board makes.
PHASES = tuple(phase.value for phase in Endpoint if phase is not Endpoint.UNKNOWN)


def check_params(spec: FaultSpec, params: Mapping[str, Any]) -> None:
    """Refuse what the fault does not take: an unknown parameter, a ``during=`` it cannot be
    injected at, a ``phase=`` that is no OTA phase, an ``at=`` where there is no byte offset."""
    allowed = set(spec.params) | (set(_TARGETING) if spec.where is Where.GATEWAY else set())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"fault {spec.name}: unknown parameter {unknown[0]!r}; it takes "
                         f"{', '.join(sorted(allowed)) or 'none'}")
    if "during" in params and params["during"] not in spec.during:
        raise ValueError(f"fault {spec.name}: during={params['during']!r} is not supported; "
                         f"it takes during={' or '.join(spec.during)}")
    if "phase" in params and params["phase"] not in PHASES:
        raise ValueError(f"fault {spec.name}: phase={params['phase']!r} is not supported; it "
                         f"takes phase={' or '.join(PHASES)}")
    phase = params.get("during", params.get("phase", spec.during[0] if spec.during else None))
    if params.get("at") is not None and phase not in (None, "download"):
        raise ValueError(f"fault {spec.name}: at={params['at']!r} is a byte offset of the "
                         f"download; it does not apply to {phase}")
