"""The whole conformance suite on a labgrid place: the place of ``tests/test_labgrid.py`` (its
``lab`` fixture, a module's own: a bench host whose nRF52832 probe is served by pyocd's probe
server, a real coordinator and exporter on loopback), with its console, power and SWD probe
reached only through the place.

A module and an xdist group of its own: the suite takes a few minutes of mostly waiting (the
tasks' retry intervals, the boards' timeouts), which then runs beside the other labgrid tests
rather than after them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from private_rig import ROOT
from test_labgrid import EXPORTER, PLACE, Lab, lab, place_state

from hil.report.signoff import decide, read_results

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="labgrid's exporter and ser2net are Linux'"),
              pytest.mark.xdist_group("labgrid-suite")]

__all__ = ["lab"]        # the fixture, one instance for this module


# A power cut timed to the install's first write (the board's `ota phase=flash` line) goes
# through `labgrid-client power off`, a new process and coordinator session: on this machine it
# lands after the simulated board's install (about a second), and the fault never hits.
CUT_DURING_FLASH = "testcases/test_flash.py::test_a_power_cut_while_flashing_still_ends_in_201"


def test_the_conformance_suite_runs_on_the_place(lab: Lab, tmp_path: Path) -> None:
    """The whole conformance suite from a rig file naming only the place: the console through
    ser2net and the coordinator, power cut through labgrid's power driver (the battery level
    through the firmware's hook), the base image restored before each test through the
    place's SWD probe (pyocd's remote probe client to the bench host's probe server), rf the
    firmware's hook. Every scenario runs but five: a bad sector and the three bootloader
    scenarios' packages, made only for a simulated board (a place is not one), and the power
    cut during the install (``CUT_DURING_FLASH``)."""
    rig = yaml.safe_load(lab.rig_path.read_text())
    rig.update(name="lab-lg-suite", ota={"device_timeout": 1.0})
    path = tmp_path / "lab-lg-suite.yaml"
    path.write_text(yaml.safe_dump(rig), encoding="utf-8")
    junit = tmp_path / "junit.xml"
    common = ["testcases", "--hil-rig", str(path), "-p", "no:cacheprovider"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *common, "--deselect", f"{CUT_DURING_FLASH}[lab-lg-suite]",
         "--hil-firmware", str(ROOT / "fixtures" / "images" / "nrf52832-1.0.0.bin"),
         f"--junitxml={junit}", f"--alluredir={tmp_path / 'allure'}", "-q", "-rfEs",
         "--no-header"],
        cwd=ROOT, env=lab.env, capture_output=True, text=True, timeout=900, check=False)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-4000:]
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 4, skipped
    assert sum("a bad sector can only be injected into a simulated board's flash" in line
               for line in skipped) == 1, skipped
    # The bootloader scenarios' packages (a failing, a foreign-signed, an older build) are
    # made for simulated boards only.
    assert sum("is no simulated board" in line for line in skipped) == 3, skipped
    # Coverage: every test the suite collects ran here (passed, or the two above), and each
    # of the suite's files took part.
    collected = subprocess.run([sys.executable, "-m", "pytest", *common, "--collect-only", "-q"],
                               cwd=ROOT, env=lab.env, capture_output=True, text=True,
                               timeout=300, check=False)
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    assert len(cases) == len(ids) - 1, (summary, collected.stdout[-2000:])
    assert re.search(rf"^{len(ids) - 5} passed, 4 skipped, 1 deselected in ", summary), summary
    assert {case.get("classname", "").split(".")[1] for case in cases} == \
        {path.stem for path in (ROOT / "testcases").glob("test_*.py")}
    assert place_state(lab) == "free"
    # The sign-off names the place every test ran on (a rig file's place: labelled once the
    # place is acquired).
    signoff = decide(read_results([tmp_path / "allure"]))
    assert [use.as_json() for use in signoff.places] == [{
        "board": "nrf52832", "rig": "lab-lg-suite", "place": PLACE, "tags": "board=nrf52832",
        "exporter": f"{EXPORTER} (127.0.0.1)", "tests": len(cases)}]
