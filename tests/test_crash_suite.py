"""A board that crashes mid-update, end to end: the conformance suite's happy path run by pytest
(a subprocess, as QA runs it) on a simulated board of each family with ``crashes-mid-download``
switched on, and the Allure report generated from its results.

What QA must see: the test failed (not broken, not a timeout) in the Allure category "Firmware
crash", its message names the crash (HardFault through the SWD probe on the nRF52832 and the
GD32, the ESP32's StoreProhibited panic from its console) with the function it happened in and
the fault status in words, and a "firmware crash" attachment holds the decoded evidence.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from hil.report.generate import generate
from hil.sim.symbols import functions, write_elf

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ("nrf52832", "gd32", "esp32")


def crashing_rig(board: str, tmp_path: Path) -> Path:
    """The shipped simulated rig of ``board`` with the defect on, its state, probe and name its
    own (the shipped rigs' may be in use by another test)."""
    text = (ROOT / "rigs" / f"sim-{board}.yaml").read_text()
    text = text.replace(f"${{HIL_SIM_ROOT}}/sim-{board}", str(tmp_path / board))
    text = text.replace(f"hilsim-{board}", f"hilsim-crash-{tmp_path.name}-{board}")
    text = text.replace(f"name: sim-{board}", f"name: crash-{board}")
    text = text.replace("http_timeout: 1.0}", "http_timeout: 1.0, defects: [crashes-mid-download]}")
    path = tmp_path / f"crash-{board}.yaml"
    path.write_text(text)
    return path


def results_by_rig(results: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in results.glob("*-result.json"):
        result = json.loads(path.read_text())
        rig = next(label["value"] for label in result["labels"] if label["name"] == "rig")
        found[rig.removeprefix("crash-")] = result
    return found


def attachment(results: Path, result: dict[str, Any], name: str) -> str:
    [found] = [a for a in result.get("attachments", []) if a["name"] == name]
    return (results / found["source"]).read_text()


def test_a_crash_mid_update_is_a_firmware_crash_with_its_decoded_cause(tmp_path: Path) -> None:
    rigs = [crashing_rig(board, tmp_path) for board in BOARDS]
    # The ESP32's ELF given as a firmware team gives theirs; the Cortex-M boards' named from
    # the simulated firmware's own (what a simulated rig uses when none is given).
    elf = write_elf("esp32", tmp_path / "esp32-app.elf")
    results = tmp_path / "allure-results"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "testcases/test_detect.py", "-k", "happy_path",
         *(f"--hil-rig={rig}" for rig in rigs), f"--hil-elf=esp32={elf}",
         f"--alluredir={results}", "-p", "no:cacheprovider", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "3 failed" in run.stdout, run.stdout[-3000:]

    by_rig = results_by_rig(results)
    assert set(by_rig) == set(BOARDS)
    for board, result in by_rig.items():
        table = functions(board)
        message = result["statusDetails"]["message"]
        assert result["status"] == "failed", message
        first = message.splitlines()[0]
        at = table["ota_store_chunk"].at(0x2E)
        called_from = table["ota_download"].at(0x5A)
        if board == "esp32":
            assert first == (
                "hil.errors.FirmwareCrash: firmware crash: StoreProhibited on ESP32 core 0 at "
                f"{at:#010x} (ota_store_chunk+0x2e), called from {called_from:#010x} "
                "(ota_download+0x5a); fault address 0x00000000")
        else:
            assert first == (
                "hil.errors.FirmwareCrash: firmware crash: HardFault on Cortex-M at "
                f"{at:#010x} (ota_store_chunk+0x2e), called from {called_from:#010x} "
                "(ota_download+0x5a): FORCED, PRECISERR, BFARVALID; fault address 0x00000000")
        assert "did not end within" not in message          # a crash, not a timeout
        evidence = attachment(results, result, "firmware crash")
        if board == "esp32":
            assert "StoreProhibited: a store to an address the MMU forbids" in evidence
            assert "Guru Meditation Error: Core  0 panic'ed (StoreProhibited)" in evidence
        else:
            assert "PRECISERR: precise data bus error" in evidence
            assert "FORCED: a configurable fault escalated to HardFault" in evidence
            assert "CFSR     0x00008200" in evidence
        [attempt] = result["steps"]
        assert attempt["name"].startswith("attempt 1: ota check (crashed: ")

    report = tmp_path / "report"
    generate([results], report)
    tree = json.loads((report / "data" / "categories.json").read_text())
    categories = {child["name"]: sorted(test["name"] for group in child["children"]
                                        for test in group["children"])
                  for child in tree["children"]}
    assert list(categories) == ["Firmware crash"], categories
    assert [name.rpartition("[")[2] for name in categories["Firmware crash"]] == \
        ["crash-esp32]", "crash-gd32]", "crash-nrf52832]"]


def test_an_elf_that_is_not_one_stops_the_run_in_one_line(tmp_path: Path) -> None:
    not_elf = tmp_path / "app.elf"
    not_elf.write_bytes(b"\x7fELF but not really")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "testcases/test_detect.py", "--collect-only", "-q",
         f"--hil-elf=nrf52832={not_elf}", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 4, run.stdout + run.stderr
    assert f"--hil-elf: {not_elf}: not a readable ELF file" in run.stderr
    assert "Traceback" not in run.stderr
