"""The release sign-off: what the Allure results of a firmware build say, and GO or NO-GO.

    results = read_results([Path("host-a/allure-results"), Path("host-b/allure-results")])
    signoff = decide(results, waivers=load_waivers(Path("waivers.yaml")))
    write(signoff, Path("allure-report"))     # signoff.md and signoff.json
    print(signoff.verdict_line())             # NO-GO (no failed test): 1 failed: ...

Input is what allure-pytest writes (``*-result.json``, one per test attempt) and the
``environment.properties`` the hil plugin puts beside them; several directories (several hosts)
merge into one sign-off. A test is its ``historyId`` (Allure's identity of a test and its
parameters; retries share it), its outcome the latest attempt's, its board the ``board`` label
and its phase the ``feature`` label ("(none)" where missing).

The verdict is a rule made of checks, in order, each a name, what it says, and a function
finding what breaks it (``DEFAULT_RULE``). GO when no check finds anything; NO-GO names the first
check broken and lists every finding. By default:

1. something was tested (a results directory without results is NO-GO);
2. the results are of one firmware build, and they name it (``firmware.build``);
3. no conformance test failed (a firmware defect), on any board, in any attempt: a test that
   failed once and passed on a retry is a flaky firmware, not a pass;
4. no rig fault is left unexplained: a broken test is explained when a later attempt of the
   same test passed, or when a waiver (``--waive FILE``) names it with a reason.

A test run on a labgrid place carries the place's name, tags and exporter (labels ``place``,
``place_tags``, ``place_exporter``): the sign-off lists, per board, the places its tests ran on
(``places_of``), in signoff.md, signoff.json and the HTML report's Environment widget.

Skipped tests do not block GO; they are counted, and listed. Every text that reaches the
summary goes through ``Redactor`` (``hil.report.redact``): secrets (access keys, tokens from the
environment, signatures of OneNET Authorization values, in any of their encodings) never do.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

from hil.configfile import (
    JSON_LIMIT,
    STRICT,
    YAML_LIMIT,
    load_json,
    load_model,
    read_bounded,
    shorten,
)
from hil.errors import ConfigError
from hil.report.redact import Redactor

__all__ = ["Redactor"]   # its home was here: ``from hil.report.signoff import Redactor`` works

NONE = "(none)"
PHASES = ("detect", "token", "download", "verify", "flash", "report")
MESSAGE_LIMIT = 240


class Status(StrEnum):
    PASSED = "passed"
    FAILED = "failed"      # a firmware defect: an AssertionError (hil's FirmwareFault)
    BROKEN = "broken"      # a rig or service fault: any other error
    SKIPPED = "skipped"
    UNKNOWN = "unknown"    # the attempt never finished: counted as broken


# The columns of the board x phase table; an unknown outcome is counted with the broken ones.
COLUMNS = (Status.PASSED, Status.FAILED, Status.BROKEN, Status.SKIPPED)


# ---------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Attempt:
    """One ``*-result.json``: one run of one test on one rig."""

    key: str               # historyId: the test with its parameters; retries share it
    name: str
    full_name: str
    status: Status
    board: str
    phase: str
    rig: str
    message: str           # the first line of the status message, redacted
    start: int
    stop: int
    source: Path           # the results directory it came from
    # The labgrid place it ran on ("" for a rig of its own): the plugin's labels place,
    # place_tags and place_exporter (hil.rig.providers.labgrid.Place.facts).
    place: str = ""
    place_tags: str = ""
    place_exporter: str = ""

    @property
    def where(self) -> str:
        on = f", place {self.place}" if self.place else ""
        return f"{self.board}/{self.phase}, rig {self.rig}{on}"


@dataclass(frozen=True)
class Environment:
    """One results directory's ``environment.properties`` (empty when there is none)."""

    directory: Path
    properties: Mapping[str, str]

    @property
    def build(self) -> str | None:
        return self.properties.get("firmware.build") or None

    @property
    def package_md5(self) -> str | None:
        return self.properties.get("package.md5") or None


@dataclass(frozen=True)
class Planned:
    """One scenario on one rig, as a session's coverage file (``*-hil-coverage.json``, written
    by the plugin, ``hil.pytest_plugin.coverage``) records it: what came of it, and why."""

    scenario: str          # the scenario's id, the same on every rig ("download/stall[once]")
    board: str
    rig: str
    names: tuple[str, ...]     # test name, node id, allure fullName: what a waiver may name
    state: str             # passed failed error skipped deselected "not run" "not applicable"
    reason: str
    source: Path

    @property
    def ran(self) -> bool:
        return self.state in ("passed", "failed")

    @property
    def why(self) -> str:
        if self.state == "deselected":
            return f"rig {self.rig}: {self.reason or 'deselected'}"
        if self.state == "not run" and not self.reason:
            return f"rig {self.rig}: not run (the session stopped before it: -x, Ctrl-C or a " \
                   "lost worker)"
        return f"rig {self.rig}: {self.state}" + (f": {self.reason}" if self.reason else "")


