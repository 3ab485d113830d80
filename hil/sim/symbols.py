"""The simulated firmware's functions, where they would lie in its image, and its ELF.

The firmware model (``hil.sim.firmware``) runs no machine code, but when it crashes (a
``crashes-mid-download`` board) the chip must show what a real crash shows: a PC, a return
address and a stack in the functions the crash happened in. This table is where those
functions are, per board: in the application's code (after the MCUboot header and vector table
on the Cortex-M boards, in the flash-mapped IROM on the ESP32). ``write_elf`` writes the
firmware's ELF with exactly these functions in its symbol table (an ELF32 executable for the
board's architecture, sections and symbols only, no code), so hil names a simulated crash's
addresses the way it names a real one's: from the ELF, through pyelftools.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from hil.boards import board_family
from hil.sim.cortex_m import XPSR_THUMB, FaultCause
from hil.sim.esp32 import EXCCAUSE, panic_output
from hil.sim.images import ESP32_IROM, MCUBOOT_HEADER_SIZE


@dataclass(frozen=True)
class Function:
    name: str
    address: int
    size: int

    def at(self, offset: int) -> int:
        if not 0 <= offset < self.size:
            raise ValueError(f"{self.name}+{offset:#x} is outside the function")
        return self.address + offset


# (name, offset from the code's start, size). The Cortex-M code starts with its vector table;
# the reset handler is where the images' reset vector points (code + 0x100, hil.sim.images).
_CORTEX_M = (("Reset_Handler", 0x100, 0x40), ("HardFault_Handler", 0x140, 0x4),
             ("main", 0x180, 0x80), ("ota_download", 0x400, 0x1C0),
             ("ota_store_chunk", 0x600, 0x90))
_ESP32 = (("app_main", 0x0E00, 0x60), ("ota_task", 0x1000, 0x120),
          ("ota_download", 0x2400, 0x1E0), ("ota_store_chunk", 0x2A40, 0xA0))


def code_base(board: str) -> int:
    """Where the application's code starts in the address map."""
    if board == "esp32":
        return ESP32_IROM
    return board_family(board).app_address + MCUBOOT_HEADER_SIZE


def functions(board: str) -> dict[str, Function]:
    base = code_base(board)
    table = _ESP32 if board == "esp32" else _CORTEX_M
    return {name: Function(name, base + offset, size) for name, offset, size in table}


# ------------------------------------------------------------------------------ the ELF
EM_ARM, EM_XTENSA = 40, 94
_SHT_SYMTAB, _SHT_STRTAB, _SHT_NOBITS = 2, 3, 8
_SHF_ALLOC_EXEC = 0x2 | 0x4
_STB_GLOBAL_STT_FUNC = (1 << 4) | 2
_EF_ARM_EABI_VER5 = 0x05000000


