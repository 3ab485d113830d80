"""ESP-IDF's OTA data partition (``otadata``) and the choices its bootloader and app make with it,
as ESP-IDF's ``bootloader_utility.c`` and ``esp_ota_ops.c`` make them with app rollback
(``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE``): the entries' functions are sans-IO, ``Bootloader``
reads and writes the flash.

The partition is two 4 KiB sectors, each starting with one ``esp_ota_select_entry_t``
(``ota_seq`` u32, ``seq_label[20]``, ``ota_state`` u32, ``crc`` u32: CRC-32 of ``ota_seq`` seeded
with 0xFFFFFFFF, as otatool checks it). An entry is valid when its ``ota_seq`` is not 0xFFFFFFFF
and its CRC matches; the valid entry with the highest ``ota_seq`` whose state is neither INVALID
nor ABORTED selects the app slot ``(ota_seq - 1) % slots``. Both blank: ``ota_0`` (no factory
partition in the simulated board's table), and the bootloader then writes ``ota_seq`` 1 into
the first sector (``set_actual_ota_seq``).

A switch (``esp_ota_set_boot_partition``) writes the next ``ota_seq`` pointing at the new slot
into the sector the active entry is not in, state NEW. The bootloader turns NEW into
PENDING_VERIFY and boots it; finding PENDING_VERIFY at a boot means the app reset before it
confirmed itself (``esp_ota_mark_app_valid_cancel_rollback``): ABORTED, and the previous entry
boots again (the rollback).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

from hil.sim.defects import Defect
from hil.sim.flash import SimFlash
from hil.sim.layout import Layout, Slot

ENTRY = struct.Struct("<I20sII")       # ota_seq, seq_label, ota_state, crc
SECTOR = 0x1000
SIZE = 2 * SECTOR
BLANK_SEQ = 0xFFFFFFFF


class State(IntEnum):
    """``esp_ota_img_states_t``."""

    NEW = 0x0
    PENDING_VERIFY = 0x1
    VALID = 0x2
    INVALID = 0x3
    ABORTED = 0x4
    UNDEFINED = 0xFFFFFFFF


def entry_crc(seq: int) -> int:
    """``bootloader_common_ota_select_crc``: ``esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)``."""
    return zlib.crc32(struct.pack("<I", seq), 0xFFFFFFFF) & 0xFFFFFFFF


@dataclass(frozen=True)
class Entry:
    seq: int
    state: int
    crc: int

    @classmethod
    def read(cls, data: bytes) -> Entry:
        seq, _, state, crc = ENTRY.unpack_from(data)
        return cls(seq, state, crc)

    @classmethod
    def make(cls, seq: int, state: State) -> Entry:
        return cls(seq, int(state), entry_crc(seq))

    def pack(self) -> bytes:
        return ENTRY.pack(self.seq, b"\xff" * 20, self.state, self.crc)

    @property
    def valid(self) -> bool:
        return self.seq != BLANK_SEQ and self.crc == entry_crc(self.seq)

    @property
    def selectable(self) -> bool:
        return self.valid and self.state not in (State.INVALID, State.ABORTED)

    def slot(self, slots: int) -> int:
        return (self.seq - 1) % slots


def read(partition: bytes) -> tuple[Entry, Entry]:
    """The two entries of the partition's bytes (``SIZE`` of them)."""
    return Entry.read(partition[:ENTRY.size]), Entry.read(partition[SECTOR:SECTOR + ENTRY.size])


def active(entries: tuple[Entry, Entry]) -> int | None:
    """``bootloader_common_get_active_otadata``: which sector's entry selects the slot (the
    selectable one with the highest ``ota_seq``), None when neither does."""
    chosen = [index for index, entry in enumerate(entries) if entry.selectable]
    return max(chosen, key=lambda index: entries[index].seq) if chosen else None


def switch_to(entries: tuple[Entry, Entry], slot: int, slots: int) -> tuple[int, Entry]:
    """``esp_ota_set_boot_partition(ota_<slot>)``: the sector to write and the entry it gets
    (the next ``ota_seq`` that selects ``slot``, state NEW)."""
    current = active(entries)
    if current is None:
        return 0, Entry.make(slot + 1, State.NEW)
    seq, rounds = entries[current].seq, 0
    while seq > (slot + 1) % slots + rounds * slots:
        rounds += 1
    return current ^ 1, Entry.make((slot + 1) % slots + rounds * slots, State.NEW)


def pending_sector(entries: tuple[Entry, Entry]) -> int:
    """The sector a switch made now would write (where a bad sector makes it fail)."""
    current = active(entries)
    return 0 if current is None else current ^ 1


# ---------------------------------------------------------------------------------- eFuse
# ESP-IDF's anti-rollback (``CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK``): the chip's eFuse holds the
# lowest ``secure_version`` an app may carry; confirming an app burns its secure_version in. An
# eFuse is never erased: not by a reflash, not by a factory reset. Kept beside the board's
# flash files (``state_dir``).
EFUSE_FILE = "efuse.json"


