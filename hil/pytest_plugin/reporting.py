"""What a conformance test leaves in its Allure results (allure-pytest, ``--alluredir``).

- **labels**: the OTA phase as ``feature`` (``@pytest.mark.phase`` or the module, ``test_<phase>``),
  the scenario as ``story``, ``allure.id`` (the scenario without its rig, shared by every rig),
  ``severity``, a ``tag`` per injected fault, ``board`` and ``rig`` labels; board, rig, firmware
  and target versions as parameters;
- **steps**, one per OTA phase of each attempt (version, detect, token check, download with its
  ranges summarised, report, verify, flash, reboot), each with its requests and answers attached
  and the fault that hit it in its title;
- **attachments**: the decoded crash when the board crashed (``firmware crash``: cause, PC and
  function, fault status in words, backtrace, registers), the console log (timestamped), the
  timeline as JSON and as text, a picture of the update (bytes downloaded over time, faults
  and report codes marked; matplotlib; below it, where the rig's supply measures current, the
  current the board drew with its phases shaded and the mA·s of each), the charge per phase as
  CSV (``energy per phase``), and the rig description with every secret removed;
- the session's ``environment.properties`` and ``categories.json`` (firmware crash, firmware
  defect, rig fault, service or infrastructure fault), written by the controller.

Allure calls are no-ops without ``--alluredir``; the picture is only drawn with it.
"""

from __future__ import annotations

import io
import json
import platform
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import allure
import pytest
import yaml
from allure_commons.model2 import StatusDetails
from allure_commons.types import AttachmentType

from hil.conformance.energy import table_csv
from hil.conformance.scenario import Attempt, OtaScenario
from hil.drivers.base import LogLine
from hil.drivers.contract import Event, parse_event
from hil.errors import ConformanceFailure
from hil.onenet.messages import Endpoint
from hil.onenet.tasks import Package
from hil.rig.model import Rig
from hil.service.timeline import Exchange

PHASES = ("detect", "token", "download", "verify", "flash", "report")
SEVERITY = {"detect": "normal", "token": "normal", "download": "critical",
            "verify": "critical", "flash": "critical", "report": "blocker"}
CATEGORIES = [
    # Before "Firmware defect": Allure files a test under the first category that matches.
    {"name": "Firmware crash", "matchedStatuses": ["failed"],
     "traceRegex": r"(?s).*hil\.errors\.FirmwareCrash.*",
     "description": "the board crashed mid-update (a Cortex-M fault read through the probe, "
                    "an ESP32 panic on its console): the 'firmware crash' attachment decodes it"},
    {"name": "Firmware defect", "matchedStatuses": ["failed"],
     "description": "the board reported a wrong or missing code, or requested what it must not"},
    {"name": "Rig fault", "matchedStatuses": ["broken"],
     "traceRegex": r"(?s).*hil\.errors\.RigFault.*",
     "description": "the bench failed: probe, port or instrument; the test could not run"},
    {"name": "Service or infrastructure fault", "matchedStatuses": ["broken"],
     "traceRegex": r"(?s).*hil\.errors\.(ServiceFault|ServiceCrashed).*",
     "description": "the OTA service, the gateway or the network between failed"},
]
_SECRET_KEY = re.compile(r"(key|secret|password|token|sign)", re.I)


def alluredir(config: pytest.Config) -> Path | None:
    value = getattr(config.option, "allure_report_dir", None)
    return Path(value) if value else None


# ---------------------------------------------------------------------------------- labels
def phase_of(item: pytest.Item) -> str:
    mark = item.get_closest_marker("phase")
    if mark is not None:
        return str(mark.args[0])
    module = Path(str(item.path)).stem.removeprefix("test_")
    return module if module in PHASES else "(none)"


