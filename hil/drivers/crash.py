"""Crashes captured and explained: a Cortex-M fault read through the debug probe, an ESP32 panic
read on the console, each decoded into a ``Crash`` (cause, PC and the function it is in, the
fault status in words, the evidence as the board gave it).

Sans-IO decoders, then the two readers that feed them:

- ``decode_cfsr``/``decode_hfsr``: ARMv7-M's Configurable and HardFault Status Registers
  (SCB CFSR 0xE000ED28, HFSR 0xE000ED2C) bit by bit into words; ``decode_cortex_m`` a halted
  core's registers, those two, MMFAR/BFAR and the exception frame the core stacked at SP into a
  ``Crash``: the faulting PC and LR come from the stacked frame (R0-R3, R12, LR, PC, xPSR at
  the SP that EXC_RETURN names: PSP when its bit 2 is set, else MSP).
- ``PanicParser``: ESP-IDF's panic handler output, line by line, as its "Fatal Errors" guide
  shows it: ``Guru Meditation Error: Core  0 panic'ed (LoadProhibited). Exception was
  unhandled.`` (or ``abort() was called at PC 0x... on core 0``, or ``assert failed: ...``),
  the ``Core  0 register dump:`` of ``NAME : 0x........`` pairs, ``Backtrace: PC:SP PC:SP ...``
  (``|<-CORRUPTED`` when the stack walk broke off), ``ELF file SHA256:``, ``Rebooting...``.

- ``read_cortex_m(debug)``: is the core in a fault? Told without stopping it: ICSR.VECTACTIVE
  (the active exception: 3 HardFault, 4 MemManage, 5 BusFault, 6 UsageFault) and
  DHCSR.S_LOCKUP are readable through the AHB-AP while the core runs. Only then is it halted
  and its registers read (pyocd, through ``hil.drivers.swd.SwdFlasher``). A real board's
  default fault handler spins (``b .``), so a crashed board stays in the handler for this.

The watches (``SwdFaultWatch``, ``ConsolePanicWatch``) are what a test's wait polls:
``poll()`` gives the ``Crash`` once there is one, ``check()`` raises ``FirmwareCrash`` with it.
Addresses are named from the build's ELF (``hil.drivers.elf.ElfSymbols``) where one is given.
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hil.drivers.base import ConsoleProtocol
from hil.drivers.elf import ElfSymbols
from hil.errors import FirmwareCrash, RigFault

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultBit:
    register: str
    name: str
    bit: int
    words: str


# ARMv7-M Architecture Reference Manual, B3.2.15-B3.2.16 (Cortex-M3/M4/M7 alike).
CFSR_BITS = (
    FaultBit("MMFSR", "IACCVIOL", 0, "instruction access violation (MemManage)"),
    FaultBit("MMFSR", "DACCVIOL", 1, "data access violation (MemManage)"),
    FaultBit("MMFSR", "MUNSTKERR", 3, "MemManage fault on unstacking for an exception return"),
    FaultBit("MMFSR", "MSTKERR", 4, "MemManage fault on stacking for exception entry"),
    FaultBit("MMFSR", "MLSPERR", 5, "MemManage fault during floating-point lazy state "
             "preservation"),
    FaultBit("MMFSR", "MMARVALID", 7, "MMFAR holds the faulting address"),
    FaultBit("BFSR", "IBUSERR", 8, "bus error on an instruction fetch"),
    FaultBit("BFSR", "PRECISERR", 9, "precise data bus error (the stacked PC is the faulting "
             "instruction)"),
    FaultBit("BFSR", "IMPRECISERR", 10, "imprecise data bus error (the stacked PC is after "
             "the faulting write)"),
    FaultBit("BFSR", "UNSTKERR", 11, "bus fault on unstacking for an exception return"),
    FaultBit("BFSR", "STKERR", 12, "bus fault on stacking for exception entry (stack "
             "overflow?)"),
    FaultBit("BFSR", "LSPERR", 13, "bus fault during floating-point lazy state preservation"),
    FaultBit("BFSR", "BFARVALID", 15, "BFAR holds the faulting address"),
    FaultBit("UFSR", "UNDEFINSTR", 16, "undefined instruction"),
    FaultBit("UFSR", "INVSTATE", 17, "invalid state: execution left Thumb state (a call "
             "through an even address?)"),
    FaultBit("UFSR", "INVPC", 18, "invalid PC load (a bad EXC_RETURN)"),
    FaultBit("UFSR", "NOCP", 19, "no coprocessor (an FPU instruction with the FPU off)"),
    FaultBit("UFSR", "UNALIGNED", 24, "unaligned memory access"),
    FaultBit("UFSR", "DIVBYZERO", 25, "divide by zero"),
)
HFSR_BITS = (
    FaultBit("HFSR", "VECTTBL", 1, "bus fault reading the vector table"),
    FaultBit("HFSR", "FORCED", 30, "a configurable fault escalated to HardFault (its handler "
             "is disabled, or it faulted itself)"),
    FaultBit("HFSR", "DEBUGEVT", 31, "a debug event with no debugger to take it (a BKPT)"),
)

ICSR, DHCSR = 0xE000ED04, 0xE000EDF0
CFSR, HFSR, MMFAR, BFAR = 0xE000ED28, 0xE000ED2C, 0xE000ED34, 0xE000ED38
S_LOCKUP = 1 << 19
HARDFAULT, MEMMANAGE, BUSFAULT, USAGEFAULT = 3, 4, 5, 6
EXCEPTIONS = {1: "Reset", 2: "NMI", HARDFAULT: "HardFault", MEMMANAGE: "MemManage",
              BUSFAULT: "BusFault", USAGEFAULT: "UsageFault", 7: "SecureFault", 11: "SVCall",
              12: "DebugMonitor", 14: "PendSV", 15: "SysTick"}
FAULTS = frozenset({HARDFAULT, MEMMANAGE, BUSFAULT, USAGEFAULT})
CORE_REGISTERS = ("r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10", "r11",
                  "r12", "sp", "lr", "pc", "xpsr", "msp", "psp")
FRAME = ("r0", "r1", "r2", "r3", "r12", "lr", "pc", "xpsr")     # the basic stacked frame


def decode(value: int, bits: Sequence[FaultBit]) -> tuple[FaultBit, ...]:
    return tuple(bit for bit in bits if value >> bit.bit & 1)


def decode_cfsr(value: int) -> tuple[FaultBit, ...]:
    """The CFSR's set bits (MMFSR, BFSR, UFSR), lowest first."""
    return decode(value, CFSR_BITS)


