"""Chip families hil knows: OneNET codes, how they are flashed, and where the application lives.

One table, read by the rig model (which flasher a board may have), the drivers (pyocd target,
flash addresses), the OTA task (manuf/model) and, later, the simulated boards.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hil.onenet.codes import CHIP_CODES, Chip


class FlasherKind(StrEnum):
    SWD = "swd"
    ESP = "esp"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class BoardFamily:
    chip: Chip
    flasher: FlasherKind          # the flasher this family is programmed with
    default_chip: str             # the part number a rig gets when it names none
    chips: tuple[str, ...]        # part numbers a rig may name (``chip:``)
    pyocd_target: str | None      # for SWD families: pyocd's target name
    needs_pack: bool              # pyocd has no builtin support: the rig names a CMSIS pack
    flash_base: int               # where flash starts in the address map
    app_offset: int               # where the application image goes, from flash_base
    description: str
    # What the family's bootloader takes: an MCUboot image (header, then the Cortex-M vector
    # table) or an ESP-IDF application image (esptool's chip name, its chip id in the header).
    image_format: str = "mcuboot"
    esp_chip: str | None = None
    # Cortex-M parts: where flash and RAM are, to tell whose vector table an image carries
    # (the initial stack pointer lies in RAM, the reset handler in flash). Ranges cover every
    # part of the family hil knows (``chips``), end exclusive.
    flash_range: tuple[int, int] | None = None
    ram_range: tuple[int, int] | None = None
    # ESP-IDF's OTA data partition (offset, size), which a restore erases: the two-OTA table's
    # default place (hil.sim.otadata).
    otadata: tuple[int, int] | None = None

    @property
    def manuf(self) -> str:
        return CHIP_CODES[self.chip][0]

    @property
    def model(self) -> str:
        return CHIP_CODES[self.chip][1]

    @property
    def app_address(self) -> int:
        return self.flash_base + self.app_offset


# App offsets: ESP-IDF's default factory app partition; MCUboot's primary slot after a 48 KiB
# bootloader on nRF52832 and a 32 KiB one on GD32F103 (the layouts the simulated boards use too).
# Memory: nRF52832 up to 512 KiB flash at 0 and 64 KiB RAM (xxAA); GD32F103 flash at 0x08000000
# (up to 3 MiB in the series) and up to 96 KiB RAM at 0x20000000.
BOARDS: dict[str, BoardFamily] = {
    "esp32": BoardFamily(Chip.ESP32, FlasherKind.ESP, "esp32-wroom-32",
                         ("esp32-wroom-32", "esp32-wrover", "esp32"), None, False,
                         0x0, 0x10000, "Espressif ESP32 (serial ROM bootloader, esptool)",
                         image_format="esp-app", esp_chip="esp32", otadata=(0xD000, 0x2000)),
    "nrf52832": BoardFamily(Chip.NRF52832, FlasherKind.SWD, "nrf52832_xxaa",
                            ("nrf52832_xxaa", "nrf52832_xxab"), "nrf52832", False,
                            0x0, 0xC000, "Nordic nRF52832 (SWD, pyocd builtin target)",
                            flash_range=(0x0, 0x80000), ram_range=(0x20000000, 0x20010000)),
    "gd32": BoardFamily(Chip.GD32, FlasherKind.SWD, "gd32f103c8",
                        ("gd32f103c8", "gd32f103cb", "gd32f103rc"), "gd32f103c8", True,
                        0x08000000, 0x8000, "GigaDevice GD32F103 (SWD, CMSIS pack)",
                        flash_range=(0x08000000, 0x08300000),
                        ram_range=(0x20000000, 0x20018000)),
}


def board_family(name: str) -> BoardFamily:
    try:
        return BOARDS[name]
    except KeyError:
        raise KeyError(f"unknown board {name!r}; known: {', '.join(BOARDS)}") from None
