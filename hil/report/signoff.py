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

Skipped tests do not block GO; they are counted, and listed. Every text that reaches the
summary goes through ``Redactor``: secrets (access keys, tokens from the environment, signatures
of OneNET Authorization values) never do.
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

from hil.configfile import STRICT, load_model
from hil.errors import ConfigError

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


# ---------------------------------------------------------------------------------- secrets
_SECRET_NAME = re.compile(r"ACCESS_KEY|SECRET|TOKEN|PASSWORD|PASSWD|API_KEY", re.IGNORECASE)
# The signature of a OneNET Authorization value (``...&sign=<base64>``), urlencoded or not.
_SIGNATURE = re.compile(r"(sign(?:=|%3D))[^&\s\"']+", re.IGNORECASE)
MASK = "***"


@dataclass(frozen=True)
class Redactor:
    """Masks secrets in text: the values of secret-named environment variables and signatures."""

    secrets: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Redactor:
        environ = os.environ if environ is None else environ
        # Short values ("1", "on") are flags, not secrets, and masking them would garble text.
        found = {value for name, value in environ.items()
                 if _SECRET_NAME.search(name) and len(value) >= 8}
        return cls(tuple(sorted(found, key=len, reverse=True)))

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return _SIGNATURE.sub(rf"\g<1>{MASK}", text)


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

    @property
    def where(self) -> str:
        return f"{self.board}/{self.phase}, rig {self.rig}"


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
class Results:
    """Every attempt of every results directory, and each directory's environment."""

    directories: tuple[Path, ...]
    attempts: tuple[Attempt, ...]
    environments: tuple[Environment, ...]

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
    for directory in dirs:
        if not directory.is_dir():
            what = "not a directory" if directory.exists() else "no such directory"
            raise ConfigError(str(directory), f"{what} (give the --alluredir of a pytest run)")
        for path in sorted(directory.glob("*-result.json")):
            attempts.append(_attempt(path, _read_json(path), directory, redact))
        environments.append(Environment(directory, _read_properties(directory)))
    return Results(dirs, tuple(attempts), tuple(environments))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_bytes())
    except OSError as error:
        raise ConfigError(str(path), f"cannot read: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        line = f"line {error.lineno}: " if isinstance(error, json.JSONDecodeError) else ""
        raise ConfigError(str(path), f"{line}not valid JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("status"), str):
        raise ConfigError(str(path), "not an Allure test result (no status)")
    return document


def _attempt(path: Path, document: dict[str, Any], source: Path, redact: Redactor) -> Attempt:
    try:
        status = Status(document["status"])
    except ValueError:
        raise ConfigError(str(path), f"status: {document['status']!r} is not an Allure "
                                     f"status ({', '.join(Status)})") from None
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
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(str(path), f"cannot read: {reason}") from None
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
class RigFaultWaiver(BaseModel):
    """One entry of a waiver file: this test's rig fault on this rig is known, and why."""

    model_config = STRICT

    test: str = Field(min_length=1)     # a fullName or name, shell-style patterns allowed
    rig: str = Field(min_length=1)      # a rig name, patterns allowed ("*" for any rig)
    reason: str = Field(min_length=1, pattern=r"\S")

    def covers(self, attempt: Attempt) -> bool:
        named = any(fnmatch.fnmatchcase(name, self.test)
                    for name in (attempt.full_name, attempt.name))
        return named and fnmatch.fnmatchcase(attempt.rig, self.rig)


class WaiverFile(RootModel[tuple[RigFaultWaiver, ...]]):
    model_config = ConfigDict(frozen=True)


def load_waivers(path: Path) -> tuple[RigFaultWaiver, ...]:
    """A YAML list of ``{test, rig, reason}``; every mistake one line naming file and key."""
    return load_model(WaiverFile, path).root


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
    waivers: tuple[RigFaultWaiver, ...]


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


DEFAULT_RULE: tuple[Check, ...] = (
    Check("something tested", "the results hold at least one test", _nothing_tested),
    Check("one firmware build", "the results name one firmware build and package", _one_build),
    Check("no failed test", "every conformance test passed on every board (no failed attempt)",
          _no_failed),
    Check("no unexplained rig fault", "no rig fault (broken) is left unexplained: a later "
          "passing retry or a waiver explains one", _rig_faults_explained),
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
    unused_waivers: tuple[RigFaultWaiver, ...] = field(default=())

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
            "firmware": {"build": self.build, "package_md5": self.package_md5},
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
                 f"| results | {_md(', '.join(self.directories))} |",
                 f"| tests | {self.tests} ({self.attempts} attempts, retries included) |", "",
                 "Rule: GO when every check holds —", ""]
        lines += [f"{number}. {_md(says)}" for number, says in enumerate(self.rule, 1)]
        lines += ["", "## Board x phase", "",
                  "| board | phase | " + " | ".join(COLUMNS) + " |",
                  "|---|---|" + "---:|" * len(COLUMNS)]
        lines += [f"| {_md(row.board)} | {_md(row.phase)} | "
                  + " | ".join(str(row.counts.get(status, 0)) for status in COLUMNS) + " |"
                  for row in self.rows]
        lines.append("| **total** | | " + " | ".join(f"**{count}**" for count in
                                                      self.totals().values()) + " |")
        sections = (("Blocking", [finding.text for finding in self.blocking]),
                    ("Rig faults explained", [finding.text for finding in self.explained]),
                    ("Skipped (not blocking)",
                     [f"{run.name} on {run.where}: {run.message}" for run in self.skipped]),
                    ("Waivers that matched nothing",
                     [f"{waiver.test} on {waiver.rig}: {waiver.reason}"
                      for waiver in self.unused_waivers]))
        for title, items in sections:
            if items:
                lines += ["", f"## {title}", ""] + [f"- {_md(item)}" for item in items]
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Text safe in a Markdown table cell or list item."""
    return text.replace("|", "\\|").replace("\n", " ")


def decide(results: Results, waivers: Sequence[RigFaultWaiver] = (),
           rule: Sequence[Check] = DEFAULT_RULE) -> SignOff:
    tests = results.tests()
    evidence = Evidence(results, tests, tuple(waivers))
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
    unused = tuple(waiver for waiver in waivers if not any(map(waiver.covers, broken)))

    used = {attempt.source for attempt in results.attempts}
    environments = [env for env in results.environments if env.directory in used] \
        or list(results.environments)
    return SignOff(
        go=first is None, decided_by=decided_by, reason=reason,
        rule=tuple(check.says for check in rule),
        build=_joined(env.build for env in environments),
        package_md5=_joined(env.package_md5 for env in environments),
        directories=tuple(str(directory) for directory in results.directories),
        rows=rows, tests=len(tests), attempts=len(results.attempts),
        blocking=tuple(blocking), explained=tuple(explained),
        skipped=tuple(final for final in finals if final.status is Status.SKIPPED),
        unused_waivers=unused,
    )


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
