"""Honest progress: a line per finished test (--hil-progress), a busy rig said while waiting and
bounded (--hil-lease-timeout), and Ctrl-C of `hil suite`: one line, exit 130, nothing left
running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hil.pytest_plugin import _short_name
from hil.rig.lease import RigLease
from tests.private_rig import private_sim_rig
from tests.test_lease import Holder
from tests.test_rig_plugin import run, write_rig

ROOT = Path(__file__).resolve().parent.parent
PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) +(\S+) +"
                      r"(\S+/.+) \.\.\. (\d+\.\d) s(: .+)?$")
FIRST_LINE_S = 300.0      # the suite's first test on a loaded CI machine


@pytest.mark.parametrize(("nodeid", "rig", "name"), [
    ("testcases/test_detect.py::test_happy_path[sim-esp32]", "sim-esp32", "detect/happy path"),
    ("testcases/test_power.py::test_cut[low-sim-gd32--control]", "sim-gd32--control",
     "power/cut [low]"),
    ("tests/test_x.py::TestA::test_b", "-", "x/b"),
])
def test_a_test_is_named_by_its_module_and_function_without_the_rig(nodeid, rig, name):
    assert _short_name(nodeid, rig) == name


def test_progress_is_a_line_per_test_with_its_verdict_rig_and_why(pytester):
    write_rig(pytester.path, "bench-a")
    pytester.makepyfile(test_x="""
        import pytest

        def test_fine(rig): pass
        def test_wrong(rig): assert 1 == 2, "the board said 104"
        @pytest.mark.needs("rf")
        def test_needs_rf(rig): pass
    """)
    result = run(pytester, "--hil-rig", "bench-a", "--hil-progress",
                 "-o", "console_output_style=classic", "-q")
    lines = [line for line in result.stdout.lines if PROGRESS.match(line)]
    assert [PROGRESS.match(line).group(1, 2, 3, 4, 5) for line in lines] == [
        ("1", "3", "PASSED", "bench-a", "x/fine"),
        ("2", "3", "FAILED", "bench-a", "x/wrong"),
        ("3", "3", "SKIPPED", "bench-a", "x/needs rf")]
    assert lines[1].endswith(": AssertionError: the board said 104")
    assert lines[2].endswith(": rig bench-a lacks rf")
    assert not any(re.fullmatch(r"[.FEsxX]+", line) for line in result.stdout.lines)   # no dots
    result.assert_outcomes(passed=1, failed=1, skipped=1)


def test_a_busy_rig_is_said_and_the_wait_is_bounded(pytester):
    write_rig(pytester.path, "bench-a")
    pytester.makepyfile(test_x="def test_rig(rig): pass")
    holder = Holder("bench-a", pytester.path / "leases", 10.0)
    try:
        holder.expect("waiting")
        holder.expect("held")
        result = run(pytester, "--hil-rig", "bench-a", "--hil-lease-timeout", "1")
    finally:
        holder.stop()
    result.assert_outcomes(errors=1)
    result.stderr.fnmatch_lines([f"hil: rig bench-a is busy (held by pid {holder.pid} on *), "
                                 "waiting up to 1 s"])
    result.stdout.fnmatch_lines([f"*rig bench-a: lease: busy for 1 s, held by pid "
                                 f"{holder.pid} on *"])


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_a_bad_lease_timeout_is_a_usage_error(pytester, value):
    pytester.makepyfile(test_x="def test_rig(rig): pass")
    result = run(pytester, "--hil-lease-timeout", value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --hil-lease-timeout: '{value}' is not a positive "
                                 "number of seconds"])


# ---------------------------------------------------------------------------------- Ctrl-C
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _in_session(session: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def test_ctrl_c_stops_the_suite_with_one_line_and_leaves_nothing_running(tmp_path):
    rig = private_sim_rig(tmp_path)
    out = tmp_path / "out"
    # Its own process group, as a shell runs a command: Ctrl-C is SIGINT to that group.
    suite = subprocess.Popen(
        [sys.executable, "-m", "hil.cli", "suite", str(rig.path), "-n", "2", "--root",
         str(ROOT), "--out", str(out), "--full-restore"], cwd=tmp_path, env=rig.env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert suite.stdout is not None
    seen: list[str] = []
    first = threading.Event()

    def read() -> None:
        assert suite.stdout is not None
        for line in suite.stdout:
            seen.append(line.rstrip("\n"))
            if PROGRESS.match(seen[-1]):
                first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first.wait(FIRST_LINE_S), "\n".join(seen)
        pytest_pids = _children(suite.pid)
        assert len(pytest_pids) == 1, pytest_pids       # the pytest controller
        workers = _in_session(pytest_pids[0])
        assert len(workers) >= 3, workers                # the controller and its two workers
        os.killpg(suite.pid, signal.SIGINT)
        status = suite.wait(timeout=120)
    finally:
        if suite.poll() is None:
            os.killpg(suite.pid, signal.SIGKILL)
            suite.wait()
    reader.join(timeout=10)
    assert suite.stderr is not None
    errors = [line for line in suite.stderr.read().splitlines() if line]
    suite.stderr.close()
    suite.stdout.close()
    assert status == 130
    assert len(errors) == 1, errors
    assert re.fullmatch(r"hil suite: interrupted after \d+/\d+ tests \(\d+ s\); pytest and its "
                        r"workers stopped, no report \(partial results in .*\)", errors[0])
    # The command it ran, printed first, forwards the restore option to pytest.
    [command] = [line for line in seen if line.startswith("hil suite: -m pytest ")]
    assert " --hil-full-restore" in command, command
    after = "\n".join(seen[seen.index(next(line for line in seen if PROGRESS.match(line))):])
    assert "KeyboardInterrupt" not in after
    assert "Traceback" not in after
    # Nothing of the suite is left: no process of pytest's session, the rig free at once.
    deadline = time.monotonic() + 10
    while _in_session(pytest_pids[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _in_session(pytest_pids[0]) == []
    with RigLease(rig.document["name"], timeout=0.5) as lease:
        assert lease.held
    assert not (out / "allure-report").exists()
