"""Coverage: what the suite could have run, and what it ran, written beside the Allure results.

A *conformance scenario* is a collected test that uses the ``ota`` fixture (every test of
``testcases/`` does; a test elsewhere that drives a scenario counts too, one that does not is
no scenario wherever it lives). Its identity is ``reporting.scenario_of`` (``download/stall
[once]``: the same on every rig), so that coverage can be counted per board.

The plugin plans every collected scenario x every selected rig, before ``-k``/``-m``/
``--deselect`` take any away (its hook runs first), and records for each pair what came of it:

=================  ===================================================================
``passed``         ran, and passed
``failed``         ran, and failed (a firmware defect: still coverage, the rule's other
                   checks judge it)
``error``          did not run to a verdict: a rig or service fault (reason: the fault)
``skipped``        skipped (reason: pytest's; a rig lacking a capability included)
``deselected``     taken away by ``-k``, ``-m`` or ``--deselect``
``not run``        selected but no report came (``-x``, Ctrl-C, a crashed worker)
``not applicable`` ``@pytest.mark.board`` keeps the scenario off this rig's board
=================  ===================================================================

A test module the plugin cannot see scenarios of is listed as ``uncollected``: a test module
(``python_files``) beside the collected scenario modules that pytest was not given, or one whose
collection was narrowed to some tests (``file.py::test``). Its scenarios are unknown, so the
sign-off cannot count them: it says so instead.

Under xdist the workers collect: each sends its plan to the controller (``workeroutput``);
the controller sees every test's reports and writes the file at the end of the session:
``<alluredir>/<uuid>-hil-coverage.json``, one per session, so a re-run into the same results
directory adds to what an earlier run covered rather than replacing it.
"""

from __future__ import annotations

import fnmatch
import json
import platform
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from hil.pytest_plugin.reporting import scenario_of
from hil.rig.model import Rig

FORMAT = 1
SUFFIX = "-hil-coverage.json"
GLOB = f"*{SUFFIX}"
_WORKER_KEY = "hil_coverage_plan"
RAN = ("passed", "failed")          # the states that are coverage


def _rig_of(item: pytest.Item) -> Rig | None:
    callspec = getattr(item, "callspec", None)
    rig = callspec.params.get("_hil_rig") if callspec else None
    return rig if isinstance(rig, Rig) else None


def _full_name(item: pytest.Item) -> str:
    # allure-pytest's fullName ("testcases.test_flash#test_power_cut"): what a waiver may name.
    from allure_pytest.utils import allure_full_name  # type: ignore[import-untyped]

    return str(allure_full_name(item))


