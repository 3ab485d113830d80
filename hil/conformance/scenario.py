"""One conformance scenario on one rig: the task, the faults, the board's attempts, the verdict.

    ota.inject("stall", persistent=True)      # hil.faults.catalog names every fault
    attempt = ota.update()                    # ota check, until ota end
    ota.expect("retries-timeout")             # the profile's codes, and nothing else reported
    ota.expect_retries(attempt)               # retry + 1 tries of the failing range, spaced

The source of truth is the gateway's timeline: every exchange the board made, with the
service's answers (whether the mock or the real OneNET is behind it) and the fault that hit it.
The console explains it: its events are kept in order with the boot lines (``trace``), so that
"201 only after the reboot" can be checked from the board's own narration.

A board without a shell (``console.shell: none``) is read at the service instead: an attempt
starts with the rig's trigger (a reset, a power cycle, the firmware's timer) and is its
requests from then on; it ends on a
final report (any result but 101), a refused detect or a token check answered 12/20/22 (the
task is over: the board stops without a report) followed by ``QUIET_AFTER_END_S`` with no
request (after a 201 it took, ``silence()``: the check of the boot that sent it follows), on
``silence()`` seconds with no request at all, or (``until_boot``) on the next boot. A rig that
names its log's phase lines (``console.events.phase``) has those the service cannot tell
(``ota phase=flash bytes=N``) acted on as they come, and placed among the exchanges.
Its events are the exchanges, told as the contract's events (``ota phase=report result=201``);
its boot lines are the version reports that follow the first (a boot-log line,
``console.events.boot``, tells ``Board.version`` what runs, but its stamp cannot bound
exchanges: the console is polled, and lags on a loaded host). From the service
alone a 201 sent just before the reboot cannot be told by its time from one sent just after
it: on a shell-less board the order checks are that the board reported the target version
after its 201, and that the 201 did not come on a TCP connection its download or 101 used (a
reboot closes them; the gateway numbers connections).

A board that crashes during an attempt ends the wait at once: an ESP32's panic is read on its
console, a Cortex-M's fault through its SWD probe (``hil.drivers.crash``), and ``update`` raises
``FirmwareCrash`` with the decoded crash (kept as ``crash``, its attempt recorded first).

A broken expectation raises ``ConformanceFailure`` naming the phase, the expected and the
received codes; a scenario the rig or service cannot run raises ``Unsupported`` (a skip). Once
the test is over, ``check_faults_landed`` raises ``FaultNotLanded`` for a fault that never hit
where and when it asked (the plugin calls it: the test is an ERROR, whatever it asserted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import requests

from hil.conformance.energy import (
    SAMPLE_INTERVAL_S,
    CurrentSampler,
    Curve,
    PhaseCharge,
    check_budget,
    per_phase,
    phase_marks,
)
from hil.conformance.expectations import Profile
from hil.drivers.base import measures_current
from hil.drivers.contract import Event, parse_event
from hil.drivers.crash import (
    ConsolePanicWatch,
    Crash,
    CrashWatch,
    NoWatch,
    SwdFaultWatch,
    check,
)
from hil.drivers.elf import ElfSymbols
from hil.drivers.hooks import ConsoleHookPower, ConsoleHookRf
from hil.drivers.power import power_cycle
from hil.errors import (
    ConformanceFailure,
    ExpectTimeout,
    FaultNotLanded,
    FirmwareCrash,
    HilError,
    ProtocolError,
    Unsupported,
)
from hil.faults.catalog import (
    InjectedFault,
    Landing,
    check_params,
    event_text,
    fault_spec,
    needs_a_shell,
)
from hil.gateway import Armed, Fault, FaultKind, Gateway
from hil.gateway.dns import DnsServer
from hil.onenet.codes import Errno
from hil.onenet.messages import DetectAnswer, Endpoint
from hil.onenet.ranges import resolve_range
from hil.onenet.tasks import Package, Task
from hil.rig.board import Board
from hil.rig.model import Rig
from hil.service.server import MockOneNet
from hil.service.timeline import Exchange, FaultHit

log = logging.getLogger(__name__)

DEFAULT_RETRY = 2                 # the suite's tasks: two retries, one second apart
DEFAULT_INTERVAL = 1
POWER_DARK_S = 0.3                # how long a power cut keeps the board dark
_SLOWEST_LINK = 20_000            # bytes/s a slow lab board still downloads at
# An attempt's own work besides the transfer (version, detect, reports, the install's copy and
# reboot): a simulated board's or a host build's takes seconds at most; a real MCUboot copying
# 1 MiB takes tens of seconds.
_SLACK_SIM_S, _SLACK_REAL_S = 4.0, 60.0
# A shell-less board's attempt is over this long after its final report or refused detect, if
# nothing followed (a board that goes on after either does so within a round trip).
QUIET_AFTER_END_S = 0.5
_POLL_S = 0.05
# How long an attempt's end waits for the gateway to record the answers its board already has
# (a device that closed its side: until its kernel acknowledged the answer, at most 5 s).
RECORD_WAIT_S = 10.0


@dataclass
class Attempt:
    """One ``ota check``: the events the board printed and the exchanges it made."""

    events: list[Event]
    exchanges: list[Exchange]
    ended: bool                   # printed ``ota end`` (not cut short, not timed out)
    timed_out: bool = False
    trace: list[Event] = field(default_factory=list)     # the events with the boot lines
    crash: Crash | None = None    # the board crashed: the attempt ended there
    # What it drew, where the rig's supply measures current (hil.conformance.energy).
    energy: Curve | None = None
    charges: list[PhaseCharge] = field(default_factory=list)

    def requests(self, phase: Endpoint) -> list[Exchange]:
        return [exchange for exchange in self.exchanges if exchange.phase is phase]

    def download_starts(self) -> list[int]:
        """The first byte of each ranged download request, in order."""
        return [_range_start(exchange) for exchange in self.requests(Endpoint.DOWNLOAD)]

    @property
    def detect_errno(self) -> int | None:
        detects = self.requests(Endpoint.DETECT)
        return detects[0].errno if detects else None

    @property
    def offered(self) -> DetectAnswer | None:
        """The task the service offered at this attempt's detect (its retry, interval, size):
        known whether the mock or the operator of a real service made it."""
        for detect in self.requests(Endpoint.DETECT):
            data = (detect.answer or {}).get("data")
            if detect.errno == Errno.OK and data is not None:
                try:
                    return DetectAnswer.from_data(data)
                except ProtocolError:
                    return None
        return None


@dataclass
class _Trigger:
    """A console trigger of one fault: ``action`` at the first event of ``phase`` that
    ``when`` accepts."""

    fault: InjectedFault
    phase: str
    action: Callable[[Event], str | None]
    when: Callable[[Event], bool] | None


def _whole(exchange: Exchange) -> bool:
    """The board got the whole range it asked for (206, as long as its Content-Range says)."""
    if exchange.status != 206 or not exchange.content_range or not exchange.length:
        return False
    span = exchange.content_range.removeprefix("bytes ").partition("/")[0]
    first, _, last = span.partition("-")
    return first.isdigit() and last.isdigit() and int(last) - int(first) + 1 == exchange.length


def _range_start(exchange: Exchange) -> int:
    wanted = resolve_range(exchange.range, 1 << 62)
    return wanted.start if wanted is not None else 0


def reported_version(exchange: Exchange) -> str | None:
    """The version a version report (``s_version``, else ``f_version``) or a detect query
    (``version=``) says the board runs; None for other exchanges."""
    if exchange.phase is Endpoint.VERSION:
        try:
            body = json.loads(exchange.request_body)
        except ValueError:
            return None
        version = (body.get("s_version") or body.get("f_version")) \
            if isinstance(body, dict) else None
        return version if isinstance(version, str) else None
    if exchange.phase is Endpoint.DETECT:
        return parse_qs(urlsplit(exchange.target).query).get("version", [None])[0]
    return None


def told(exchange: Exchange) -> Event:
    """An exchange as the contract's event would tell it (``ota phase=report result=201
    errno=0``): a shell-less board's narration, read at the service."""
    fields: dict[str, str] = {"phase": exchange.phase.value}
    if exchange.phase is Endpoint.DOWNLOAD:
        fields["offset"] = str(_range_start(exchange))
        fields["status"] = str(exchange.status)
    if exchange.phase is Endpoint.VERSION:
        fields["version"] = str(reported_version(exchange))
    if exchange.result is not None:
        fields["result"] = str(exchange.result)
    if exchange.errno is not None:
        fields["errno"] = str(exchange.errno)
    return Event("ota", fields)