def decode_hfsr(value: int) -> tuple[FaultBit, ...]:
    return decode(value, HFSR_BITS)


# ================================================================================ the crash
@dataclass(frozen=True)
class Frame:
    """One step of a backtrace: a code address, its stack pointer (ESP32), where it is."""

    pc: int
    sp: int | None = None
    where: str = ""


@dataclass(frozen=True)
class Crash:
    """A decoded crash. ``cause`` is what the core called it (HardFault, LoadProhibited),
    ``pc`` where it happened and ``where`` that address named from the ELF
    (``0x0000c82e (ota_store_chunk+0x2e)``); ``words`` the fault status decoded; ``evidence``
    what the board gave, as it gave it (registers read through the probe, the console's panic
    lines)."""

    core: str                                 # "Cortex-M", "ESP32 core 0"
    cause: str
    pc: int | None
    where: str
    words: tuple[str, ...] = ()
    fault_address: int | None = None
    registers: tuple[tuple[str, int], ...] = ()
    backtrace: tuple[Frame, ...] = ()
    evidence: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def function(self) -> str | None:
        """The function the PC is in (``ota_store_chunk``), when the ELF named it."""
        match = re.search(r"\((\w+)(?:\+0x[0-9a-f]+)?\)", self.where)
        return match.group(1) if match else None

    def summary(self) -> str:
        """One line: ``HardFault at 0x0000c82e (ota_store_chunk+0x2e), called from ...:
        FORCED, PRECISERR, BFARVALID; fault address 0x00000000``."""
        text = f"{self.cause} on {self.core} at {self.where or 'an unknown PC'}"
        callers = [frame.where for frame in self.backtrace[1:2] if frame.where]
        if callers:
            text += f", called from {callers[0]}"
        names = [word.partition(":")[0] for word in self.words]
        names = [name for name in names if name != self.cause]   # said once is enough
        if names:
            text += ": " + ", ".join(names)
        if self.fault_address is not None:
            text += f"; fault address {self.fault_address:#010x}"
        return text

    def report(self) -> str:
        """The evidence for the report: cause and place, the words, the backtrace, the
        registers, and what the board printed."""
        lines = [f"{self.cause} on {self.core}", f"PC: {self.where or 'unknown'}"]
        if self.fault_address is not None:
            lines.append(f"fault address: {self.fault_address:#010x}")
        lines += [f"  {word}" for word in self.words]
        if self.backtrace:
            lines.append("backtrace:")
            lines += [f"  #{i} {frame.where or f'{frame.pc:#010x}'}"
                      + (f" (sp {frame.sp:#010x})" if frame.sp is not None else "")
                      for i, frame in enumerate(self.backtrace)]
        if self.registers:
            lines.append("registers:")
            pairs = [f"{name.upper():<8} {value:#010x}" for name, value in self.registers]
            lines += ["  " + "  ".join(pairs[i:i + 4]) for i in range(0, len(pairs), 4)]
        lines += list(self.notes)
        if self.evidence:
            lines += ["as the board gave it:", self.evidence]
        return "\n".join(lines)


