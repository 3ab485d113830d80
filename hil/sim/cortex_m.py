"""An emulated Cortex-M chip as a debugger sees it: a SW-DP, its access ports, the memory map
behind the AHB-AP, and a core that halts, resets and runs flash algorithms.

Nothing here knows pyocd: registers and bytes go in, values and state come out (the adapter that
makes this a pyocd debug probe is ``hil.sim.probe``). The emulation stops where a debugger stops
looking, and goes exactly that deep:

- **SW-DP** (ADIv5 DPv1): DPIDR, ABORT, CTRL/STAT with the power-up request/acknowledge handshake
  and STICKYERR, SELECT (APSEL and APBANKSEL are honoured, so a debugger that forgets to select
  reaches the wrong register, as on the wire), RDBUFF.
- **AHB-AP** (MEM-AP): IDR, CSW (size, auto-increment, HPROT; DeviceEn follows the chip's access
  protection), TAR, DRW and BD0-3 with byte lanes, CFG, BASE (-> the ROM table). A block path
  (``MemAp.read_block``/``write_block``) serves probes that move whole blocks in their firmware,
  as an ST-Link does; both paths share one bus access.
- **System memory**: the chip's regions (flash through ``SimFlash``, RAM, peripherals) and the
  private peripheral bus: the ROM table and the CoreSight ID registers of SCS, DWT, FPB and ITM,
  CPUID and the feature registers, DHCSR, DCRSR/DCRDR, DEMCR, DFSR, AIRCR, VTOR, ICSR's
  VECTACTIVE, the fault status and address registers (CFSR and HFSR write-one-to-clear, MMFAR,
  BFAR; cleared by a system reset), FPB and DWT control. Anything else on the PPB is plain
  read/write storage. An address no region maps is a bus fault.
- **The core** cannot execute ARM code. It runs what a debugger makes it run: when resumed at an
  entry point of a flash algorithm it knows (recognised by the machine code in RAM at the entry's
  load address, not by the address alone), it performs the routine natively on the flash and
  leaves behind what the algorithm would: R0 = result, PC at the return address, halted on the
  BKPT the debugger placed there. A BKPT at PC (outside flash) halts. Code in flash is the
  firmware: the core "runs" it (``on_run``) until halted, without looking at it; the firmware
  itself is modelled elsewhere. Anything else (unknown code in RAM, an erased reset vector)
  faults: halted by the HardFault vector catch if DEMCR asks for it, else into the firmware's
  HardFault handler if flash has one, else lockup. A fault of the firmware model itself
  (``take_fault``: a crashing firmware) is recorded as the hardware records one: CFSR, HFSR,
  MMFAR and BFAR set, the exception frame stacked on the main stack, LR = EXC_RETURN, IPSR and
  ICSR.VECTACTIVE = 3; the core then spins in the handler (running, as a default ``b .``
  handler does) until a debugger halts it or a reset clears it all.
  Single-stepping is not emulated: a step request leaves PC where it is and halts.
- **Reset**: SYSRESETREQ, VECTRESET, nRESET and chip-specific requests run the chip's reset hooks
  (peripherals), reload SP and PC from the vector table, set S_RESET_ST, and halt with VCATCH if
  DEMCR.VC_CORERESET is set, else start the firmware. RAM survives a reset, as on silicon.
"""

from __future__ import annotations

import binascii
import contextlib
import enum
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hil.sim.flash import SimFlash

WORD = 0xFFFFFFFF


class BusFault(Exception):
    """The bus answered an access with an error (AHB ERROR): nothing is mapped there, the access
    port is locked, or debug power is off. A probe reports it as a transfer fault."""

    def __init__(self, address: int, length: int, reason: str) -> None:
        super().__init__(f"bus fault at 0x{address:08x}+{length}: {reason}")
        self.address = address
        self.length = length