class _PhaseLog:
    """The phase lines (``console.events.phase``) of a shell-less board's log that the service
    cannot tell (``ota phase=flash bytes=N``, ``verify``), read as they come, each with when it
    was read: the moment a trigger acts on it, and its place among the exchanges (a line is read
    within a poll of being printed, well before a write it announces is over)."""

    def __init__(self, board: Board) -> None:
        self.console = board.console
        self.pattern = board.contract.events["phase"]
        self.mark = self.console.mark()
        self.heard: list[tuple[float, Event]] = []

    def read(self) -> list[Event]:
        lines = self.console.lines()[self.mark:]
        self.mark += len(lines)
        new = []
        for line in lines:
            match = self.pattern.search(line.text)
            if match is None or match.group("phase") in _TOLD_PHASES:
                continue
            event = parse_event(line.text) or Event("ota", {"phase": match.group("phase")})
            self.heard.append((time.time(), event))
            new.append(event)
        return new


_TOLD_PHASES = frozenset(phase.value for phase in Endpoint)   # the service tells these

# Token-check answers after which a board ends its attempt without a report (ONENET.md).
_TOKEN_ENDED = (Errno.TOKEN_EXPIRED, Errno.TASK_FINISHED, Errno.TASK_CANCELLED)


def _upgraded(exchange: Exchange) -> bool:
    """A 201 the service took (a report, or a progress step)."""
    return exchange.result == 201 and exchange.errno == Errno.OK and \
        (exchange.phase is Endpoint.REPORT or exchange.phase is Endpoint.PROGRESS)