@dataclass(frozen=True)
class CoverageFile:
    """One session's coverage: its rigs, the scenarios it knew (each with the boards it is
    for, None for every board), the modules it could not see into, and the plan."""

    path: Path
    directory: Path
    host: str
    rigs: Mapping[str, str]                        # rig -> board
    scenarios: Mapping[str, tuple[str, ...] | None]
    uncollected: tuple[tuple[str, str], ...]       # (module, reason)
    planned: tuple[Planned, ...]


@dataclass(frozen=True)
class Results:
    """Every attempt of every results directory, each directory's environment, and the
    coverage files of the sessions that wrote them."""

    directories: tuple[Path, ...]
    attempts: tuple[Attempt, ...]
    environments: tuple[Environment, ...]
    coverage: tuple[CoverageFile, ...] = ()

    def tests(self) -> dict[str, tuple[Attempt, ...]]:
        """Each test's attempts, oldest first (Allure orders retries the same way)."""
        grouped: dict[str, list[Attempt]] = defaultdict(list)
        for attempt in self.attempts:
            grouped[attempt.key].append(attempt)
        return {key: tuple(sorted(runs, key=lambda run: (run.start, run.stop)))
                for key, runs in sorted(grouped.items(), key=lambda item: _order(item[1]))}


def _order(runs: Sequence[Attempt]) -> tuple[str, str, str]:
    first = runs[0]
    return (first.board, _phase_order(first.phase), first.name)


def _phase_order(phase: str) -> str:
    return f"{PHASES.index(phase):02d}" if phase in PHASES else f"99{phase}"


def read_results(directories: Iterable[Path], redact: Redactor | None = None) -> Results:
    """Read the results directories; a missing directory or an unreadable file is a ConfigError
    naming it (a directory with no results is not: that is a NO-GO, nothing was tested)."""
    redact = redact or Redactor.from_environment()
    dirs = tuple(directories)
    attempts: list[Attempt] = []
    environments: list[Environment] = []
    coverage: list[CoverageFile] = []
    for directory in dirs:
        if not directory.is_dir():
            what = "not a directory" if directory.exists() else "no such directory"
            raise ConfigError(str(directory), f"{what} (give the --alluredir of a pytest run)")
        for path in sorted(directory.glob("*-result.json")):
            attempts.append(_attempt(path, _read_json(path), directory, redact))
        environments.append(Environment(directory, _read_properties(directory)))
        coverage += [_coverage_file(path, directory, redact)
                     for path in sorted(directory.glob(COVERAGE_GLOB))]
    return Results(dirs, tuple(attempts), tuple(environments), tuple(coverage))


COVERAGE_GLOB = "*-hil-coverage.json"     # hil.pytest_plugin.coverage.GLOB


def _coverage_file(path: Path, directory: Path, redact: Redactor) -> CoverageFile:
    document = _read_json_document(path)
    if not isinstance(document, dict) or document.get("hil_coverage") != 1:
        raise ConfigError(str(path), "hil_coverage: not a hil coverage file of format 1")
    try:
        rigs = {str(rig["name"]): str(rig["board"]) for rig in document["rigs"]}
        scenarios = {str(name): tuple(boards) if boards else None
                     for name, boards in document["scenarios"].items()}
        uncollected = tuple((str(entry["module"]), str(entry["reason"]))
                            for entry in document["uncollected"])
        planned = tuple(Planned(
            scenario=str(entry["scenario"]), board=str(entry["board"]), rig=str(entry["rig"]),
            names=tuple(str(entry[key]) for key in ("name", "nodeid", "full_name")),
            state=str(entry["state"]), reason=redact(str(entry["reason"])), source=directory)
            for entry in document["entries"])
    except (KeyError, TypeError, AttributeError) as error:
        raise ConfigError(str(path), f"not a hil coverage file ({type(error).__name__}: "
                                     f"{shorten(str(error))})") from None
    return CoverageFile(path, directory, str(document.get("host", "")), rigs, scenarios,
                        uncollected, planned)


def _read_json_document(path: Path) -> Any:
    return load_json(path, JSON_LIMIT, "results file")


def _read_json(path: Path) -> dict[str, Any]:
    document = _read_json_document(path)
    if not isinstance(document, dict) or not isinstance(document.get("status"), str):
        raise ConfigError(str(path), "not an Allure test result (no status)")
    return document