def _namer(symbols: ElfSymbols | None) -> Callable[[int], str]:
    return symbols.describe if symbols is not None else (lambda address: f"{address:#010x}")


# ================================================================================ Cortex-M
@dataclass(frozen=True)
class CortexMState:
    """What a halted Cortex-M shows a debugger after a fault: its core registers (pyocd's
    names), the fault status and address registers, and the exception frame at SP (None when
    it could not be read)."""

    registers: Mapping[str, int]
    cfsr: int
    hfsr: int
    mmfar: int
    bfar: int
    frame: Mapping[str, int] | None
    lockup: bool = False


def stacked_sp(registers: Mapping[str, int]) -> int:
    """The stack the exception frame was pushed on: EXC_RETURN (the handler's LR) bit 2 set
    means the process stack (PSP), clear the main stack (MSP)."""
    return registers["psp"] if registers["lr"] & 0x4 else registers["msp"]


def decode_cortex_m(state: CortexMState, symbols: ElfSymbols | None = None) -> Crash:
    name = _namer(symbols)
    registers = state.registers
    exception = registers["xpsr"] & 0x1FF
    cause = "lockup" if state.lockup else EXCEPTIONS.get(exception, f"exception {exception}")
    set_bits = decode_hfsr(state.hfsr) + decode_cfsr(state.cfsr)
    words = tuple(f"{bit.name}: {bit.words}" for bit in set_bits)
    names = {bit.name for bit in set_bits}
    fault_address = state.bfar if "BFARVALID" in names else \
        state.mmfar if "MMARVALID" in names else None
    notes: list[str] = []
    if state.frame is not None:
        pc, lr = state.frame["pc"], state.frame["lr"]
        notes.append(f"the handler's PC {name(registers['pc'])}, EXC_RETURN "
                     f"{registers['lr']:#010x}; the frame the core stacked at "
                     f"{stacked_sp(registers):#010x}: " + ", ".join(
                         f"{key.upper()} {value:#010x}" for key, value in state.frame.items()))
    else:
        pc, lr = registers["pc"], registers["lr"]
        if not state.lockup:
            notes.append("no exception frame could be read at SP: PC and LR are the core's")
    backtrace = (Frame(pc, None, name(pc)), Frame(lr & ~1, None, name(lr & ~1)))
    status = (("CFSR", state.cfsr), ("HFSR", state.hfsr), ("MMFAR", state.mmfar),
              ("BFAR", state.bfar))
    return Crash(core="Cortex-M", cause=cause, pc=pc, where=name(pc), words=words,
                 fault_address=fault_address,
                 registers=tuple((key, registers[key]) for key in CORE_REGISTERS
                                 if key in registers) + status,
                 backtrace=backtrace, notes=tuple(notes))


