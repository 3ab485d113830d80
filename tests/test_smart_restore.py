"""The restore before each test writes only what differs (issue 15, item 4): on each simulated
board, through the real flashers (esptool against the simulated ESP32's ROM and stub, pyocd
against the simulated SWD probe), counted by the simulated chip itself.

- a restore after a test that changed nothing writes nothing, and the board boots its base;
- after an OTA installed 1.1.0, it writes exactly the sectors that differ from the base (on
  the ESP32, whose update went to its other slot, none: it erases the OTA data partition), and
  the board boots 1.0.0 with no OTA state left, its flash as a full write leaves it;
- the forced full restore (``full=True``, ``--hil-full-restore``) writes the whole image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hil.drivers.esp import SECTOR, _differing_runs, _sector_padded
from hil.rig.board import Board
from hil.rig.model import load_rig
from hil.rig.parts import RigParts
from hil.service.server import new_access_key
from hil.sim.esp32 import board_for
from hil.sim.images import DEFAULT_PAYLOAD_SIZE, build_image
from hil.sim.layout import layout_of
from hil.sim.probe import board as probe_board
from hil.sim.probe import read_spec
from tests.private_rig import private_sim_rig
from tests.sim_board import KEY_ENV, SimBoard, SimSetup, rig_document

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ("esp32", "nrf52832", "gd32")
BASE, TARGET = "1.0.0", "1.1.0"


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimSetup]:
    with SimSetup(tmp_path, monkeypatch) as setup:
        yield setup


class Written:
    """What the flasher did to the simulated chip's flash, as the chip counts it: the
    sectors erased (their addresses) and the bytes programmed."""

    def __init__(self, sim: SimBoard) -> None:
        self.esp = sim.rig.board == "esp32"
        state_dir = sim.bench.state_dir
        # The simulated chip behind the flasher: one object per state directory and process.
        self.board: Any = board_for(state_dir) if self.esp else probe_board(read_spec(state_dir))
        self.reset()

    def reset(self) -> None:
        self.board.flash_ops.reset()

    @property
    def programmed(self) -> int:
        ops = self.board.flash_ops
        return int(ops.programmed if self.esp else ops.bytes_programmed)

    @property
    def erased(self) -> int:
        ops = self.board.flash_ops
        if self.esp:
            return int(ops.erased)
        return sum(size for routine, _, size in ops.log if routine.name == "ERASE_SECTOR")

    def erased_sectors(self) -> list[int]:
        """The SWD boards' erased sectors, in order (the probe logs each)."""
        assert not self.esp
        return [address for routine, address, _ in self.board.flash_ops.log
                if routine.name == "ERASE_SECTOR"]


def base_file(tmp_path: Path, board: str) -> Path:
    path = tmp_path / f"{board}-{BASE}.bin"
    path.write_bytes(build_image(board, BASE))
    return path


def patch_image(board: str) -> bytes:
    """1.1.0 built from the base's payload: its header (the version) and its hash trailer
    differ from the base, its code does not (a one-line fix whose link did not move)."""
    return build_image(board, TARGET, seed=f"{board}|{BASE}|{DEFAULT_PAYLOAD_SIZE[board]}")


def primary(sim: SimBoard, size: int) -> bytes:
    slot = layout_of(sim.rig.board).primary
    return sim.bench.flash(slot.chip).read(slot.address, size)


def sector_size(sim: SimBoard) -> int:
    return sim.bench.flash(layout_of(sim.rig.board).primary.chip).sector_size


def differing_sectors(sim: SimBoard, image: bytes) -> list[int]:
    """The sectors of the primary slot whose bytes are not those ``image`` (padded with 0xFF to
    its last sector's end) puts there."""
    unit = sector_size(sim)
    wanted = image + b"\xff" * (-len(image) % unit)
    held = primary(sim, len(wanted))
    address = layout_of(sim.rig.board).primary.address
    return [address + offset for offset in range(0, len(wanted), unit)
            if held[offset:offset + unit] != wanted[offset:offset + unit]]


