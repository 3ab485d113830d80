"""The simulated ESP32 boots as ESP-IDF's bootloader does with app rollback, Secure Boot V2 and
anti-rollback (hil.boards.otadata, hil.sim.otadata), on real simulated flash: the otadata
entries are otatool's, an update is tried as PENDING_VERIFY and rolled back unless its app
confirms, an image the bootloader must not boot is skipped for the other slot, and the ESP
flasher's restore leaves an otadata that boots the base. On the conformance suite: each
bootloader defect fails a scenario on the simulated ESP32."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hil.boards import otadata as fmt
from hil.sim import otadata
from hil.sim.defects import Defect
from hil.sim.flash import SimFlash
from hil.sim.images import ESP32_SECURE_VERSION, build_image
from hil.sim.layout import layout_of

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = layout_of("esp32")
assert LAYOUT.otadata is not None
PARTITION = LAYOUT.otadata


class Io:
    """The bootloader's board: one 4 MiB SPI flash file and the console kept as lines."""

    def __init__(self, tmp: Path) -> None:
        self.chip = SimFlash(tmp / "flash.bin", size=0x400000)
        self.lines: list[str] = []

    def flash(self, chip: str) -> SimFlash:
        assert chip == "internal"
        return self.chip

    def say(self, line: str) -> None:
        self.lines.append(line)


def put(io: Io, slot: int, image: bytes) -> None:
    where = LAYOUT.slots[slot]
    io.chip.erase(where.address, where.size)
    io.chip.program(where.address, image)


def boot(io: Io, tmp: Path, *defects: Defect) -> int | None:
    return otadata.Bootloader(LAYOUT, io, tmp, frozenset(defects)).run()


def switch(io: Io, slot: int) -> None:
    """``esp_ota_set_boot_partition(ota_<slot>)``, as the simulated app makes it."""
    sector, entry = fmt.switch_to(otadata.read_entries(io.chip, PARTITION), slot, 2)
    otadata.write_entry(io.chip, PARTITION, sector, entry)


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Io]:
    """A fresh board: the base in ota_0, the otadata blank, booted once."""
    io = Io(tmp_path)
    try:
        put(io, 0, build_image("esp32", "1.0.0"))
        assert boot(io, tmp_path) == 0
        yield io
    finally:
        io.chip.close()


# ------------------------------------------------------------------------------------ format
def test_the_entry_crc_is_otatools():
    # binascii.crc32(struct.pack("I", seq), 0xFFFFFFFF), as ESP-IDF's otatool.py checks it.
    assert [fmt.entry_crc(seq) for seq in (1, 2, 3)] == [0x4743989A, 0x55F63774, 0xED4A5011]


def test_switches_alternate_sectors_and_slots_as_esp_idf_numbers_them():
    entries = fmt.read(b"\xff" * fmt.SIZE)
    assert fmt.active(entries) is None
    sector, first = fmt.switch_to(entries, 0, 2)     # blank: otadata[0], ota_seq 1
    assert (sector, first.seq, first.state) == (0, 1, fmt.State.NEW)
    seen = []
    partition = bytearray(b"\xff" * fmt.SIZE)
    partition[:fmt.ENTRY.size] = first.pack()
    for slot in (1, 0, 1):
        sector, entry = fmt.switch_to(fmt.read(bytes(partition)), slot, 2)
        partition[sector * fmt.SECTOR:sector * fmt.SECTOR + fmt.ENTRY.size] = entry.pack()
        seen.append((sector, entry.seq, entry.slot(2)))
    assert seen == [(1, 2, 1), (0, 3, 0), (1, 4, 1)]


def test_a_first_boot_of_a_blank_otadata_records_ota_0(board, tmp_path):
    entries = otadata.read_entries(board.chip, PARTITION)
    assert (entries[0].seq, entries[0].state) == (1, fmt.State.VALID)    # set_actual_ota_seq
    assert not entries[1].valid
    assert otadata.efuse_secure_version(tmp_path) == ESP32_SECURE_VERSION


# ------------------------------------------------------------------------------------ rollback
def test_an_update_is_tried_then_rolled_back_unless_its_app_confirms(board, tmp_path):
    put(board, 1, build_image("esp32", "1.1.0"))
    switch(board, 1)
    assert boot(board, tmp_path) == 1                      # NEW: tried, as PENDING_VERIFY
    entries = otadata.read_entries(board.chip, PARTITION)
    assert entries[fmt.active(entries)].state == fmt.State.PENDING_VERIFY

    assert boot(board, tmp_path) == 0                      # reset before it confirmed
    assert any("rolling back" in line for line in board.lines)
    assert entries[1].seq == otadata.read_entries(board.chip, PARTITION)[1].seq
    assert otadata.read_entries(board.chip, PARTITION)[1].state == fmt.State.ABORTED
    assert boot(board, tmp_path) == 0                      # and stays rolled back