class CortexMDebug(Protocol):
    """What ``read_cortex_m`` needs of a debug probe (``hil.drivers.swd.SwdFlasher``)."""

    def read_memory(self, address: int, size: int) -> bytes: ...

    def halt(self) -> None: ...

    def read_core_registers(self, names: list[str]) -> dict[str, int]: ...


def _word(debug: CortexMDebug, address: int) -> int:
    return int(struct.unpack("<I", debug.read_memory(address, 4))[0])


def fault_active(debug: CortexMDebug) -> bool:
    """The core is in a fault handler or locked up: told from ICSR.VECTACTIVE and
    DHCSR.S_LOCKUP, read while it runs (nothing is stopped)."""
    return (_word(debug, ICSR) & 0x1FF) in FAULTS or bool(_word(debug, DHCSR) & S_LOCKUP)


def read_cortex_m(debug: CortexMDebug, symbols: ElfSymbols | None = None) -> Crash | None:
    """The crash, if the core is in a fault (see the module docstring); the core is left
    halted in it, as evidence for whoever looks next. None when it is not."""
    lockup = bool(_word(debug, DHCSR) & S_LOCKUP)
    if (_word(debug, ICSR) & 0x1FF) not in FAULTS and not lockup:
        return None
    debug.halt()
    registers = debug.read_core_registers(list(CORE_REGISTERS))
    cfsr, hfsr, _dfsr, mmfar, bfar = struct.unpack("<5I", debug.read_memory(CFSR, 20))
    frame: dict[str, int] | None = None
    if not lockup:
        try:
            words = struct.unpack("<8I", debug.read_memory(stacked_sp(registers), 32))
            frame = dict(zip(FRAME, words, strict=True))
        except RigFault:
            frame = None          # SP points nowhere readable: a stack overflow, say
    return decode_cortex_m(CortexMState(registers, cfsr, hfsr, mmfar, bfar, frame, lockup),
                           symbols)


# ================================================================================ ESP32
# Xtensa exception causes as ESP-IDF names them in the panic line, in words.
PANIC_WORDS = {
    "LoadProhibited": "a load from an address the MMU forbids (a NULL or wild pointer read)",
    "StoreProhibited": "a store to an address the MMU forbids (a NULL or wild pointer write)",
    "InstrFetchProhibited": "an instruction fetch from an address the MMU forbids (a call "
                            "through a bad function pointer)",
    "IllegalInstruction": "an illegal instruction (corrupt code, or a jump into data)",
    "LoadStoreAlignment": "an unaligned load or store",
    "LoadStoreError": "a byte-wide access to memory that only takes 32-bit words",
    "IntegerDivideByZero": "divide by zero",
    "Unhandled debug exception": "a breakpoint or watchpoint with no debugger (a stack "
                                 "overflow caught by the canary watchpoint?)",
    "Double exception": "an exception in an exception handler",
    "Interrupt wdt timeout on CPU0": "the interrupt watchdog: CPU0 was stuck with "
                                     "interrupts off",
    "Interrupt wdt timeout on CPU1": "the interrupt watchdog: CPU1 was stuck with "
                                     "interrupts off",
    "Cache disabled but cached memory region accessed": "flash-mapped code or data used "
                                                        "while the flash cache was off",
}
_GURU = re.compile(r"Guru Meditation Error: Core\s+(?P<core>\d+) panic'ed \((?P<cause>[^)]+)\)")
_ABORT = re.compile(r"abort\(\) was called at PC (?P<pc>0x[0-9a-fA-F]+) on core (?P<core>\d+)")
_ASSERT = re.compile(r"assert failed: (?P<what>.+)")
_REGISTER = re.compile(r"\b(?P<name>[A-Z][A-Z0-9]*)\s*:\s*(?P<value>0x[0-9a-fA-F]{8})\b")
_BACKTRACE = re.compile(r"Backtrace:\s*(?P<frames>.*)")
_FRAME = re.compile(r"(0x[0-9a-fA-F]+):(0x[0-9a-fA-F]+)")
# A panic that printed no backtrace is over at the reboot (or a halt's silence, never here).
_PANIC_OVER = re.compile(r"Rebooting\.\.\.|^ets |^rst:0x")
_MAX_PANIC_LINES = 64


