"""What a conformance run leaves in its Allure results (``--alluredir``), read back from the
files allure-pytest wrote for a real run of two scenarios on a private simulated nRF52832:
labels and parameters, one step per OTA phase with its requests attached and the fault in its
title, the attachments (console log, timeline as JSON and text, the update's picture, the rig
without secrets), and the session's environment.properties and categories.json."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from private_rig import ROOT, private_sim_rig

from hil.pytest_plugin.reporting import CATEGORIES


def _steps(steps: list[dict]) -> list[dict]:
    return [s for step in steps for s in (step, *_steps(step.get("steps", [])))]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, dict]]:
    tmp = tmp_path_factory.mktemp("allure")
    rig = private_sim_rig(tmp, name="allure-nrf52832")
    key = rig.env[rig.document["identity"]["access_key_env"]]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "testcases/test_download.py", "--hil-rig",
         str(rig.path), "-k", "once_is_retried and stall or persistently and stall",
         f"--alluredir={tmp / 'results'}", "-p", "no:cacheprovider", "-q"],
        cwd=ROOT, env=rig.env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    by_name = {}
    for path in (tmp / "results").glob("*-result.json"):
        result = json.loads(path.read_text())
        by_name[result["name"].split("[")[0]] = result
    return tmp / "results", key, by_name


def test_labels_and_parameters_name_phase_scenario_board_rig_and_fault(results):
    _, _, by_name = results
    result = by_name["test_a_range_failing_persistently_is_given_up_after_its_retries"]
    labels = {(label["name"], label["value"]) for label in result["labels"]}
    assert {("feature", "download"), ("severity", "critical"), ("board", "nrf52832"),
            ("rig", "allure-nrf52832--control"), ("tag", "stall persistent"),
            ("story", "a range failing persistently is given up after its retries (stall)"),
            ("as_id", "download/a_range_failing_persistently_is_given_up_after_its_retries"
                      "[stall]")} <= labels
    shown = {p["name"]: p["value"] for p in result["parameters"] if p.get("mode") != "hidden"}
    assert shown == {"board": "'nrf52832'", "rig": "'allure-nrf52832--control'",
                     "firmware": "'1.0.0'", "target": "'1.1.0'"}


def test_each_phase_is_a_step_with_its_requests_and_the_fault_on_the_step_it_hit(results):
    directory, _, by_name = results
    result = by_name["test_a_failing_request_once_is_retried_and_the_update_finishes"]
    titles = [step["name"] for step in _steps(result["steps"])]
    assert titles[0] == "attempt 1: ota check"
    assert titles[1:4] == ["version report", "detect: errno=0 target=1.1.0 size=66192",
                           "token check: errno=0"]
    download = next(t for t in titles if t.startswith("download:"))
    assert "[fault: stall 2s]" in download
    assert "1 retried" in download
    assert [t for t in titles if t.startswith(("report:", "verify", "flash", "reboot"))] == [
        "report: result=101 errno=0", "verify: md5=ok", "flash: bytes=66192",
        "reboot: boot version=1.1.0", "report: result=201 errno=0"]
    detect = next(s for s in _steps(result["steps"]) if s["name"].startswith("detect"))
    [attached] = detect["attachments"]
    text = (directory / attached["source"]).read_text()
    assert "GET /ota/south/check?dev_id=" in text
    assert '"token":' in text


def test_the_evidence_is_attached_and_the_rig_has_no_secret(results):
    directory, key, by_name = results
    result = by_name["test_a_failing_request_once_is_retried_and_the_update_finishes"]
    attachments = {a["name"]: directory / a["source"] for a in result["attachments"]}
    assert set(attachments) == {"console log", "timeline", "timeline (text)", "rig",
                                "the update", "energy per phase"}
    assert "> ota check" in attachments["console log"].read_text()
    timeline = json.loads(attachments["timeline"].read_text())
    assert [e["phase"] for e in timeline[:3]] == ["version", "detect", "token"]
    assert any(e.get("fault") == "stall 2s" for e in timeline)
    assert "download GET" in attachments["timeline (text)"].read_text()
    rig = yaml.safe_load(attachments["rig"].read_text())
    assert rig["identity"]["access_key_env"] == "HIL_SIM_ACCESS_KEY"
    png = attachments["the update"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000
    leaks = [path for path in directory.iterdir() if key.encode() in path.read_bytes()]
    assert leaks == []


def test_the_session_writes_its_environment_and_categories(results):
    directory, _, _ = results
    properties = dict(line.split("=", 1) for line in
                      (directory / "environment.properties").read_text().splitlines())
    assert properties["firmware.build"] == "1.1.0"
    assert properties["package.md5"].startswith("nrf52832=")
    assert properties["rigs"] == "allure-nrf52832--control (nrf52832)"
    assert properties["service"] == "mock"
    assert {"hil.version", "pytest.version", "pyocd.version", "esptool.version"} \
        <= set(properties)
    assert json.loads((directory / "categories.json").read_text()) == CATEGORIES


def test_steps_carry_their_real_times_the_attempt_spans_its_phases(results):
    _, _, by_name = results
    result = by_name["test_a_failing_request_once_is_retried_and_the_update_finishes"]
    [attempt] = [step for step in result["steps"] if step["name"].startswith("attempt 1")]
    phases = attempt["steps"]
    # The stall held one range for 2 s: the attempt, written after it, still spans it.
    assert attempt["stop"] - attempt["start"] >= 2000
    assert result["start"] <= attempt["start"] <= attempt["stop"] <= result["stop"]
    assert phases[0]["start"] == attempt["start"]
    for before, after in itertools.pairwise(phases):   # back to back, in order
        assert before["stop"] == after["start"]
        assert after["start"] <= after["stop"] <= attempt["stop"]
    download = next(step for step in phases if step["name"].startswith("download:"))
    assert download["stop"] - download["start"] >= 2000          # the stalled phase holds it
    assert {step["status"] for step in [attempt, *phases]} == {"passed"}


def test_the_step_of_the_phase_that_failed_is_failed_not_green(tmp_path):
    """A board that never reports its failure (defect silent-after-failure) fails the
    persistent stall scenario in its download phase: that step is red, and its attempt."""
    rig = private_sim_rig(tmp_path)
    document = {**rig.document, "sim": {**rig.document["sim"],
                                        "defects": ["silent-after-failure"]}}
    rig.path.write_text(yaml.safe_dump(document), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "testcases/test_download.py", "--hil-rig",
         str(rig.path), "-k", "persistently and stall", f"--alluredir={tmp_path / 'results'}",
         "-p", "no:cacheprovider", "-q"],
        cwd=ROOT, env=rig.env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stdout[-3000:]
    [result] = [json.loads(path.read_text())
                for path in (tmp_path / "results").glob("*-result.json")]
    assert result["status"] == "failed"
    assert result["statusDetails"]["message"].startswith(
        "hil.errors.ConformanceFailure: download phase:")
    [attempt] = [step for step in result["steps"] if step["name"].startswith("attempt 1")]
    statuses = {step["name"].split(":")[0]: step["status"] for step in attempt["steps"]}
    assert statuses["download"] == "failed", statuses
    assert attempt["status"] == "failed"
    assert statuses["detect"] == "passed"      # the phases before it went as they should
