"""What the scenarios for result codes 103, 203 and 206 stand on, below the suite: a simulated
flash whose bad sector refuses every write and says so, and image headers that say how much
slot an image fills (and can be made to say more); and the bad-sector fault proving it landed
and not outliving its test. The scenarios themselves are in testcases/ (``oversize``,
``oversized-image``, ``bad-sector``); the defects each one alone catches are in
tests/test_sim_defects.py."""

from __future__ import annotations

import json

import pytest
from private_rig import ROOT, private_sim_rig

from hil.faults.catalog import CATALOG, Where
from hil.sim.flash import ERASED, FlashWriteError, SimFlash
from hil.sim.images import SLOT_SIZE, build_image, claim_span, image_span, image_version

BOARDS = ("esp32", "nrf52832", "gd32")


# ------------------------------------------------------------------------------ bad sectors
def test_a_bad_sector_refuses_erase_and_program_and_keeps_its_bytes(tmp_path):
    with SimFlash(tmp_path / "flash.bin", size=0x4000, base=0x1000) as flash:
        flash.write(0x2000, b"kept")
        flash.mark_bad(0x2010)                       # any address in the sector
        with pytest.raises(FlashWriteError, match=r"^flash write at 0x00002000\+4096 failed: "
                           r"sector 0x00002000 is bad$"):
            flash.erase(0x2000, 0x1000)
        with pytest.raises(FlashWriteError):
            flash.program(0x2ffc, b"\x00" * 8)       # straddling into the bad sector
        with pytest.raises(FlashWriteError):
            flash.write(0x2004, b"new")
        assert flash.read(0x2000, 4) == b"kept"
        assert flash.refused(0x2000) == 3
        flash.erase(0x3000, 0x1000)                  # its neighbours work
        flash.program(0x1000, b"ok")
        assert flash.read(0x1000, 2) == b"ok"


def test_a_sector_marked_good_again_works(tmp_path):
    with SimFlash(tmp_path / "flash.bin", size=0x2000) as flash:
        flash.mark_bad(0x0)
        flash.mark_bad(0x1000)
        flash.mark_good(0x0)
        flash.erase(0x0, 0x1000)
        assert flash.read(0x0, 1) == bytes([ERASED])
        assert flash.refused(0x0) == 0
        with pytest.raises(FlashWriteError):
            flash.erase(0x1000, 1)
        flash.mark_good()                            # every sector
        flash.erase(0x1000, 1)


def test_marking_outside_the_flash_is_refused(tmp_path):
    with SimFlash(tmp_path / "flash.bin", size=0x1000) as flash, \
            pytest.raises(ValueError, match="outside"):
        flash.mark_bad(0x1000)


# ------------------------------------------------------------------------------ image spans
@pytest.mark.parametrize("board", BOARDS)
def test_an_images_span_is_what_its_header_says(board):
    image = build_image(board, "1.1.0")
    span = image_span(board, image)
    assert span <= len(image) < SLOT_SIZE[board]
    if board == "esp32":
        # Segments, checksum, SHA-256: all of it but the Secure Boot V2 padding and signature
        # sector behind it (a 4 KiB boundary, then 4 KiB).
        assert len(image) - span < 0x2000
        assert len(image) % 0x1000 == 0
    else:
        assert len(image) - span < 0x100           # all but the TLVs after the payload


@pytest.mark.parametrize("board", BOARDS)
def test_an_image_can_be_made_to_claim_more_than_its_slot(board):
    image = build_image(board, "1.1.0")
    claimed = claim_span(board, image, 2 * SLOT_SIZE[board])
    assert image_span(board, claimed) == 2 * SLOT_SIZE[board]
    assert len(claimed) == len(image)
    assert sum(a != b for a, b in zip(image, claimed, strict=True)) <= 4   # one header field
    with pytest.raises(ValueError, match=r"truncated|End of file"):   # a bootloader refuses it
        image_version(board, claimed)
    assert claim_span(board, image, image_span(board, image)) == image


@pytest.mark.parametrize("board", BOARDS)
def test_a_span_of_something_else_is_refused(board):
    with pytest.raises(ValueError, match="not an"):
        image_span(board, b"\x00" * 64)


# ------------------------------------------------------------------------------ the catalog
def test_the_catalog_names_a_fault_for_each_code():
    assert CATALOG["oversize"].where is Where.GATEWAY          # 103
    assert CATALOG["oversized-image"].where is Where.SERVICE   # 203
    assert CATALOG["oversized-image"].needs == ("mock",)
    assert CATALOG["bad-sector"].where is Where.RIG            # 206


# ------------------------------------------------------------------------------ the fault
BAD_SECTOR_SCENARIOS = '''
def test_1_a_bad_sector_under_the_install_request(ota):
    ota.inject("bad-sector")
    ota.update()
    ota.expect("flash-write-failed")


def test_2_the_next_test_updates_as_usual(ota):
    ota.update()
    ota.expect("success")


def test_3_a_bad_sector_the_board_never_writes(ota):
    ota.inject("corrupt")                # md5 mismatch: no install request is ever written
    ota.inject("bad-sector")
    ota.update()
    ota.expect("md5-mismatch")
'''


def test_a_bad_sector_proves_it_landed_and_does_not_outlive_its_test(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = private_sim_rig(pytester.path)
    for name, value in rig.env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_bad_sector=BAD_SECTOR_SCENARIOS)
    records = pytester.path / "records"
    result = pytester.runpytest_subprocess(
        "test_bad_sector.py", "--hil-rig", str(rig.path), "--hil-timeline-dir", str(records),
        "--hil-lease-dir", str(pytester.path / "leases"), "--rootdir", str(ROOT),
        "-c", str(ROOT / "pytest.ini"), "-p", "no:cacheprovider", "-p", "no:randomly",
        timeout=300)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines([
        "E * hil.errors.FaultNotLanded: fault bad-sector never hit: the board never wrote to "
        "sector 0x6f000, which the fault made bad"])
    [timeline] = records.glob("*test_1_a_bad_sector_under_the_install_request*.timeline.jsonl")
    lines = [json.loads(line) for line in timeline.read_text().splitlines()]
    [hit] = [line for line in lines if line.get("kind") == "fault-hit"]
    assert (hit["fault"], hit["phase"]) == ("bad-sector", "flash")
    assert "sector 0x6f000 of the internal flash" in hit["detail"]
    assert [line["result"] for line in lines if line["phase"] == "report"] == [101, 206]