def _attempt(path: Path, document: dict[str, Any], source: Path, redact: Redactor) -> Attempt:
    try:
        status = Status(document["status"])
    except ValueError:
        raise ConfigError(str(path), f"status: {shorten(repr(document['status']))} is not "
                                     f"an Allure status ({', '.join(Status)})") from None
    label = _pairs(document.get("labels"))
    parameters = {name: _unquote(value) for name, value in
                  _pairs(document.get("parameters")).items()}
    full_name = str(document.get("fullName") or document.get("name") or path.stem)
    key = document.get("historyId") or json.dumps([full_name, sorted(parameters.items())])
    details = document.get("statusDetails")
    message = details.get("message") if isinstance(details, dict) else None
    return Attempt(
        key=str(key),
        name=redact(str(document.get("name") or full_name)),
        full_name=redact(full_name),
        status=status,
        board=redact(label.get("board") or parameters.get("board") or NONE),
        phase=redact(label.get("feature") or NONE),
        rig=redact(label.get("rig") or parameters.get("rig") or NONE),
        message=redact(_first_line(message)) if isinstance(message, str) else "",
        start=_int(document.get("start")),
        stop=_int(document.get("stop")),
        source=source,
        place=redact(label.get("place", "")),
        place_tags=redact(label.get("place_tags", "")),
        place_exporter=redact(label.get("place_exporter", "")),
    )


def _pairs(items: object) -> dict[str, str]:
    """Allure's ``[{"name": ..., "value": ...}]`` lists (labels, parameters) as a mapping; the
    first of a repeated name wins (``tag`` repeats, and is not read here)."""
    pairs: dict[str, str] = {}
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and "name" in item:
            pairs.setdefault(str(item["name"]), str(item.get("value", "")))
    return pairs


def _unquote(value: str) -> str:
    # allure-pytest writes parameter values as Python reprs: 'esp32' for "esp32".
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= MESSAGE_LIMIT else line[:MESSAGE_LIMIT - 1] + "…"


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _read_properties(directory: Path) -> dict[str, str]:
    """Java properties as Allure reads them: ``key=value`` or ``key: value``, # and ! comments."""
    path = directory / "environment.properties"
    if not os.path.lexists(path):
        return {}
    try:
        text = read_bounded(path, YAML_LIMIT, "properties file").decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), "cannot read: not UTF-8 text") from None
    properties: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#!":
            continue
        split = re.search(r"\s*[=:]\s*|\s+", line)
        key, value = (line[:split.start()], line[split.end():]) if split else (line, "")
        properties[key] = value
    return properties


# ---------------------------------------------------------------------------------- waivers
class Waiver(BaseModel):
    """One entry of a waiver file: a known rig fault, or a scenario knowingly not run, and why.

    ``test`` names the test (its name, node id or Allure fullName), its scenario (the id shared
    by every rig, ``flash/power_cut_while_flashing``) or, for a module that was not collected,
    the module's path; shell-style patterns allowed. ``rig`` and ``board`` narrow it ("*", the
    default, for any). Files of the earlier form, ``{test, rig, reason}``, mean the same."""

    model_config = STRICT

    test: str = Field(min_length=1)
    rig: str = Field(default="*", min_length=1)
    board: str = Field(default="*", min_length=1)
    reason: str = Field(min_length=1, pattern=r"\S")

    def matches_name(self, names: Iterable[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, self.test) for name in names)

    def covers(self, attempt: Attempt) -> bool:
        return self.matches_name((attempt.full_name, attempt.name)) \
            and fnmatch.fnmatchcase(attempt.rig, self.rig) \
            and fnmatch.fnmatchcase(attempt.board, self.board)

    def covers_gap(self, gap: Gap) -> bool:
        """A scenario missing on a board: named by its id or any of its tests there, on the
        board, and on one of the board's rigs that could have run it (any, when none did)."""
        names = (gap.scenario, *(name for planned in gap.planned for name in planned.names))
        rigs = [planned.rig for planned in gap.planned] or ["*"]
        return self.matches_name(names) and fnmatch.fnmatchcase(gap.board, self.board) \
            and (self.rig == "*" or any(fnmatch.fnmatchcase(rig, self.rig) for rig in rigs))

    def describe(self) -> str:
        where = " and ".join(f"{key} {value}" for key, value in
                             (("board", self.board), ("rig", self.rig)) if value != "*")
        return f"{self.test}" + (f" on {where}" if where else "") + f": {self.reason}"


RigFaultWaiver = Waiver     # the earlier name: waiver files and callers of it stay valid


class WaiverFile(RootModel[tuple[Waiver, ...]]):
    model_config = ConfigDict(frozen=True)


def load_waivers(path: Path) -> tuple[Waiver, ...]:
    """A YAML list of ``{test, rig, board, reason}`` (rig and board optional); every mistake
    one line naming file and key."""
    return load_model(WaiverFile, path, "waiver file").root