def xtensa_pc(address: int) -> int:
    """A windowed-call return address (A0: the call size in its top two bits) as a code
    address in the 0x40000000 region, as ESP-IDF's backtrace prints them."""
    return (address & 0x3FFFFFFF) | 0x40000000 if address & 0x80000000 else address


class PanicParser:
    """ESP-IDF panic output, fed line by line: ``feed`` returns the ``Crash`` at the line that
    completes one (its backtrace, or the reboot when it printed none), else None."""

    def __init__(self, symbols: ElfSymbols | None = None) -> None:
        self.symbols = symbols
        self._lines: list[str] = []
        self._core = 0
        self._cause = ""
        self._extra: list[str] = []

    @property
    def in_panic(self) -> bool:
        return bool(self._lines)

    def feed(self, line: str) -> Crash | None:
        text = line.rstrip("\r\n")
        start = _GURU.search(text) or _ABORT.search(text) or _ASSERT.search(text)
        if start is not None and not self._lines:
            groups = start.groupdict()
            self._core = int(groups.get("core") or 0)
            self._cause = groups.get("cause") or ("abort()" if "pc" in groups
                                                  else "assert failed")
            self._extra = [f"assert failed: {groups['what']}"] if "what" in groups else []
            self._lines = [text]
            return None
        if not self._lines:
            return None
        if _PANIC_OVER.search(text) and not _BACKTRACE.search(text):
            return self._finish([])
        self._lines.append(text)
        backtrace = _BACKTRACE.search(text)
        if backtrace is not None:
            frames = [(int(pc, 16), int(sp, 16))
                      for pc, sp in _FRAME.findall(backtrace.group("frames"))]
            if "CORRUPTED" in text:
                self._extra.append("the backtrace broke off: |<-CORRUPTED (the stack is "
                                   "damaged)")
            return self._finish(frames)
        if len(self._lines) >= _MAX_PANIC_LINES:
            return self._finish([])
        return None

    def _finish(self, frames: list[tuple[int, int]]) -> Crash:
        lines, self._lines = self._lines, []
        registers: dict[str, int] = {}
        for line in lines[1:]:
            for match in _REGISTER.finditer(line):
                registers.setdefault(match.group("name"), int(match.group("value"), 16))
        name = _namer(self.symbols)
        pc = registers.get("PC", frames[0][0] if frames else None)
        words = [f"{self._cause}: {PANIC_WORDS[self._cause]}"] if self._cause in PANIC_WORDS \
            else []
        fault_address = registers.get("EXCVADDR") \
            if self._cause.endswith("Prohibited") or self._cause.startswith("LoadStore") \
            else None
        backtrace = tuple(Frame(frame_pc, sp, name(frame_pc)) for frame_pc, sp in frames)
        if not backtrace and pc is not None:
            backtrace = (Frame(pc, registers.get("A1"), name(pc)),)
            if "A0" in registers:
                caller = xtensa_pc(registers["A0"])
                backtrace += (Frame(caller, None, name(caller)),)
        return Crash(core=f"ESP32 core {self._core}", cause=self._cause, pc=pc,
                     where=name(pc) if pc is not None else "", words=tuple(words),
                     fault_address=fault_address, registers=tuple(registers.items()),
                     backtrace=backtrace, evidence="\n".join(lines),
                     notes=tuple(self._extra))


