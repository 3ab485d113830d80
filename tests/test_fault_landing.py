"""Every fault proves it landed: the plugin ends a scenario whose fault never hit where and when
it asked as an ERROR (Allure: broken), never PASSED; a scenario that failed stays FAILED with a
note naming the fault that missed; a fault that landed leaves its hit in the test's timeline
(a ``fault-hit`` line for a console-triggered power cut, the labelled exchange for a gateway
hook). Run by pytester on a private simulated nRF52832, with Allure results read back.

And the catalog refuses, at ``inject``, a ``during=``/``phase=``/``at=`` a fault does not take.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from private_rig import ROOT, private_sim_rig

from hil.drivers.contract import Event, parse_event
from hil.faults.catalog import CATALOG, InjectedFault, _cut_mid_write, check_params, fault_spec

SCENARIOS = '''
def test_a_cut_during_a_flash_that_never_comes(ota):
    ota.inject("corrupt")                        # md5 mismatch: the board never flashes
    ota.inject("power-cut", during="flash")
    ota.update()
    ota.expect("md5-mismatch")                   # holds; the cut proved nothing


def test_a_stall_at_a_byte_no_range_holds(ota):
    ota.inject("stall", at=10_000_000)
    ota.update()
    ota.expect("success")


def test_a_failure_under_a_fault_that_missed(ota):
    ota.inject("stall", at=10_000_000)
    ota.update()
    ota.expect("md5-mismatch")                   # fails: the board updated


def test_a_cut_while_the_image_is_written(ota):
    ota.inject("power-cut", during="flash")
    ota.update()
    ota.expect("success", repeats_allowed=True)


def test_low_power_mid_download(ota):
    ota.inject("thresholds", power=50)
    ota.inject("low-power", level=20, during="download")
    ota.update()
    ota.expect("low-power-download")
'''


def test_faults_that_cannot_land_are_errors_and_landed_ones_leave_their_hits(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The five scenarios above in one run (about 20 s on the simulated board)."""
    rig = private_sim_rig(pytester.path)
    for name, value in rig.env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_landing=SCENARIOS)
    records, alluredir = pytester.path / "records", pytester.path / "allure"
    result = pytester.runpytest_subprocess(
        "test_landing.py", "--hil-rig", str(rig.path), "--hil-timeline-dir", str(records),
        "--hil-lease-dir", str(pytester.path / "leases"), f"--alluredir={alluredir}",
        "--rootdir", str(ROOT), "-c", str(ROOT / "pytest.ini"), "-p", "no:cacheprovider",
        timeout=300)
    allure = {}
    for path in alluredir.glob("*-result.json"):
        document = json.loads(path.read_text())
        allure[document["name"].split("[")[0]] = document
    result.assert_outcomes(passed=2, failed=1, errors=2)
    a_fault_that_cannot_land_is_an_error_not_a_pass(result, allure)
    a_failure_stays_failed_with_a_note_about_the_fault_that_missed(result, allure)
    a_landed_power_cut_came_between_the_write_start_and_the_next_boot(records, allure)
    low_power_mid_download_hit_the_third_chunk(records, allure)


def a_fault_that_cannot_land_is_an_error_not_a_pass(result: pytest.RunResult,
                                                    allure: dict[str, dict]) -> None:
    result.stdout.fnmatch_lines_random([
        "ERROR *test_a_cut_during_a_flash_that_never_comes*",
        "ERROR *test_a_stall_at_a_byte_no_range_holds*",
        "E * hil.errors.FaultNotLanded: fault power-cut during=flash never hit: the board never "
        "announced a flash write (ota phase=flash bytes=...); its last event was "
        "'ota phase=report result=205 errno=0', then it printed ota end first",
        "E * hil.errors.FaultNotLanded: fault stall at=10000000 never hit: the board made no "
        "download request holding byte 10000000"])
    for name in ("test_a_cut_during_a_flash_that_never_comes",
                 "test_a_stall_at_a_byte_no_range_holds"):
        assert allure[name]["status"] == "broken", allure[name].get("statusDetails")
        assert "FaultNotLanded" in allure[name]["statusDetails"]["message"]


def a_failure_stays_failed_with_a_note_about_the_fault_that_missed(
        result: pytest.RunResult, allure: dict[str, dict]) -> None:
    result.stdout.fnmatch_lines_random([
        "FAILED *test_a_failure_under_a_fault_that_missed*",
        "E * hil.errors.ConformanceFailure: verify phase: expected report codes [[]101, 205[]]*",
        "E * note: fault stall at=10000000 never hit: the board made no download request "
        "holding byte 10000000 (this failure may not be about it)"])
    assert allure["test_a_failure_under_a_fault_that_missed"]["status"] == "failed"


