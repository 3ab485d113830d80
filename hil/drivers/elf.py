"""A firmware's ELF symbol table, read with pyelftools (pyocd's own ELF reader): a variable's
address and size by name (``elf_symbol``, for SWD memory reads), and the function an address
lies in (``ElfSymbols.function_at``, for a crash's PC, LR and backtrace).

Both read the same table the same way: defined symbols only (an undefined reference is not a
definition), and a Thumb function's address with its interworking bit 0 cleared, so the address
is where its code is. A stripped image (no ``.symtab``) or a file that is not an ELF is a
ValueError naming the file.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int          # Thumb bit cleared
    size: int
    kind: str             # pyelftools' st_info type: STT_FUNC, STT_OBJECT...
    bind: str             # STB_GLOBAL, STB_LOCAL, STB_WEAK


def read_symbols(elf: Path) -> list[Symbol]:
    """Every defined symbol of ``elf``'s symbol table (ValueError: stripped, or not an ELF)."""
    return _read(elf)[0]


def _read(elf: Path) -> tuple[list[Symbol], bool]:
    """The defined symbols, and whether the ELF is ARM code (Thumb addresses)."""
    with elf.open("rb") as stream:
        try:
            elffile = ELFFile(stream)
            symtab = elffile.get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                raise ValueError(f"{elf}: no symbol table (stripped? use the unstripped ELF)")
            is_arm = elffile["e_machine"] == "EM_ARM"
            symbols = []
            for symbol in symtab.iter_symbols():
                if symbol["st_shndx"] == "SHN_UNDEF" or not symbol.name:
                    continue
                kind = symbol["st_info"]["type"]
                address = int(symbol["st_value"])
                if is_arm and kind == "STT_FUNC":
                    address &= ~1
                symbols.append(Symbol(symbol.name, address, int(symbol["st_size"]), kind,
                                      symbol["st_info"]["bind"]))
        except ELFError as err:
            raise ValueError(f"{elf}: not a readable ELF file: {err}") from err
    return symbols, is_arm


def elf_symbol(elf: Path, name: str) -> tuple[int, int]:
    """(address, size) of the symbol ``name`` in the ELF's symbol table.

    Raises KeyError naming the symbol if the ELF does not define it, ValueError if the file is
    not an ELF or has no symbol table (a stripped image)."""
    defined = [symbol for symbol in read_symbols(elf) if symbol.name == name]
    if not defined:
        raise KeyError(f"symbol {name} is not defined in {elf}")
    # A file-local (static) name may exist once per source file; the global one wins.
    globals_ = [symbol for symbol in defined if symbol.bind == "STB_GLOBAL"]
    chosen = globals_ or defined
    if len(chosen) > 1:
        raise ValueError(f"{elf}: symbol {name} is defined {len(chosen)} times (file-local "
                         "statics of the same name); read it by address instead")
    return chosen[0].address, chosen[0].size


class ElfSymbols:
    """The functions of an ELF, for naming code addresses (``function_at``). Read once."""

    def __init__(self, elf: Path) -> None:
        self.path = elf
        symbols, self._thumb = _read(elf)
        functions = sorted((symbol for symbol in symbols if symbol.kind == "STT_FUNC"),
                           key=lambda symbol: (symbol.address, symbol.bind != "STB_GLOBAL"))
        self._functions = functions
        self._starts = [symbol.address for symbol in functions]

    def function_at(self, address: int) -> tuple[str, int] | None:
        """(function name, offset into it) of the code at ``address``; None outside every
        function. A function the table gives no size extends to the next one."""
        if self._thumb:
            address &= ~1          # an LR or a stacked return address carries the Thumb bit
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0:
            return None
        start = self._starts[index]
        index = bisect.bisect_left(self._starts, start)      # the global one of aliases
        symbol = self._functions[index]
        following = bisect.bisect_right(self._starts, start)
        end = symbol.address + symbol.size if symbol.size else (
            self._starts[following] if following < len(self._starts) else start + 1)
        if address < end:
            return symbol.name, address - symbol.address
        return None

    def describe(self, address: int) -> str:
        """``0x00027a4c (ota_store_chunk+0x2e)``, or the address alone outside every function."""
        found = self.function_at(address)
        if found is None:
            return f"{address:#010x}"
        name, offset = found
        return f"{address:#010x} ({name}+{offset:#x})" if offset else f"{address:#010x} ({name})"
