"""`hil report` end to end: a real run of the conformance suite on a simulated rig, the real
Allure generator, the page opened in headless Chromium (Debian's, driven by playwright-core),
no access key anywhere in the results or the report, and each kind of fault in its category."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from allure_runs import AllureRun, Case
from sim_board import rig_document

from hil.report.generate import generate
from hil.service.server import new_access_key

ROOT = Path(__file__).resolve().parent.parent
HIL = Path(sys.executable).with_name("hil")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NODE_MODULES = ROOT / ".allure" / "node_modules"
SUITE = ["testcases/test_detect.py", "testcases/test_report.py"]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The suite's detect and report scenarios on a simulated nRF52832 with a firmware defect
    (so the report has failures too), the rig's key a known one; then `hil report` on it."""
    base = tmp_path_factory.mktemp("suite")
    key = new_access_key()
    document = rig_document("report-nrf52832", "nrf52832", base / "state",
                            defects=["ignores-power"], http_timeout=1.0)
    document["identity"]["access_key_env"] = "HIL_ACCESS_KEY"
    rig = base / "report-nrf52832.yaml"
    rig.write_text(yaml.safe_dump(document))
    results, report = base / "allure-results", base / "allure-report"
    environment = {**{name: value for name, value in os.environ.items()
                      if not name.startswith("PYTEST_")}, "HIL_ACCESS_KEY": key}
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", *SUITE, "-q", "-p", "no:cacheprovider",
         "--hil-rig", str(rig), "--hil-lease-dir", str(base / "leases"),
         "--hil-timeline-dir", str(base / "timelines"), f"--alluredir={results}"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300, check=False)
    assert suite.returncode in (0, 1), suite.stdout[-3000:] + suite.stderr[-3000:]
    assert "failed" in suite.stdout.splitlines()[-1], "the defect should fail some scenario"
    command = subprocess.run([HIL, "report", str(results), "-o", str(report)], env=environment,
                             capture_output=True, text=True, timeout=300, check=False)
    return {"key": key, "results": results, "report": report, "command": command}


