"""--hil-ota-service URL: the gateway in front of a real OneNET service (here a mock standing in
as the real upstream, run apart from the suite, with the task its "operator" created). The
board talks to the gateway, the gateway forwards and records, and the same timeline assertions
apply; scenarios that must shape the task skip with a reason, the gateway's own faults still
apply."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hil.onenet.codes import TaskState
from hil.onenet.tasks import Package
from hil.service.server import MockOneNet, new_access_key

ROOT = Path(__file__).resolve().parent.parent
RIG = "sim-nrf52832"


def run_suite(url: str, key: str, *selection: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HIL_SIM_ACCESS_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "pytest", *selection, "--hil-rig", RIG,
         "--hil-ota-service", url, "-p", "no:cacheprovider", "-q", "-rs", "--no-header"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def upstream():
    """The "real" service, its product key, and the operator's task for the board."""
    key = new_access_key()
    with MockOneNet(access_key=key) as onenet:
        def operator_task() -> None:
            image = (ROOT / "fixtures" / "images" / "nrf52832-1.1.0.bin").read_bytes()
            onenet.service.create_task(RIG, "1.1.0", Package(image, "app-1.1.0.bin"),
                                       manuf="102", model="10201", retry=2, interval=1)
        yield onenet, key, operator_task


@pytest.mark.slow
def test_the_suite_runs_through_the_gateway_against_a_real_service(upstream):
    onenet, key, operator_task = upstream
    operator_task()
    done = run_suite(onenet.url, key, "testcases/test_detect.py::"
                     "test_happy_path_updates_to_the_target_and_the_next_detect_finds_no_task")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed" in done.stdout
    # The upstream saw the board's whole update, forwarded by the gateway.
    assert onenet.timeline.reported_codes(RIG) == [101, 201]
    assert onenet.service.task(RIG).state is TaskState.SUCCEEDED
    hosts = {e.request_headers.get("host") for e in onenet.timeline.exchanges(RIG)}
    assert hosts == {onenet.url.removeprefix("http://")}    # the gateway's Host rewrite


@pytest.mark.slow
def test_task_shaping_scenarios_skip_and_gateway_faults_still_apply(upstream):
    onenet, key, operator_task = upstream
    operator_task()
    done = run_suite(onenet.url, key, "testcases/test_download.py", "testcases/test_detect.py",
                     "-k", "stall and once or low_power_at_detect")
    assert done.returncode == 0, done.stdout[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "1 passed" in summary, done.stdout[-2000:]
    assert "1 skipped" in summary, done.stdout[-2000:]
    assert "shapes the task, which only the mock service lets a test do" in done.stdout
    stalled = [e for e in onenet.timeline.exchanges(RIG) if e.phase == "download"]
    assert len(stalled) > 17            # the stalled range was asked for again
    assert onenet.timeline.reported_codes(RIG) == [101, 201]