def efuse_secure_version(state_dir: Path) -> int:
    try:
        value = json.loads((state_dir / EFUSE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    version = value.get("secure_version") if isinstance(value, dict) else None
    return version if isinstance(version, int) and version >= 0 else 0


def burn_secure_version(state_dir: Path, version: int) -> None:
    """``esp_efuse_update_secure_version``: bits are only ever set, so it never goes down."""
    if version <= efuse_secure_version(state_dir):
        return
    temporary = state_dir / (EFUSE_FILE + ".tmp")
    temporary.write_text(json.dumps({"secure_version": version}), encoding="utf-8")
    os.replace(temporary, state_dir / EFUSE_FILE)


# ---------------------------------------------------------------------------------- flash
def read_entries(flash: SimFlash, partition: Slot) -> tuple[Entry, Entry]:
    return read(flash.read(partition.address, SIZE))


def write_entry(flash: SimFlash, partition: Slot, sector: int, entry: Entry) -> None:
    """``write_otadata``: the sector erased, then the entry programmed (FlashWriteError from a
    bad sector)."""
    at = partition.address + sector * SECTOR
    flash.erase(at, SECTOR)
    flash.program(at, entry.pack())
    flash.flush()


def confirm(flash: SimFlash, partition: Slot, slot: int, slots: int) -> bool:
    """``esp_ota_mark_app_valid_cancel_rollback`` by the app running from ``slot``: its entry,
    when PENDING_VERIFY, becomes VALID. False when there was nothing to confirm."""
    entries = read_entries(flash, partition)
    current = active(entries)
    if current is None or entries[current].slot(slots) != slot \
            or entries[current].state != State.PENDING_VERIFY:
        return False
    write_entry(flash, partition, current, Entry.make(entries[current].seq, State.VALID))
    return True


class BootIo(Protocol):
    """What the bootloader gets from the board (``hil.sim.firmware``)."""

    def flash(self, chip: str) -> SimFlash: ...

    def say(self, line: str) -> None: ...


class Bootloader:
    """One boot of ESP-IDF's second-stage bootloader with app rollback, Secure Boot V2 and
    anti-rollback: ``run()`` picks the slot as the otadata says (a never-confirmed app rolled
    back), checks its image (format, SHA-256, signature with the key digest burnt into the
    chip, secure_version against the eFuse) and falls back to the other slot when it fails.
    Returns the slot booted, None when neither holds a bootable app. The defects that live in
    the bootloader (``no-revert``: built without rollback; ``accepts-unsigned``: without secure
    boot; ``accepts-downgrade``: without anti-rollback) are its switches."""

    def __init__(self, layout: Layout, io: BootIo, state_dir: Path,
                 defects: frozenset[Defect] = frozenset(), *, trusted_key: str = "root") -> None:
        if layout.otadata is None:
            raise ValueError("this layout has no OTA data partition: not an ESP-IDF layout")
        self.layout, self.io, self.state_dir, self.defects = layout, io, state_dir, defects
        self.partition = layout.otadata
        self.otadata = io.flash(layout.otadata.chip)
        self.trusted_key = trusted_key

    def run(self) -> int | None:
        rollback = Defect.NO_REVERT not in self.defects
        entries = read_entries(self.otadata, self.partition)
        blank = not any(entry.valid for entry in entries)
        current = active(entries) if rollback else self._newest(entries)
        if rollback and current is not None:
            entry = entries[current]
            if entry.state == State.PENDING_VERIFY:
                self.io.say(f"W (40) boot: ota_{entry.slot(2)} was never confirmed by its app: "
                            "rolling back (ABORTED)")
                write_entry(self.otadata, self.partition, current,
                            Entry.make(entry.seq, State.ABORTED))
                entries = read_entries(self.otadata, self.partition)
                current = active(entries)
            elif entry.state == State.NEW:
                write_entry(self.otadata, self.partition, current,
                            Entry.make(entry.seq, State.PENDING_VERIFY))
        start = entries[current].slot(2) if current is not None else 0
        for index in (start, start ^ 1):
            slot = self.layout.slots[index]
            why = self._invalid(slot)
            if why is None:
                if blank:       # set_actual_ota_seq: the first boot of a blank otadata
                    write_entry(self.otadata, self.partition, 0,
                                Entry.make(index + 1, State.VALID))
                    self._burn(slot)
                self.io.say(f"I (45) boot: Loaded app from partition at offset "
                            f"{slot.address:#x}")
                return index
            self.io.say(f"E (45) boot: ota_{index} at {slot.address:#x}: {why}")
        self.io.say("E (46) boot: No bootable app partitions in the partition table")
        return None

    def _burn(self, slot: Slot) -> None:
        """``update_anti_rollback``: the booted app's secure_version burnt into the eFuse."""
        from hil.sim.images import esp32_secure_version

        data = self.io.flash(slot.chip).read(slot.address, slot.size)
        with contextlib.suppress(ValueError):
            burn_secure_version(self.state_dir, esp32_secure_version(data))

    @staticmethod
    def _newest(entries: tuple[Entry, Entry]) -> int | None:
        """Without rollback: the valid entry with the highest ota_seq, whatever its state."""
        valid = [index for index, entry in enumerate(entries) if entry.valid]
        return max(valid, key=lambda index: entries[index].seq) if valid else None

    def _invalid(self, slot: Slot) -> str | None:
        """Why the image in ``slot`` is not booted (None: it is)."""
        from hil.sim.images import (
            check_esp32_signature,
            esp32_key_digest,
            esp32_secure_version,
            image_span,
            image_version,
        )

        data = self.io.flash(slot.chip).read(slot.address, slot.size)
        try:
            span = image_span("esp32", data)
            if span > slot.size:
                return f"its headers say {span} bytes, the partition holds {slot.size}"
            image_version("esp32", data)
            if Defect.ACCEPTS_UNSIGNED not in self.defects:
                check_esp32_signature(data, esp32_key_digest(self.trusted_key))
            if Defect.ACCEPTS_DOWNGRADE not in self.defects:
                version, lowest = esp32_secure_version(data), efuse_secure_version(self.state_dir)
                if version < lowest:
                    return (f"secure_version {version} is below the eFuse's {lowest} "
                            "(anti-rollback)")
        except ValueError as error:
            return str(error)
        return None