# ================================================================================ watches
class CrashWatch(Protocol):
    """What a test's wait polls for a crash (see the module docstring)."""

    def start(self) -> None:
        """From now on: what came before is not this attempt's."""

    def poll(self) -> Crash | None: ...


def check(watch: CrashWatch) -> None:
    """Raise ``FirmwareCrash`` when ``watch`` has seen a crash."""
    __tracebackhide__ = True      # the test's traceback ends at its wait, not in here
    crash = watch.poll()
    if crash is not None:
        raise FirmwareCrash(crash)


class _Every:
    """Due at most once every ``every`` seconds (the first time at once): a watch's looks."""

    def __init__(self, every: float, clock: Callable[[], float]) -> None:
        self._every = every
        self._clock = clock
        self._last: float | None = None

    def reset(self) -> None:
        self._last = None

    def due(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self._every:
            return False
        self._last = now
        return True


class ConsolePanicWatch:
    """An ESP32's panic output on its console (``PanicParser`` over the lines since
    ``start``), read every ``every`` seconds at most. ``console`` gives the console if it is
    open, else None: the watch never opens it (an ESP32's port may be the flasher's for a
    moment, taken by a fault's reset on another thread)."""

    def __init__(self, console: Callable[[], ConsoleProtocol | None],
                 symbols: ElfSymbols | None = None, *, every: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._console = console
        self._symbols = symbols
        self._looks = _Every(every, clock)   # the log is copied to be read: not at every poll
        self._parser = PanicParser(symbols)
        self._source: ConsoleProtocol | None = None
        self._mark = 0
        self.crash: Crash | None = None

    def start(self) -> None:
        self._parser = PanicParser(self._symbols)
        self._source = self._console()
        self._mark = self._source.mark() if self._source is not None else 0
        self._looks.reset()
        self.crash = None

    def poll(self) -> Crash | None:
        if self.crash is not None or not self._looks.due():
            return self.crash
        console = self._console()
        if console is None:
            return None
        if console is not self._source:
            # Reopened (an ESP32's port is let go for its reset lines): a new log, from 0.
            self._source, self._mark = console, 0
        lines = console.lines()[self._mark:]
        self._mark += len(lines)
        for line in lines:
            if line.sent:
                continue
            crash = self._parser.feed(line.text)
            if crash is not None:
                self.crash = crash
                return crash
        return None


class SwdFaultWatch:
    """A Cortex-M board through its SWD probe: every ``every`` seconds at most, whether the core
    is in a fault handler or locked up (``read_cortex_m``; a running core is not stopped).

    A look that fails (a ``RigFault`` from the probe) is no crash and no verdict: the test's
    own faults power the board off or hold it in reset, when a real target does not answer
    its probe; the next look tries again."""

    def __init__(self, debug: Callable[[], CortexMDebug], symbols: ElfSymbols | None = None,
                 *, every: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self._debug = debug
        self._symbols = symbols
        self._looks = _Every(every, clock)
        self.crash: Crash | None = None

    def start(self) -> None:
        self._looks.reset()
        self.crash = None

    def poll(self) -> Crash | None:
        if self.crash is not None or not self._looks.due():
            return self.crash
        try:
            self.crash = read_cortex_m(self._debug(), self._symbols)
        except RigFault as unanswered:
            log.debug("crash watch: the probe did not answer: %s", unanswered)
        return self.crash


class NoWatch:
    """A board hil cannot look into for a crash (a host build: its exit is a boot loop)."""

    def start(self) -> None:
        pass

    def poll(self) -> Crash | None:
        return None