# ================================================================================ the bus
class Region(Protocol):
    """A range of the address map that answers reads and writes."""

    base: int
    size: int

    def read(self, address: int, length: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...


class Ram:
    def __init__(self, base: int, size: int) -> None:
        self.base, self.size = base, size
        # Power-on RAM content is undefined; zero is as good as any and reproducible.
        self._data = bytearray(size)

    def read(self, address: int, length: int) -> bytes:
        offset = address - self.base
        return bytes(self._data[offset:offset + length])

    def write(self, address: int, data: bytes) -> None:
        offset = address - self.base
        self._data[offset:offset + len(data)] = data


class FlashBank:
    """A flash array in the address map, backed by a ``SimFlash`` file while the board is attached.

    Reads come from the flash. A plain bus write does not change NOR flash: it reaches the array
    only through the chip's flash controller, so writes go to ``write_hook`` (the controller) and
    are dropped when the chip has none.
    """

    def __init__(self, name: str, path: Path, *, base: int, size: int, sector_size: int) -> None:
        self.name, self.path = name, path
        self.base, self.size, self.sector_size = base, size, sector_size
        self.write_hook: Callable[[FlashBank, int, bytes], None] | None = None
        self._flash: SimFlash | None = None

    @property
    def flash(self) -> SimFlash:
        if self._flash is None:
            raise RuntimeError(f"flash bank {self.name} ({self.path}) is not open")
        return self._flash

    @property
    def is_open(self) -> bool:
        return self._flash is not None

    def open(self) -> None:
        if self._flash is None:
            self._flash = SimFlash(self.path, size=self.size, base=self.base,
                                   sector_size=self.sector_size)

    def close(self) -> None:
        flash, self._flash = self._flash, None
        if flash is not None:
            flash.close()

    def contains(self, address: int, length: int = 1) -> bool:
        return self.base <= address and address + length <= self.base + self.size

    def read(self, address: int, length: int) -> bytes:
        return self.flash.read(address, length)

    def write(self, address: int, data: bytes) -> None:
        if self.write_hook is not None:
            self.write_hook(self, address, data)


class Alias:
    """Another window onto a region, e.g. boot flash mirrored at address 0 (GD32 BOOT0=0)."""

    def __init__(self, base: int, target: Region) -> None:
        self.base, self.size, self.target = base, target.size, target

    def read(self, address: int, length: int) -> bytes:
        return self.target.read(address - self.base + self.target.base, length)

    def write(self, address: int, data: bytes) -> None:
        self.target.write(address - self.base + self.target.base, data)


class Registers:
    """A block of 32-bit registers: ``read_word(address)``/``write_word(address, value)`` get
    aligned word addresses. Byte and halfword writes are read-modify-write of their word, as a
    peripheral that only decodes words behaves to a debugger."""

    def __init__(self, base: int, size: int, read_word: Callable[[int], int],
                 write_word: Callable[[int, int], None]) -> None:
        self.base, self.size = base, size
        self._read_word, self._write_word = read_word, write_word

    def read(self, address: int, length: int) -> bytes:
        first = address & ~3
        last = (address + length + 3) & ~3
        words = b"".join(struct.pack("<I", self._read_word(a) & WORD)
                         for a in range(first, last, 4))
        return words[address - first:address - first + length]

    def write(self, address: int, data: bytes) -> None:
        first = address & ~3
        last = (address + len(data) + 3) & ~3
        if first == address and last == address + len(data):
            for index in range(0, len(data), 4):
                self._write_word(first + index, struct.unpack_from("<I", data, index)[0])
            return
        merged = bytearray(self.read(first, last - first))
        merged[address - first:address - first + len(data)] = data
        for index in range(0, len(merged), 4):
            self._write_word(first + index, struct.unpack_from("<I", merged, index)[0])


class Bus:
    """The system address map: regions in, bus faults for the gaps."""

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self._regions: list[Region] = []
        for region in regions:
            self.add(region)

    def add(self, region: Region) -> None:
        for other in self._regions:
            if region.base < other.base + other.size and other.base < region.base + region.size:
                raise ValueError(f"region at 0x{region.base:08x} overlaps one at "
                                 f"0x{other.base:08x}")
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.base)

    def _pieces(self, address: int, length: int) -> Iterable[tuple[Region, int, int]]:
        """(region, address, length) for each part of an access; a gap is a bus fault."""
        if address < 0 or address + length > 1 << 32:
            raise BusFault(address, length, "outside the 32-bit address space")
        while length > 0:
            region = next((r for r in self._regions if r.base <= address < r.base + r.size), None)
            if region is None:
                raise BusFault(address, length, "nothing is mapped there")
            chunk = min(length, region.base + region.size - address)
            yield region, address, chunk
            address += chunk
            length -= chunk

    def read(self, address: int, length: int) -> bytes:
        pieces = list(self._pieces(address, length))
        if len(pieces) == 1:
            region, _, _ = pieces[0]
            return region.read(address, length)
        return b"".join(region.read(start, chunk) for region, start, chunk in pieces)

    def write(self, address: int, data: bytes) -> None:
        offset = 0
        for region, start, chunk in list(self._pieces(address, len(data))):
            region.write(start, data[offset:offset + chunk])
            offset += chunk

    def read32(self, address: int) -> int:
        return int(struct.unpack("<I", self.read(address, 4))[0])

    def write32(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<I", value & WORD))

    def read16(self, address: int) -> int:
        return int(struct.unpack("<H", self.read(address, 2))[0])


# ================================================================================ flash algorithms
class Routine(enum.Enum):
    """What a flash algorithm entry point does (CMSIS FLM ABI: args in R0-R3, result in R0)."""

    INIT = "Init"
    UNINIT = "UnInit"
    ERASE_ALL = "EraseChip"
    ERASE_SECTOR = "EraseSector"
    PROGRAM_PAGE = "ProgramPage"
    CRC32 = "CRC32 analyzer"   # pyocd's analyzer: CRCs of (address, size) pairs, in place


# pyocd's names for the entry points in its flash algorithm dicts.
PYOCD_ENTRY_KEYS: Mapping[str, Routine] = {
    "pc_init": Routine.INIT,
    "pc_unInit": Routine.UNINIT,
    "pc_eraseAll": Routine.ERASE_ALL,
    "pc_erase_sector": Routine.ERASE_SECTOR,
    "pc_program_page": Routine.PROGRAM_PAGE,
}


@dataclass(frozen=True)
class FlashAlgorithm:
    """Machine code the emulated core "can run": its bytes as loaded into RAM and the routine at
    each entry offset. ``verify_after_program``: the real ProgramPage reads back and returns 1 on
    a mismatch (STM32F1-style FPEC algorithms do; Nordic's does not)."""

    name: str
    code: bytes
    entries: Mapping[int, Routine]
    verify_after_program: bool = False

    @classmethod
    def from_pyocd(cls, name: str, algo: Mapping[str, Any], *,
                   verify_after_program: bool = False) -> FlashAlgorithm:
        """From a pyocd flash algorithm dict (``load_address``, ``instructions``, ``pc_*``)."""
        load = int(algo["load_address"])
        code = words_to_bytes(algo["instructions"])
        entries = {(int(algo[key]) & ~1) - load: routine
                   for key, routine in PYOCD_ENTRY_KEYS.items() if key in algo}
        return cls(name, code, entries, verify_after_program)

    @classmethod
    def crc_analyzer(cls, name: str, words: Iterable[int]) -> FlashAlgorithm:
        return cls(name, words_to_bytes(words), {0: Routine.CRC32})


def words_to_bytes(words: Iterable[int]) -> bytes:
    # Masked like the wire masks: pyocd hands over Python ints, the bus carries 32 bits.
    return b"".join(struct.pack("<I", int(word) & WORD) for word in words)


@dataclass
class FlashOps:
    """What the flash algorithms did to the flash, for tests that prove what was (not) touched."""

    sector_erases: int = 0
    chip_erases: int = 0
    pages_programmed: int = 0
    bytes_programmed: int = 0
    crc_regions: int = 0
    log: list[tuple[Routine, int, int]] = field(default_factory=list)   # (routine, address, size)

    def reset(self) -> None:
        self.sector_erases = self.chip_erases = self.pages_programmed = 0
        self.bytes_programmed = self.crc_regions = 0
        self.log.clear()


# ================================================================================ the core
class CoreState(enum.Enum):
    RUNNING = "running"
    HALTED = "halted"
    LOCKUP = "lockup"
    RESET = "held in reset"


@dataclass(frozen=True)
class CortexMProfile:
    """The identity registers of one Cortex-M implementation, as a debugger reads them."""

    name: str
    cpuid: int
    rom_table_part: int
    scs_part: int
    isar3: int = 0x01111110
    mpu_type: int = 0
    mvfr0: int = 0
    mvfr1: int = 0
    ictr: int = 1              # INTLINESNUM: (n + 1) * 32 interrupt lines
    fp_ctrl: int = 0x260       # FPB: 6 code and 2 literal comparators, FPBv1
    dwt_ctrl: int = 0x40000000  # DWT: 4 comparators, cycle counter present


CORTEX_M4F = CortexMProfile("Cortex-M4F r0p1", cpuid=0x410FC241, rom_table_part=0x4C4,
                            scs_part=0x00C, mpu_type=0x00000800,
                            mvfr0=0x10110021, mvfr1=0x11000011)
CORTEX_M3 = CortexMProfile("Cortex-M3 r1p1", cpuid=0x411FC231, rom_table_part=0x4C3,
                           scs_part=0x000)

# System control space and debug registers (ARMv7-M).
ITM_BASE, DWT_BASE, FPB_BASE, SCS_BASE = 0xE0000000, 0xE0001000, 0xE0002000, 0xE000E000
TPIU_BASE, ETM_BASE, ROM_TABLE_BASE = 0xE0040000, 0xE0041000, 0xE00FF000
PPB_BASE, PPB_SIZE = 0xE0000000, 0x100000
ICTR, CPUID, ICSR, VTOR, AIRCR = 0xE000E004, 0xE000ED00, 0xE000ED04, 0xE000ED08, 0xE000ED0C
DFSR, ISAR3, MPU_TYPE, MVFR0, MVFR1 = 0xE000ED30, 0xE000ED6C, 0xE000ED90, 0xE000EF40, 0xE000EF44
DHCSR, DCRSR, DCRDR, DEMCR = 0xE000EDF0, 0xE000EDF4, 0xE000EDF8, 0xE000EDFC
CFSR, HFSR, MMFAR, BFAR = 0xE000ED28, 0xE000ED2C, 0xE000ED34, 0xE000ED38

DBGKEY = 0xA05F
C_DEBUGEN, C_HALT, C_STEP, C_MASKINTS, C_SNAPSTALL = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 5
S_REGRDY, S_HALT, S_SLEEP, S_LOCKUP = 1 << 16, 1 << 17, 1 << 18, 1 << 19
S_RETIRE_ST, S_RESET_ST = 1 << 24, 1 << 25
DFSR_HALTED, DFSR_BKPT, DFSR_DWTTRAP, DFSR_VCATCH, DFSR_EXTERNAL = 1, 2, 4, 8, 16
DEMCR_VC_CORERESET, DEMCR_VC_HARDERR = 1 << 0, 1 << 10
DEMCR_WRITABLE = 0x010F07F1   # TRCENA, MON_*, VC_*
AIRCR_VECTKEY, AIRCR_VECTKEYSTAT = 0x05FA, 0xFA05
AIRCR_VECTRESET, AIRCR_SYSRESETREQ = 1 << 0, 1 << 2
DCRSR_REGWNR, DCRSR_REGSEL = 1 << 16, 0x7F

REG_SP, REG_LR, REG_PC, REG_XPSR, REG_MSP, REG_PSP, REG_CONTROL = 13, 14, 15, 16, 17, 18, 20
XPSR_THUMB = 1 << 24
HARDFAULT = 3
EXC_RETURN_THREAD_MSP = 0xFFFFFFF9   # the handler's LR: back to Thread mode on the main stack
STACKED_FRAME = ("r0", "r1", "r2", "r3", "r12", "lr", "pc", "xpsr")


@dataclass(frozen=True)
class FaultCause:
    """A fault the firmware ran into, as the hardware records it: the registers of the
    exception frame the core stacks (``frame``: r0-r3, r12, lr, pc, xpsr), the fault status
    bits (CFSR, HFSR) and the fault address registers (None: not valid)."""

    frame: Mapping[str, int]
    cfsr: int
    hfsr: int
    mmfar: int | None = None
    bfar: int | None = None

# CoreSight identification, as pyocd's component table keys it: (class, part number).
CLASS_ROM_TABLE, CLASS_GENERIC = 0x1, 0xE
ARM_JEP106 = 0x3B                 # with 4 continuation codes (PIDR4)


def coresight_id_registers(component_class: int, part: int, revision: int = 0) -> dict[int, int]:
    """PIDR0-7 and CIDR0-3 (offsets 0xFD0-0xFFC) of an Arm-designed component."""
    return {
        0xFD0: 0x04,   # PIDR4: JEP106 continuation code 4, one 4 KiB block
        0xFD4: 0, 0xFD8: 0, 0xFDC: 0,
        0xFE0: part & 0xFF,
        0xFE4: ((part >> 8) & 0xF) | ((ARM_JEP106 & 0xF) << 4),
        0xFE8: ((ARM_JEP106 >> 4) & 0x7) | 0x8 | ((revision & 0xF) << 4),   # 0x8: JEDEC ID used
        0xFEC: 0,
        0xFF0: 0x0D, 0xFF4: (component_class & 0xF) << 4, 0xFF8: 0x05, 0xFFC: 0xB1,
    }


def rom_table_entry(component: int, present: bool = True) -> int:
    offset = (component - ROM_TABLE_BASE) & 0xFFFFF000
    return offset | 0x2 | (1 if present else 0)    # 0x2: 32-bit entry format


class CortexM:
    """The core, its debug registers and the private peripheral bus.

    ``routines`` are the flash algorithms the core recognises; ``flash_banks`` what they act on;
    ``code_regions`` (base, size) where code counts as the firmware (default: the flash banks;
    add a boot alias). Hooks:
    ``on_reset`` after every reset, ``on_run`` when the core starts running firmware,
    ``on_halt`` when it stops; the board's firmware model hangs there.
    """

    def __init__(self, profile: CortexMProfile, bus: Bus, *,
                 flash_banks: Iterable[FlashBank] = (),
                 routines: Iterable[FlashAlgorithm] = (),
                 code_regions: Iterable[tuple[int, int]] | None = None) -> None:
        self.profile = profile
        self.bus = bus
        self.flash_banks = list(flash_banks)
        self.code_regions = list(code_regions) if code_regions is not None else [
            (bank.base, bank.size) for bank in self.flash_banks]
        self.routines = list(routines)
        self.flash_ops = FlashOps()
        self.reset_hooks: list[Callable[[], None]] = []   # peripherals reset with the system
        self.on_reset: Callable[[], None] | None = None
        self.on_run: Callable[[], None] | None = None
        self.on_halt: Callable[[], None] | None = None
        self.state = CoreState.RUNNING
        self.regs: dict[int, int] = {}
        self._dhcsr_ctrl = 0          # C_DEBUGEN, C_MASKINTS, C_SNAPSTALL as written
        self._reset_sticky = False
        self._dcrdr = 0
        self._demcr = 0
        self._dfsr = 0
        self._vtor = 0
        self._prigroup = 0
        self._fpb_enabled = False
        self._store: dict[int, int] = {}
        self._active_exception = 0    # ICSR.VECTACTIVE: the exception being handled (0: none)
        self._fault_status = {CFSR: 0, HFSR: 0, MMFAR: 0, BFAR: 0}
        self._ids: dict[int, dict[int, int]] = {
            ROM_TABLE_BASE: coresight_id_registers(CLASS_ROM_TABLE, profile.rom_table_part),
            SCS_BASE: coresight_id_registers(CLASS_GENERIC, profile.scs_part),
            DWT_BASE: coresight_id_registers(CLASS_GENERIC, 0x002),
            FPB_BASE: coresight_id_registers(CLASS_GENERIC, 0x003),
            ITM_BASE: coresight_id_registers(CLASS_GENERIC, 0x001),
        }
        self._ids[ROM_TABLE_BASE][0xFCC] = 0x1   # MEMTYPE.SYSMEM: system memory on this bus
        # TPIU and ETM are listed as not present: a debugger need not configure trace.
        entries = [rom_table_entry(SCS_BASE), rom_table_entry(DWT_BASE),
                   rom_table_entry(FPB_BASE), rom_table_entry(ITM_BASE),
                   rom_table_entry(TPIU_BASE, present=False),
                   rom_table_entry(ETM_BASE, present=False), 0]
        self._rom_entries = {ROM_TABLE_BASE + 4 * i: entry for i, entry in enumerate(entries)}
        bus.add(Registers(PPB_BASE, PPB_SIZE, self._read_ppb, self._write_ppb))

    # ----------------------------------------------------------------------------- state
    @property
    def halted(self) -> bool:
        return self.state is CoreState.HALTED

    @property
    def debug_enabled(self) -> bool:
        return bool(self._dhcsr_ctrl & C_DEBUGEN)

    @property
    def pc(self) -> int:
        return self.regs.get(REG_PC, 0)

    def power_on(self) -> None:
        """Power-on reset: the debug logic too (DEMCR, DFSR, DHCSR control) starts clean."""
        self._dhcsr_ctrl = self._demcr = self._dfsr = 0
        self._fpb_enabled = False
        self._store.clear()
        self.system_reset()

    def system_reset(self) -> None:
        """SYSRESETREQ or nRESET: peripherals and core; the debug logic keeps its settings."""
        for hook in self.reset_hooks:
            hook()
        self._fault_status = dict.fromkeys(self._fault_status, 0)   # SCB registers reset
        self.core_reset()

    def hold_in_reset(self) -> None:
        self._enter(CoreState.RESET)

    def core_reset(self) -> None:
        """VECTRESET-level: the core restarts from the vector table at VTOR's reset value."""
        self._vtor = 0
        self._prigroup = 0
        self._active_exception = 0
        try:
            sp = self.bus.read32(self._vtor)
            reset_vector = self.bus.read32(self._vtor + 4)
        except BusFault:
            sp, reset_vector = 0, 0
        self.regs = {n: 0 for n in range(13)}
        self.regs.update({REG_MSP: sp & ~3, REG_PSP: 0, REG_LR: WORD, REG_CONTROL: 0,
                          REG_PC: reset_vector & ~1,
                          REG_XPSR: XPSR_THUMB if reset_vector & 1 else 0})
        self._reset_sticky = True
        if self.on_reset is not None:
            self.on_reset()   # before the core starts: the firmware model boots with it
        if self._demcr & DEMCR_VC_CORERESET:
            self._halt(DFSR_VCATCH)
        else:
            self._start_running()

    def _enter(self, state: CoreState) -> None:
        was_halted = self.state is CoreState.HALTED
        self.state = state
        if state is CoreState.HALTED and not was_halted and self.on_halt is not None:
            self.on_halt()

    def _halt(self, reason: int) -> None:
        self._dfsr |= reason
        self._enter(CoreState.HALTED)

    def request_halt(self) -> None:
        """A debugger's halt request (C_HALT): taken if debug is enabled, as in DHCSR."""
        if self.debug_enabled and self.state in (CoreState.RUNNING, CoreState.LOCKUP):
            self._halt(DFSR_HALTED)

    def _start_running(self) -> None:
        """Leave the halted state at PC and do what the code there does (see the module doc)."""
        pc = self.regs.get(REG_PC, 0) & ~1
        if not self._is_firmware(pc) and not self._is_breakpoint(pc):
            match = self._find_routine(pc)
            if match is not None:
                # One routine per resume; it returns (BX LR) to where the debugger put a BKPT.
                algorithm, routine = match
                self.regs[0] = self._run_routine(algorithm, routine) & WORD
                pc = self.regs[REG_PC] = self.regs.get(REG_LR, 0) & ~1
        if self._is_firmware(pc):
            # What the firmware executes is the firmware model's business, BKPTs included.
            self._enter(CoreState.RUNNING)
            if self.on_run is not None:
                self.on_run()
        elif self._is_breakpoint(pc):
            if self.debug_enabled:
                self._halt(DFSR_BKPT)
            else:
                self._fault()   # BKPT without a debugger escalates to HardFault
        else:
            self._fault()

    def _fault(self) -> None:
        """A HardFault: caught by the debugger, or into the firmware's handler, or lockup."""
        xpsr = self.regs.get(REG_XPSR, 0)
        self.regs[REG_XPSR] = (xpsr & ~0x1FF) | HARDFAULT
        try:
            handler = self.bus.read32(self._vtor + 4 * HARDFAULT) & ~1
        except BusFault:
            handler = WORD & ~1
        self.regs[REG_PC] = handler
        if self.debug_enabled and self._demcr & DEMCR_VC_HARDERR:
            self._halt(DFSR_VCATCH)
        elif self._is_firmware(handler):
            self._enter(CoreState.RUNNING)
            if self.on_run is not None:
                self.on_run()
        else:
            self._enter(CoreState.LOCKUP)

    def take_fault(self, cause: FaultCause, handler: int) -> None:
        """The firmware faulted (the firmware model says how, ``cause``): the core records the
        fault status, stacks the exception frame on the main stack and enters the HardFault
        handler at ``handler``, where it spins as a default handler does (``b .``): running,
        in Handler mode, answering the debugger, doing nothing else. The firmware model has
        stopped itself; ``on_run`` is not called (nothing boots). With DEMCR.VC_HARDERR the
        debugger's vector catch halts it at the handler's first instruction instead."""
        sp = (self.regs.get(REG_MSP, 0) - 0x100 - 32) & ~7
        words = [cause.frame.get(name, 0) & WORD for name in STACKED_FRAME]
        with contextlib.suppress(BusFault):   # no RAM at SP: the frame is lost (an overflow)
            self.bus.write(sp, struct.pack("<8I", *words))
        self._fault_status[CFSR] |= cause.cfsr
        self._fault_status[HFSR] |= cause.hfsr
        if cause.mmfar is not None:
            self._fault_status[MMFAR] = cause.mmfar & WORD
        if cause.bfar is not None:
            self._fault_status[BFAR] = cause.bfar & WORD
        self.regs.update({n: words[n] for n in range(4)})
        self.regs.update({12: words[4], REG_MSP: sp, REG_LR: EXC_RETURN_THREAD_MSP,
                          REG_PC: handler & ~1, REG_XPSR: XPSR_THUMB | HARDFAULT,
                          REG_CONTROL: self.regs.get(REG_CONTROL, 0) & ~(1 << 25)})
        self._active_exception = HARDFAULT
        if self.debug_enabled and self._demcr & DEMCR_VC_HARDERR:
            self._halt(DFSR_VCATCH)
        else:
            self._enter(CoreState.RUNNING)

    def _is_breakpoint(self, pc: int) -> bool:
        try:
            return (self.bus.read16(pc) & 0xFF00) == 0xBE00
        except BusFault:
            return False

    def _is_firmware(self, pc: int) -> bool:
        return any(base <= pc < base + size for base, size in self.code_regions)

    # ----------------------------------------------------------------------------- algorithms
    def _find_routine(self, pc: int) -> tuple[FlashAlgorithm, Routine] | None:
        for algorithm in self.routines:
            for offset, routine in algorithm.entries.items():
                load = pc - offset
                if load < 0:
                    continue
                try:
                    if self.bus.read(load, len(algorithm.code)) == algorithm.code:
                        return algorithm, routine
                except BusFault:
                    continue
        return None

    def _bank_for(self, address: int, length: int = 1) -> FlashBank | None:
        return next((b for b in self.flash_banks if b.contains(address, length)), None)

    def _run_routine(self, algorithm: FlashAlgorithm, routine: Routine) -> int:
        r0, r1, r2 = (self.regs.get(n, 0) for n in range(3))
        ops = self.flash_ops
        if routine in (Routine.INIT, Routine.UNINIT):
            return 0
        if routine is Routine.ERASE_ALL:
            for each in self.flash_banks:
                each.flash.erase(each.base, each.size)
            ops.chip_erases += 1
            ops.log.append((routine, 0, 0))
            return 0
        if routine is Routine.ERASE_SECTOR:
            bank = self._bank_for(r0)
            if bank is None:
                return 1
            bank.flash.erase(r0, 1)
            ops.sector_erases += 1
            ops.log.append((routine, r0 - r0 % bank.sector_size, bank.sector_size))
            return 0
        if routine is Routine.PROGRAM_PAGE:
            bank = self._bank_for(r0, r1)
            if bank is None:
                return 1
            try:
                data = self.bus.read(r2, r1)
            except BusFault:
                return 1
            bank.flash.program(r0, data)
            ops.pages_programmed += 1
            ops.bytes_programmed += r1
            ops.log.append((routine, r0, r1))
            if algorithm.verify_after_program and bank.flash.read(r0, r1) != data:
                return 1
            return 0
        # The CRC32 analyzer: R0 -> R1 words, each (log2 size) | (address / size) << 16,
        # replaced in place by the CRC32 of that range; 16-bit fields as the real code reads them.
        for index in range(r1):
            entry = self.bus.read32(r0 + 4 * index)
            size_log2, block = entry & 0xFFFF, entry >> 16
            size = 1 << size_log2
            crc = binascii.crc32(self.bus.read((block << size_log2) & WORD, size))
            self.bus.write32(r0 + 4 * index, crc)
            ops.crc_regions += 1
        ops.log.append((routine, r0, r1))
        return 0

    # ----------------------------------------------------------------------------- PPB
    def _read_ppb(self, address: int) -> int:
        block, offset = address & ~0xFFF, address & 0xFFF
        if offset >= 0xFD0 and block in self._ids:
            return self._ids[block].get(offset, 0)
        if address in self._rom_entries:
            return self._rom_entries[address]
        if address == DHCSR:
            return self._read_dhcsr()
        if address == DCRDR:
            return self._dcrdr
        if address == DEMCR:
            return self._demcr
        if address == DFSR:
            return self._dfsr
        if address == AIRCR:
            return (AIRCR_VECTKEYSTAT << 16) | (self._prigroup << 8)
        if address == VTOR:
            return self._vtor
        if address == ICSR:
            return self._active_exception & 0x1FF
        if address in self._fault_status:
            return self._fault_status[address]
        fixed = {CPUID: self.profile.cpuid, ISAR3: self.profile.isar3,
                 MPU_TYPE: self.profile.mpu_type, MVFR0: self.profile.mvfr0,
                 MVFR1: self.profile.mvfr1, ICTR: self.profile.ictr}
        if address in fixed:
            return fixed[address]
        if address == FPB_BASE:
            return (self.profile.fp_ctrl & ~1) | int(self._fpb_enabled)
        if address == DWT_BASE:
            return (self.profile.dwt_ctrl & 0xFFFF0000) | (self._store.get(address, 0) & 0xFFFF)
        return self._store.get(address, 0)

    def _read_dhcsr(self) -> int:
        value = self._dhcsr_ctrl
        if self.state is CoreState.HALTED:
            # The debugger's register transfers complete at once: S_REGRDY is always set.
            value |= C_HALT | S_HALT | S_REGRDY
        elif self.state is CoreState.LOCKUP:
            value |= S_LOCKUP
        elif self.state is CoreState.RUNNING:
            value |= S_RETIRE_ST
        if self._reset_sticky or self.state is CoreState.RESET:
            value |= S_RESET_ST
        # S_RESET_ST and S_RETIRE_ST are sticky: they mean "since the last read".
        self._reset_sticky = False
        return value

    def _write_ppb(self, address: int, value: int) -> None:
        if address == DHCSR:
            self._write_dhcsr(value)
        elif address == DCRSR:
            self._transfer_register(value)
        elif address == DCRDR:
            self._dcrdr = value
        elif address == DEMCR:
            self._demcr = value & DEMCR_WRITABLE
        elif address == DFSR:
            self._dfsr &= ~value   # write one to clear
        elif address == AIRCR:
            self._write_aircr(value)
        elif address == VTOR:
            self._vtor = value & 0xFFFFFF80
        elif address in (CFSR, HFSR):
            self._fault_status[address] &= ~value   # write one to clear
        elif address in (MMFAR, BFAR):
            self._fault_status[address] = value
        elif address == ICSR:
            pass   # VECTACTIVE is read-only; the pend bits are not modelled
        elif address == FPB_BASE:
            if value & 0x2:   # KEY: the write counts only with it
                self._fpb_enabled = bool(value & 1)
        elif address in (CPUID, ISAR3, MPU_TYPE, MVFR0, MVFR1, ICTR, *self._rom_entries):
            pass   # read-only
        elif (address & 0xFFF) >= 0xFD0 and (address & ~0xFFF) in self._ids:
            pass   # ID registers are read-only
        else:
            self._store[address] = value

    def _write_dhcsr(self, value: int) -> None:
        if value >> 16 != DBGKEY:
            return   # without the key the write is ignored, as on silicon
        self._dhcsr_ctrl = value & (C_DEBUGEN | C_MASKINTS | C_SNAPSTALL)
        if not self.debug_enabled:
            if self.state is CoreState.HALTED:
                self._start_running()   # leaving debug state: the core carries on
            return
        if value & C_HALT:
            self.request_halt()
        elif self.state is CoreState.HALTED:
            if value & C_STEP:
                self._halt(DFSR_HALTED)   # stepping is not emulated: stays at PC
            else:
                self._start_running()

    def _write_aircr(self, value: int) -> None:
        if value >> 16 != AIRCR_VECTKEY:
            return
        self._prigroup = (value >> 8) & 0x7
        if value & AIRCR_SYSRESETREQ:
            self.system_reset()
        elif value & AIRCR_VECTRESET:
            self.core_reset()

    def _transfer_register(self, value: int) -> None:
        if self.state is not CoreState.HALTED:
            return   # only a halted core transfers registers; S_REGRDY stays clear
        regsel = value & DCRSR_REGSEL
        spsel = (self.regs.get(REG_CONTROL, 0) >> 25) & 1   # CONTROL.SPSEL, in bits 31:24
        if regsel == REG_SP:
            regsel = REG_PSP if spsel else REG_MSP
        if value & DCRSR_REGWNR:
            self.regs[regsel] = self._dcrdr & WORD
        else:
            self._dcrdr = self.regs.get(regsel, 0)


# ================================================================================ access ports
class AccessPort(Protocol):
    def read_reg(self, offset: int) -> int: ...

    def write_reg(self, offset: int, value: int) -> None: ...


CSW_SIZE, CSW_ADDRINC, CSW_DEVICEEN = 0x7, 0x30, 0x40
CSW_WRITABLE = 0x3F000037      # SIZE, AddrInc, HPROT[5:0] incl. MasterType (Cortex-M3/M4 AHB-AP)
CSW_RESET = 0x03000040 | 0x2   # HPROT data+privileged, 32-bit, DeviceEn
AHB_AP_IDR = 0x24770011        # Cortex-M3/M4 AHB-AP: 4 KiB TAR wrap, MasterType


class MemAp:
    """An AHB-AP: the debugger's window onto ``bus``. ``enabled`` is the chip's say (a locked
    nRF52 clears DeviceEn and refuses every transfer)."""

    def __init__(self, bus: Bus, *, idr: int = AHB_AP_IDR, rom_table: int = ROM_TABLE_BASE,
                 enabled: Callable[[], bool] = lambda: True) -> None:
        self.bus = bus
        self.idr = idr
        self.base = rom_table | 0x3   # ADIv5 format, entry present
        self._enabled = enabled
        self.csw = CSW_RESET
        self.tar = 0

    def read_block(self, address: int, length: int) -> bytes:
        self._check(address, length)
        return self.bus.read(address, length)

    def write_block(self, address: int, data: bytes) -> None:
        self._check(address, len(data))
        self.bus.write(address, data)

    def _check(self, address: int, length: int) -> None:
        if not self._enabled():
            raise BusFault(address, length, "the access port is disabled (debug access protection)")

    def read_reg(self, offset: int) -> int:
        if offset == 0x00:
            return (self.csw & ~CSW_DEVICEEN) | (CSW_DEVICEEN if self._enabled() else 0)
        if offset == 0x04:
            return self.tar
        if offset == 0x0C:
            return self._data_read(self.tar, increment=True)
        if 0x10 <= offset <= 0x1C:
            return self._data_read((self.tar & ~0xF) | (offset & 0xC), increment=False)
        if offset == 0xF8:
            return self.base
        if offset == 0xFC:
            return self.idr
        return 0   # CFG (little-endian, no large address/data), reserved

    def write_reg(self, offset: int, value: int) -> None:
        if offset == 0x00:
            self.csw = (self.csw & ~CSW_WRITABLE) | (value & CSW_WRITABLE)
        elif offset == 0x04:
            self.tar = value & WORD
        elif offset == 0x0C:
            self._data_write(self.tar, value, increment=True)
        elif 0x10 <= offset <= 0x1C:
            self._data_write((self.tar & ~0xF) | (offset & 0xC), value, increment=False)

    def _size(self) -> int:
        size = self.csw & CSW_SIZE
        if size > 2:
            raise BusFault(self.tar, 0, f"CSW.SIZE {size} is not supported by an AHB-AP")
        return 1 << size

    def _data_read(self, address: int, *, increment: bool) -> int:
        size = self._size()
        data = self.read_block(address, size)
        lane = address & 3 & ~(size - 1)
        if increment:
            self._increment(size)
        return int.from_bytes(data, "little") << (8 * lane)

    def _data_write(self, address: int, value: int, *, increment: bool) -> None:
        size = self._size()
        lane = address & 3 & ~(size - 1)
        data = ((value >> (8 * lane)) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self.write_block(address, data)
        if increment:
            self._increment(size)

    def _increment(self, size: int) -> None:
        if self.csw & CSW_ADDRINC:
            # The TAR increments within its 4 KiB page only (ADIv5: beyond it is not defined).
            self.tar = (self.tar & ~0xFFF) | ((self.tar + size) & 0xFFF)


# ================================================================================ the debug port
DP_ABORT_IDR, DP_CTRL_STAT, DP_SELECT, DP_RDBUFF = 0x0, 0x4, 0x8, 0xC
CSYSPWRUPACK, CSYSPWRUPREQ, CDBGPWRUPACK, CDBGPWRUPREQ = 1 << 31, 1 << 30, 1 << 29, 1 << 28
STICKYORUN, STICKYCMP, STICKYERR, WDATAERR = 1 << 1, 1 << 4, 1 << 5, 1 << 7
ABORT_STKCMPCLR, ABORT_STKERRCLR, ABORT_WDERRCLR, ABORT_ORUNERRCLR = 1 << 1, 1 << 2, 1 << 3, 1 << 4
CTRL_STAT_WRITABLE = CSYSPWRUPREQ | CDBGPWRUPREQ | 0x0F00 | 0x1   # requests, MASKLANE, ORUNDETECT


class DebugPort:
    """A SW-DP (ADIv5, DPv1). AP accesses go to the AP and bank that SELECT names, and need
    debug power; a fault sets STICKYERR, which blocks AP accesses until ABORT clears it."""

    def __init__(self, dpidr: int, aps: Mapping[int, AccessPort]) -> None:
        self.dpidr = dpidr
        self.aps = dict(aps)
        self.ctrl_stat = 0
        self.select = 0
        self.rdbuff = 0

    def read_dp(self, address: int) -> int:
        address &= 0xC
        if address == DP_ABORT_IDR:
            return self.dpidr
        if address == DP_CTRL_STAT:
            if self.select & 0xF:
                return 0   # DLCR, TARGETID...: not implemented by a DPv1
            acks = 0
            if self.ctrl_stat & CSYSPWRUPREQ:
                acks |= CSYSPWRUPACK
            if self.ctrl_stat & CDBGPWRUPREQ:
                acks |= CDBGPWRUPACK
            return self.ctrl_stat | acks
        # RESEND (0x8) and RDBUFF both return the last AP read result.
        return self.rdbuff

    def write_dp(self, address: int, value: int) -> None:
        address &= 0xC
        if address == DP_ABORT_IDR:
            cleared = ((STICKYCMP if value & ABORT_STKCMPCLR else 0)
                       | (STICKYERR if value & ABORT_STKERRCLR else 0)
                       | (WDATAERR if value & ABORT_WDERRCLR else 0)
                       | (STICKYORUN if value & ABORT_ORUNERRCLR else 0))
            self.ctrl_stat &= ~cleared
        elif address == DP_CTRL_STAT:
            if not self.select & 0xF:
                sticky = self.ctrl_stat & (STICKYORUN | STICKYCMP | STICKYERR | WDATAERR)
                self.ctrl_stat = (value & CTRL_STAT_WRITABLE) | sticky
        elif address == DP_SELECT:
            self.select = value & WORD

    def _selected(self, address: int) -> tuple[AccessPort | None, int]:
        if not self.ctrl_stat & CDBGPWRUPREQ:
            raise BusFault(address, 4, "AP access with debug power off (CDBGPWRUPREQ clear)")
        if self.ctrl_stat & STICKYERR:
            raise BusFault(address, 4, "STICKYERR is set: the DP refuses AP accesses until ABORT")
        ap = self.aps.get(self.select >> 24)
        return ap, (self.select & 0xF0) | (address & 0xC)

    def read_ap(self, address: int) -> int:
        ap, register = self._selected(address)
        try:
            value = ap.read_reg(register) if ap is not None else 0   # no AP: IDR reads as 0
        except BusFault:
            self.ctrl_stat |= STICKYERR
            raise
        self.rdbuff = value & WORD
        return self.rdbuff

    def write_ap(self, address: int, value: int) -> None:
        ap, register = self._selected(address)
        if ap is None:
            return
        try:
            ap.write_reg(register, value & WORD)
        except BusFault:
            self.ctrl_stat |= STICKYERR
            raise


# ================================================================================ the chip
class Chip:
    """A whole simulated chip: bus, core, debug port, flash banks; one lock for all of it, since
    a probe and the board's firmware model may poke it from different threads.

    Flash files are open while anyone holds the chip (``attach``/``detach`` count: a probe, the
    simulated rig). Power: a probe attaching to a chip nobody powers switches it on, as a probe
    that supplies its target does; a simulated rig that wires the chip to its bench supply sets
    ``external_power`` and switches it with ``set_power``."""

    def __init__(self, *, dp: DebugPort, core: CortexM, banks: Iterable[FlashBank],
                 mem_ap: MemAp) -> None:
        self.dp = dp
        self.core = core
        self.banks = list(banks)
        self.mem_ap = mem_ap
        self.lock = threading.RLock()
        self.external_power = False
        self._powered = False
        self._holders = 0
        self._reset_asserted = False

    @property
    def reset_asserted(self) -> bool:
        return self._reset_asserted

    @property
    def powered(self) -> bool:
        return self._powered

    def attach(self) -> None:
        """Open the flash files; power the chip on unless a rig powers it (it boots what flash
        holds)."""
        with self.lock:
            self._holders += 1
            for bank in self.banks:
                bank.open()
            if not self._powered and not self.external_power:
                self.set_power(True)

    def detach(self) -> None:
        with self.lock:
            self._holders = max(self._holders - 1, 0)
            if self._holders == 0:
                for bank in self.banks:
                    bank.close()

    def set_power(self, on: bool) -> None:
        """Supply on: a power-on reset, then the chip runs what flash holds (unless nRESET is
        held). Supply off: everything stops; flash keeps its contents."""
        with self.lock:
            if on == self._powered:
                return
            self._powered = on
            if not on:
                self.core.hold_in_reset()
                if self.core.on_reset is not None:
                    self.core.on_reset()       # the firmware stops with the core
            elif self._reset_asserted:
                self.core.hold_in_reset()
            else:
                self.core.power_on()

    def assert_reset(self, asserted: bool) -> None:
        """The nRESET pin: held low the chip stays in reset; releasing it resets the system."""
        with self.lock:
            was, self._reset_asserted = self._reset_asserted, asserted
            if not self._powered:
                return
            if asserted:
                self.core.hold_in_reset()
                if self.core.on_reset is not None:
                    self.core.on_reset()
            elif was:
                self.core.system_reset()
