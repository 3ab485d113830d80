"""Where the simulated boards keep their images: the flash layout their firmware and bootloader use.

Each board has a primary slot (the image the bootloader starts) and a secondary slot (where an OTA
download goes). On the nRF52832 and the GD32 MCUboot swaps the two slots through a scratch area
(``hil.sim.mcuboot``): the primary slot always holds what runs, the secondary the other image, and
each slot ends in MCUboot's image trailer (``trailer`` bytes: one swap unit, which the swap leaves
in place). The ESP32 boots either of its two slots, as ESP-IDF's OTA data partition says
(``hil.sim.otadata``): an update goes to the slot that does not run, and nothing is copied.
Flashing a base image into the primary slot and erasing the bootloader's state (MCUboot's
trailers, ESP-IDF's otadata) is all a restore needs.

- **esp32**: 4 MiB SPI flash; the OTA data partition at 0xD000 (two 4 KiB sectors), ``ota_0``
  at 0x10000 (where esptool flashes the application) and ``ota_1`` (1 MiB each) behind it, a
  two-OTA partition table without a factory partition.
- **nrf52832**: 512 KiB internal flash; MCUboot's 48 KiB, then two 200 KiB slots and the 40 KiB
  scratch area at 0x70000 (Zephyr's nrf52dk layout); swapped in 4 KiB units (the NVMC page).
- **gd32**: GD32F103C8, 64 KiB internal flash: MCUboot's 32 KiB, then one 32 KiB primary slot;
  the secondary slot sits on the board's external SPI NOR (``spi_flash.bin``), as GD32F103
  designs without room for two slots do, and the scratch area right behind it on the same NOR
  (0x8000, one 4 KiB sector): the internal flash has no room left, and the NOR's 4 KiB sector
  is the swap unit (four of the FMC's 1 KiB pages).
"""

from __future__ import annotations

from dataclasses import dataclass

from hil.boards import board_family
from hil.sim.flash import FlashTiming


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
    install_timing: FlashTiming  # the primary slot's flash: how long the install's writes take
    # MCUboot's swap (None: the ESP32, whose bootloader copies). The scratch area holds one
    # swap unit; ``write_size`` is the flash's program unit, which sizes the trailer's status
    # entries (imgtool's ``--align``); ``secondary_timing`` the secondary and scratch flash's
    # times.
    scratch: Slot | None = None
    swap_unit: int = 0x1000
    write_size: int = 4
    secondary_timing: FlashTiming | None = None
    # ESP-IDF's OTA data partition (``hil.sim.otadata``): the ESP32 boots either slot as it
    # says (A/B, no copy); None on the MCUboot boards.
    otadata: Slot | None = None

    @property
    def slots(self) -> tuple[Slot, Slot]:
        """The two application slots: MCUboot's primary and secondary, ESP-IDF's ``ota_0`` and
        ``ota_1``."""
        return self.primary, self.secondary

    @property
    def trailer(self) -> int:
        """The bytes at each slot's end that hold MCUboot's trailer: one swap unit (0 on the
        ESP32)."""
        return self.swap_unit if self.scratch is not None else 0

    @property
    def image_room(self) -> int:
        """The most an image may fill of the primary slot (its trailer excluded)."""
        return self.primary.size - self.trailer


# Typical erase and program times of the parts that hold each board's primary slot:
# - nRF52832 NVMC (nRF52832 Product Specification, NVMC electrical specification): page erase
#   t_ERASEPAGE 85 ms per 4 KiB page, t_WRITE 41 us per 32-bit word.
# - GD32F103C8 FMC (1 KiB pages, half-word programming): its datasheet gives page erase and
#   half-word program times of the same order as its register twin, the STM32F103 (DS5319,
#   flash memory characteristics: t_ERASE 20..40 ms per page, t_prog 40..70 us, 52.5 typical,
#   per half-word); 30 ms and 52.5 us are used.
# - ESP32 external SPI NOR (Winbond W25Q32JV class, the ESP32-WROOM-32's 4 MB part): sector
#   erase t_SE 45 ms typical per 4 KiB sector, page program t_PP 0.7 ms typical per 256 bytes.
# Installing the 1.1.0 test images so takes about 2.1 s (nRF52832, 66 KB), 0.95 s (GD32, 17 KB)
# and 1.9 s (ESP32, 131 KB) of real time; the firmware scales them (``hil.sim.firmware``).
NRF52832_NVMC = FlashTiming(page=0x1000, erase_s=0.085, word=4, program_s=41e-6)
GD32F103_FMC = FlashTiming(page=0x400, erase_s=0.030, word=2, program_s=52.5e-6)
ESP32_SPI_NOR = FlashTiming(page=0x1000, erase_s=0.045, word=256, program_s=0.7e-3)
# The GD32 board's external NOR is of the same class (4 KiB sectors, 256-byte pages).

LAYOUTS: dict[str, Layout] = {
    "esp32": Layout(primary=Slot(0x10000, 0x100000), secondary=Slot(0x110000, 0x100000),
                    boot_region=None, install_timing=ESP32_SPI_NOR,
                    otadata=Slot(0xD000, 0x2000)),
    "nrf52832": Layout(primary=Slot(0xC000, 0x32000), secondary=Slot(0x3E000, 0x32000),
                       boot_region=Slot(0x0, 0xC000), install_timing=NRF52832_NVMC,
                       scratch=Slot(0x70000, 0xA000), swap_unit=0x1000, write_size=4,
                       secondary_timing=NRF52832_NVMC),
    "gd32": Layout(primary=Slot(0x08008000, 0x8000), secondary=Slot(0x0, 0x8000, chip="spi"),
                   boot_region=Slot(0x08000000, 0x8000), install_timing=GD32F103_FMC,
                   scratch=Slot(0x8000, 0x1000, chip="spi"), swap_unit=0x1000, write_size=2,
                   secondary_timing=ESP32_SPI_NOR),
}

SPI_FLASH_SIZE = 0x100000       # the GD32 board's external NOR (1 MiB)
SPI_FLASH_FILE = "spi_flash.bin"


def layout_of(board: str) -> Layout:
    layout = LAYOUTS[board]
    # The primary slot is where the flasher puts an application: one table must not drift.
    assert layout.primary.address == board_family(board).app_address, board
    return layout
