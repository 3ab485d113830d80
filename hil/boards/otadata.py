"""ESP-IDF's OTA data partition (``otadata``), sans-IO: the two entries' format and the choices
ESP-IDF's bootloader (``bootloader_utility.c``) and app (``esp_ota_ops.c``) make with them, with
app rollback (``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE``). Read by the ESP flasher (is a restore's
erase needed?) and by the simulated ESP32's bootloader (``hil.sim.otadata``).

The partition is two 4 KiB sectors, each starting with one ``esp_ota_select_entry_t``
(``ota_seq`` u32, ``seq_label[20]``, ``ota_state`` u32, ``crc`` u32: CRC-32 of ``ota_seq`` seeded
with 0xFFFFFFFF, as otatool checks it). An entry is valid when its ``ota_seq`` is not 0xFFFFFFFF
and its CRC matches; the valid entry with the highest ``ota_seq`` whose state is neither INVALID
nor ABORTED selects the app slot ``(ota_seq - 1) % slots``. Both blank: ``ota_0`` (a table without
a factory partition), and the bootloader then writes ``ota_seq`` 1 into the first sector
(``set_actual_ota_seq``).

A switch (``esp_ota_set_boot_partition``) writes the next ``ota_seq`` pointing at the new slot
into the sector the active entry is not in, state NEW. The bootloader turns NEW into
PENDING_VERIFY and boots it; finding PENDING_VERIFY at a boot means the app reset before it
confirmed itself (``esp_ota_mark_app_valid_cancel_rollback``): ABORTED, and the previous entry
boots again (the rollback).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

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


def settled_on_first_slot(partition: bytes) -> bool:
    """Whether a board with this otadata boots ``ota_0`` with nothing pending or to roll back,
    as a blank one does: blank, or its only selectable entry chooses ``ota_0`` confirmed
    (VALID, or UNDEFINED from a bootloader built without rollback) and no other entry is
    valid (a board that rolled back keeps its ABORTED entry: erased, as a fresh board's)."""
    entries = read(partition)
    valid = [entry for entry in entries if entry.valid]
    if not valid:
        return True
    return len(valid) == 1 and valid[0].slot(2) == 0 \
        and valid[0].state in (State.VALID, State.UNDEFINED)