def scenario_of(item: pytest.Item, rig: Rig) -> tuple[str, str]:
    """The scenario's story (its name in words) and its id (the same on every rig)."""
    name = getattr(item, "originalname", item.name)
    callspec = getattr(item, "callspec", None)
    words = callspec.id.split("-") if callspec else []
    rig_words = rig.name.split("-")
    for at in range(len(words) - len(rig_words) + 1):   # the rig's part of the test id
        if words[at:at + len(rig_words)] == rig_words:
            del words[at:at + len(rig_words)]
            break
    params = "-".join(words)
    story = name.removeprefix("test_").replace("_", " ")
    ident = f"{phase_of(item)}/{name.removeprefix('test_')}"
    return (f"{story} ({params})", f"{ident}[{params}]") if params else (story, ident)


def label(item: pytest.Item, rig: Rig, firmware: str, target: str) -> None:
    phase = phase_of(item)
    story, ident = scenario_of(item, rig)
    allure.dynamic.feature(phase)
    allure.dynamic.story(story)
    allure.dynamic.id(ident)
    allure.dynamic.severity(SEVERITY.get(phase, "normal"))
    allure.dynamic.label("board", rig.board)
    allure.dynamic.label("rig", rig.name)
    for name, value in (("board", rig.board), ("rig", rig.name), ("firmware", firmware),
                        ("target", target)):
        allure.dynamic.parameter(name, value)
    # pytest's own parameters, hidden: the rig is named above, the rest in the story. Their
    # values stay, as Allure tells tests (and retries of one test) apart by them.
    callspec = getattr(item, "callspec", None)
    for name, value in callspec.params.items() if callspec else ():
        allure.dynamic.parameter(name, value.name if isinstance(value, Rig) else str(value),
                                 mode=allure.parameter_mode.HIDDEN)


def place_labels(place: Any) -> None:
    """The labgrid place the test ran on (``hil.rig.providers.labgrid.Place.facts``: its name,
    tags and exporter), as labels, not parameters: the place does not make another test of it
    (its history); ``hil report`` shows them per board."""
    for name, value in place.facts().items():
        allure.dynamic.label(name, value)


# ---------------------------------------------------------------------------------- steps
class AttemptClock:
    """An observer of ``OtaScenario.update``: when each attempt was over (its steps are written
    at the end of the test, when the phase that failed is known)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def __call__(self, scenario: OtaScenario, attempt: Attempt) -> None:
        self.ends.append(time.time())


CLOCK = pytest.StashKey[AttemptClock]()


@dataclass(frozen=True)
class _Step:
    title: str
    phase: str                    # version detect token download verify flash report reboot
    exchanges: list[Exchange]
    start: float
    stop: float


def attempt_steps(scenario: OtaScenario, console: list[LogLine], ends: list[float],
                  failure: BaseException | None) -> None:
    """Each attempt as a step, its OTA phases as steps within, with their real start and stop
    (the console's stamps and the exchanges' times) and the status of their phase: the phase a
    ``ConformanceFailure`` names is failed (the last step of it), a rig or service fault leaves
    the last step broken. Called at the end of the test, the Allure test result still open."""
    reporter = _allure_reporter()
    checks = [line for line in console
              if line.sent and line.text == scenario.board.contract.command("check")]
    failed_at = _failed_step(scenario, failure)
    before = 0.0
    for number, attempt in enumerate(scenario.attempts):
        first = attempt.exchanges[0].started if attempt.exchanges else before
        begun = checks[number].at if len(checks) == len(scenario.attempts) else first
        over = ends[number] if number < len(ends) else max(
            [begun, *(e.at for e in attempt.exchanges)])
        steps = _timed(attempt, _event_times(scenario, attempt, console, begun), begun, over)
        title = f"attempt {number + 1}: ota check" + (
            "" if attempt.ended else f" (crashed: {attempt.crash.cause})" if attempt.crash
            else " (cut short)" if not attempt.timed_out else " (did not end in time)")
        status = message = None
        with _step(reporter, title, begun, over) as attempt_result:
            for index, step in enumerate(steps):
                faults = sorted({e.fault for e in step.exchanges if e.fault})
                here = failed_at == (number, index) or (
                    failed_at == (number, -1) and index == len(steps) - 1)
                with _step(reporter, step.title + (f" [fault: {', '.join(faults)}]"
                                                   if faults else ""), step.start, step.stop,
                           _status(failure) if here else None, _message(failure)):
                    if step.exchanges:
                        allure.attach("\n\n".join(_exchange_text(e) for e in step.exchanges),
                                      "requests and answers", AttachmentType.TEXT)
                if here:
                    status, message = _status(failure), _message(failure)
        if status is not None and attempt_result is not None:
            attempt_result.status = status
            attempt_result.statusDetails = StatusDetails(message=message)
        before = over


def _allure_reporter() -> Any:
    """allure-pytest's reporter (the listener's), where the open test's steps are."""
    from allure_commons import plugin_manager

    for plugin in plugin_manager.get_plugins():
        reporter = getattr(plugin, "allure_logger", None)
        if reporter is not None:
            return reporter
    return None


