"""Test helpers for the report: real allure-results, written by a real allure-pytest run.

    results = AllureRun(tmp_path / "host-a").run({
        "esp32-download-stall": Case("esp32", "download", "stall", "failed"),
        "gd32-flash-happy": Case("gd32", "flash", "happy path"),
    })

Each case is one parametrization of one tiny test that sets the labels and parameters of the
plugin's results contract (feature = phase, story, board, rig, tag, severity, AS_ID; parameters
board and rig) and ends the way the case says: passed, failed (an AssertionError reading like a
ConformanceFailure), broken (a hil RigFault), service (a hil ServiceFault) or skipped. The case
id is the only pytest parameter, so running again with other outcomes into the same directory
makes retries of the same tests (same historyId), as a re-run on the bench does.
``environment.properties`` is written as the hil plugin writes it beside them (its contract);
``categories.json`` is the plugin's own (``hil.pytest_plugin.reporting.CATEGORIES``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from hil.pytest_plugin import reporting

BUILD = "1.1.0+g4f2a9c1"
RIG_CHIPS = {"esp32": "esp32", "gd32": "gd32f103c8", "nrf52832": "nrf52832"}
PACKAGE_MD5 = "9e107d9d372bb6826bd81d3542a419d6"

# The categories are the plugin's own (what every results directory of the suite carries).
CATEGORIES = reporting.CATEGORIES

TEST_FILE = '''
import json
import pathlib

import allure
import pytest

from hil.errors import RigFault, ServiceFault

HERE = pathlib.Path(__file__).parent
CASES = json.loads((HERE / "cases.json").read_text())


@pytest.fixture
def ota(rig):
    """Stands for the plugin's scenario (a test using ``ota`` is a conformance scenario): the
    plugin's own rig fixture, parametrization over the rigs and coverage are real."""
    return rig


def _case(name):
    marks = [pytest.mark.board(CASES[name]["board"])]
    if CASES[name]["needs"]:
        marks.append(pytest.mark.needs(*CASES[name]["needs"]))
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("case", [_case(name) for name in sorted(CASES)])
def test_scenario(case, ota):
    board, phase, story, outcome = (CASES[case][key] for key in
                                    ("board", "phase", "story", "outcome"))
    rig = ota.name
    allure.dynamic.feature(phase)
    allure.dynamic.story(story)
    allure.dynamic.label("board", board)
    allure.dynamic.label("rig", rig)
    allure.dynamic.tag(story.replace(" ", "-"))
    allure.dynamic.severity(allure.severity_level.CRITICAL)
    allure.dynamic.id(f"OTA-{phase}-{story}")
    allure.dynamic.parameter("board", board)
    allure.dynamic.parameter("rig", rig)
    with allure.step(f"{phase}: {story}"):
        if outcome == "failed":
            raise AssertionError(f"{phase} phase: expected report codes [104], received [101]")
        if outcome == "broken":
            raise RigFault("flasher", "SWD probe 000683000000 not found", rig=rig)
        if outcome == "service":
            raise ServiceFault("OTA service: 502 from the upstream")
        if outcome == "skipped":
            pytest.skip(f"rig {rig} lacks power_cut")
        if outcome.startswith("fail:"):
            raise AssertionError(outcome.removeprefix("fail:"))
'''


@dataclass(frozen=True)
class Case:
    board: str
    phase: str
    story: str
    outcome: str = "passed"   # passed | failed | broken | service | skipped | fail:<message>
    needs: tuple[str, ...] = ()   # @pytest.mark.needs: a rig lacking one skips the case


class AllureRun:
    """A directory with the tiny test file; ``run`` writes its results into ``results``."""

    def __init__(self, directory: Path, results: Path | None = None) -> None:
        self.directory = directory
        self.results = results or directory / "allure-results"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "test_ota.py").write_text(TEST_FILE)

    def _rigs(self, cases: dict[str, Case], power_cut: tuple[str, ...]) -> list[str]:
        """A rig ``bench-<board>`` per board of the cases (no bench supply: it lacks power_cut),
        and a rig ``bench-<board>-b`` with one for each board in ``power_cut``."""
        names = []
        for board in sorted({case.board for case in cases.values()} | set(power_cut)):
            for name, power in ((f"bench-{board}", {"kind": "none"}),) + (
                    ((f"bench-{board}-b", {"kind": "scpi", "url": "/dev/null",
                                           "empty_volts": 3.3, "full_volts": 4.2}),)
                    if board in power_cut else ()):
                document = {
                    "name": name, "board": board, "chip": RIG_CHIPS[board],
                    "identity": {"product_id": "245528", "dev_id": name,
                                 "access_key_env": "HIL_ACCESS_KEY"},
                    "console": {"port": "/dev/null"},
                    "flasher": {"kind": "none"}, "power": power, "rf": {"kind": "none"},
                    "ota": {"service": "mock"}}
                (self.directory / f"{name}.yaml").write_text(json.dumps(document))
                names += ["--hil-rig", str(self.directory / f"{name}.yaml")]
        return names

    def run(self, cases: dict[str, Case], *, build: str | None = BUILD,
            package_md5: str = PACKAGE_MD5, extra_env: dict[str, str] | None = None,
            power_cut: tuple[str, ...] = (), args: tuple[str, ...] = ()) -> Path:
        (self.directory / "cases.json").write_text(
            json.dumps({name: asdict(case) for name, case in cases.items()}))
        environment = {name: value for name, value in os.environ.items()
                       if not name.startswith(("PYTEST_", "HIL_ALLURE"))}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
             f"--alluredir={self.results}", "test_ota.py", *self._rigs(cases, power_cut),
             "--hil-lease-dir", str(self.directory / "leases"), *args],
            cwd=self.directory, env={**environment, **(extra_env or {})},
            capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode in (0, 1), done.stdout + done.stderr   # 1: some tests failed
        (self.results / "environment.properties").unlink(missing_ok=True)   # the plugin's
        properties = {"package.md5": package_md5, "rigs": "bench-esp32,bench-gd32",
                      "service": "mock", "hil.version": "0.1.0"}
        if build is not None:
            properties["firmware.build"] = build
        (self.results / "environment.properties").write_text(
            "".join(f"{key}={value}\n" for key, value in properties.items()))
        (self.results / "categories.json").write_text(json.dumps(CATEGORIES))
        return self.results
