"""The chips hil simulates behind an SWD probe: nRF52832 and GD32F103C8, built from
``hil.sim.cortex_m``'s parts, plus the pyocd target the project defines for the GD32.

Each chip is what a debugger finds on it, with the registers values of the real part:

- **nRF52832** (Cortex-M4F): SW-DP 0x2BA01477; AP0 the AHB-AP, AP1 Nordic's CTRL-AP (ERASEALL,
  RESET, APPROTECTSTATUS), which pyocd's builtin ``nrf52832`` target checks before discovery;
  512 KiB flash at 0 (``flash.bin``) and the UICR at 0x10001000 (``uicr.bin``), both NOR through
  ``SimFlash``; FICR part info (nRF52832 QFAA, build E0, so pyocd does not rewrite the UICR);
  the NVMC (CONFIG, READY, ERASEPAGE/ERASEALL/ERASEUICR, word writes with WEN); access
  protection latched from UICR.APPROTECT at reset, as on parts before build G0.
- **GD32F103C8** (Cortex-M3): SW-DP 0x1BA01477; AHB-AP; 64 KiB flash at 0x08000000
  (``flash.bin``), mirrored at 0 as BOOT0=0 does; 20 KiB RAM.

Flash algorithms: the emulated core recognises the code of pyocd's own algorithms and runs their
routines natively (``cortex_m.FlashAlgorithm``). The nRF52832 runs pyocd's builtin algorithm
(and pyocd's CRC32 analyzer, which it enables for this part). The GD32F103's flash controller
(FMC) is register-compatible with the STM32F10x FPEC, so the GD32 target below carries pyocd's
STM32F1 algorithm, real code for this chip, page-size agnostic; with the analyzer off, as the
FLM algorithms of CMSIS packs are.

Why the GD32 target is not registered under ``gd32f103c8``: pyocd looks a target name up in its
``TARGET`` table before reading packs (``PackTargets.populate_device`` skips parts already there),
so a globally registered ``gd32f103c8`` would silently replace the GigaDevice pack on a real
rig in the same process. The simulated probe hands pyocd this class itself (``hil.sim.probe``:
``create_associated_board``), under the key ``hilsim_gd32f103c8``.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyocd.core.memory_map import FlashRegion, MemoryMap, RamRegion
from pyocd.coresight.coresight_target import CoreSightTarget
from pyocd.flash import flash as pyocd_flash
from pyocd.target.builtin import target_nRF52832_xxAA, target_STM32F103RC

from hil.sim.cortex_m import (
    CORTEX_M3,
    CORTEX_M4F,
    Alias,
    Bus,
    BusFault,
    Chip,
    CortexM,
    DebugPort,
    FlashAlgorithm,
    FlashBank,
    MemAp,
    Ram,
    Registers,
)

# pyocd's CRC32 analyzer, loaded by pyocd's Flash.compute_crcs when an algorithm allows it
# (private in pyocd 0.46, pinned by the project; the emulation must know its code to run it).
CRC_ANALYZER = FlashAlgorithm.crc_analyzer("pyocd CRC32 analyzer", pyocd_flash._ANALYZER_CODE)

NRF52_FLASH_ALGO: dict[str, Any] = target_nRF52832_xxAA.FLASH_ALGO
# GD32F10x FMC == STM32F10x FPEC (keys, CR/SR/AR): pyocd's STM32F1 algorithm programs it.
# ProgramPage reads each halfword back and returns 1 on a mismatch.
GD32F1_FLASH_ALGO: dict[str, Any] = {**target_STM32F103RC.FLASH_ALGO, "analyzer_supported": False}
GD32F1_FLASH_ALGO.pop("analyzer_address", None)

SIM_TARGET_PREFIX = "hilsim_"


# ================================================================================ GD32F103C8
class GD32F103C8(CoreSightTarget):  # type: ignore[misc]   # pyocd ships no type hints
    """GigaDevice GD32F103C8: Cortex-M3, 64 KiB flash in 1 KiB pages, 20 KiB RAM. Defined here
    so a simulated GD32 needs no downloaded CMSIS pack."""

    VENDOR = "GigaDevice"
    PART_NUMBER = "GD32F103C8"

    MEMORY_MAP = MemoryMap(
        FlashRegion(start=0x08000000, length=0x10000, blocksize=0x400, is_boot_memory=True,
                    algo=GD32F1_FLASH_ALGO),
        RamRegion(start=0x20000000, length=0x5000),
    )

    def __init__(self, session: Any) -> None:
        super().__init__(session, self.MEMORY_MAP)


# ================================================================================ nRF52832
NRF_FICR, NRF_UICR, NRF_NVMC = 0x10000000, 0x10001000, 0x4001E000
UICR_APPROTECT = 0x10001208
NVMC_READY, NVMC_READYNEXT, NVMC_CONFIG = 0x400, 0x408, 0x504
NVMC_ERASEPAGE, NVMC_ERASEALL, NVMC_ERASEUICR = 0x508, 0x50C, 0x514
CONFIG_WEN, CONFIG_EEN = 1, 2


class Nvmc:
    """Nordic's NVM controller, the only way bus writes reach the flash: word writes program
    (AND) with CONFIG=WEN, erase registers work with CONFIG=EEN, otherwise writes are dropped."""

    def __init__(self, code: FlashBank, uicr: FlashBank) -> None:
        self.code, self.uicr = code, uicr
        self.config = 0
        self._store: dict[int, int] = {}
        code.write_hook = uicr.write_hook = self.bus_write

    def reset(self) -> None:
        self.config = 0

    def read_word(self, address: int) -> int:
        offset = address - NRF_NVMC
        if offset in (NVMC_READY, NVMC_READYNEXT):
            return 1   # operations complete at once
        if offset == NVMC_CONFIG:
            return self.config
        return self._store.get(offset, 0)

    def write_word(self, address: int, value: int) -> None:
        offset = address - NRF_NVMC
        erase = self.config == CONFIG_EEN
        if offset == NVMC_CONFIG:
            self.config = value & 0x3
        elif offset == NVMC_ERASEPAGE and erase and self.code.contains(value):
            self.code.flash.erase(value, 1)
        elif offset == NVMC_ERASEALL and erase and value & 1:
            self.code.flash.erase(self.code.base, self.code.size)
            self.uicr.flash.erase(self.uicr.base, self.uicr.size)
        elif offset == NVMC_ERASEUICR and erase and value & 1:
            self.uicr.flash.erase(self.uicr.base, self.uicr.size)
        else:
            self._store[offset] = value

    def bus_write(self, bank: FlashBank, address: int, data: bytes) -> None:
        if self.config == CONFIG_WEN:
            bank.flash.program(address, data)


class NrfCtrlAp:
    """Nordic's CTRL-AP (AP #1): RESET holds the chip in reset, ERASEALL erases flash, UICR and
    RAM (done at once), APPROTECTSTATUS tells whether the AHB-AP is locked."""

    IDR = 0x02880000

    def __init__(self, chip: Callable[[], Chip], erase_all: Callable[[], None],
                 protected: Callable[[], bool]) -> None:
        self._chip, self._erase_all, self._protected = chip, erase_all, protected
        self.reset_reg = 0
        self.eraseall_reg = 0

    def read_reg(self, offset: int) -> int:
        if offset == 0x000:
            return self.reset_reg
        if offset == 0x004:
            return self.eraseall_reg
        if offset == 0x008:
            return 0   # ERASEALLSTATUS: ready
        if offset == 0x00C:
            return 0 if self._protected() else 1
        if offset == 0x0FC:
            return self.IDR
        return 0

    def write_reg(self, offset: int, value: int) -> None:
        if offset == 0x000:
            self.reset_reg = value & 1
            self._chip().assert_reset(bool(self.reset_reg))
        elif offset == 0x004:
            self.eraseall_reg = value & 1
            if self.eraseall_reg:
                self._erase_all()


def _ficr(uid: str) -> dict[int, int]:
    device_id = binascii.crc32(uid.encode()) | (binascii.crc32(uid[::-1].encode()) << 32)
    return {
        NRF_FICR + 0x010: 0x1000,                 # CODEPAGESIZE
        NRF_FICR + 0x014: 128,                    # CODESIZE (pages)
        NRF_FICR + 0x060: device_id & 0xFFFFFFFF,  # DEVICEID[0..1]: stable per board
        NRF_FICR + 0x064: device_id >> 32,
        NRF_FICR + 0x100: 0x52832,                # INFO.PART
        NRF_FICR + 0x104: int.from_bytes(b"AAE0", "big"),   # INFO.VARIANT: QFAA build E0
        NRF_FICR + 0x108: 0x2000,                 # INFO.PACKAGE: QF
        NRF_FICR + 0x10C: 64,                     # INFO.RAM (KiB)
        NRF_FICR + 0x110: 512,                    # INFO.FLASH (KiB)
    }


def build_nrf52832(state_dir: Path, uid: str) -> Chip:
    code = FlashBank("code", state_dir / "flash.bin", base=0x0, size=0x80000, sector_size=0x1000)
    uicr = FlashBank("uicr", state_dir / "uicr.bin", base=NRF_UICR, size=0x400,
                     sector_size=0x400)
    ram = Ram(0x20000000, 0x10000)
    nvmc = Nvmc(code, uicr)
    ficr = _ficr(uid)
    bus = Bus([code, uicr, ram,
               Registers(NRF_FICR, 0x1000, lambda a: ficr.get(a, 0xFFFFFFFF), lambda a, v: None),
               Registers(NRF_NVMC, 0x1000, nvmc.read_word, nvmc.write_word)])
    core = CortexM(CORTEX_M4F, bus, flash_banks=[code, uicr],
                   routines=[FlashAlgorithm.from_pyocd("pyocd nRF52 flash algorithm",
                                                       NRF52_FLASH_ALGO), CRC_ANALYZER])
    protection = {"locked": False}

    def latch_approtect() -> None:
        # Before build G0, UICR.APPROTECT.PALL = 0x00 locks the AHB-AP from the next reset on.
        try:
            protection["locked"] = (bus.read32(UICR_APPROTECT) & 0xFF) == 0x00
        except BusFault:
            protection["locked"] = False

    def erase_all() -> None:
        code.flash.erase(code.base, code.size)
        uicr.flash.erase(uicr.base, uicr.size)
        ram.write(ram.base, bytes(ram.size))

    core.reset_hooks += [nvmc.reset, latch_approtect]
    mem_ap = MemAp(bus, enabled=lambda: not protection["locked"])
    holder: list[Chip] = []
    ctrl_ap = NrfCtrlAp(lambda: holder[0], erase_all, lambda: protection["locked"])
    chip = Chip(dp=DebugPort(0x2BA01477, {0: mem_ap, 1: ctrl_ap}), core=core,
                banks=[code, uicr], mem_ap=mem_ap)
    holder.append(chip)
    return chip


# ================================================================================ GD32F103C8
def build_gd32f103c8(state_dir: Path, uid: str) -> Chip:
    code = FlashBank("code", state_dir / "flash.bin", base=0x08000000, size=0x10000,
                     sector_size=0x400)
    boot_alias = Alias(0x0, code)   # BOOT0=0: main flash also appears at 0, where reset fetches
    ram = Ram(0x20000000, 0x5000)
    bus = Bus([boot_alias, code, ram])
    algorithm = FlashAlgorithm.from_pyocd("pyocd STM32F1 flash algorithm (GD32 FMC)",
                                          GD32F1_FLASH_ALGO, verify_after_program=True)
    core = CortexM(CORTEX_M3, bus, flash_banks=[code], routines=[algorithm, CRC_ANALYZER],
                   code_regions=[(boot_alias.base, boot_alias.size), (code.base, code.size)])
    mem_ap = MemAp(bus)
    return Chip(dp=DebugPort(0x1BA01477, {0: mem_ap}), core=core, banks=[code], mem_ap=mem_ap)


# ================================================================================ the table
@dataclass(frozen=True)
class ChipModel:
    """A chip a simulated board can carry. ``name`` is the pyocd target name a rig uses;
    ``target_class`` a pyocd target the project defines (None: pyocd's builtin one)."""

    name: str
    part: str
    build: Callable[[Path, str], Chip]
    target_class: type | None = None

    @property
    def pyocd_target_key(self) -> str:
        """The key of this chip's target in pyocd's TARGET table."""
        return self.name if self.target_class is None else SIM_TARGET_PREFIX + self.name


CHIPS: dict[str, ChipModel] = {
    "nrf52832": ChipModel("nrf52832", "nRF52832-QFAA", build_nrf52832),
    "gd32f103c8": ChipModel("gd32f103c8", "GD32F103C8", build_gd32f103c8, GD32F103C8),
}