@contextmanager
def _step(reporter: Any, title: str, start: float, stop: float, status: str | None = None,
          message: str | None = None) -> Iterator[Any]:
    """An Allure step, then its real times and status set on its result (allure's own step
    stamps the time it is written, which is after the fact)."""
    context = allure.step(title)
    with context:
        result = reporter.get_item(context.uuid) if reporter is not None else None
        yield result
    if result is not None:
        result.start, result.stop = int(start * 1000), int(max(stop, start) * 1000)
        if status is not None:
            result.status, result.statusDetails = status, StatusDetails(message=message)


def _failed_step(scenario: OtaScenario, failure: BaseException | None
                 ) -> tuple[int, int] | None:
    """(attempt, step) the failure belongs to: the last step of the phase a ConformanceFailure
    names; (last attempt, -1), its last step, for any other failure; None when it passed."""
    if failure is None or not scenario.attempts:
        return None
    phase = getattr(failure, "phase", None) if isinstance(failure, ConformanceFailure) else None
    if phase is not None:
        for number in reversed(range(len(scenario.attempts))):
            names = [name for _, _, name in _phases(scenario.attempts[number])]
            if phase in names:
                return number, len(names) - 1 - names[::-1].index(phase)
    return len(scenario.attempts) - 1, -1


def _status(failure: BaseException | None) -> str:
    # A firmware fault (an AssertionError) is "failed"; anything else (a rig or service fault)
    # is "broken", as allure-pytest says of the test.
    return "failed" if isinstance(failure, AssertionError) else "broken"


def _message(failure: BaseException | None) -> str | None:
    return f"{type(failure).__name__}: {failure}" if failure is not None else None


def _event_times(scenario: OtaScenario, attempt: Attempt, console: list[LogLine],
                 since: float) -> list[float | None]:
    """When the console printed each event of ``attempt.trace``: its lines from the attempt's
    ``ota check`` on, matched in order with the events the scenario read from them."""
    events = scenario.board.contract.events
    lines = iter([line for line in console if not line.sent and line.at >= since])
    times: list[float | None] = []
    for event in attempt.trace:
        found = None
        for line in lines:
            if _event_of(line.text, events) == event:
                found = line.at
                break
        times.append(found)
        if found is None:         # the console's log ran out: the rest are unknown
            lines = iter(())
    return times


def _event_of(text: str, events: Mapping[str, re.Pattern[str]]) -> Event | None:
    """The event a console line is, as ``Board.wait_update_end`` reads it."""
    booted = events["boot"].search(text)
    if booted:
        return Event("boot", {"version": booted.group("version")})
    if events["phase"].search(text):
        return parse_event(text) or Event(text.strip(), {})
    return None


def _timed(attempt: Attempt, times: list[float | None], start: float, stop: float
           ) -> list[_Step]:
    """The phases of an attempt, back to back: each from where the one before ended to its
    console line (or its last answer, when later)."""
    stamps = dict(zip(map(id, attempt.trace), times, strict=True))
    steps: list[_Step] = []
    at = start
    for title, exchanges, phase, event in _phases_with_events(attempt):
        ends = [stamp for stamp in ([stamps.get(id(event))] if event is not None else [])
                if stamp is not None] + [e.at for e in exchanges]
        end = min(max([at, *ends]), max(stop, at))
        steps.append(_Step(title, phase, exchanges, at, end))
        at = end
    return steps


