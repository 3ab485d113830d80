"""MCUboot as the simulated nRF52832 and GD32 boot through it: swap using scratch, with test,
confirm and revert, resumable after a power cut, signature check and downgrade prevention.

What carries over from MCUboot (bootutil's ``bootutil_public.c``, ``bootutil_misc.c``,
``swap_scratch.c``, ``loader.c``; imgtool's ``image.py`` trailer):

- **The image trailer** at the end of each slot, as imgtool lays it out (``_trailer_size`` and
  ``pad_to``) with ``BOOT_MAX_ALIGN`` 8 and 128 status entries: from the slot's end, the 16-byte
  magic, ``image_ok``, ``copy_done``, ``swap_info`` (swap type in the low nibble, image 0 in the
  high), ``swap_size`` (u32), each in an 8-byte field, then the swap status area, 128 sectors
  times 3 states times the flash's write size (4 on the nRF52832's NVMC, 2 on the GD32's FMC).
  A flag is set when it reads 0x01, unset when erased (0xFF); the magic is good when it is
  bootutil's ``boot_img_magic``, unset when erased.
- **The requests**: ``boot_request_upgrade`` writes the secondary slot's magic (a *test*
  upgrade; a *permanent* one also sets its ``image_ok``); ``boot_set_confirmed`` (the running
  image confirming itself) sets the primary slot's ``image_ok`` when its magic is good, and
  does nothing on a primary slot with no trailer (an image flashed directly).
- **The swap type** (``boot_swap_tables``): secondary magic good and ``image_ok`` unset: TEST;
  secondary magic good and ``image_ok`` set: PERM; primary magic good, ``image_ok`` unset and
  ``copy_done`` set (an image tested and never confirmed): REVERT; else NONE.
- **Before a TEST or PERM swap** the secondary image is validated (``boot_validate_slot``): its
  header, its SHA256 TLV, its ED25519 signature with the key the bootloader was built with
  (KEYHASH must name it), its size against the slot, and (``MCUBOOT_DOWNGRADE_PREVENTION``) its
  version against the primary's: older is refused, equal is not. A refused image's slot is
  erased and the primary boots as it is.
- **The swap**, one unit at a time from the top of the swapped area down, each in three steps
  (``swap_scratch.c``'s states): secondary unit to scratch, primary unit to secondary, scratch to
  primary, each step an erase and a program taking the part's time, and its status entry written
  in the primary slot's trailer once it is done. A power cut leaves the entries written so far:
  the next boot finds the primary's magic good and ``copy_done`` unset, and resumes at the first
  step not recorded (each step's source is intact until the step after it, so redoing it is
  safe). At the end the secondary's trailer is erased, then ``copy_done`` is set (and
  ``image_ok`` after PERM or REVERT: a reverted image is confirmed).

What differs, to keep the model small: the trailer occupies the last swap unit of each slot
(``Layout.trailer``) and is never swapped, so the status always lives in the primary slot's
trailer (MCUboot moves it to the scratch's while it swaps the last sector); an image may fill
the slot less that unit (``Layout.image_room``). The swap covers ``swap_size`` bytes, the larger
of the two images, rounded up to whole units.

The firmware model (``hil.sim.firmware``) gives the bootloader its flash, its console and its
clock (``BootIo``); the defects that live in the bootloader (``no-revert``, ``accepts-unsigned``,
``accepts-downgrade``, ``non-atomic-install``) are its switches.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hil.sim.defects import Defect
from hil.sim.flash import FlashTiming, SimFlash
from hil.sim.images import check_signature, mcuboot_span, public_key_der, read_mcuboot
from hil.sim.layout import Layout, Slot

# bootutil's boot_img_magic for BOOT_MAX_ALIGN 8 (imgtool's boot_magic for --max-align 8).
BOOT_MAGIC = bytes.fromhex("77c295f360d2ef7f3552500f2cb67980")
MAGIC_SIZE = 16
MAX_ALIGN = 8                    # BOOT_MAX_ALIGN: each flag's field
STATUS_MAX_ENTRIES = 128         # BOOT_STATUS_MAX_ENTRIES (imgtool's --max-sectors default)
STATE_COUNT = 3                  # BOOT_STATUS_STATE_COUNT: swap_scratch's three steps per unit
FLAG_SET = 0x01
ERASED = 0xFF
# The key the simulated boards' MCUboot is built with (hil.sim.images.signing_key).
TRUSTED_KEY = "root"
# A swap writes each unit three times where the old overwrite-only copy wrote it once; each
# write waits the part's time times this (a sixth), so that an install takes about what it took
# before (the suite's ~25 updates per rig) while still lasting hundreds of milliseconds, far
# longer than a host takes to cut the power once the board announced it.
SWAP_TIME_SCALE = 1 / 6


class SwapType(enum.IntEnum):
    """bootutil's BOOT_SWAP_TYPE_*."""

    NONE = 1
    TEST = 2
    PERM = 3
    REVERT = 4
    FAIL = 5