# ---------------------------------------------------------------------------------- coverage
@dataclass(frozen=True)
class Gap:
    """A scenario that did not run (to a verdict) on any rig of a board; ``planned`` are its
    entries on that board's rigs (none: no session collected it for the board)."""

    scenario: str
    board: str
    planned: tuple[Planned, ...]
    waived_by: Waiver | None = None

    @property
    def why(self) -> str:
        if not self.planned:
            return "not collected for this board (no session that ran it knew the scenario)"
        return "; ".join(dict.fromkeys(planned.why for planned in self.planned))

    def text(self) -> str:
        return f"{self.scenario} on {self.board}: {self.why}"

    def as_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "board": self.board, "why": self.why,
                "waived": self.waived_by.reason if self.waived_by else None}


@dataclass(frozen=True)
class BoardCoverage:
    """How many of the scenarios meant for a board ran on one of its rigs."""

    board: str
    expected: int
    ran: int
    gaps: tuple[Gap, ...]          # waived or not

    @property
    def waived(self) -> int:
        return sum(1 for gap in self.gaps if gap.waived_by is not None)

    def line(self) -> str:
        return f"{self.board} {self.ran}/{self.expected}" + \
            (f" (+{self.waived} waived)" if self.waived else "")

    def as_json(self) -> dict[str, Any]:
        return {"board": self.board, "ran": self.ran, "expected": self.expected,
                "waived": self.waived, "missing": [gap.as_json() for gap in self.gaps]}


def coverage_of(results: Results, waivers: Sequence[Waiver] = ()) -> tuple[BoardCoverage, ...]:
    """Per board: every scenario any session knew (for that board), and whether a rig of the
    board ran it in any session; the gaps, each with the waiver that names it, if one does."""
    scenarios: dict[str, tuple[str, ...] | None] = {}
    boards: set[str] = set()
    by_pair: dict[tuple[str, str], list[Planned]] = defaultdict(list)
    for session in results.coverage:
        for name, only in session.scenarios.items():
            known = scenarios.get(name, ())
            scenarios[name] = None if only is None or known is None else (*known, *only)
        boards |= set(session.rigs.values())
        for entry in session.planned:
            by_pair[(entry.scenario, entry.board)].append(entry)
    found = []
    for board in sorted(boards):
        expected = sorted(name for name, only in scenarios.items()
                          if only is None or board in only)
        gaps = []
        ran = 0
        for scenario in expected:
            planned = [entry for entry in by_pair[(scenario, board)]
                       if entry.state != "not applicable"]
            if any(entry.ran for entry in planned):
                ran += 1
                continue
            # One line per rig: its latest session's word (a later session may have skipped
            # what an earlier one errored on; neither ran it).
            latest = tuple({entry.rig: entry for entry in planned}.values())
            gap = Gap(scenario, board, latest)
            waiver = next((waiver for waiver in waivers if waiver.covers_gap(gap)), None)
            gaps.append(Gap(scenario, board, latest, waiver))
        found.append(BoardCoverage(board, len(expected), ran, tuple(gaps)))
    return tuple(found)


# ---------------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class Finding:
    """Something a check found: blocking, or a rig fault and what explained it."""

    check: str
    text: str
    attempt: Attempt | None = None

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"check": self.check, "text": self.text}
        if self.attempt is not None:
            found.update(test=self.attempt.name, full_name=self.attempt.full_name,
                         board=self.attempt.board, phase=self.attempt.phase,
                         rig=self.attempt.rig, status=str(self.attempt.status),
                         message=self.attempt.message, results=str(self.attempt.source))
        return found


@dataclass(frozen=True)
class Evidence:
    """What the checks look at: the results, grouped by test, and the waivers."""

    results: Results
    tests: Mapping[str, tuple[Attempt, ...]]
    waivers: tuple[Waiver, ...]
    coverage: tuple[BoardCoverage, ...] = ()


@dataclass(frozen=True)
class Check:
    name: str
    says: str
    find: Callable[[Evidence], list[Finding]]


def _nothing_tested(evidence: Evidence) -> list[Finding]:
    if evidence.tests:
        return []
    where = ", ".join(str(directory) for directory in evidence.results.directories) or "nowhere"
    return [Finding("something tested", f"nothing was tested: no *-result.json in {where}")]


def _one_build(evidence: Evidence) -> list[Finding]:
    used = {attempt.source for attempt in evidence.results.attempts}
    environments = [env for env in evidence.results.environments if env.directory in used]
    findings = [Finding("one firmware build",
                        f"{env.directory}: names no firmware build (environment.properties "
                        f"firmware.build)") for env in environments if env.build is None]
    builds = {env.build: env.directory for env in environments if env.build is not None}
    if len(builds) > 1:
        listed = ", ".join(f"{name} ({directory})" for name, directory in builds.items())
        findings.append(Finding("one firmware build", f"results of several firmware builds: "
                                f"{listed}"))
    # package.md5 is "board=md5, ..." (one package per board family): hosts that test other
    # boards may list others; one board with two packages is two builds.
    packages: dict[str, dict[str, Path]] = {}
    for env in environments:
        for entry in (env.package_md5 or "").split(","):
            board, _, md5 = entry.strip().rpartition("=")
            if md5:
                packages.setdefault(board, {})[md5] = env.directory
    for board, seen in packages.items():
        if len(seen) > 1:
            listed = ", ".join(f"{md5} ({directory})" for md5, directory in seen.items())
            findings.append(Finding("one firmware build", f"results of several packages"
                                    f"{' for ' + board if board else ''}: {listed}"))
    return findings


