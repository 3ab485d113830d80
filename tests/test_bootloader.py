"""The simulated MCUboot (hil.sim.mcuboot) on real simulated flash: its trailer is imgtool's, a
test swap is reverted unless confirmed, a swap cut at any step resumes to one complete image in
each slot, and it refuses what its build says it must (another key, an older version)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from imgtool import image as imgtool_image
from imgtool.version import decode_version

from hil.faults.catalog import older_version
from hil.sim import mcuboot
from hil.sim.defects import Defect
from hil.sim.flash import SimFlash
from hil.sim.images import (
    MCUBOOT_HEADER_SIZE,
    SLOT_SIZE,
    build_image,
    image_version,
)
from hil.sim.layout import SPI_FLASH_SIZE, Layout, layout_of


class _PowerCut(Exception):
    pass


class Io:
    """The bootloader's board: real flash files, the console kept as lines, and a clock that
    can cut the power at its ``cut_at``-th wait (None: never)."""

    def __init__(self, layout: Layout, tmp: Path, cut_at: int | None = None) -> None:
        internal_base = layout.primary.address - layout.primary.address % 0x10000
        self.flashes = {
            "internal": SimFlash(tmp / "internal.bin", size=0x80000 if internal_base == 0
                                 else 0x10000, base=internal_base,
                                 sector_size=0x1000 if internal_base == 0 else 0x400),
            "spi": SimFlash(tmp / "spi.bin", size=SPI_FLASH_SIZE)}
        self.lines: list[str] = []
        self.waits = 0
        self.cut_at = cut_at

    def flash(self, chip: str) -> SimFlash:
        return self.flashes[chip]

    def say(self, line: str) -> None:
        self.lines.append(line)

    def wait(self, seconds: float) -> None:
        del seconds
        self.waits += 1
        if self.cut_at is not None and self.waits >= self.cut_at:
            raise _PowerCut

    def draw(self, activity: str) -> None:
        del activity


_OPEN: list[Io] = []


@pytest.fixture(autouse=True)
def _close_flash() -> Iterator[None]:
    yield
    while _OPEN:
        for flash in _OPEN.pop().flashes.values():
            flash.close()


def _board(tmp: Path, board: str = "gd32", *, base: str = "1.0.0",
           cut_at: int | None = None) -> tuple[Layout, Io]:
    layout = layout_of(board)
    io = Io(layout, tmp, cut_at)
    _OPEN.append(io)
    primary = io.flash(layout.primary.chip)
    primary.program(layout.primary.address, build_image(board, base))
    return layout, io


def _download(layout: Layout, io: Io, image: bytes) -> None:
    """What the OTA agent does: the image into the secondary slot, then a test upgrade asked."""
    flash = io.flash(layout.secondary.chip)
    flash.erase(layout.secondary.address, layout.secondary.size)
    flash.program(layout.secondary.address, image)
    assert mcuboot.request_upgrade(flash, mcuboot.trailers(layout)[1])


def _running(layout: Layout, io: Io, board: str = "gd32") -> str:
    flash = io.flash(layout.primary.chip)
    return image_version(board, flash.read(layout.primary.address, layout.image_room))


def _other(layout: Layout, io: Io, board: str = "gd32") -> str:
    flash = io.flash(layout.secondary.chip)
    return image_version(board, flash.read(layout.secondary.address, layout.image_room))


@pytest.mark.parametrize("board", ["nrf52832", "gd32"])
def test_the_trailer_is_where_imgtool_puts_it(board):
    # imgtool --pad --confirm for the board's write size: the magic ends the slot, image_ok is
    # 0x01 where the model reads it, and its trailer is as long as the model's.
    layout = layout_of(board)
    made = imgtool_image.Image(version=decode_version("1.0.0"), header_size=MCUBOOT_HEADER_SIZE,
                               pad_header=True, pad=True, confirm=True,
                               align=layout.write_size, max_align=mcuboot.MAX_ALIGN,
                               slot_size=SLOT_SIZE[board])
    made.payload = bytearray(b"\0" * 4096)
    made.create(None, "hash", None)
    made.pad_to(SLOT_SIZE[board])
    padded = bytes(made.payload)
    trailer = mcuboot.Trailer(layout.primary, layout.write_size, layout.swap_unit)
    base = layout.primary.address
    assert padded[trailer.magic_at - base:] == mcuboot.BOOT_MAGIC
    assert padded[trailer.image_ok_at - base] == mcuboot.FLAG_SET
    assert trailer.end - trailer.status_at == made._trailer_size(
        layout.write_size, 128, False, None, False, 0)
    assert trailer.end - trailer.status_at <= layout.trailer


def test_a_tested_image_is_reverted_unless_it_confirms_itself(tmp_path):
    layout, io = _board(tmp_path)
    _download(layout, io, build_image("gd32", "1.1.0"))
    assert mcuboot.Bootloader(layout, io).run() is mcuboot.SwapType.TEST
    assert (_running(layout, io), _other(layout, io)) == ("1.1.0", "1.0.0")
    primary = io.flash(layout.primary.chip)
    assert mcuboot.pending_test(primary, mcuboot.trailers(layout)[0])
    # Not confirmed: the next boot swaps back, and the old image is confirmed.
    assert mcuboot.Bootloader(layout, io).run() is mcuboot.SwapType.REVERT
    assert (_running(layout, io), _other(layout, io)) == ("1.0.0", "1.1.0")
    assert mcuboot.Bootloader(layout, io).run() is mcuboot.SwapType.NONE
    assert _running(layout, io) == "1.0.0"


def test_a_confirmed_image_stays(tmp_path):
    layout, io = _board(tmp_path)
    _download(layout, io, build_image("gd32", "1.1.0"))
    mcuboot.Bootloader(layout, io).run()
    primary = io.flash(layout.primary.chip)
    assert mcuboot.set_confirmed(primary, mcuboot.trailers(layout)[0])
    assert not mcuboot.set_confirmed(primary, mcuboot.trailers(layout)[0])   # once is enough
    for _ in range(2):
        assert mcuboot.Bootloader(layout, io).run() is mcuboot.SwapType.NONE
        assert _running(layout, io) == "1.1.0"


def test_no_revert_defect_boots_the_unconfirmed_image_again(tmp_path):
    layout, io = _board(tmp_path)
    _download(layout, io, build_image("gd32", "1.1.0"))
    mcuboot.Bootloader(layout, io).run()
    defective = frozenset({Defect.NO_REVERT})
    assert mcuboot.Bootloader(layout, io, defective).run() is mcuboot.SwapType.NONE
    assert _running(layout, io) == "1.1.0"


def _swap_waits(tmp: Path) -> int:
    layout, io = _board(tmp)
    _download(layout, io, build_image("gd32", "1.1.0"))
    mcuboot.Bootloader(layout, io).run()
    return io.waits


def test_a_swap_cut_at_any_step_resumes_to_one_complete_image_in_each_slot(tmp_path):
    total = _swap_waits(tmp_path / "count")
    assert total >= 2 * 3 * 4          # an erase and a program per step, 3 steps per unit
    for cut in range(1, total + 1):
        layout, io = _board(tmp_path / f"cut{cut}", cut_at=cut)
        _download(layout, io, build_image("gd32", "1.1.0"))
        with pytest.raises(_PowerCut):
            mcuboot.Bootloader(layout, io).run()
        io.cut_at = None
        kind = mcuboot.Bootloader(layout, io).run()
        assert kind is mcuboot.SwapType.TEST, (cut, io.lines)
        assert "I: bootloader: resuming the interrupted test swap" in io.lines
        assert (_running(layout, io), _other(layout, io)) == ("1.1.0", "1.0.0"), cut


def test_without_its_record_a_cut_swap_leaves_no_bootable_image(tmp_path):
    # The non-atomic-install defect: the swap keeps no status; cut in its first write into
    # the primary slot, the next boot finds half-swapped slots.
    layout, io = _board(tmp_path, cut_at=5)      # the primary unit erased, not yet written
    _download(layout, io, build_image("gd32", "1.1.0"))
    defective = frozenset({Defect.NON_ATOMIC_INSTALL})
    with pytest.raises(_PowerCut):
        mcuboot.Bootloader(layout, io, defective).run()
    io.cut_at = None
    mcuboot.Bootloader(layout, io, defective).run()
    with pytest.raises(ValueError, match="MCUboot image"):  # half an image: no TLVs, or no hash
        _running(layout, io)


@pytest.mark.parametrize(("image", "why", "defect"), [
    (lambda: build_image("gd32", "1.1.0", key="other"),
     "signed with a key this bootloader does not know", Defect.ACCEPTS_UNSIGNED),
    (lambda: build_image("gd32", "0.9.0"), "older than the running 1.0.0",
     Defect.ACCEPTS_DOWNGRADE),
], ids=["another-key", "older"])
def test_the_bootloader_refuses_what_it_must_not_install(tmp_path, image, why, defect):
    layout, io = _board(tmp_path / "good")
    _download(layout, io, image())
    assert mcuboot.Bootloader(layout, io).run() is mcuboot.SwapType.NONE
    assert any(line.startswith("E: bootloader: secondary slot image rejected") and why in line
               for line in io.lines), io.lines
    assert _running(layout, io) == "1.0.0"
    # Refused once is refused for good: the slot is erased, the next boot asks nothing.
    assert mcuboot.Bootloader(layout, io).run() is mcuboot.SwapType.NONE
    # The defect skips that check: the image is swapped in.
    layout, io = _board(tmp_path / "bad")
    _download(layout, io, image())
    assert mcuboot.Bootloader(layout, io, frozenset({defect})).run() is mcuboot.SwapType.TEST


def test_the_same_version_is_no_downgrade(tmp_path):
    layout, io = _board(tmp_path)
    _download(layout, io, build_image("gd32", "1.0.0", seed="a rebuild"))
    assert mcuboot.Bootloader(layout, io).run() is mcuboot.SwapType.TEST


def test_a_restore_erases_the_boot_state(tmp_path):
    layout, io = _board(tmp_path)
    _download(layout, io, build_image("gd32", "1.1.0"))
    mcuboot.Bootloader(layout, io).run()           # a tested image, pending its confirm
    mcuboot.erase_boot_state(layout, io.flash)
    primary = io.flash(layout.primary.chip)
    assert not mcuboot.pending_test(primary, mcuboot.trailers(layout)[0])
    assert mcuboot.Bootloader(layout, io).run() is mcuboot.SwapType.NONE


@pytest.mark.parametrize(("version", "older"), [
    ("1.0.0", "0.9.0"), ("1.2.0", "1.1.0"), ("1.2.3", "1.2.2"), ("2.0.1+7", "2.0.0"),
    ("0.0.0", None), ("v5.3.1-dirty", None)])
def test_the_downgrade_fault_offers_a_version_below_the_base(version, older):
    assert older_version(version) == older

