"""A lab bench misbehaving under the suite, on a board known only by its ptys (a simulated
nRF52832 run by ``hil sim up`` in another process, its console and bench supply reached through
their paths as a USB serial adapter and a USB-TMC supply would be):

- the console's port vanishes mid-test (the adapter re-enumerates): that test ends as a rig
  fault with the console log up to the cut, and the next test finds the port again by its path;
- the firmware hangs: the next test's board is power-cycled through the supply, and it runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from private_rig import ROOT, private_sim_rig, sim_up

TESTS = '''
import os
import signal


def _signal(name):
    os.kill(int(os.environ["HIL_SIM_UP_PID"]), getattr(signal, name))


def test_1_the_port_vanishes_mid_update(ota):
    from hil.gateway import Fault, FaultKind
    from hil.onenet.messages import Endpoint

    ota.inject("stall", at=8192, persistent=True, seconds=30)
    # At the third chunk the adapter drops off the bus (the board goes on downloading).
    ota.arm(Fault(FaultKind.HOOK, phase=Endpoint.DOWNLOAD, offset=8192,
                  action=lambda: _signal("SIGUSR1")))
    ota.update()


def test_2_the_port_is_found_again(board):
    assert board.version() == "1.0.0"
    _signal("SIGUSR2")                    # and now the firmware hangs


def test_3_a_hung_board_is_power_cycled(board):
    assert board.version() == "1.0.0"
'''


@pytest.fixture
def bench(tmp_path):
    """The board run by ``hil sim up``, and a lab rig file that knows only its ptys."""
    board = private_sim_rig(tmp_path)
    with sim_up(board) as up:
        rig = {"name": "lab-bench", "board": "nrf52832", "identity": board.document["identity"],
               "console": {"port": up.addresses["console"]}, "flasher": {"kind": "none"},
               "power": {**board.document["power"], "url": up.addresses["power"]},
               "rf": {"kind": "console"}, "ota": {"device_timeout": 1.0}}
        (tmp_path / "lab-bench.yaml").write_text(yaml.safe_dump(rig), encoding="utf-8")
        yield tmp_path / "lab-bench.yaml", {**board.env, "HIL_SIM_UP_PID": str(up.pid)}


def _run_on_the_bench(tests: str, bench: tuple[Path, dict[str, str]], tmp_path: Path
                      ) -> tuple[str, Path]:
    """``tests`` run by pytest in another process on the bench's rig: its verbose output, and
    where its console logs and timelines went."""
    rig_file, env = bench
    (tmp_path / "test_bench.py").write_text(tests, encoding="utf-8")
    records = tmp_path / "records"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "test_bench.py"), "--hil-rig",
         str(rig_file), "--hil-timeline-dir", str(records), "-p", "no:cacheprovider", "-v",
         "-rE", "--rootdir", str(ROOT), "-c", str(ROOT / "pytest.ini")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    return done.stdout, records


@pytest.mark.slow
def test_a_vanished_port_and_a_hung_board_do_not_stop_the_suite(bench, tmp_path):
    started = time.monotonic()
    out, records = _run_on_the_bench(TESTS, bench, tmp_path)
    assert re.search(r"test_1_the_port_vanishes_mid_update\[lab-bench\] ERROR", out), out
    assert re.search(r"RigFault: rig lab-bench: console: .*vanished", out), out
    assert re.search(r"test_2_the_port_is_found_again\[lab-bench\] PASSED", out), out
    assert re.search(r"test_3_a_hung_board_is_power_cycled\[lab-bench\] PASSED", out), out
    # The cut test's console log, on disk, goes up to the cut.
    [log] = records.glob("*test_1_the_port_vanishes*.console.log")
    assert "> ota check" in log.read_text()     # what came before the cut, on disk
    [log] = records.glob("*test_3_a_hung_board*.console.log")
    assert log.read_text().count("boot version=1.0.0") >= 2     # the power cycle, the factory
    assert time.monotonic() - started < 120


LEFT_RUNNING = '''
def test_1_leaves_an_attempt_running(ota):
    ota.shape_task(retry=3, interval=10)    # a board that retries, slowly
    ota.inject("stall", at=0, persistent=True, seconds=60)
    attempt = ota.update(timeout=1.0)        # gives up on the board long before it gives up
    assert attempt.timed_out


def test_2_the_next_board_is_restored_anyway(board):
    assert board.version() == "1.0.0"
'''


@pytest.mark.slow
def test_a_board_busy_with_an_attempt_a_test_left_running_is_power_cycled_first(bench, tmp_path):
    """The firmware refuses ``test factory`` while an attempt runs (its service gone, it is
    retrying): the next test's board fixture power-cycles it through the rig's supply instead
    of failing that test for what the previous one left behind."""
    out, records = _run_on_the_bench(LEFT_RUNNING, bench, tmp_path)
    assert re.search(r"test_1_leaves_an_attempt_running\[lab-bench\] PASSED", out), out
    assert re.search(r"test_2_the_next_board_is_restored_anyway\[lab-bench\] PASSED", out), out
    [log] = records.glob("*test_2_the_next_board*.console.log")
    text = log.read_text()
    # Refused, then the power cycle's boot, then the factory reset that now succeeds.
    assert "ERR busy" in text, text
    assert text.index("ERR busy") < text.rindex("boot version="), text