def _no_failed(evidence: Evidence) -> list[Finding]:
    findings = []
    for runs in evidence.tests.values():
        failed = [run for run in runs if run.status is Status.FAILED]
        if failed:
            last = failed[-1]
            flaky = " (passed on a later retry: flaky)" if runs[-1].status is Status.PASSED \
                else ""
            findings.append(Finding("no failed test",
                                    f"failed on {last.where}: {last.name}{flaky}: {last.message}",
                                    last))
    return findings


def _broken(runs: Sequence[Attempt]) -> Attempt | None:
    faulted = [run for run in runs if run.status in (Status.BROKEN, Status.UNKNOWN)]
    return faulted[-1] if faulted else None


def _explanation(runs: Sequence[Attempt], waivers: Sequence[RigFaultWaiver]) -> str | None:
    """Why the test's last rig fault does not block: a later pass, or a waiver."""
    last = _broken(runs)
    assert last is not None
    if any(run.status is Status.PASSED for run in runs[runs.index(last) + 1:]):
        return "passed on a later retry"
    for waiver in waivers:
        if waiver.covers(last):
            return f"waived: {waiver.reason}"
    return None


def _rig_faults_explained(evidence: Evidence) -> list[Finding]:
    findings = []
    for runs in evidence.tests.values():
        last = _broken(runs)
        if last is not None and _explanation(runs, evidence.waivers) is None:
            findings.append(Finding("no unexplained rig fault",
                                    f"{last.status} on {last.where}: {last.name}: {last.message}",
                                    last))
    return findings


def _every_scenario_ran(evidence: Evidence) -> list[Finding]:
    """Coverage: every scenario ran on every board, or its absence is waived by name. A
    results directory that carries no coverage (a run without the hil plugin) is unknown."""
    check = "every scenario on every board"
    findings = []
    with_coverage = {session.directory for session in evidence.results.coverage}
    for directory in evidence.results.directories:
        holds = any(attempt.source == directory for attempt in evidence.results.attempts)
        if holds and directory not in with_coverage:
            findings.append(Finding(check, f"coverage unknown: {directory} has test results but "
                                    f"no hil coverage file ({COVERAGE_GLOB}): not a run of the "
                                    "hil plugin, which records what the suite could have run"))
    for session in evidence.results.coverage:
        for module, reason in session.uncollected:
            if not any(waiver.matches_name((module,)) for waiver in evidence.waivers):
                findings.append(Finding(check, f"{module} was not collected ({reason}): its "
                                        f"scenarios are unknown ({session.path.name})"))
    if evidence.results.coverage and not any(session.scenarios
                                             for session in evidence.results.coverage):
        findings.append(Finding(check, "no conformance scenario was collected (no test uses "
                                "the ota fixture)"))
    for board in evidence.coverage:
        missing = [gap for gap in board.gaps if gap.waived_by is None]
        if missing:
            shown = "; ".join(gap.text() for gap in missing[:3])
            more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
            findings.append(Finding(check, f"{board.board} {board.ran}/{board.expected} ran, "
                                    f"{len(missing)} missing: {shown}{more}"))
    return findings


DEFAULT_RULE: tuple[Check, ...] = (
    Check("something tested", "the results hold at least one test", _nothing_tested),
    Check("one firmware build", "the results name one firmware build and package", _one_build),
    Check("no failed test", "every conformance test passed on every board (no failed attempt)",
          _no_failed),
    Check("no unexplained rig fault", "no rig fault (broken) is left unexplained: a later "
          "passing retry or a waiver explains one", _rig_faults_explained),
    Check("every scenario on every board", "every collected conformance scenario ran (passed "
          "or failed) on a rig of every selected board, or is waived by name: a deselected, "
          "uncollected or skipped scenario (a rig lacking a capability included) is not "
          "coverage", _every_scenario_ran),
)


# ---------------------------------------------------------------------------------- sign-off
@dataclass(frozen=True)
class Row:
    board: str
    phase: str
    counts: Mapping[Status, int]

    def as_json(self) -> dict[str, Any]:
        return {"board": self.board, "phase": self.phase,
                **{str(status): self.counts.get(status, 0) for status in COLUMNS}}