def test_a_confirmed_update_stays(board, tmp_path):
    put(board, 1, build_image("esp32", "1.1.0"))
    switch(board, 1)
    assert boot(board, tmp_path) == 1
    assert otadata.confirm(board.chip, PARTITION, 1, 2)
    assert not otadata.confirm(board.chip, PARTITION, 1, 2)      # nothing left to confirm
    assert boot(board, tmp_path) == 1
    assert boot(board, tmp_path) == 1


def test_without_rollback_an_unconfirmed_update_boots_again(board, tmp_path):
    put(board, 1, build_image("esp32", "1.1.0"))
    switch(board, 1)
    assert boot(board, tmp_path, Defect.NO_REVERT) == 1
    assert boot(board, tmp_path, Defect.NO_REVERT) == 1


# ------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize(("image", "why", "defect"), [
    (lambda: build_image("esp32", "1.1.0", key="other"),
     "signed with a key this bootloader does not know", Defect.ACCEPTS_UNSIGNED),
    (lambda: build_image("esp32", "0.9.0", secure_version=ESP32_SECURE_VERSION - 1),
     "below the eFuse's 1 (anti-rollback)", Defect.ACCEPTS_DOWNGRADE),
], ids=["other-key", "lower-secure-version"])
def test_the_bootloader_boots_the_other_slot_rather_than_what_it_must_not(
        board, tmp_path, image, why, defect):
    put(board, 1, image())
    switch(board, 1)
    assert boot(board, tmp_path) == 0
    assert any(why in line for line in board.lines), board.lines
    # A bootloader built without the check boots it.
    switch(board, 1)
    assert boot(board, tmp_path, defect) == 1


def test_a_damaged_image_is_skipped(board, tmp_path):
    image = bytearray(build_image("esp32", "1.1.0"))
    image[0x1000] ^= 0x01
    put(board, 1, bytes(image))
    switch(board, 1)
    assert boot(board, tmp_path) == 0


def test_the_efuse_never_goes_down(tmp_path):
    otadata.burn_secure_version(tmp_path, 3)
    otadata.burn_secure_version(tmp_path, 2)
    assert otadata.efuse_secure_version(tmp_path) == 3


# ------------------------------------------------------------------------------------ restore
def test_only_an_otadata_that_boots_ota_0_settled_is_left_by_a_restore(board, tmp_path):
    def settled() -> bool:
        return fmt.settled_on_first_slot(board.chip.read(PARTITION.address, PARTITION.size))

    assert settled()                                        # the base, booted once
    put(board, 1, build_image("esp32", "1.1.0"))
    switch(board, 1)
    assert not settled()                                    # an update pending
    boot(board, tmp_path)
    boot(board, tmp_path)
    assert not settled()                                    # rolled back: ABORTED kept
    assert fmt.settled_on_first_slot(b"\xff" * fmt.SIZE)


# ------------------------------------------------------------------------------------ suite
@pytest.mark.slow
@pytest.mark.parametrize("defect", [Defect.CONFIRMS_BEFORE_SELF_TEST, Defect.NO_REVERT,
                                    Defect.ACCEPTS_UNSIGNED, Defect.ACCEPTS_DOWNGRADE], ids=str)
def test_each_bootloader_defect_fails_a_boot_scenario_on_the_simulated_esp32(tmp_path, defect):
    rig = yaml.safe_load((ROOT / "rigs" / "sim-esp32.yaml").read_text())
    rig["name"] = f"sim-esp32-{defect.value}"
    rig["sim"]["defects"] = [defect.value]
    rig["sim"]["state_dir"] = str(tmp_path / "state")
    rig["console"]["url"] = f"hilsim://{tmp_path / 'state'}"
    rig["power"]["url"] = str(tmp_path / "state" / "supply")
    rig["rf"]["url"] = str(tmp_path / "state" / "attenuator")
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(rig))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "testcases" / "test_boot.py"), "-q",
         "-p", "no:cacheprovider", "--hil-rig", str(path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert " failed" in out.splitlines()[-1], out
    assert "phase:" in out, out          # the message names the phase that went wrong


def test_a_state_directory_left_by_the_copying_esp32_starts_afresh(tmp_path, monkeypatch):
    """A simulated ESP32's state from before the A/B layout (an unsigned image in ota_0, the
    old factory image cached, no format marker) would boot nothing under the new bootloader:
    the bench discards it and the board boots its factory version."""
    from hil.sim.bench import FORMAT_FILE, STATE_FORMAT
    from tests.sim_board import SimSetup

    state = tmp_path / "t0-esp32"
    state.mkdir()
    old = build_image("esp32", "1.0.0")[:0x20050]          # the unsigned image of before
    flash = bytearray(b"\xff" * 0x400000)
    flash[0x10000:0x10000 + len(old)] = old
    (state / "flash.bin").write_bytes(bytes(flash))
    (state / "factory.bin").write_bytes(old)
    with SimSetup(tmp_path, monkeypatch) as setup:
        sim = setup.board("esp32")
        assert sim.board.version() == "1.0.0"
    assert (state / FORMAT_FILE).read_text().strip() == STATE_FORMAT
