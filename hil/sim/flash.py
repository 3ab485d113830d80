"""A simulated board's NOR flash, kept in a file so it survives a restart like real flash does.

NOR semantics, because firmware and flash tools rely on them: erasing sets whole sectors to 0xFF,
programming can only clear bits (new = old AND data), so writing without erasing first corrupts
the data the way real hardware does. Every simulated flash path (the pyocd probe plugin, the
ESP32 ROM bootloader, the firmware model's OTA slots) goes through this one class.

A sector can be marked bad (``mark_bad``, a bench fault): every erase or program that touches it
then fails with ``FlashWriteError`` and changes nothing, as a worn-out NOR sector whose erase or
program never completes, reported by the part (the erase/program fail bits of a SPI NOR's status,
a driver's write-verify on internal flash). It stays bad until ``mark_good``.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass
from pathlib import Path

ERASED = 0xFF


class FlashWriteError(OSError):
    """An erase or program that failed (a bad sector): nothing of it was written."""


@dataclass(frozen=True, slots=True)
class FlashTiming:
    """How long a part takes to change its flash: ``erase_s`` per erase unit of ``page`` bytes,
    ``program_s`` per program unit of ``word`` bytes (typical figures of its datasheet).
    ``SimFlash`` itself is instant (the flash tools' paths stay fast); the firmware model's
    installer waits these times, so that a power cut can land while an image is written."""

    page: int
    erase_s: float
    word: int
    program_s: float

    def erase_time(self, length: int) -> float:
        return -(-length // self.page) * self.erase_s

    def program_time(self, length: int) -> float:
        return -(-length // self.word) * self.program_s


class SimFlash:
    """``size`` bytes of flash at ``base`` in the address map, ``sector_size`` per erase unit,
    backed by ``path`` (created erased if missing). Thread-safe; a context manager."""

    def __init__(self, path: Path, *, size: int, base: int = 0, sector_size: int = 4096) -> None:
        if size <= 0 or size % sector_size:
            raise ValueError(f"flash size {size} is not a multiple of the sector {sector_size}")
        self.path = path
        self.size = size
        self.base = base
        self.sector_size = sector_size
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size != size:
            path.write_bytes(bytes([ERASED]) * size)
        self._file = path.open("r+b")
        self._map = mmap.mmap(self._file.fileno(), size)
        self._bad: dict[int, int] = {}     # offset of each sector marked bad: writes refused

    def mark_bad(self, address: int) -> None:
        """The sector holding ``address`` fails every erase and program from now on."""
        offset = self._offset(address, 1)
        with self._lock:
            self._bad.setdefault(offset - offset % self.sector_size, 0)

    def refused(self, address: int) -> int:
        """How many erases and programs the bad sector holding ``address`` refused."""
        offset = self._offset(address, 1)
        with self._lock:
            return self._bad.get(offset - offset % self.sector_size, 0)

    def mark_good(self, address: int | None = None) -> None:
        """The sector holding ``address`` (None: every sector) works again."""
        with self._lock:
            if address is None:
                self._bad.clear()
            else:
                offset = self._offset(address, 1)
                self._bad.pop(offset - offset % self.sector_size, None)

    def _check_good(self, offset: int, length: int) -> None:
        """Raise FlashWriteError if ``offset..offset+length`` touches a bad sector (lock held)."""
        for bad in self._bad:
            if bad < offset + length and offset < bad + self.sector_size:
                self._bad[bad] += 1
                raise FlashWriteError(f"flash write at 0x{self.base + offset:08x}+{length} "
                                      f"failed: sector 0x{self.base + bad:08x} is bad")

    def contains(self, address: int, length: int = 1) -> bool:
        return self.base <= address and address + length <= self.base + self.size

    def _offset(self, address: int, length: int) -> int:
        if not self.contains(address, length):
            raise ValueError(f"flash access 0x{address:08x}+{length} is outside "
                             f"0x{self.base:08x}..0x{self.base + self.size:08x}")
        return address - self.base

    def read(self, address: int, length: int) -> bytes:
        offset = self._offset(address, length)
        with self._lock:
            return self._map[offset:offset + length]

    def erase(self, address: int, length: int) -> None:
        """Erase every sector that ``address..address+length`` touches."""
        offset = self._offset(address, length)
        first = offset - offset % self.sector_size
        last = -(-(offset + length) // self.sector_size) * self.sector_size
        with self._lock:
            self._check_good(first, last - first)
            self._map[first:last] = bytes([ERASED]) * (last - first)

    def program(self, address: int, data: bytes) -> None:
        """Program ``data``: bits only go from 1 to 0, as on NOR flash."""
        offset = self._offset(address, len(data))
        with self._lock:
            self._check_good(offset, len(data))
            old = int.from_bytes(self._map[offset:offset + len(data)], "big")
            # One big-integer AND instead of a Python loop per byte.
            self._map[offset:offset + len(data)] = (old & int.from_bytes(data, "big")).to_bytes(
                len(data), "big")

    def write(self, address: int, data: bytes) -> None:
        """Erase the sectors ``data`` covers, keeping their other bytes, then program it."""
        offset = self._offset(address, len(data))
        first = offset - offset % self.sector_size
        last = -(-(offset + len(data)) // self.sector_size) * self.sector_size
        with self._lock:
            self._check_good(first, last - first)
            merged = bytearray(self._map[first:last])
            merged[offset - first:offset - first + len(data)] = data
            self._map[first:last] = bytes(merged)

    def flush(self) -> None:
        with self._lock:
            self._map.flush()

    def close(self) -> None:
        with self._lock:
            if not self._map.closed:
                self._map.flush()
                self._map.close()
                self._file.close()

    def __enter__(self) -> SimFlash:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