@dataclass(frozen=True)
class PlaceUse:
    """A labgrid place a board's tests ran on, and how many of them (their last attempts)."""

    board: str
    rig: str
    place: str
    tags: str
    exporter: str
    tests: int

    def line(self) -> str:
        """``bench-07 (board=nrf52832, dev_id=527776562; exporter bench-host-3): 59 tests``."""
        tags = f"{self.tags}; " if self.tags else ""
        return f"{self.place} ({tags}exporter {self.exporter or 'unknown'}): {self.tests} " \
               f"test{'s' if self.tests != 1 else ''}, rig {self.rig}"

    def as_json(self) -> dict[str, Any]:
        return {"board": self.board, "rig": self.rig, "place": self.place, "tags": self.tags,
                "exporter": self.exporter, "tests": self.tests}


def places_of(finals: Iterable[Attempt]) -> tuple[PlaceUse, ...]:
    """The places the tests ran on, by board (a run on several places: a line each)."""
    counts: Counter[tuple[str, str, str, str, str]] = Counter(
        (run.board, run.rig, run.place, run.place_tags, run.place_exporter)
        for run in finals if run.place)
    return tuple(PlaceUse(*key, tests=count) for key, count in sorted(counts.items()))


@dataclass(frozen=True)
class SignOff:
    go: bool
    decided_by: str                     # the check that decided NO-GO, or "every check"
    reason: str
    rule: tuple[str, ...]               # what each check of the rule says
    build: str
    package_md5: str
    directories: tuple[str, ...]
    rows: tuple[Row, ...]
    tests: int
    attempts: int
    blocking: tuple[Finding, ...]
    explained: tuple[Finding, ...]
    skipped: tuple[Attempt, ...]
    unused_waivers: tuple[Waiver, ...] = field(default=())
    coverage: tuple[BoardCoverage, ...] = field(default=())
    base: str = "unknown"             # the base image of each board, its md5 and version
    base_md5: str = "unknown"
    base_version: str = "unknown"
    profile: str = "unknown"          # the expectation profile
    hosts: str = "unknown"
    date: str = "unknown"             # when the sessions ran
    hil_version: str = "unknown"
    waivers: tuple[Waiver, ...] = field(default=())
    # The rest of the results' environment.properties (rigs, service, tool versions), joined.
    other_environment: tuple[tuple[str, str], ...] = field(default=())
    places: tuple[PlaceUse, ...] = field(default=())    # the labgrid places tests ran on

    def coverage_line(self) -> str:
        """``coverage: esp32 56/56, gd32 56/56, nrf52832 56/56``."""
        boards = ", ".join(board.line() for board in self.coverage)
        return f"coverage: {boards or 'unknown (no hil coverage file)'}"

    @property
    def verdict(self) -> str:
        return "GO" if self.go else "NO-GO"

    def totals(self) -> dict[Status, int]:
        total: Counter[Status] = Counter()
        for row in self.rows:
            total.update(row.counts)
        return {status: total[status] for status in COLUMNS}

    def verdict_line(self) -> str:
        return f"{self.verdict} ({self.decided_by}): {self.reason}"

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "decided_by": self.decided_by,
            "reason": self.reason,
            "rule": list(self.rule),
            "firmware": {"build": self.build, "package_md5": self.package_md5,
                         "base": self.base, "base_md5": self.base_md5,
                         "base_version": self.base_version},
            "profile": self.profile,
            "date": self.date,
            "hosts": self.hosts,
            "hil_version": self.hil_version,
            "coverage": [board.as_json() for board in self.coverage],
            "places": [place.as_json() for place in self.places],
            "waivers": [waiver.model_dump() for waiver in self.waivers],
            "results": list(self.directories),
            "tests": self.tests,
            "attempts": self.attempts,
            "totals": {str(status): count for status, count in self.totals().items()},
            "boards_x_phases": [row.as_json() for row in self.rows],
            "blocking": [finding.as_json() for finding in self.blocking],
            "explained": [finding.as_json() for finding in self.explained],
            "skipped": [{"test": run.name, "board": run.board, "phase": run.phase,
                         "rig": run.rig, "reason": run.message} for run in self.skipped],
            "unused_waivers": [waiver.model_dump() for waiver in self.unused_waivers],
        }

    def as_markdown(self) -> str:
        lines = [f"# Release sign-off: firmware {self.build}", "",
                 f"**{self.verdict}** — decided by *{self.decided_by}*: {_md(self.reason)}", "",
                 "| | |", "|---|---|",
                 f"| firmware build | {_md(self.build)} |",
                 f"| package md5 | {_md(self.package_md5)} |",
                 f"| base image | {_md(self.base)} |",
                 f"| base version | {_md(self.base_version)} |",
                 f"| base md5 | {_md(self.base_md5)} |",
                 f"| expectation profile | {_md(self.profile)} |",
                 f"| {_md(self.coverage_line().split(': ', 1)[0])} | "
                 f"{_md(self.coverage_line().split(': ', 1)[1])} |",
                 f"| date | {_md(self.date)} |",
                 f"| host | {_md(self.hosts)} |",
                 f"| hil version | {_md(self.hil_version)} |",
                 f"| results | {_md(', '.join(self.directories))} |",
                 f"| tests | {self.tests} ({self.attempts} attempts, retries included) |", "",
                 "Rule: GO when every check holds —", ""]
        lines += [f"{number}. {_md(says)}" for number, says in enumerate(self.rule, 1)]
        if self.coverage:
            lines += ["", "## Coverage", "", "| board | ran | scenarios | waived | missing |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {_md(board.board)} | {board.ran} | {board.expected} | "
                      f"{board.waived} | {len(board.gaps) - board.waived} |"
                      for board in self.coverage]
        if self.places:
            lines += ["", "## Places (labgrid)", "",
                      "| board | place | tags | exporter | tests | rig |",
                      "|---|---|---|---|---:|---|"]
            lines += [f"| {_md(use.board)} | {_md(use.place)} | {_md(use.tags)} | "
                      f"{_md(use.exporter)} | {use.tests} | {_md(use.rig)} |"
                      for use in self.places]
        lines += ["", "## Board x phase", "",
                  "| board | phase | " + " | ".join(COLUMNS) + " |",
                  "|---|---|" + "---:|" * len(COLUMNS)]
        lines += [f"| {_md(row.board)} | {_md(row.phase)} | "
                  + " | ".join(str(row.counts.get(status, 0)) for status in COLUMNS) + " |"
                  for row in self.rows]
        lines.append("| **total** | | " + " | ".join(f"**{count}**" for count in
                                                      self.totals().values()) + " |")
        gaps = [gap for board in self.coverage for gap in board.gaps]
        sections = (("Blocking", [finding.text for finding in self.blocking]),
                    ("Not run (blocking unless waived)",
                     [gap.text() for gap in gaps if gap.waived_by is None]),
                    ("Not run, waived",
                     [f"{gap.text()} — waived: {gap.waived_by.reason}" for gap in gaps
                      if gap.waived_by is not None]),
                    ("Waivers given", [waiver.describe() for waiver in self.waivers]),
                    ("Rig faults explained", [finding.text for finding in self.explained]),
                    ("Skipped (not blocking)",
                     [f"{run.name} on {run.where}: {run.message}" for run in self.skipped]),
                    ("Waivers that matched nothing",
                     [waiver.describe() for waiver in self.unused_waivers]))
        for title, items in sections:
            if items:
                lines += ["", f"## {title}", ""] + [f"- {_md(item)}" for item in items]
        return "\n".join(lines) + "\n"


    # ------------------------------------------------------------ in the HTML report
    def executor(self) -> dict[str, Any]:
        """Allure 2's ``executor.json``: the verdict is the report's name (the Overview's
        title) and the Executors widget's build line."""
        return {"name": "hil release sign-off", "type": "hil",
                "reportName": f"Release sign-off: {self.verdict} — firmware {self.build}",
                "buildName": f"{self.verdict_line()} | {self.coverage_line()}"}

    def environment(self) -> dict[str, str]:
        """The Environment widget: the verdict, the rule, the coverage, the build and the
        waivers, key by key (the results' own environment is folded in)."""
        # Allure shows the first five rows until "Show all" is clicked: the verdict, the
        # coverage of each board and the build come first, the rule after them.
        values = {"sign-off": self.verdict_line(),
                  **{f"coverage {board.board}": board.line() for board in self.coverage}}
        if not self.coverage:
            values["coverage"] = self.coverage_line().split(": ", 1)[1]
        values.update({"firmware build (target)": self.build, "package md5": self.package_md5,
                       "base image": self.base, "base version": self.base_version,
                       "base md5": self.base_md5, "expectation profile": self.profile,
                       "date": self.date, "host": self.hosts, "hil version": self.hil_version,
                       **{f"rule {number}": says for number, says in enumerate(self.rule, 1)}})
        places: dict[str, list[str]] = defaultdict(list)
        for use in self.places:
            places[use.board].append(use.line())
        values.update({f"places {board}": " / ".join(lines) for board, lines in places.items()})
        values.update({f"waiver {number}": waiver.describe()
                       for number, waiver in enumerate(self.waivers, 1)})
        values.update(self.other_environment)
        return values


