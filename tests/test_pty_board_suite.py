"""A board that is only a console on a pty, following the console contract, runs the whole
conformance suite from a rig file alone, without code changes: no simulation in the rig (no
``sim:``), no flasher (``test factory`` restores it), the firmware's ``test power`` and ``test
signal`` hooks as its power and rf parts. The board is a simulated nRF52832 brought up by
``hil sim up`` in another process; this process sees only its pty, as it would a USB serial
adapter."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from private_rig import ROOT, private_sim_rig, sim_up


@pytest.mark.slow
def test_a_contract_board_on_a_pty_runs_the_suite_from_its_rig_file(tmp_path):
    board = private_sim_rig(tmp_path)
    with sim_up(board) as up:
        # What a lab writes for a board it knows only by its serial port.
        rig = {"name": "pty-board", "board": "nrf52832", "identity": board.document["identity"],
               "console": {"port": up.addresses["console"]}, "flasher": {"kind": "none"},
               "power": {"kind": "console"}, "rf": {"kind": "console"},
               "ota": {"device_timeout": 1.0}}
        (tmp_path / "pty-board.yaml").write_text(yaml.safe_dump(rig), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "testcases", "--hil-rig",
             str(tmp_path / "pty-board.yaml"), "-p", "no:cacheprovider", "-q", "-rfEs",
             "--no-header"], cwd=ROOT, env=board.env, capture_output=True, text=True,
            timeout=600, check=False)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-4000:]
    assert re.search(r"\b5\d passed", summary), summary
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    # Only what needs a bench supply to cut, a simulated flash to make a sector bad, or a
    # simulated board's bootloader and the images hil signs for it, is skipped, and it says so.
    assert skipped, done.stdout[-2000:]
    assert all("lacks power_cut" in line or "can only be injected into a simulated board's "
               "flash" in line or "needs a simulated board's bootloader" in line
               for line in skipped), skipped