def _phases(attempt: Attempt) -> Iterator[tuple[str, list[Exchange], str]]:
    for title, exchanges, phase, _ in _phases_with_events(attempt):
        yield title, exchanges, phase


def _phases_with_events(attempt: Attempt
                        ) -> Iterator[tuple[str, list[Exchange], str, Event | None]]:
    """(step title, its exchanges, its phase, the console event that ended it) in the order the
    board went through them: the console's narration, each event matched with the exchanges
    of its phase in order."""
    queues: dict[Endpoint, list[Exchange]] = {}
    for exchange in attempt.exchanges:
        queues.setdefault(exchange.phase, []).append(exchange)
    versions = queues.pop(Endpoint.VERSION, [])
    if versions:
        yield "version report", versions, "version", None
    downloads: list[Event] = []
    for event in [*attempt.trace, Event("(end)", {})]:
        phase = event.fields.get("phase")
        if phase == "download":
            downloads.append(event)
            continue
        if downloads:
            taken = queues.get(Endpoint.DOWNLOAD, [])
            yield _download_title(taken), list(taken), "download", downloads[-1]
            queues.pop(Endpoint.DOWNLOAD, None)
            downloads = []
        if event.tag == "boot":
            yield f"reboot: boot version={event.fields.get('version')}", [], "reboot", event
        elif phase in ("detect", "token", "report"):
            endpoint = {"detect": Endpoint.DETECT, "token": Endpoint.TOKEN_CHECK,
                        "report": Endpoint.REPORT}[phase]
            queue = queues.get(endpoint, [])
            taken = queue[:1] if queue else []
            del queue[:1]
            yield _event_title(phase, event), taken, phase, event
        elif phase in ("verify", "flash"):
            yield _event_title(phase, event), [], phase, event
    for leftover in queues.values():       # requests the console did not narrate
        for exchange in leftover:
            yield f"{exchange.phase.value} (not narrated)", [exchange], exchange.phase.value, None


def _event_title(phase: str, event: Event) -> str:
    names = {"detect": "detect", "token": "token check", "report": "report",
             "verify": "verify", "flash": "flash"}
    details = " ".join(f"{k}={v}" for k, v in event.fields.items() if k != "phase")
    return f"{names[phase]}: {details}" if details else names[phase]


def _download_title(exchanges: list[Exchange]) -> str:
    if not exchanges:
        return "download"
    got = sum(e.length or 0 for e in exchanges if e.status == 206)
    starts = [e.range or "(whole)" for e in exchanges]
    retried = len(starts) - len(set(starts))
    return (f"download: {len(exchanges)} requests, {got} bytes, "
            f"{starts[0]} .. {starts[-1]}" + (f", {retried} retried" if retried else ""))


def _exchange_text(exchange: Exchange) -> str:
    headers = "\n".join(f"  {name}: {value}" for name, value in exchange.request_headers.items())
    answer = (json.dumps(exchange.answer) if exchange.answer is not None else
              f"error byte {exchange.error_byte}" if exchange.error_byte is not None else
              f"{exchange.length} bytes {exchange.content_range or ''}".strip())
    return (f"{exchange.summary()}\n> {exchange.method} {exchange.target}\n{headers}\n"
            + (f"  body: {exchange.request_body}\n" if exchange.request_body else "")
            + f"< {exchange.status} {answer}")


