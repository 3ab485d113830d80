"""A pytest-xdist worker killed with SIGKILL in the middle of an update leaves no lease behind
that blocks the next run on its rig, and the killed test's timeline and console log are on disk
up to the kill (both are written line by line as they come)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from private_rig import ROOT, private_sim_rig

# Stalls every download after the third chunk, so the update hangs there until the kill.
HANGING_TEST = '''
def test_an_update_that_hangs(ota):
    ota.inject("stall", at=8192, persistent=True, seconds=600)
    ota.update(timeout=600)
'''
QUICK_TEST = '''
def test_the_rig_is_free_again(rig, board):
    assert board.version() == "1.0.0"
'''


def _pytest(args: list[str], env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_worker_leaves_its_records_and_no_lease(tmp_path):
    rig = private_sim_rig(tmp_path)
    (tmp_path / "test_hang.py").write_text(HANGING_TEST, encoding="utf-8")
    (tmp_path / "test_quick.py").write_text(QUICK_TEST, encoding="utf-8")
    records, leases = tmp_path / "records", tmp_path / "leases"
    env = rig.env
    common = ["--hil-rig", str(rig.path), "--hil-timeline-dir", str(records),
              "--hil-lease-dir", str(leases), "--rootdir", str(ROOT), "-c",
              str(ROOT / "pytest.ini")]

    run = _pytest([str(tmp_path / "test_hang.py"), "-n", "1", *common], env)
    try:
        def hanging() -> bool:
            timeline = list(records.glob("*.timeline.jsonl"))
            return bool(timeline) and timeline[0].read_text().count('"phase":"download"') >= 3
        _wait(hanging, 60, "the update to reach the stalled chunk")
        [worker] = [int(pid) for pid in subprocess.run(
            ["pgrep", "-P", str(run.pid)], capture_output=True, text=True,
            check=False).stdout.split()]
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.5)
    finally:
        run.terminate()
        out, _ = run.communicate(timeout=60)

    [timeline] = records.glob("*test_an_update_that_hangs*.timeline.jsonl")
    exchanges = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert [e["phase"] for e in exchanges[:3]] == ["version", "detect", "token"], out
    assert sum(e["phase"] == "download" for e in exchanges) >= 2
    [console] = records.glob("*test_an_update_that_hangs*.console.log")
    log = console.read_text()
    assert "> ota check" in log
    assert "ota phase=download offset=4096 status=206" in log

    started = time.monotonic()
    quick = _pytest([str(tmp_path / "test_quick.py"), *common], env)
    out, _ = quick.communicate(timeout=120)
    assert quick.returncode == 0, out
    assert time.monotonic() - started < 60, "the next run waited on the killed worker's lease"