class CoverageRecorder:
    """The plan (from collection) and the outcomes (from the reports) of one session."""

    def __init__(self, rigs: Iterable[Rig], root: Path) -> None:
        self.rigs = tuple(rigs)
        self.root = root
        self.started = time.time()
        self.entries: dict[str, dict[str, Any]] = {}       # node id -> entry
        self.scenarios: dict[str, list[str] | None] = {}   # scenario -> boards it is for
        self.uncollected: list[dict[str, str]] = []
        self._modules: set[Path] = set()
        self.outcomes: dict[str, tuple[str, str]] = {}     # node id -> (state, reason)

    # -------------------------------------------------------------------- collection
    def plan(self, items: Iterable[pytest.Item]) -> None:
        """Every scenario item, before any deselection."""
        for item in items:
            rig = _rig_of(item)
            if rig is None or "ota" not in getattr(item, "fixturenames", ()):
                continue
            _, scenario = scenario_of(item, rig)
            boards = sorted({str(name) for mark in item.iter_markers("board")
                             for name in mark.args}) or None
            self.scenarios[scenario] = boards
            self._modules.add(Path(str(item.path)))
            applicable = boards is None or rig.board in boards
            self.entries[item.nodeid] = {
                "scenario": scenario, "board": rig.board, "rig": rig.name,
                "name": item.name, "nodeid": item.nodeid, "full_name": _full_name(item),
                "state": "not run" if applicable else "not applicable",
                "reason": "" if applicable else f"runs on {', '.join(boards or ())}",
            }

    def deselected(self, items: Iterable[pytest.Item]) -> None:
        for item in items:
            entry = self.entries.get(item.nodeid)
            if entry is not None and entry["state"] == "not run":
                entry.update(state="deselected", reason="deselected (-k, -m or --deselect)")

    def finish_collection(self, session: pytest.Session) -> None:
        """The test modules beside the collected ones that pytest was not given (or was given
        only part of): their scenarios are unknown to this session."""
        modules = self._modules
        patterns = session.config.getini("python_files")
        for directory in sorted({module.parent for module in modules}):
            for candidate in sorted(directory.iterdir()):
                if candidate.is_file() and candidate not in modules and any(
                        fnmatch.fnmatch(candidate.name, pattern) for pattern in patterns):
                    self.uncollected.append({"module": self._relative(candidate),
                                             "reason": "pytest was not given it"})
        for arg in session.config.args:
            if "::" in arg:
                self.uncollected.append({"module": self._relative(Path(arg.split("::")[0])),
                                         "reason": f"collection narrowed to {arg}"})

    def _relative(self, path: Path) -> str:
        path = path if path.is_absolute() else Path.cwd() / path
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def as_plan(self) -> dict[str, Any]:
        return {"entries": self.entries, "scenarios": self.scenarios,
                "uncollected": self.uncollected}

    def take_plan(self, plan: dict[str, Any]) -> None:
        """A worker's plan, on the controller (every worker collects the same)."""
        if self.entries:
            return
        self.entries = {nodeid: dict(entry) for nodeid, entry in plan["entries"].items()}
        self.scenarios = dict(plan["scenarios"])
        self.uncollected = list(plan["uncollected"])

    # -------------------------------------------------------------------- outcomes
    def report(self, report: pytest.TestReport) -> None:
        """A test's report. Kept by node id, apart from the plan: under xdist the controller
        hears reports before a worker's plan reaches it (when the worker stops)."""
        state, reason = self.outcomes.get(report.nodeid, ("not run", ""))
        if report.skipped:
            state, reason = "skipped", _skip_reason(report)
        elif report.failed:
            fault = getattr(report, "hil_rig_fault", None)
            if report.when == "call" and not fault:
                state, reason = "failed", _first_error(report)
            elif state != "failed":
                state, reason = "error", f"{report.when}: {fault or _first_error(report)}"
        elif report.when == "call":
            state, reason = "passed", ""
        self.outcomes[report.nodeid] = (state, reason)

    def _entries(self) -> list[dict[str, Any]]:
        entries = []
        for nodeid, entry in self.entries.items():
            if entry["state"] == "not run" and nodeid in self.outcomes:
                state, reason = self.outcomes[nodeid]
                entry = {**entry, "state": state, "reason": reason}
            entries.append(entry)
        return sorted(entries, key=lambda e: (e["board"], e["scenario"], e["rig"]))

    def document(self, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "hil_coverage": FORMAT, "host": platform.node(), "started": self.started,
            "finished": time.time(), **options,
            "rigs": [{"name": rig.name, "board": rig.board} for rig in self.rigs],
            "scenarios": self.scenarios, "uncollected": self.uncollected,
            "entries": self._entries(),
        }

    def write(self, directory: Path, options: dict[str, Any]) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{uuid.uuid4()}{SUFFIX}"
        path.write_text(json.dumps(self.document(options), indent=1), encoding="utf-8")
        return path


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return "skipped"


def _first_error(report: pytest.TestReport) -> str:
    """The exception line of a failure (``E   hil.errors.RigFault: ...``), else its last line."""
    text = report.longreprtext
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    found = lines[0] if lines else (text.strip().splitlines() or ["(no detail)"])[-1]
    return found[:240]


# ---------------------------------------------------------------------------------- hooks
class CoveragePlugin:
    """The recorder's hooks, registered for the session (``pytest_sessionstart``)."""

    def __init__(self, recorder: CoverageRecorder) -> None:
        self.recorder = recorder

    # First, as the plugin's own: -k, -m and --deselect have not taken anything away yet.
    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.recorder.plan(items)

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.recorder.deselected(items)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.recorder.finish_collection(session)
        workeroutput = getattr(session.config, "workeroutput", None)
        if isinstance(workeroutput, dict):      # an xdist worker: the plan goes to the controller
            workeroutput[_WORKER_KEY] = self.recorder.as_plan()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.recorder.report(report)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        plan = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
        if isinstance(plan, dict):
            self.recorder.take_plan(plan)


PLUGIN_NAME = "hil-coverage"


def register(config: pytest.Config, rigs: Iterable[Rig]) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(CoveragePlugin(CoverageRecorder(rigs, config.rootpath)),
                                      PLUGIN_NAME)


def recorder(config: pytest.Config) -> CoverageRecorder | None:
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    return plugin.recorder if isinstance(plugin, CoveragePlugin) else None
