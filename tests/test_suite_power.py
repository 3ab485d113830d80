"""The suite's power: ``hil defects`` runs the conformance suite (testcases/) on the simulated
nRF52832 with each named firmware defect switched on, and on the same rig without any (the
control). Every defect must fail at least one scenario, with a message that names the phase and
the expected and received codes; the control must pass everything."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hil.sim.defects import Defect

ROOT = Path(__file__).resolve().parent.parent
PHASE_EXPECTED = re.compile(r"\b(detect|token|download|verify|flash|report) phase: expected")
# A crash names its cause and the function it happened in instead (hil.drivers.crash).
FIRMWARE_CRASH = re.compile(r"firmware crash: \w+ on [\w -]+ at 0x[0-9a-f]{8} \(\w+\+0x")


@pytest.mark.slow
def test_every_defect_is_caught_by_the_suite_and_the_control_passes():
    done = subprocess.run([sys.executable, "-m", "hil.cli", "defects", "--root", str(ROOT)],
                          capture_output=True, text=True, timeout=900, check=False)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.split() and line.split()[0] in {d.value for d in Defect}}
    assert set(rows) == {d.value for d in Defect}, out
    for row in rows.values():
        count = int(row.split()[1])
        assert count >= 1, row
    messages = {line.split(":", 1)[0]: line for line in out.splitlines()
                if re.match(r"^[a-z0-9-]+: ", line) and line.split(":", 1)[0] in rows}
    assert set(messages) == set(rows), out
    for message in messages.values():
        # What a firmware engineer acts on: the phase, and what was expected against what came
        # (or the crash, and where).
        assert PHASE_EXPECTED.search(message) or FIRMWARE_CRASH.search(message), message
    assert re.search(rf"^PASS: every defect \({len(Defect)}\) is caught; the control passed "
                     r"\d+ tests", out, re.M), out
