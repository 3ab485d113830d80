"""The simulated ESP32's side of ESP-IDF's OTA data partition (its format and the choices made
with it: ``hil.boards.otadata``): the eFuse that anti-rollback burns, reading and writing the
entries in flash, and the second-stage bootloader that picks and checks the slot to boot.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Protocol

from hil.boards.otadata import (
    ENTRY,
    SECTOR,
    SIZE,
    Entry,
    State,
    active,
    pending_sector,
    read,
    switch_to,
)
from hil.sim.defects import Defect
from hil.sim.flash import SimFlash
from hil.sim.layout import Layout, Slot

__all__ = ["ENTRY", "SECTOR", "SIZE", "Bootloader", "Entry", "State", "active",
           "burn_app_secure_version", "burn_secure_version", "confirm", "efuse_secure_version",
           "pending_sector", "read_entries", "switch_to", "write_entry"]


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


def burn_app_secure_version(state_dir: Path, image: bytes) -> None:
    """The app ``image``'s secure_version burnt in (by the bootloader's ``update_anti_rollback``
    or the app's confirm); an image whose descriptor cannot be read burns nothing."""
    from hil.sim.images import esp32_secure_version

    with contextlib.suppress(ValueError):
        burn_secure_version(state_dir, esp32_secure_version(image))


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
        burn_app_secure_version(self.state_dir,
                                self.io.flash(slot.chip).read(slot.address, slot.size))

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