def _md(text: str) -> str:
    """Text safe in a Markdown table cell or list item."""
    return text.replace("|", "\\|").replace("\n", " ")


def decide(results: Results, waivers: Sequence[Waiver] = (),
           rule: Sequence[Check] = DEFAULT_RULE) -> SignOff:
    # A test ``@pytest.mark.board`` keeps off its rig's board is no test of that board: its
    # skip is not counted (the coverage knows it as not applicable).
    elsewhere = {name for session in results.coverage for planned in session.planned
                 if planned.state == "not applicable" for name in planned.names[:1]}
    tests = {key: runs for key, runs in results.tests().items()
             if runs[-1].name not in elsewhere}
    coverage = coverage_of(results, waivers)
    evidence = Evidence(results, tests, tuple(waivers), coverage)
    blocking: list[Finding] = []
    for check in rule:
        blocking += check.find(evidence)
    first = blocking[0] if blocking else None
    if first is None:
        decided_by, reason = "every check", "; ".join(check.says for check in rule)
    else:
        count = len(blocking)
        decided_by = first.check
        reason = first.text + (f" (and {count - 1} more)" if count > 1 else "")

    finals = [runs[-1] for runs in tests.values()]
    table: dict[tuple[str, str], Counter[Status]] = defaultdict(Counter)
    for final in finals:
        status = Status.BROKEN if final.status is Status.UNKNOWN else final.status
        table[(final.board, final.phase)][status] += 1
    rows = tuple(Row(board, phase, dict(counts)) for (board, phase), counts in
                 sorted(table.items(), key=lambda item: (item[0][0], _phase_order(item[0][1]))))

    explained = []
    for runs in tests.values():
        last = _broken(runs)
        why = _explanation(runs, waivers) if last is not None else None
        if last is not None and why is not None:
            explained.append(Finding("no unexplained rig fault",
                                     f"{last.status} on {last.where}: {last.name}: "
                                     f"{last.message} — {why}", last))
    broken = [run for run in results.attempts if run.status in (Status.BROKEN, Status.UNKNOWN)]
    gap_waivers = [gap.waived_by for board in coverage for gap in board.gaps]
    modules = [module for session in results.coverage for module, _ in session.uncollected]
    unused = tuple(waiver for waiver in waivers if not any(map(waiver.covers, broken))
                   and waiver not in gap_waivers and not waiver.matches_name(modules))

    used = {attempt.source for attempt in results.attempts}
    environments = [env for env in results.environments if env.directory in used] \
        or list(results.environments)
    return SignOff(
        go=first is None, decided_by=decided_by, reason=reason,
        rule=tuple(check.says for check in rule),
        build=_joined(env.build for env in environments),
        package_md5=_joined(env.package_md5 for env in environments),
        directories=tuple(str(directory) for directory in results.directories),
        rows=rows, tests=len(tests), attempts=sum(len(runs) for runs in tests.values()),
        blocking=tuple(blocking), explained=tuple(explained),
        skipped=tuple(final for final in finals if final.status is Status.SKIPPED),
        unused_waivers=unused, coverage=coverage,
        base=_property(environments, "base.images", "firmware.base"),
        base_md5=_property(environments, "base.md5"),
        base_version=_property(environments, "base.version"),
        profile=_property(environments, "profile"),
        hosts=_joined([env.properties["host"] for env in environments
                       if env.properties.get("host")]
                      + [session.host for session in results.coverage if session.host]
                      or [None]),
        date=_property(environments, "date"),
        hil_version=_property(environments, "hil.version"),
        waivers=tuple(waivers),
        other_environment=tuple(
            (key, _joined(env.properties.get(key) for env in environments))
            for key in dict.fromkeys(key for env in environments for key in env.properties)
            if key not in _SIGNED_PROPERTIES),
        places=places_of(finals),
    )