def a_landed_power_cut_came_between_the_write_start_and_the_next_boot(
        records: Path, allure: dict[str, dict]) -> None:
    assert allure["test_a_cut_while_the_image_is_written"]["status"] == "passed"
    [timeline] = records.glob("*test_a_cut_while_the_image_is_written*.timeline.jsonl")
    lines = [json.loads(line) for line in timeline.read_text().splitlines()]
    [hit] = [line for line in lines if line.get("kind") == "fault-hit"]
    assert hit["fault"] == "power-cut during=flash"
    assert hit["phase"] == "flash"
    assert hit["event"] == "ota phase=flash bytes=66192"
    # Between the 101 (the download over) and the 201 (the board booted the target after it).
    reports = [line for line in lines if line["phase"] == "report"]
    assert [r["result"] for r in reports] == [101, 201]
    assert reports[0]["at"] < hit["at"] < reports[1]["at"]
    # The board's own narration: the write announced, cut, the swap resumed and the write
    # announced again, then the boot.
    [console] = records.glob("*test_a_cut_while_the_image_is_written*.console.log")
    log = console.read_text()
    first = log.index("ota phase=flash bytes=66192")
    again = log.index("I: bootloader: resuming the interrupted test swap", first)
    # (the log starts with the board's restore to its base image: read from the first write)
    assert "boot version" not in log[first:again]
    assert log.index("ota phase=flash bytes=66192", again) \
        < log.index("boot version=1.1.0", again)


def low_power_mid_download_hit_the_third_chunk(records: Path,
                                               allure: dict[str, dict]) -> None:
    assert allure["test_low_power_mid_download"]["status"] == "passed"
    [timeline] = records.glob("*test_low_power_mid_download*.timeline.jsonl")
    lines = [json.loads(line) for line in timeline.read_text().splitlines()]
    hits = [line for line in lines if line.get("fault", "").startswith("low-power")]
    assert [(h["phase"], h["range"]) for h in hits] == [("download", "bytes=8192-12287")]
    assert [line["result"] for line in lines if line["phase"] == "report"] == [105]


# ---------------------------------------------------------------------------------- refused
@pytest.mark.parametrize(("name", "params", "message"), [
    ("power-cut", {"during": "verify"},
     "fault power-cut: during='verify' is not supported; it takes during=download or flash"),
    ("low-power", {"during": "report"}, "fault low-power: during='report' is not supported; "
     "it takes during=detect or download or flash"),
    ("cancel", {"during": "flash"},
     "fault cancel: during='flash' is not supported; it takes during=token or download"),
    ("stall", {"phase": "flash"}, "fault stall: phase='flash' is not supported; it takes "
     "phase=version or detect or token or download or progress or report"),
    ("power-cut", {"during": "flash", "at": 4096},
     "fault power-cut: at=4096 is a byte offset of the download; it does not apply to flash"),
    ("low-power", {"at": 4096},
     "fault low-power: at=4096 is a byte offset of the download; it does not apply to detect"),
])
def test_an_unsupported_moment_is_refused_naming_the_fault_and_what_it_takes(
        name, params, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(") + "$"):
        check_params(fault_spec(name), params)


def test_every_fault_taking_during_lists_what_it_takes():
    for spec in CATALOG.values():
        assert ("during" in spec.params) == bool(spec.during), spec.name


# ---------------------------------------------------------------------------------- the cut
class _Board:
    """What the power cut's landing check reads of a scenario: the trace and the target."""

    target = "1.1.0"

    def __init__(self, *lines: str) -> None:
        self.trace = [parse_event(line) or Event(line, {}) for line in lines]


def _boot(version: str) -> Event:
    return Event("boot", {"version": version})


@pytest.mark.parametrize(("after", "landed"), [
    # the installer starts the interrupted copy over, then boots the target: landed
    (["ota phase=flash bytes=66192", "boot"], True),
    # the board boots its old image (the install did not take) or stays silent: landed
    (["boot-old"], True),
    ([], True),
    # the target booted before the cut took the board: the write was over, not landed
    (["boot", "ota phase=report result=201 errno=0", "boot"], False),
])
def test_a_cut_lands_only_between_the_write_start_and_the_boot_of_the_target(after, landed):
    board = _Board("ota phase=verify md5=ok", "ota phase=flash bytes=66192")
    fault = InjectedFault("power-cut during=flash", "rig", fired=[len(board.trace)])
    for line in after:
        board.trace.append(_boot("1.1.0") if line == "boot" else _boot("1.0.0")
                           if line == "boot-old" else parse_event(line))
    reason = _cut_mid_write(board)(fault)   # type: ignore[arg-type]
    if landed:
        assert reason is None
    else:
        assert reason == "the cut came after the write: the board printed 'boot " \
                         "version=1.1.0' before the cut took it"