@pytest.fixture(scope="module")
def served(suite_run: dict[str, Any]) -> Iterator[str]:
    """The report on a loopback HTTP server (Allure's page loads its data over HTTP)."""
    handler = functools.partial(_QuietHandler, directory=str(suite_run["report"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()
    server.server_close()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_hil_report_prints_where_the_report_is_and_the_verdict(suite_run):
    command, report = suite_run["command"], suite_run["report"]
    summary = json.loads((report / "signoff.json").read_text())
    assert command.returncode == (0 if summary["verdict"] == "GO" else 1), command.stderr
    lines = command.stdout.splitlines()
    assert lines[0].startswith(f"report:   {report / 'index.html'} (serve it over HTTP")
    assert lines[1] == f"sign-off: {report / 'signoff.md'}, {report / 'signoff.json'}"
    assert lines[2] == "coverage: nrf52832 15/15", lines
    assert lines[3].startswith(f"{summary['verdict']} ({summary['decided_by']}): ")
    assert summary["tests"] == len(list(suite_run["results"].glob("*-result.json")))


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason="no chromium: apt-get install chromium (.ci/run installs it)")
def test_the_page_lists_the_suites_and_the_tests(suite_run, served, tmp_path):
    assert (NODE_MODULES / "playwright-core").is_dir(), \
        "playwright-core is not installed in .allure: run `python3 dev.py setup`"
    screenshot = tmp_path / "suites.png"
    page = subprocess.run(
        ["node", str(Path(__file__).with_name("report_page.js")), served, str(screenshot),
         CHROMIUM, str(tmp_path / "chromium-profile")],
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
        capture_output=True, text=True, timeout=120, check=False)
    assert page.returncode == 0, page.stderr
    listed = json.loads(page.stdout)
    assert listed["title"] == "Allure Report"
    assert listed["errors"] == []
    assert {"testcases", "test_detect", "test_report"} <= set(listed["groups"])
    names = {json.loads(path.read_text())["name"]
             for path in suite_run["results"].glob("*-result.json")}
    assert len(names) >= 10
    # Allure 2 takes results with one testCaseId and the same visible parameters for retries of
    # one test: a parameter that tells tests apart, hidden, hides all but one of them.
    missing = names - set(listed["tests"])
    assert not missing, f"{len(missing)} tests missing from the page (shown as retries?): " \
                        f"{sorted(missing)}"
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1400, 1000)
    assert len(png) > 20_000          # a rendered page, not a blank one
    # The release verdict is on the page a release manager opens, not only in signoff.md.
    summary = json.loads((suite_run["report"] / "signoff.json").read_text())
    widgets = listed["widgets"]
    assert widgets["summary"].startswith(f"Release sign-off: {summary['verdict']}")
    environment = widgets["environment"]
    for shown in ("sign-off", summary["verdict"], "rule 1", "rule 5", "coverage nrf52832",
                  "nrf52832 15/15", "base md5", "package md5", "hil version", "host",
                  "expectation profile", "onenet"):
        assert shown in environment, f"{shown!r} is not in the Environment widget"
    assert summary["firmware"]["base_md5"] in environment
    assert summary["firmware"]["package_md5"] in environment
    assert f"{summary['verdict']} ({summary['decided_by']})" in widgets["executors"]


def test_no_access_key_in_the_results_or_the_report(suite_run):
    key = suite_run["key"].encode()
    assert (suite_run["report"] / "index.html").exists()
    leaks = [path for directory in (suite_run["results"], suite_run["report"])
             for path in directory.rglob("*") if path.is_file() and key in path.read_bytes()]
    assert leaks == [], f"the access key is in {leaks}"


# ---------------------------------------------------------------------------------- categories
FAULTS = {
    "esp32-download": Case("esp32", "download", "stall persistent", "failed"),
    "gd32-flash": Case("gd32", "flash", "power cut", "broken"),
    "gd32-token": Case("gd32", "token", "expired", "service"),
    "esp32-detect": Case("esp32", "detect", "happy path"),
}


@pytest.fixture(scope="module")
def category_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("categories")
    results = AllureRun(base).run(FAULTS)
    generate([results], base / "report")
    return base / "report"


def _category(report: Path, name: str) -> list[dict[str, Any]]:
    """The tests Allure put in category ``name``, each with its message group."""
    tree = json.loads((report / "data" / "categories.json").read_text())
    category = next((child for child in tree["children"] if child["name"] == name), None)
    assert category is not None, [child["name"] for child in tree["children"]]
    return [{**test, "message": group["name"]}
            for group in category["children"] for test in group["children"]]


def test_a_failing_scenario_is_a_firmware_defect_with_its_phase(category_report):
    [test] = _category(category_report, "Firmware defect")
    assert test["name"] == "test_scenario[bench-esp32-esp32-download]"
    assert test["status"] == "failed"
    assert test["message"] == \
        "AssertionError: download phase: expected report codes [104], received [101]"
    case = json.loads((category_report / "data" / "test-cases" / f"{test['uid']}.json")
                      .read_text())
    labels = {(label["name"], label["value"]) for label in case["labels"]}
    assert {("feature", "download"), ("board", "esp32"), ("rig", "bench-esp32")} <= labels


def test_a_rig_fault_and_a_service_fault_have_their_own_categories(category_report):
    [rig] = _category(category_report, "Rig fault")
    assert (rig["name"], rig["status"]) == ("test_scenario[bench-gd32-gd32-flash]", "broken")
    assert rig["message"] == \
        "hil.errors.RigFault: rig bench-gd32: flasher: SWD probe 000683000000 not found"
    [service] = _category(category_report, "Service or infrastructure fault")
    assert service["name"] == "test_scenario[bench-gd32-gd32-token]"
    widget = json.loads((category_report / "widgets" / "categories.json").read_text())
    assert {item["name"]: item["statistic"]["total"] for item in widget["items"]} == \
        {"Firmware defect": 1, "Rig fault": 1, "Service or infrastructure fault": 1}


def test_exit_status_gates_a_release_go_0_no_go_1(tmp_path):
    good = AllureRun(tmp_path / "good").run({"esp32-detect": FAULTS["esp32-detect"]})
    bad = AllureRun(tmp_path / "bad").run({"esp32-download": FAULTS["esp32-download"]})
    go = subprocess.run([HIL, "report", str(good), "-o", str(tmp_path / "r1")],
                        capture_output=True, text=True, timeout=300, check=False)
    assert (go.returncode, go.stdout.splitlines()[-1][:14]) == (0, "GO (every chec"), go.stderr
    # Two hosts merged: the good one and the bad one; the report holds both.
    nogo = subprocess.run([HIL, "report", str(good), str(bad), "-o", str(tmp_path / "r2")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert nogo.returncode == 1, nogo.stderr
    assert nogo.stdout.splitlines()[-1].startswith("NO-GO (no failed test): failed on "
                                                   "esp32/download")
    summary = json.loads((tmp_path / "r2" / "widgets" / "summary.json").read_text())
    assert summary["statistic"]["total"] == 2