def install(setup: SimSetup, sim: SimBoard, image: bytes) -> None:
    """A real OTA: the board downloads ``image`` from the mock and its bootloader installs it."""
    setup.mock.service.reset()
    setup.task(sim, TARGET, image=image)
    setup.update(sim)
    assert setup.codes(sim) == [101, 201]
    assert sim.board.version() == TARGET


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("board", BOARDS)
def test_a_restore_after_a_test_that_changed_nothing_writes_nothing(setup, tmp_path, board):
    sim = setup.board(board)
    base = base_file(tmp_path, board)
    assert sim.board.restore_base(base) == BASE
    written = Written(sim)

    assert sim.board.restore_base(base) == BASE          # the board boots its base

    assert (written.programmed, written.erased) == (0, 0)
    assert primary(sim, base.stat().st_size) == base.read_bytes()


@pytest.mark.parametrize("board", BOARDS)
def test_after_an_ota_the_restore_writes_only_the_sectors_that_differ(setup, tmp_path, board):
    sim = setup.board(board)
    base = base_file(tmp_path, board)
    assert sim.board.restore_base(base) == BASE
    install(setup, sim, patch_image(board))
    changed = differing_sectors(sim, base.read_bytes())
    unit = sector_size(sim)
    written = Written(sim)
    progress: list[tuple[int, int]] = []
    if board == "esp32":
        # ESP-IDF's A/B: the update went to ota_1 and the base in ota_0 is untouched; what
        # makes the board boot the base again is the OTA data partition, erased.
        assert changed == []
    else:
        assert 0 < len(changed) < base.stat().st_size // unit // 4   # the header, the trailer

    version = sim.board.restore_base(base, lambda done, total: progress.append((done, total)))

    assert version == BASE
    otadata = layout_of(board).otadata
    if otadata is not None:
        assert (written.programmed, written.erased) == (0, otadata.size)
    else:
        assert (written.programmed, written.erased) == (len(changed) * unit, len(changed) * unit)
        assert written.erased_sectors() == changed
        assert progress == sorted(progress)                    # monotonic, to the end
        assert progress[-1][0] == progress[-1][1]
    assert differing_sectors(sim, base.read_bytes()) == []    # as a full write leaves it
    assert "ota" not in sim.bench.firmware.nvs.load()          # no update state left
    # The next test starts from the base: the same restore now finds nothing to write.
    written.reset()
    assert sim.board.restore_base(base) == BASE
    assert (written.programmed, written.erased) == (0, 0)


@pytest.mark.parametrize("board", BOARDS)
def test_the_forced_full_restore_writes_the_whole_image(setup, tmp_path, board):
    sim = setup.board(board)
    base = base_file(tmp_path, board)
    assert sim.board.restore_base(base) == BASE
    written = Written(sim)
    unit = sector_size(sim)
    sectors = -(-base.stat().st_size // unit)

    assert sim.board.restore_base(base, full=True) == BASE

    otadata = layout_of(board).otadata
    assert written.erased == sectors * unit + (otadata.size if otadata is not None else 0)
    # esptool sends the image (padded to 4 bytes); pyocd programs whole sectors.
    assert written.programmed == (base.stat().st_size if board == "esp32" else sectors * unit)
    if board != "esp32":
        address = layout_of(board).primary.address
        assert written.erased_sectors() == [address + index * unit for index in range(sectors)]
    assert primary(sim, base.stat().st_size) == base.read_bytes()


@pytest.mark.parametrize("board", ["esp32", "nrf52832"])
def test_a_shell_less_restore_that_writes_nothing_still_erases_the_ota_state(
        tmp_path, monkeypatch, board):
    """A board without a shell is restored with its factory image and its settings erased; when
    the image is in place already nothing is written, and the OTA state goes all the same."""
    monkeypatch.setenv(KEY_ENV, new_access_key())
    doc = rig_document("shipped", board, tmp_path / "state", shipped=True, http_timeout=1.0)
    doc["console"]["shell"] = "none"
    doc["console"]["events"] = {"boot": r"^I: app: firmware version (?P<version>\S+)$"}
    doc["ota"] = {"service": "mock", "trigger": "reset", "host": "ota.heclouds.com",
                  "port": 0, "dns": {"listen": "127.0.0.1:0"}}
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(doc))
    with RigParts(load_rig(path)) as parts:
        board_ = Board(parts)
        sim = SimBoard(parts.rig, parts, board_)
        board_.restore_base(None)
        firmware = sim.bench.firmware
        assert firmware is not None
        # What a test left behind: a download half done, bound to the running image.
        firmware.nvs.update(ota={"stage": "download", "token": "t", "offset": 8192},
                            server="http://127.0.0.1:9")
        written = Written(sim)

        board_.restore_base(None)

        assert (written.programmed, written.erased) == (0, 0)
        assert firmware.nvs.load() == {}
        assert firmware.version == BASE                     # it booted its factory image