class Magic(enum.Enum):
    GOOD = "good"
    UNSET = "unset"
    BAD = "bad"


@dataclass(frozen=True)
class Trailer:
    """Where each field of ``slot``'s trailer lies (imgtool's layout; see the module doc)."""

    slot: Slot
    write_size: int
    unit: int

    @property
    def end(self) -> int:
        return self.slot.address + self.slot.size

    @property
    def magic_at(self) -> int:
        return self.end - MAGIC_SIZE

    @property
    def image_ok_at(self) -> int:
        return self.magic_at - MAX_ALIGN

    @property
    def copy_done_at(self) -> int:
        return self.image_ok_at - MAX_ALIGN

    @property
    def swap_info_at(self) -> int:
        return self.copy_done_at - MAX_ALIGN

    @property
    def swap_size_at(self) -> int:
        return self.swap_info_at - MAX_ALIGN

    @property
    def status_at(self) -> int:
        return self.swap_size_at - STATUS_MAX_ENTRIES * STATE_COUNT * self.write_size

    @property
    def sector_at(self) -> int:
        """The unit the trailer sits in (erased whole)."""
        return self.end - self.unit

    def entry_at(self, index: int) -> int:
        return self.status_at + index * self.write_size


@dataclass(frozen=True)
class SlotState:
    magic: Magic
    image_ok: bool | None          # None: neither set nor erased (bootutil's BOOT_FLAG_BAD)
    copy_done: bool | None
    swap_type: int                 # swap_info's low nibble (0xF: erased)
    swap_size: int


def trailers(layout: Layout) -> tuple[Trailer, Trailer]:
    """The primary's and the secondary's trailer."""
    return (Trailer(layout.primary, layout.write_size, layout.swap_unit),
            Trailer(layout.secondary, layout.write_size, layout.swap_unit))


def read_state(flash: SimFlash, trailer: Trailer) -> SlotState:
    magic = flash.read(trailer.magic_at, MAGIC_SIZE)
    return SlotState(
        magic=Magic.GOOD if magic == BOOT_MAGIC else
        Magic.UNSET if magic == bytes([ERASED]) * MAGIC_SIZE else Magic.BAD,
        image_ok=_flag(flash.read(trailer.image_ok_at, 1)[0]),
        copy_done=_flag(flash.read(trailer.copy_done_at, 1)[0]),
        swap_type=flash.read(trailer.swap_info_at, 1)[0] & 0x0F,
        swap_size=struct.unpack("<I", flash.read(trailer.swap_size_at, 4))[0])


def _flag(value: int) -> bool | None:
    return True if value == FLAG_SET else False if value == ERASED else None


