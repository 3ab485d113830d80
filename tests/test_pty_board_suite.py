"""A board that is only a console on a pty, following the console contract, runs the whole
conformance suite from a rig file alone, without code changes: no simulation in the rig (no
``sim:``), no flasher (``test factory`` restores it), the firmware's ``test power`` and ``test
signal`` hooks as its power and rf parts. The board is a simulated nRF52832 brought up by
``hil sim up`` in another process; this process sees only its pty, as it would a USB serial
adapter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hil.configfile import read_yaml, validate
from hil.conformance.power import defect_rig
from hil.rig.model import Rig
from hil.service.server import new_access_key

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_contract_board_on_a_pty_runs_the_suite_from_its_rig_file(tmp_path):
    base = read_yaml(ROOT / "rigs" / "sim-nrf52832.yaml")
    board = defect_rig(base, validate(Rig, base, "sim-nrf52832"), None, tmp_path / "state")
    (tmp_path / "board.yaml").write_text(yaml.safe_dump(board), encoding="utf-8")
    env = {**os.environ, board["identity"]["access_key_env"]: new_access_key()}
    up = subprocess.Popen([sys.executable, "-m", "hil.cli", "sim", "up",
                           str(tmp_path / "board.yaml")], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert up.stdout is not None
        started = [up.stdout.readline() for _ in range(4)]
        assert started[-1].endswith("up (Ctrl-C or SIGTERM stops it)\n"), started
        console = re.search(r"console at (\S+)", "".join(started)).group(1)
        # What a lab writes for a board it knows only by its serial port.
        rig = {"name": "pty-board", "board": "nrf52832", "identity": board["identity"],
               "console": {"port": console}, "flasher": {"kind": "none"},
               "power": {"kind": "console"}, "rf": {"kind": "console"},
               "ota": {"device_timeout": 1.0}}
        (tmp_path / "pty-board.yaml").write_text(yaml.safe_dump(rig), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "testcases", "--hil-rig",
             str(tmp_path / "pty-board.yaml"), "-p", "no:cacheprovider", "-q", "-rs",
             "--no-header"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
            check=False)
    finally:
        up.terminate()
        stopped = up.wait(30)
        if up.stdout is not None:
            up.stdout.close()
    assert stopped == 0
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-4000:]
    assert re.search(r"\b5\d passed", summary), summary
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    # Only what needs a bench supply to cut is skipped, and it says so.
    assert skipped, done.stdout[-2000:]
    assert all("lacks power_cut" in line for line in skipped), skipped