# ---------------------------------------------------------------------------------- evidence
def attach_evidence(scenario: OtaScenario, console_log: str | None) -> None:
    for fault in scenario.faults:
        allure.dynamic.tag(fault.label)
    if console_log is not None:
        allure.attach(console_log, "console log", AttachmentType.TEXT)
    if scenario.crash is not None:
        allure.attach(scenario.crash.report(), "firmware crash", AttachmentType.TEXT)
    exchanges = scenario.exchanges()
    allure.attach(json.dumps([json.loads(e.to_json()) for e in exchanges], indent=1),
                  "timeline", AttachmentType.JSON)
    allure.attach("\n".join(e.summary() for e in exchanges) or "(no exchange)",
                  "timeline (text)", AttachmentType.TEXT)
    allure.attach(yaml.safe_dump(redacted(scenario.rig.model_dump(mode="json")),
                                 sort_keys=False), "rig", AttachmentType.YAML)
    if exchanges:
        allure.attach(update_picture(scenario, exchanges), "the update", AttachmentType.PNG)
    measured = [attempt.charges for attempt in scenario.attempts if attempt.energy is not None]
    if measured:
        origin = exchanges[0].started if exchanges else measured[0][0].start
        allure.attach(table_csv(measured, origin), "energy per phase", AttachmentType.CSV)


def redacted(value: Any) -> Any:
    """The rig description with anything secret-looking blanked (names of environment
    variables stay: they are where a secret lives, not the secret)."""
    if isinstance(value, dict):
        return {key: ("(removed)" if _SECRET_KEY.search(key) and not key.endswith("_env")
                      and value[key] is not None else redacted(value[key])) for key in value}
    if isinstance(value, list):
        return [redacted(item) for item in value]
    return value