# The properties the sign-off shows under its own names (SignOff.environment).
_SIGNED_PROPERTIES = {"firmware.build", "firmware.base", "firmware.packages", "package.md5",
                      "base.images", "base.md5", "base.version", "profile", "host", "date",
                      "hil.version"}


def _property(environments: Sequence[Environment], *keys: str) -> str:
    """One property of the environments (the first of ``keys`` each has), hosts joined."""
    return _joined(next((env.properties[key] for key in keys if env.properties.get(key)), None)
                   for env in environments)


def _joined(values: Iterable[str | None]) -> str:
    seen = list(dict.fromkeys(value or "unknown" for value in values))
    return " / ".join(seen) or "unknown"


def write(signoff: SignOff, directory: Path, redact: Redactor | None = None) -> tuple[Path, Path]:
    """``signoff.md`` and ``signoff.json`` in ``directory`` (the report's), redacted again as a
    last guard: the summary is what gets mailed around."""
    redact = redact or Redactor.from_environment()
    directory.mkdir(parents=True, exist_ok=True)
    markdown, document = directory / "signoff.md", directory / "signoff.json"
    markdown.write_text(redact(signoff.as_markdown()), encoding="utf-8")
    document.write_text(redact(json.dumps(signoff.as_json(), indent=2, ensure_ascii=False))
                        + "\n", encoding="utf-8")
    return markdown, document