# ------------------------------------------------------------------------------ the pure part
def _flash_md5(flash: bytes, calls: list[tuple[int, int]]) -> Any:
    def md5(start: int, size: int) -> str:
        calls.append((start, size))
        return hashlib.md5(flash[start:start + size], usedforsecurity=False).hexdigest()
    return md5


def test_the_esp_comparison_hashes_the_span_then_blocks_then_sectors_and_merges_runs():
    wanted = _sector_padded(bytes(range(256)) * 1000)          # 256,000 -> 63 sectors
    assert len(wanted) == 63 * SECTOR
    flash = bytearray(wanted)
    calls: list[tuple[int, int]] = []
    assert _differing_runs(_flash_md5(bytes(flash), calls), wanted) == []
    assert calls == [(0, len(wanted))]                        # one MD5: nothing differs

    for sector in (1, 2, 3, 40):
        flash[sector * SECTOR + 7] ^= 0xFF
    calls.clear()
    runs = _differing_runs(_flash_md5(bytes(flash), calls), wanted)

    assert runs == [(SECTOR, 3 * SECTOR), (40 * SECTOR, SECTOR)]
    # The span, its four 64 KiB blocks, then the sectors of the two blocks that differ.
    assert len(calls) == 1 + 4 + 16 + 16
    assert _differing_runs(_flash_md5(bytes(flash), []), b"") == []


def test_a_span_that_differs_while_no_piece_does_is_written_whole():
    wanted = _sector_padded(b"\x01" * 3 * SECTOR)
    answers = iter(["not the md5 of anything"])

    def flash_changing_meanwhile(start: int, size: int) -> str:
        # The first answer differs; then the flash holds the image (another writer?).
        return next(answers, hashlib.md5(wanted[start:start + size],
                                         usedforsecurity=False).hexdigest())

    assert _differing_runs(flash_changing_meanwhile, wanted) == [(0, len(wanted))]


# ------------------------------------------------------------------------------ the switch
def test_hil_full_restore_makes_the_plugins_restore_write_the_whole_image(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = private_sim_rig(pytester.path)
    for name, value in rig.env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_restored="""
        def test_written(rig, board_written, board):
            print(f"WRITTEN {board_written()}")
    """)
    pytester.makeconftest("""
        import pytest
        from hil.sim.probe import board as probe_board, read_spec

        @pytest.fixture
        def board_written(rig, rig_parts):
            # What the restore of the board fixture (set up after this one) programmed.
            ops = probe_board(read_spec(rig.sim_state_dir)).flash_ops
            ops.reset()
            return lambda: ops.bytes_programmed
    """)
    image = ROOT / "fixtures" / "images" / f"nrf52832-{BASE}.bin"
    common = ("-p", "no:cacheprovider", "-s", "--hil-rig", str(rig.path),
              "--hil-firmware", str(image))

    smart = pytester.runpytest_subprocess(*common, timeout=300)
    full = pytester.runpytest_subprocess(*common, "--hil-full-restore", timeout=300)

    smart.assert_outcomes(passed=1)
    full.assert_outcomes(passed=1)
    smart.stdout.fnmatch_lines(["*WRITTEN 0*"])       # the factory image is the base already
    sectors = -(-image.stat().st_size // 0x1000)
    full.stdout.fnmatch_lines([f"*WRITTEN {sectors * 0x1000}*"])