def _final(exchange: Exchange) -> bool:
    """The board's last word in an attempt: a result other than 101, a refused detect, or a
    token check answered that the task is over."""
    if exchange.result is not None and exchange.result > 101 and \
            (exchange.phase is Endpoint.REPORT or exchange.phase is Endpoint.PROGRESS):
        return True
    if exchange.phase is Endpoint.TOKEN_CHECK:
        return exchange.errno in _TOKEN_ENDED
    return exchange.phase is Endpoint.DETECT and exchange.errno not in (None, Errno.OK)


class OtaScenario:
    """See the module docstring. The plugin's ``ota`` fixture builds one per test."""

    def __init__(self, *, rig: Rig, board: Board, gateway: Gateway, mock: MockOneNet | None,
                 profile: Profile, package: Package, target: str,
                 base_package: Package | None = None, dns: DnsServer | None = None,
                 elf: Path | None = None) -> None:
        self.rig = rig
        self.board = board
        self.gateway = gateway
        self.dns = dns          # hil's DNS answering the rig's ota.host (a hard-coded host)
        self.mock = mock
        self.profile = profile
        self.package = package
        self.target = target
        self.base_package = base_package      # the base build, for a package of another version
        self.elf = elf                        # the build's ELF: names a crash's addresses
        self.crash: Crash | None = None       # the board crashed (update raised FirmwareCrash)
        self._watch: CrashWatch | None = None
        self.task: Task | None = None
        self.faults: list[InjectedFault] = []
        self.attempts: list[Attempt] = []
        self.trace: list[Event] = []          # every event and boot line, in order
        self._task_options: dict[str, Any] = {}
        self._no_task = False
        self._triggers: list[_Trigger] = []
        self._pointed = False
        self._next_start: float | None = None   # a shell-less board's boot that began the next
        self._sampler: CurrentSampler | None = None   # the attempt's current, sampled
        if board.shell_less:
            # Its version is read at the service (a boot after a reset): the board's network
            # must take it there from the start, before the first update.
            board.watch_service(self._service_versions)
            self._point()
        self.energy_interval = SAMPLE_INTERVAL_S    # seconds between current samples
        # Called with each attempt once it is over (the report draws its steps from them).
        self.observers: list[Callable[[OtaScenario, Attempt], None]] = []

    @property
    def _runs_here(self) -> bool:
        """The board is one hil runs on this host: simulated, or a host build."""
        return self.rig.sim is not None or self.rig.console.command is not None

    # ================================================================ Injection (hil.faults)
    @property
    def dev_id(self) -> str:
        return self.rig.identity.dev_id

    @property
    def device_timeout(self) -> float:
        return self.rig.device_timeout

    def inject(self, name: str, **params: Any) -> InjectedFault:
        """Inject the catalog's fault ``name`` (``hil.faults.catalog``) for this scenario."""
        spec = fault_spec(name)
        check_params(spec, params)
        if self.board.shell_less:
            wanted = needs_a_shell(name, params, power=self.rig.power.kind, rf=self.rig.rf.kind,
                                   flasher=self.rig.flasher.kind, narrates=self.board.narrates)
            if wanted is not None:
                raise Unsupported(f"rig {self.rig.name} has no shell: fault "
                                  f"{spec.label(params)} needs {wanted}")
        for need in spec.needs:
            if need == "mock" and self.mock is None:
                raise Unsupported(f"fault {name}: shapes the task, which only the mock service "
                                  "lets a test do (on the real platform the operator does)")
            if need != "mock" and need not in self.rig.capabilities:
                raise Unsupported(f"fault {name}: rig {self.rig.name} lacks {need}")
        injected = InjectedFault(spec.label(params), spec.where.value)
        self.faults.append(injected)
        spec.inject(self, params)
        return injected

    def arm(self, fault: Fault) -> Armed:
        if self.faults and fault.kind is FaultKind.HOOK and fault.name is None:
            # The exchange it hits says which fault it carried out, not just "hook".
            fault = dataclasses.replace(fault, name=self.faults[-1].label)
        armed = self.gateway.arm(fault)
        if self.faults:
            self.faults[-1].armed.append(armed)
        return armed

    def record_hit(self, phase: str, **where: Any) -> None:
        fault = self._injecting()
        fault.hits.append(self.gateway.timeline.record_hit(self.dev_id, fault.label, phase,
                                                           **where))

    def landing(self, check: Landing) -> None:
        self._injecting().landings.append(check)

    def _injecting(self) -> InjectedFault:
        if not self.faults:
            raise ValueError("no fault is being injected: use ota.inject(name, ...)")
        return self.faults[-1]

    def shape_task(self, **options: Any) -> None:
        if self.task is not None:
            raise ValueError("the task exists already: inject task faults before the update")
        if "task" in options and options.pop("task") is None:
            self._no_task = True
        self._task_options.update(options)

    def operate(self, action: str) -> None:
        service = self._service()
        if action == "cancel":
            service.cancel(self.dev_id)
        elif action == "pause":
            service.pause(self.dev_id)
        elif action == "expire-token":
            service.expire_token(self.dev_id)
        elif action == "finish":
            # The board got the target by another way (a cable, another session) and said so.
            assert self.mock is not None
            requests.post(f"{self.mock.url}/ota/device/version",
                          params={"dev_id": self.dev_id}, json={"s_version": self.target},
                          headers={"Authorization": self.mock.authorization()},
                          timeout=5).raise_for_status()
        else:
            raise ValueError(f"unknown operator action {action!r}")

    def set_power(self, percent: int) -> None:
        # The rig's supply when it can set a level; else the firmware's `test power` hook (a
        # host build's power part cuts, but has no battery to lower).
        if "power" not in self.rig.capabilities:
            ConsoleHookPower(self.board.console,
                             self.board.contract.commands["power"]).set_level(percent)
        else:
            self.board.set_power(percent)

    def set_signal(self, level: int) -> None:
        if self.rig.rf.kind == "none":
            ConsoleHookRf(self.board.console,
                          self.board.contract.commands["signal"]).set_signal(level)
        else:
            self.board.set_signal(level)

    def set_free_space(self, size: int) -> None:
        self.board.set_free_space(size)

    def power_cycle(self) -> None:
        supply = self.board.parts.power()
        if supply is None:
            raise Unsupported(f"rig {self.rig.name} has no bench supply to cut")
        power_cycle(supply, POWER_DARK_S)

    def send_console(self, command: str, **values: object) -> None:
        self.board.console.send(self.board.contract.command(command, **values))

    def reboot(self) -> None:
        if self.board.shell_less:
            self.board.reset()
        else:
            self.send_console("reboot")

    def on_event(self, phase: str, action: Callable[[Event], str | None], *,
                 when: Callable[[Event], bool] | None = None) -> None:
        self._triggers.append(_Trigger(self._injecting(), phase, action, when))

    def _fire(self, event: Event) -> list[InjectedFault]:
        """Run the triggers ``event`` is for, once each; record each one's hit. Returns the
        faults fired."""
        phase = event.fields.get("phase", "")
        fired: list[InjectedFault] = []
        for trigger in list(self._triggers):
            if trigger.phase != phase or (trigger.when is not None and not trigger.when(event)):
                continue
            self._triggers.remove(trigger)
            started = time.time()          # the hit is when the action began (a cut's dark
            detail = trigger.action(event)  # period comes after it)
            fault = trigger.fault
            fault.fired.append(len(self.trace))
            fault.hits.append(self.gateway.timeline.record_hit(
                self.dev_id, fault.label, phase, at=started, event=event_text(event),
                detail=detail))
            fired.append(fault)
        return fired

    # ================================================================ did the faults land
    def check_faults_landed(self) -> None:
        """Raise ``FaultNotLanded`` for the first fault that did not hit where and when it
        asked (``InjectedFault.not_landed``)."""
        for fault in self.faults:
            reason = fault.not_landed()
            if reason is not None:
                raise FaultNotLanded(fault.label, reason)

    # ================================================================ running
    def ensure_task(self) -> Task | None:
        """The task of this scenario, created on the first update (after the faults that shape
        it). On the real service the operator's task is used as it is."""
        if self.task is not None or self.mock is None:
            return self.task
        service = self.mock.service
        service.add_device(self.dev_id, name=self.rig.identity.device_name)
        if self._no_task:
            return None
        options: dict[str, Any] = {"retry": DEFAULT_RETRY, "interval": DEFAULT_INTERVAL,
                                   "manuf": self.rig.family.manuf,
                                   "model": self.rig.family.model, **self._task_options}
        package = options.pop("package", self.package)
        target = options.pop("target", self.target)
        self.task = service.create_task(self.dev_id, target, package, **options)
        return self.task

    def deadline(self) -> float:
        """How long a conforming board may take for one attempt: the transfer at a slow lab
        link, and every try of one range (timeout and interval) with time to spare."""
        task = self.task
        retry = task.retry if task else DEFAULT_RETRY
        interval = task.interval if task else DEFAULT_INTERVAL
        size = task.package.size if task and task.package else self.package.size
        tries = (retry + 1) * self.device_timeout + retry * interval
        slack = _SLACK_SIM_S if self._runs_here else _SLACK_REAL_S
        return slack + size / _SLOWEST_LINK + tries

    def update(self, *, until_boot: bool = False, timeout: float | None = None) -> Attempt:
        """One ``ota check`` until ``ota end`` (or, ``until_boot``, until the board boots again:
        an attempt cut short by a power cut or a reboot never ends). A board that takes longer
        than ``deadline()`` gives an attempt with ``timed_out``; ``expect`` says so."""
        self.ensure_task()
        self._point()
        before, traced = len(self.exchanges()), len(self.trace)
        watch = self.crash_watch()
        watch.start()
        self._sampler = self._energy_sampler()
        try:
            if self.board.shell_less:
                return self._finished(self._update_shell_less(until_boot,
                                                              timeout or self.deadline()))
            return self._update_shell(until_boot, timeout)
        except FirmwareCrash as crashed:
            self.crash = crashed.crash
            self._finished(Attempt([e for e in self.trace[traced:] if e.tag != "boot"],
                                   self.exchanges()[before:], False, False, self.trace[traced:],
                                   crash=crashed.crash))
            raise
        finally:
            sampler, self._sampler = self._sampler, None
            if sampler is not None:     # the attempt ended in an error: no curve to keep
                with contextlib.suppress(HilError):
                    sampler.stop()

    def crash_watch(self) -> CrashWatch:
        """What an attempt's wait polls for a crash: the SWD probe of a Cortex-M board, the
        console of an ESP32; nothing for a host build (its exits are boot loops)."""
        if self._watch is None:
            symbols = ElfSymbols(self.elf) if self.elf is not None else None
            if self.rig.flasher.kind == "swd":
                self._watch = SwdFaultWatch(self._debug_probe, symbols)
            elif self.rig.board == "esp32" and self.rig.console.command is None:
                self._watch = ConsolePanicWatch(lambda: self.board.parts.opened("console"),
                                                symbols)
            else:
                self._watch = NoWatch()
        return self._watch

    def _debug_probe(self) -> Any:
        return self.board.parts.flasher()

    def _update_shell(self, until_boot: bool, timeout: float | None) -> Attempt:
        before = len(self.gateway.timeline.exchanges(self.dev_id))
        traced = len(self.trace)
        watch = self.crash_watch()
        self.board.start_update()
        ended, timed_out = True, False
        booted: list[Event] = []

        def seen(event: Event) -> None:
            self.trace.append(event)
            if event.tag == "boot":
                booted.append(event)
            self._fire(event)

        try:
            events = self.board.wait_update_end(timeout or self.deadline(), on_event=seen,
                                                until_boot=until_boot,
                                                watch=lambda: check(watch))
        except ExpectTimeout:
            events, ended, timed_out = [e for e in self.trace if e.tag != "boot"], False, True
        if until_boot and booted and not (events and events[-1].tag == "ota end"):
            ended = False
        # The board printed its end on answers the gateway may not have recorded yet.
        self.gateway.wait_recorded(RECORD_WAIT_S)
        return self._finished(Attempt(events, self.gateway.timeline.exchanges(self.dev_id)[before:],
                                      ended, timed_out, self.trace[traced:]))

    def _finished(self, attempt: Attempt) -> Attempt:
        sampler, self._sampler = self._sampler, None
        curve = None
        if sampler is not None:
            try:
                curve = sampler.stop()
            except HilError as error:
                # A supply whose MEAS:CURR? fails (a model that cannot measure, an error in its
                # queue) costs the curve, not the test: a setting it refuses still fails it.
                log.warning("%s: no energy curve for this attempt: %s", self.rig.name, error)
        if curve is not None:
            attempt.energy = curve
            console = self.board.parts.opened("console")
            marks = phase_marks(curve.start, attempt.exchanges,
                                console.lines() if console is not None else [], self._event_of)
            attempt.charges = per_phase(curve, marks)
        self.attempts.append(attempt)
        for observer in self.observers:
            observer(self, attempt)
        self.gateway.raise_errors()
        if attempt.charges and attempt.crash is None:
            check_budget(attempt.charges, self.profile.energy_budget,
                                where=str(self.profile.path))
        return attempt

    def _energy_sampler(self) -> CurrentSampler | None:
        """A sampler started on the rig's supply when it measures current; else None (no curve,
        no error: most USB-powered dev boards have nothing to measure with)."""
        parts = self.board.parts
        supply = parts.opened("power") or (parts.power() if self.rig.power.kind == "scpi"
                                           else None)
        if not measures_current(supply):
            return None
        sampler = CurrentSampler(supply, self.energy_interval)
        sampler.start()
        return sampler

    def _event_of(self, text: str) -> Event | None:
        """A console line as the contract reads it: a boot line, a phase line, or None."""
        events = self.board.contract.events
        booted = events["boot"].search(text)
        if booted:
            return Event("boot", {"version": booted.group("version")})
        return parse_event(text) if events["phase"].search(text) else None

    def _point(self) -> None:
        """The board pointed at the gateway, once (``ota server``; a shell-less board's network
        told hil's DNS)."""
        if not self._pointed:
            self.board.point_at(self.gateway.url,
                                self.dns.address if self.dns is not None else None)
            self._pointed = True

    # ---------------------------------------------------------------- boards without a shell
    def silence(self) -> float:
        """How long a shell-less board may make no request before its attempt is taken as
        over: a request held to its timeout, the retry interval after it, and the attempt's
        own work between requests (the install's copy and reboot)."""
        interval = self.task.interval if self.task else DEFAULT_INTERVAL
        slack = _SLACK_SIM_S if self._runs_here else _SLACK_REAL_S
        return self.device_timeout + interval + slack

    def _service_versions(self) -> list[tuple[float, str]]:
        """The board's boots as the service heard them: (when, version) of each version report;
        of each detect for a board that sends none."""
        exchanges = self.exchanges()
        phase = Endpoint.VERSION if any(e.phase is Endpoint.VERSION for e in exchanges) \
            else Endpoint.DETECT
        return [(e.started, version) for e in exchanges
                if e.phase is phase and (version := reported_version(e)) is not None]

    def _update_shell_less(self, until_boot: bool, limit: float) -> Attempt:
        """One attempt of a board without a shell (see the module docstring)."""
        log = _PhaseLog(self.board) if self.board.narrates else None
        if self._next_start is not None:
            # The boot that cut the last attempt short began this one: the board checks at boot.
            since, self._next_start = self._next_start, None
        else:
            since = time.time()
            self.board.start_update()
        deadline = time.monotonic() + limit
        quiet_for = self.silence()
        traced = len(self.trace)
        fired_live: list[tuple[Event, list[InjectedFault]]] = []
        watch = self.crash_watch()
        while True:
            time.sleep(_POLL_S)
            check(watch)
            if log is not None:
                # Its log's own phase lines, acted on as they come (a power cut timed by the
                # flash write's announcement); placed among the exchanges by when they came.
                for event in log.read():
                    fired_live.append((event, self._fire(event)))
            now = time.time()
            # Read at the service alone: a console's stamps lag its lines (it is polled), so
            # they cannot bound an attempt's exchanges.
            boots = [boot for boot in self._service_versions() if boot[0] >= since]
            mine = [e for e in self.exchanges() if e.started >= since]
            begun = mine[0].started if mine else None
            if begun is None:
                if time.monotonic() > deadline:
                    return Attempt([], [], False, True, [])
                continue
            later = [boot for boot in boots if boot[0] > begun]
            cut = later[0][0] if until_boot and later else None
            exchanges = [e for e in mine if e.started >= begun
                         and (cut is None or e.started < cut)]
            last = max([begun, *(e.at for e in exchanges)])
            # A 201 is sent at the boot into the new image, and the check that boot makes
            # follows it (its version report: how the service hears the boot); it may come
            # late on a loaded host (the board's own writes first), not within a round trip.
            after_end = quiet_for if exchanges and _upgraded(exchanges[-1]) \
                else QUIET_AFTER_END_S
            over = cut is not None or (
                bool(exchanges) and _final(exchanges[-1]) and now - last >= after_end) \
                or now - last >= quiet_for
            timed_out = not over and time.monotonic() > deadline
            if over or timed_out:
                if self.gateway.recording() and self.gateway.wait_recorded(RECORD_WAIT_S):
                    continue       # look again with the answers that were being recorded
                break
        told_events = [(e.started, told(e)) for e in exchanges]
        booted = [(at, Event("boot", {"version": version})) for at, version in later
                  if cut is None or at <= cut]
        logged = log.heard if log is not None else []
        events = [event for _, event in sorted(told_events + booted + logged,
                                               key=lambda pair: pair[0])]
        for event in events:
            self.trace.append(event)
            if not any(event is heard for heard, _ in fired_live):
                self._fire(event)
        for event, faults in fired_live:
            # A trigger fired by a log line counts from that line's place in the trace.
            place = next(i for i, traced_event in enumerate(self.trace) if traced_event is event)
            for fault in faults:
                fault.fired[-1] = place + 1
        if cut is not None:
            self._next_start = cut
        return Attempt([e for e in events if e.tag != "boot"], exchanges, cut is None,
                       timed_out, self.trace[traced:])

    # ================================================================ what the service saw
    def exchanges(self, phase: Endpoint | None = None) -> list[Exchange]:
        return self.gateway.timeline.exchanges(self.dev_id, phase)

    def fault_hits(self) -> list[FaultHit]:
        """The hits of this scenario's faults that no exchange shows (a power cut at a console
        event, a level set before the update), in order."""
        return self.gateway.timeline.hits(self.dev_id)

    def accepted_codes(self) -> list[int]:
        return self.gateway.timeline.reported_codes(self.dev_id)

    def sent_codes(self) -> list[int]:
        """Every result the board reported (refused ones included), by /report or /progress."""
        return [e.result for e in self.exchanges()
                if e.result is not None and (e.phase is Endpoint.REPORT or e.result > 100)]

    # ================================================================ verdicts
    def expect(self, outcome: str, *, repeats_allowed: bool = False) -> None:
        """The service accepted exactly the profile's codes for ``outcome``, the board sent
        nothing else, and the order rules of every update held (no download after a 101, a
        201 only after a reboot into the target version).

        ``repeats_allowed``: a report sent again right after itself counts once (a board whose
        answer was lost, or whose power was cut under the report, says it again)."""
        wanted = self.profile[outcome]
        accepted, sent = self.accepted_codes(), self.sent_codes()
        if repeats_allowed:
            sent = [code for i, code in enumerate(sent) if i == 0 or sent[i - 1] != code]
        expected, expected_sent = list(wanted.codes), list(wanted.sent_codes)
        where = f"(profile {self.profile.name}, outcome {outcome}; rig {self.rig.name}, " \
                f"{self.rig.board}{self._fault_note()})"
        if self.attempts and self.attempts[-1].timed_out:
            self._fail(wanted.phase, f"expected report codes {expected} {where}; the attempt "
                       f"did not end within {self.deadline():.0f} s, the service received "
                       f"{accepted} so far", expected, accepted)
        if accepted != expected:
            self._fail(wanted.phase, f"expected report codes {expected} {where}; the service "
                       f"received {accepted}" + (f" (the board sent {sent})"
                                                 if sent != accepted else ""),
                       expected, accepted)
        if sent != expected_sent:
            self._fail(wanted.phase, f"expected the board to send {expected_sent} {where}; it "
                       f"sent {sent} (the service accepted {accepted})", expected_sent, sent)
        self._check_order()
        if 201 in expected:
            booted = self.booted_versions()
            if not booted or booted[-1] != self.target:
                self._fail("report", f"expected the board to boot {self.target} after its 201 "
                           f"{where}; its boot lines said {booted}", expected, accepted)

    def expect_detect(self, attempt: Attempt, errno: int) -> None:
        """The attempt's detect was answered ``errno`` (the scenario's premise), and the board
        asked for nothing else after a refused one."""
        if attempt.detect_errno != errno:
            self._fail("detect", f"expected the service to answer detect with errno {errno} "
                       f"on rig {self.rig.name}; it answered {attempt.detect_errno}")
        after = [e for e in attempt.exchanges if e.phase not in (Endpoint.VERSION,
                                                                 Endpoint.DETECT)]
        if errno != Errno.OK and after:
            self._fail("detect", f"expected no request after detect answered errno {errno} "
                       f"on rig {self.rig.name}; the board went on: {after[0].summary()}")

    def expect_nothing_requested(self, *phases: Endpoint) -> None:
        """The board made no request of these phases (after a refused detect: no token check,
        no download)."""
        for phase in phases:
            made = self.exchanges(phase)
            if made:
                self._fail(phase.value, f"expected no {phase.value} request on rig "
                           f"{self.rig.name}; the board made {len(made)}, the first: "
                           f"{made[0].summary()}")

    def expect_retries(self, attempt: Attempt, at: int | None = None, *,
                       persistent: bool = True) -> None:
        """The range holding byte ``at`` (default: the first range that was asked for more
        than once) was asked for once and then ``retry`` times (``persistent``: it failed
        every time) or once more (it failed once), each retry at least ``interval`` seconds
        after the failure before it."""
        task = attempt.offered
        if task is None:
            self._fail("download", f"expected a task at detect on rig {self.rig.name}; the "
                       f"service offered none (detect errno {attempt.detect_errno})")
        downloads = attempt.requests(Endpoint.DOWNLOAD)
        starts = [_range_start(e) for e in downloads]
        failing = at - at % 4096 if at is not None else \
            next((s for s in starts if starts.count(s) > 1), starts[0] if starts else 0)
        tries = [e for e, start in zip(downloads, starts, strict=True) if start == failing]
        wanted, why = (task.retry + 1, f"1 + {task.retry} (retry)") if persistent \
            else (2, "2 (a failure, then a retry that got it)")
        if len(tries) != wanted:
            self._fail("download", f"expected the range at byte {failing} to be asked for "
                       f"{why} times on rig {self.rig.name}; it was asked for {len(tries)} "
                       "times")
        for before, after in itertools.pairwise(tries):
            gap = after.started - self._failed_at(before)
            if gap < task.interval - 0.05:      # 50 ms of clock granularity between hosts
                self._fail("download", f"expected retries at least {task.interval} s "
                           f"(interval) after the failure on rig {self.rig.name}; one came "
                           f"{gap:.2f} s after")

    def expect_resumed(self, interrupted: Attempt, resumed: Attempt) -> None:
        """The resumed attempt's download began where the interrupted one had stored up to:
        at the end of a range it received whole, not at byte 0."""
        whole = [(_range_start(e), _range_start(e) + (e.length or 0))
                 for e in interrupted.requests(Endpoint.DOWNLOAD) if _whole(e)]
        starts = resumed.download_starts()
        if not starts:
            self._fail("download", f"expected the board to resume its download on rig "
                       f"{self.rig.name}; it made no download request")
        first = starts[0]
        ends = {end for _, end in whole}
        last_asked = max(interrupted.download_starts(), default=0)
        if first == 0 or first not in ends or first < last_asked:
            self._fail("download", f"expected the download to resume at the offset the board "
                       f"had stored (one of {sorted(ends)[-2:]}, at least {last_asked}) on "
                       f"rig {self.rig.name}; it resumed at byte {first}")

    def booted_versions(self) -> list[str]:
        return [event.fields["version"] for event in self.trace if event.tag == "boot"]

    # ================================================================ helpers
    def _failed_at(self, exchange: Exchange) -> float:
        """When the board saw the request fail: when the answer ended (an exchange is stamped
        when it is over), or when its own timeout gave up on an answer held longer (a stall)."""
        return min(exchange.at, exchange.started + self.device_timeout)

    def _check_order(self) -> None:
        exchanges = self.exchanges()
        # By when each request was made, not when its exchange was over: a download asked for
        # before the 101 but answered after it (held by a hook that reset the board meanwhile)
        # was not asked for after the 101.
        first_101 = next((e.started for e in exchanges if e.phase is Endpoint.REPORT
                          and e.result == 101), None)
        if first_101 is not None:
            # A download after the 101 is early only within that attempt: after a detect it
            # belongs to a later attempt that re-reported (the first answer was lost).
            next_detect = min((e.started for e in exchanges if e.phase is Endpoint.DETECT
                               and e.started > first_101), default=None)
            late = [e for e in exchanges if e.phase is Endpoint.DOWNLOAD
                    and e.started > first_101
                    and (next_detect is None or e.started < next_detect)
                    and e.errno is None and e.error_byte is None]
            if late:
                self._fail("download", f"expected 101 only once the package was downloaded "
                           f"(rig {self.rig.name}); the board downloaded {len(late)} more "
                           f"range(s) after reporting it, the first: {late[0].summary()}")
        if self.board.shell_less:
            # See the module docstring: expect() checks the target booted after its 201.
            self._check_201_after_a_reboot(exchanges)
            return
        reported = [e for e in self.trace if e.tag == "boot"
                    or (e.fields.get("phase") == "report" and e.fields.get("result") == "201")]
        if reported and reported[0].tag != "boot":
            self._fail("report", f"expected 201 only after the board rebooted into the new "
                       f"image (rig {self.rig.name}); it reported 201 before any boot line")

    def _check_201_after_a_reboot(self, exchanges: list[Exchange]) -> None:
        """From the service: a 201 on a TCP connection that carried the attempt's download or
        101 was sent before the reboot, which closes every connection (the gateway numbers
        them, ``Exchange.connection``). A board that opens a connection per request passes
        whenever it sends the 201: this check can only catch, never wrongly fail."""
        before_a_reboot: set[int] = set()
        for exchange in exchanges:
            if exchange.connection is None:
                continue
            if exchange.phase is Endpoint.REPORT and exchange.result == 201 \
                    and exchange.connection in before_a_reboot:
                self._fail("report", f"expected 201 only after the board rebooted into the new "
                           f"image (rig {self.rig.name}); it came on the connection its "
                           f"download used (connection {exchange.connection}), which a reboot "
                           f"would have closed: {exchange.summary()}")
            if exchange.phase is Endpoint.DOWNLOAD or (
                    exchange.phase is Endpoint.REPORT and exchange.result == 101):
                before_a_reboot.add(exchange.connection)

    def _fault_note(self) -> str:
        return f"; fault {', '.join(f.label for f in self.faults)}" if self.faults else ""

    def _fail(self, phase: str, message: str, expected: list[int] | None = None,
              received: list[int] | None = None) -> NoReturn:
        tail = "\n".join(e.summary() for e in self.exchanges()[-8:]) or "(no exchange)"
        raise ConformanceFailure(phase, f"{message}\nthe board's last exchanges:\n{tail}",
                                 tuple(expected or ()), tuple(received or ()))

    def _service(self) -> Any:
        if self.mock is None:
            raise Unsupported("operator actions need the mock service")
        return self.mock.service