def write_elf(board: str, path: Path) -> Path:
    """The simulated firmware's ELF for ``board`` at ``path``: a ``.text`` section over its
    functions and a symbol table naming them (Thumb functions with bit 0 set, as a linker
    writes them)."""
    arm = board != "esp32"
    table = sorted(functions(board).values(), key=lambda function: function.address)
    text_start = table[0].address
    text_size = table[-1].address + table[-1].size - text_start
    strtab = b"\0"
    symbols = [struct.pack("<IIIBBH", 0, 0, 0, 0, 0, 0)]
    for function in table:
        value = function.address | (1 if arm else 0)
        symbols.append(struct.pack("<IIIBBH", len(strtab), value, function.size,
                                   _STB_GLOBAL_STT_FUNC, 0, 1))
        strtab += function.name.encode("ascii") + b"\0"
    symtab = b"".join(symbols)
    names = [b"", b".text", b".symtab", b".strtab", b".shstrtab"]
    shstrtab = b"\0".join(names) + b"\0"
    name_at = [shstrtab.index(name + b"\0") if name else 0 for name in names]
    header_size = 52
    symtab_at = header_size
    strtab_at = symtab_at + len(symtab)
    shstrtab_at = strtab_at + len(strtab)
    sections_at = (shstrtab_at + len(shstrtab) + 3) & ~3
    section = struct.Struct("<IIIIIIIIII")
    sections = [
        section.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        section.pack(name_at[1], _SHT_NOBITS, _SHF_ALLOC_EXEC, text_start, header_size,
                     text_size, 0, 0, 4, 0),
        section.pack(name_at[2], _SHT_SYMTAB, 0, 0, symtab_at, len(symtab), 3, 1, 4, 16),
        section.pack(name_at[3], _SHT_STRTAB, 0, 0, strtab_at, len(strtab), 0, 0, 1, 0),
        section.pack(name_at[4], _SHT_STRTAB, 0, 0, shstrtab_at, len(shstrtab), 0, 0, 1, 0),
    ]
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)     # ELF32, little-endian, version 1
    entry = functions(board)["Reset_Handler"].address | 1 if arm else text_start
    header = ident + struct.pack("<HHIIIIIHHHHHH", 2, EM_ARM if arm else EM_XTENSA, 1, entry,
                                 0, sections_at, _EF_ARM_EABI_VER5 if arm else 0, header_size,
                                 0, 0, section.size, len(sections), 4)
    body = symtab + strtab + shstrtab
    padding = bytes(sections_at - header_size - len(body))
    path.write_bytes(header + body + padding + b"".join(sections))
    return path


# ------------------------------------------------------------------------------ crashes
@dataclass(frozen=True)
class NullWrite:
    """The firmware stores through a NULL pointer at ``function`` + ``offset``, which
    ``caller`` called (its return address ``caller`` + ``return_offset``); ``length`` and
    ``data`` are what it was storing (the call's arguments, seen in the registers)."""

    function: str
    offset: int
    caller: str
    return_offset: int
    data: int = 0
    length: int = 0


# Cortex-M: a store to address 0 (flash, which a bus write cannot change) is a precise bus
# fault; with no BusFault handler enabled it escalates to HardFault.
CFSR_PRECISERR, CFSR_BFARVALID, HFSR_FORCED = 1 << 9, 1 << 15, 1 << 30


def cortex_m_fault(board: str, crash: NullWrite) -> tuple[FaultCause, int]:
    """How the core records ``crash``, and where its HardFault handler is."""
    table = functions(board)
    frame = {"r0": 0, "r1": crash.data, "r2": crash.length, "r3": 0, "r12": 0,
             "lr": table[crash.caller].at(crash.return_offset) | 1,
             "pc": table[crash.function].at(crash.offset), "xpsr": XPSR_THUMB}
    cause = FaultCause(frame, cfsr=CFSR_PRECISERR | CFSR_BFARVALID, hfsr=HFSR_FORCED, bfar=0)
    return cause, table["HardFault_Handler"].address


ESP32_TASK_STACK = 0x3FFB5E40     # the OTA task's stack, in DRAM, where A1 points


def esp32_panic(crash: NullWrite) -> str:
    """What the ESP32 prints for ``crash``: a StoreProhibited panic."""
    table = functions("esp32")
    pc = table[crash.function].at(crash.offset)
    caller = table[crash.caller].at(crash.return_offset)
    task = table["ota_task"].at(0x5A)
    sp = ESP32_TASK_STACK
    registers = {"PC": pc, "PS": 0x00060830, "A0": 0x80000000 | (caller + 3) & 0x3FFFFFFF,
                 "A1": sp, "A2": 0, "A3": crash.data, "A4": crash.length,
                 "EXCCAUSE": EXCCAUSE["StoreProhibited"], "EXCVADDR": 0,
                 "LBEG": 0x4000C46C, "LEND": 0x4000C477, "LCOUNT": 0xFFFFFFFF}
    # The backtrace's addresses are the calls (ESP-IDF prints return addresses minus 3).
    return panic_output("StoreProhibited", registers,
                        [(pc, sp), (caller, sp + 0x30), (task, sp + 0x60)])