def _program_field(flash: SimFlash, at: int, data: bytes, write_size: int) -> None:
    """A field written as bootutil writes it: padded with the erased value to the write size."""
    padded = -(-len(data) // write_size) * write_size
    flash.program(at, data + bytes([ERASED]) * (padded - len(data)))


def request_upgrade(flash: SimFlash, trailer: Trailer, *, permanent: bool = False) -> bool:
    """``boot_request_upgrade``: the secondary slot's trailer erased, its magic written (and
    ``image_ok``, ``permanent``), read back. True when it reads back as asked;
    ``FlashWriteError`` from a write that failed."""
    flash.erase(trailer.sector_at, trailer.unit)
    if permanent:
        _program_field(flash, trailer.image_ok_at, bytes([FLAG_SET]), trailer.write_size)
    flash.program(trailer.magic_at, BOOT_MAGIC)
    flash.flush()
    state = read_state(flash, trailer)
    return state.magic is Magic.GOOD and state.image_ok is bool(permanent)


def set_confirmed(flash: SimFlash, trailer: Trailer) -> bool:
    """``boot_set_confirmed`` on the primary slot: True when it wrote ``image_ok`` (a tested
    image confirming itself), False when there was nothing to confirm (no trailer: an image
    flashed directly; or confirmed already)."""
    state = read_state(flash, trailer)
    if state.magic is not Magic.GOOD or state.image_ok is not False:
        return False
    _program_field(flash, trailer.image_ok_at, bytes([FLAG_SET]), trailer.write_size)
    flash.flush()
    return True


def pending_test(flash: SimFlash, trailer: Trailer) -> bool:
    """Whether the primary slot runs a tested image not confirmed yet (the next reset reverts
    it)."""
    state = read_state(flash, trailer)
    return state.magic is Magic.GOOD and state.image_ok is False and state.copy_done is True


def swap_type(primary: SlotState, secondary: SlotState) -> SwapType:
    """``boot_swap_type``: bootutil's table (see the module doc)."""
    if secondary.magic is Magic.GOOD and secondary.image_ok is False:
        return SwapType.TEST
    if secondary.magic is Magic.GOOD and secondary.image_ok is True:
        return SwapType.PERM
    if primary.magic is Magic.GOOD and primary.image_ok is False and primary.copy_done is True:
        return SwapType.REVERT
    return SwapType.NONE


def erase_boot_state(layout: Layout, flash: Callable[[str], SimFlash]) -> None:
    """Both trailers and the scratch area erased (where they are not already): a board
    restored to its base image has nothing pending, nothing to revert. ``flash`` gives the
    chip named in the layout."""
    if layout.scratch is None:
        return
    areas = [Slot(trailer.sector_at, trailer.unit, trailer.slot.chip)
             for trailer in trailers(layout)]
    erase_areas(flash, [*areas, Slot(layout.scratch.address, layout.swap_unit,
                                     layout.scratch.chip)])


def erase_areas(flash: Callable[[str], SimFlash], areas: list[Slot]) -> None:
    """Each area erased unless it reads erased already (a restore that changed nothing writes
    nothing); MCUboot's trailers and scratch, ESP-IDF's otadata."""
    for area in areas:
        part = flash(area.chip)
        if part.read(area.address, area.size) != bytes([ERASED]) * area.size:
            part.erase(area.address, area.size)
            part.flush()


def image_length(data: bytes) -> int:
    """Where an MCUboot image's TLV area ends (bootutil's ``boot_read_image_size``); 0 when
    no image can be read there."""
    from imgtool.image import TLV_INFO_MAGIC, TLV_PROT_INFO_MAGIC

    try:
        offset = mcuboot_span(data)
    except ValueError:
        return 0
    for magic in (TLV_PROT_INFO_MAGIC, TLV_INFO_MAGIC):
        if offset + 4 <= len(data):
            found, total = struct.unpack_from("<HH", data, offset)
            if found == magic:
                offset += total
    return offset if offset <= len(data) else 0


class BootIo(Protocol):
    """What the bootloader gets from the board and the firmware model."""

    def flash(self, chip: str) -> SimFlash: ...

    def say(self, line: str) -> None:
        """A console line (the bootloader's ``I:``/``E:`` log, the contract's flash event)."""

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass (a power cut strands the bootloader here)."""

    def draw(self, activity: str) -> None:
        """What the board draws from here on (``flash`` while it writes, ``boot`` after)."""


class Bootloader:
    """One boot of MCUboot on ``layout``'s slots: ``run()`` swaps (or resumes a swap, or
    reverts) as the trailers ask, then returns; the firmware then starts the primary slot."""

    def __init__(self, layout: Layout, io: BootIo, defects: frozenset[Defect] = frozenset(),
                 *, trusted_key: str = TRUSTED_KEY) -> None:
        if layout.scratch is None:
            raise ValueError("this layout has no scratch area: not an MCUboot swap layout")
        self.layout = layout
        self.io = io
        self.defects = defects
        self.trusted = public_key_der(trusted_key)
        self.primary_trailer, self.secondary_trailer = trailers(layout)
        self.primary = io.flash(layout.primary.chip)
        self.secondary = io.flash(layout.secondary.chip)
        self.scratch = io.flash(layout.scratch.chip)
        self.unit = layout.swap_unit

    def run(self) -> SwapType:
        """The swap done this boot (NONE when none was)."""
        primary = read_state(self.primary, self.primary_trailer)
        if primary.magic is Magic.GOOD and primary.copy_done is False \
                and primary.swap_type in (SwapType.TEST, SwapType.PERM, SwapType.REVERT):
            kind = SwapType(primary.swap_type)
            self.io.say(f"I: bootloader: resuming the interrupted {kind.name.lower()} swap")
            self._swap(kind, primary.swap_size, resumed=True)
            return kind
        secondary = read_state(self.secondary, self.secondary_trailer)
        kind = swap_type(primary, secondary)
        if kind is SwapType.REVERT and Defect.NO_REVERT in self.defects:
            kind = SwapType.NONE          # built as if every upgrade were permanent
        self.io.say(f"I: bootloader: swap type: {kind.name.lower()}")
        if kind in (SwapType.TEST, SwapType.PERM):
            why = self._invalid_secondary()
            if why is not None:
                self.io.say(f"E: bootloader: secondary slot image rejected: {why}; erasing "
                            "the slot")
                self.secondary.erase(self.layout.secondary.address, self.layout.secondary.size)
                self.secondary.flush()
                return SwapType.NONE
        if kind is SwapType.NONE:
            return kind
        size = max(self._length(self.primary, self.layout.primary),
                   self._length(self.secondary, self.layout.secondary))
        self.io.say(f"I: bootloader: starting swap using scratch ({kind.name.lower()}, "
                    f"{size} bytes)")
        self._start(kind, size)
        self._swap(kind, size, resumed=False)
        return kind

    # ------------------------------------------------------------------ validation
    def _length(self, flash: SimFlash, slot: Slot) -> int:
        return image_length(flash.read(slot.address, self.layout.image_room))

    def _invalid_secondary(self) -> str | None:
        slot = self.layout.secondary
        data = self.secondary.read(slot.address, self.layout.image_room)
        try:
            span = mcuboot_span(data)
            if span > self.layout.image_room:
                return f"its header says {span} bytes, the slot holds {self.layout.image_room}"
            image = read_mcuboot(data)
        except ValueError as error:
            return str(error)
        if Defect.ACCEPTS_UNSIGNED not in self.defects:
            try:
                check_signature(data, self.trusted)
            except ValueError as error:
                return str(error)
        if Defect.ACCEPTS_DOWNGRADE not in self.defects:
            try:
                running = read_mcuboot(self.primary.read(self.layout.primary.address,
                                                         self.layout.image_room)).version
            except ValueError:
                return None             # nothing valid runs: any version is an upgrade
            if image.version[:3] < running[:3]:
                old = ".".join(map(str, image.version[:3]))
                now = ".".join(map(str, running[:3]))
                return f"version {old} is older than the running {now} (downgrade prevention)"
        return None

    # ------------------------------------------------------------------ the swap
    def _start(self, kind: SwapType, size: int) -> None:
        """The primary trailer erased and the swap recorded in it: size and type first, the
        magic last, so that a good magic means the rest is there."""
        trailer = self.primary_trailer
        self.primary.erase(trailer.sector_at, trailer.unit)
        if Defect.NON_ATOMIC_INSTALL in self.defects:
            self.primary.flush()
            return                       # no record of the swap in progress
        _program_field(self.primary, trailer.swap_size_at, struct.pack("<I", size),
                       trailer.write_size)
        _program_field(self.primary, trailer.swap_info_at, bytes([int(kind)]),
                       trailer.write_size)
        self.primary.program(trailer.magic_at, BOOT_MAGIC)
        self.primary.flush()

    def _done_steps(self) -> int:
        """How many status entries the primary's trailer records (the steps done)."""
        for index in range(STATUS_MAX_ENTRIES * STATE_COUNT):
            if self.primary.read(self.primary_trailer.entry_at(index), 1)[0] == ERASED:
                return index
        return STATUS_MAX_ENTRIES * STATE_COUNT

    def _swap(self, kind: SwapType, size: int, *, resumed: bool) -> None:
        units = -(-size // self.unit)
        if units > STATUS_MAX_ENTRIES or units * self.unit > self.layout.image_room:
            self.io.say(f"E: bootloader: a {size}-byte swap does not fit the slots; booting "
                        "the primary slot as it is")
            return
        done = self._done_steps() if resumed else 0
        self.io.draw("flash")
        shown = done * 4 // (units * STATE_COUNT)
        announced = kind is SwapType.REVERT
        for step in range(done, units * STATE_COUNT):
            unit, state = divmod(step, STATE_COUNT)
            offset = (units - 1 - unit) * self.unit        # from the top down
            if state == 2 and not announced:
                # The contract's event as the image's first write into the slot it runs from
                # begins (the first two steps only copy into scratch and the secondary): a
                # power-cut fault waits for it, and lands where a swap without a record of
                # its progress loses data.
                self.io.say(f"ota phase=flash bytes={size}")
                announced = True
            self._step(state, offset)
            if Defect.NON_ATOMIC_INSTALL not in self.defects:
                _program_field(self.primary, self.primary_trailer.entry_at(step),
                               bytes([state + 1]), self.primary_trailer.write_size)
                self.primary.flush()
            if (step + 1) * 4 // (units * STATE_COUNT) > shown:
                shown = (step + 1) * 4 // (units * STATE_COUNT)
                self.io.say(f"I: bootloader: swapped {min((unit + 1) * self.unit, size)} of "
                            f"{size} bytes")
        self._finish(kind, size)
        self.io.draw("boot")

    def _step(self, state: int, offset: int) -> None:
        """One of swap_scratch's three steps for the unit at ``offset`` in the slots."""
        layout = self.layout
        assert layout.scratch is not None
        scratch_at = layout.scratch.address
        secondary_timing = layout.secondary_timing or layout.install_timing
        if state == 0:
            source = self.secondary.read(layout.secondary.address + offset, self.unit)
            self._write(self.scratch, scratch_at, source, secondary_timing)
        elif state == 1:
            source = self.primary.read(layout.primary.address + offset, self.unit)
            self._write(self.secondary, layout.secondary.address + offset, source,
                        secondary_timing)
        else:
            source = self.scratch.read(scratch_at, self.unit)
            self._write(self.primary, layout.primary.address + offset, source,
                        layout.install_timing)

    def _write(self, flash: SimFlash, at: int, data: bytes, timing: FlashTiming) -> None:
        flash.erase(at, len(data))
        self.io.wait(timing.erase_time(len(data)) * SWAP_TIME_SCALE)
        flash.program(at, data)
        flash.flush()
        self.io.wait(timing.program_time(len(data)) * SWAP_TIME_SCALE)

    def _finish(self, kind: SwapType, size: int) -> None:
        """The secondary's trailer erased first (a cut after it resumes into this again), then
        the primary's ``copy_done`` (and ``image_ok`` after PERM or REVERT)."""
        self.secondary.erase(self.secondary_trailer.sector_at, self.unit)
        self.secondary.flush()
        trailer = self.primary_trailer
        if Defect.NON_ATOMIC_INSTALL in self.defects:
            _program_field(self.primary, trailer.swap_size_at, struct.pack("<I", size),
                           trailer.write_size)
            _program_field(self.primary, trailer.swap_info_at, bytes([int(kind)]),
                           trailer.write_size)
            self.primary.program(trailer.magic_at, BOOT_MAGIC)
        if kind in (SwapType.PERM, SwapType.REVERT):
            _program_field(self.primary, trailer.image_ok_at, bytes([FLAG_SET]),
                           trailer.write_size)
        _program_field(self.primary, trailer.copy_done_at, bytes([FLAG_SET]), trailer.write_size)
        self.primary.flush()
        self.io.say(f"I: bootloader: {kind.name.lower()} swap done")
