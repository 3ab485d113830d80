"""Where the simulated boards keep their images: the flash layout their firmware and bootloader use.

Each board has a primary slot (the image the bootloader starts) and a secondary slot (where an OTA
download goes); the bootloader installs a downloaded image by copying it over the primary slot
(MCUboot's overwrite-only upgrade), so the primary slot always holds what runs and flashing a base
image there with a debugger or esptool is all a restore needs.

- **esp32**: 4 MiB SPI flash; the application at 0x10000 (where esptool flashes it) and a second
  1 MiB slot behind it, as ESP-IDF's two-OTA partition table places ``ota_0``/``ota_1``.
- **nrf52832**: 512 KiB internal flash; MCUboot's 48 KiB, then two 200 KiB slots (Zephyr's
  nrf52dk layout).
- **gd32**: GD32F103C8, 64 KiB internal flash: MCUboot's 32 KiB, then one 32 KiB primary slot;
  the secondary slot sits on the board's external SPI NOR (``spi_flash.bin``), as GD32F103
  designs without room for two slots do.
"""

from __future__ import annotations

from dataclasses import dataclass

from hil.boards import board_family


@dataclass(frozen=True, slots=True)
class Slot:
    """``size`` bytes at ``address`` of the flash chip named ``chip`` (``internal`` or ``spi``)."""

    address: int
    size: int
    chip: str = "internal"


@dataclass(frozen=True, slots=True)
class Layout:
    primary: Slot
    secondary: Slot
    boot_region: Slot | None     # where the bootloader lives (None: in ROM, the ESP32's case)


LAYOUTS: dict[str, Layout] = {
    "esp32": Layout(primary=Slot(0x10000, 0x100000), secondary=Slot(0x110000, 0x100000),
                    boot_region=None),
    "nrf52832": Layout(primary=Slot(0xC000, 0x32000), secondary=Slot(0x3E000, 0x32000),
                       boot_region=Slot(0x0, 0xC000)),
    "gd32": Layout(primary=Slot(0x08008000, 0x8000), secondary=Slot(0x0, 0x8000, chip="spi"),
                   boot_region=Slot(0x08000000, 0x8000)),
}

SPI_FLASH_SIZE = 0x100000       # the GD32 board's external NOR (1 MiB)
SPI_FLASH_FILE = "spi_flash.bin"


def layout_of(board: str) -> Layout:
    layout = LAYOUTS[board]
    # The primary slot is where the flasher puts an application: one table must not drift.
    assert layout.primary.address == board_family(board).app_address, board
    return layout