def update_picture(scenario: OtaScenario, exchanges: list[Exchange]) -> bytes:
    """Bytes downloaded over time, with the faults and the report codes marked: a gateway
    fault where the request it hit came in, a fault no request shows (a power cut during the
    flash write, a level set before the update) as a dashed line at its hit."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    start = exchanges[0].started
    times, received, total = [0.0], [0], 0
    for exchange in exchanges:
        if exchange.phase is Endpoint.DOWNLOAD and exchange.status == 206 and exchange.length:
            total += exchange.length
            times.append(exchange.at - start)
            received.append(total)
    curves = [attempt for attempt in scenario.attempts if attempt.energy is not None]
    if curves:
        figure, (axes, current) = pyplot.subplots(
            2, 1, figsize=(8, 6.4), dpi=100, sharex=True, height_ratios=(1, 1))
    else:
        figure, axes = pyplot.subplots(figsize=(8, 3.6), dpi=100)
    try:
        axes.step(times, [r / 1024 for r in received], where="post", color="#1f77b4",
                  label="bytes received (KiB)")
        for exchange in exchanges:
            at = exchange.at - start
            if exchange.fault:        # where the request came in, when the fault hit it
                asked = exchange.started - start
                axes.axvline(asked, color="#d62728", alpha=0.5, linestyle=":")
                axes.annotate(exchange.fault, (asked, 0), rotation=90, fontsize=7,
                              color="#d62728", va="bottom")
            if exchange.phase is Endpoint.REPORT and exchange.result is not None:
                good = exchange.errno == 0
                axes.axvline(at, color="#2ca02c" if good else "#ff7f0e")
                axes.annotate(f"{exchange.result}" + ("" if good else f" (errno {exchange.errno})"),
                              (at, total / 1024 * 0.9 or 1), fontsize=8, ha="right")
        for hit in scenario.fault_hits():
            at = max(hit.at - start, 0.0)          # one set before the update: at the start
            axes.axvline(at, color="#9467bd", linestyle="--", linewidth=1.5)
            axes.annotate(f"{hit.fault} " + (f"at {hit.event}" if hit.event
                                             else f"({hit.phase})"),
                          (at, total / 1024 * 0.5 or 1), rotation=90, fontsize=7,
                          color="#9467bd", va="center", ha="left")
        if curves:
            _current_axes(current, curves, start)
        (current if curves else axes).set_xlabel("seconds since the first request")
        axes.set_ylabel("KiB")
        faults = ", ".join(f.label for f in scenario.faults) or "no fault"
        axes.set_title(f"{scenario.rig.name}: {faults}", fontsize=9)
        axes.legend(loc="upper left", fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        pyplot.close(figure)


_PHASE_COLOURS = {"detect": "#c6dbef", "download": "#fdd0a2", "verify": "#d9d9d9",
                  "flash": "#fcbba1", "report": "#c7e9c0"}


def _current_axes(axes: Any, attempts: list[Attempt], start: float) -> None:
    """The current each attempt drew (mA over the same seconds as the bytes above), its phases
    shaded and labelled with the charge they took (mA·s)."""
    # A phase too narrow for its label (a few ms of detect) is left to the CSV beside.
    narrow = 0.06 * (max(a.energy.end for a in attempts if a.energy is not None) -
                     min(a.energy.start for a in attempts if a.energy is not None))
    for attempt in attempts:
        assert attempt.energy is not None
        samples = attempt.energy.samples
        axes.plot([s.at - start for s in samples], [s.ma for s in samples], color="#d62728",
                  linewidth=1, marker=".", markersize=2,
                  label="current (mA)" if attempt is attempts[0] else None)
        for charge in attempt.charges:
            if charge.end <= charge.start:
                continue
            axes.axvspan(charge.start - start, charge.end - start, alpha=0.5, linewidth=0,
                         color=_PHASE_COLOURS.get(charge.phase, "#eeeeee"))
            if charge.end - charge.start < narrow:
                continue
            axes.annotate(f"{charge.phase}\n{charge.mas:.1f} mAs",
                          ((charge.start + charge.end) / 2 - start, 1.0),
                          xycoords=("data", "axes fraction"), fontsize=7, ha="center",
                          va="top")
    axes.set_ylabel("mA")
    axes.set_ylim(bottom=0)
    axes.legend(loc="lower right", fontsize=8)     # the phases' labels are along the top


# ---------------------------------------------------------------------------------- session
def _version_of(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def write_session_files(directory: Path, *, build: str, base: str,
                        packages: dict[str, Package], rigs: list[Rig], service: str,
                        bases: dict[str, Package] | None = None, profile: str = "",
                        started: float | None = None) -> None:
    """environment.properties and categories.json of a results directory. ``build`` is the
    version under test (the OTA packages' target), ``base`` what the boards start from,
    ``packages`` the package of each board family, ``bases`` the base image of each (its file,
    md5 and the version inside it), ``profile`` the expectation profile, ``started`` when the
    session began (the run's date; the host is this one)."""
    directory.mkdir(parents=True, exist_ok=True)
    md5 = ", ".join(f"{name}={package.md5}" for name, package in sorted(packages.items()))
    bases = bases or {}
    values = {
        "firmware.build": build, "firmware.base": base,
        "firmware.packages": ", ".join(f"{name}={package.filename}"
                                       for name, package in sorted(packages.items())),
        "package.md5": md5,
        "base.images": ", ".join(f"{name}={package.filename}"
                                 for name, package in sorted(bases.items())),
        "base.md5": ", ".join(f"{name}={package.md5}" for name, package in sorted(bases.items())),
        "base.version": ", ".join(f"{name}={_image_version(name, package)}"
                                  for name, package in sorted(bases.items())),
        "profile": profile,
        "rigs": ", ".join(f"{rig.name} ({rig.board})" for rig in rigs),
        "service": service, "host": platform.node(),
        "date": datetime.fromtimestamp(started or time.time(), UTC).strftime(
            "%Y-%m-%d %H:%M:%S UTC"),
        "hil.version": _version_of("hil"),
        "pytest.version": _version_of("pytest"), "pyocd.version": _version_of("pyocd"),
        "esptool.version": _version_of("esptool"),
    }
    # Nothing rather than a placeholder: the sign-off says a run that names no build so.
    lines = [f"{key}={_escape(value)}" for key, value in values.items() if value]
    (directory / "environment.properties").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (directory / "categories.json").write_text(json.dumps(CATEGORIES, indent=1), encoding="utf-8")


def _image_version(board: str, package: Package) -> str:
    """The version an image carries (MCUboot header, ESP-IDF app descriptor), or "unknown"."""
    from hil.sim.images import image_version

    try:
        return image_version(board, package.data)
    except ValueError:
        return "unknown"


def _escape(value: str) -> str:
    # A properties value may hold '=' and ':' as they are (only the key's first one splits).
    return value.replace("\\", "\\\\").replace("\n", "\\n")
