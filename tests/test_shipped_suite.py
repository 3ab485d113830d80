"""The conformance suite on the three shipped-firmware simulated rigs (``rigs/sim-*-shipped.yaml``:
no test shell, a hard-coded host resolved through hil's DNS), which the default run leaves out
(``hil.pytest_plugin.SIM_RIGS``): here, in one session over the three at once.

Every scenario passes or skips saying that the board has no shell and which firmware hook the
scenario needs. Coverage is per board: what a shipped rig skips, the contract rig of the same
board runs, so the sign-off over both sessions' results has no gap."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hil.report.signoff import coverage_of, read_results

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ("esp32", "gd32", "nrf52832")
HOOK_SKIP = re.compile(r"rig sim-\w+-shipped has no shell: fault .+ needs the firmware hook `")


def _suite(rigs: list[str], results: Path, junit: Path, *extra: str
           ) -> subprocess.CompletedProcess[str]:
    args = [arg for rig in rigs for arg in ("--hil-rig", rig)]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "testcases", *args, "-n", str(len(rigs)),
         "--dist", "loadgroup", f"--alluredir={results}", f"--junitxml={junit}",
         "-o", "junit_family=xunit2", "-p", "no:cacheprovider", "-q", "-rfEs", "--no-header",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)


def _skipped(junit: Path) -> dict[str, str]:
    """test name (no parameters) -> skip message, of every skipped test case."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            found[case.get("name", "").partition("[")[0]] = skipped.get("message", "")
    return found


@pytest.mark.slow
def test_the_suite_passes_on_the_shipped_rigs_and_every_board_is_covered(tmp_path):
    results = tmp_path / "results"
    shipped = _suite([f"sim-{board}-shipped" for board in BOARDS], results,
                     tmp_path / "shipped.xml")
    summary = shipped.stdout.strip().splitlines()[-1]
    assert shipped.returncode == 0, shipped.stdout[-4000:]
    assert "failed" not in summary, summary
    assert "error" not in summary, summary
    skipped = _skipped(tmp_path / "shipped.xml")
    assert skipped, summary
    wrong = {name: why for name, why in skipped.items()
             if not HOOK_SKIP.search(why)}
    assert not wrong, f"skips that do not name the firmware hook they need: {wrong}"

    # The shipped rigs alone leave exactly those scenarios uncovered, on every board.
    alone = coverage_of(read_results([results]))
    assert [board.board for board in alone] == list(BOARDS)
    for board in alone:
        assert board.gaps, board.line()
        assert all("has no shell" in gap.why for gap in board.gaps), \
            [gap.text() for gap in board.gaps]

    # The contract rigs run what the shipped ones skipped, into the same results: every board
    # is then covered in full, and `hil report` says so.
    contract = _suite([f"sim-{board}" for board in BOARDS], results, tmp_path / "contract.xml",
                      "-k", " or ".join(sorted(skipped)))
    assert contract.returncode == 0, contract.stdout[-4000:]
    report = subprocess.run([sys.executable, "-m", "hil.cli", "report", str(results), "-o",
                             str(tmp_path / "report")], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, check=False)
    document = json.loads((tmp_path / "report" / "signoff.json").read_text(encoding="utf-8"))
    coverage = {board["board"]: board for board in document["coverage"]}
    assert sorted(coverage) == list(BOARDS), report.stdout
    for board, covered in coverage.items():
        assert covered["missing"] == [], (board, covered["missing"])
        assert covered["ran"] == covered["expected"] == alone[0].expected, (board, covered)
