"""Crashes captured and explained (``hil.drivers.crash``).

- the Cortex-M fault status registers decoded bit by bit (every CFSR and HFSR bit has its name
  and words; reserved bits say nothing), and a halted core's registers decoded into the
  faulting PC and LR from the frame stacked on the stack EXC_RETURN names;
- ESP-IDF's panic output parsed as ESP-IDF prints it (the Guru Meditation line, the register
  dump, the backtrace), property-tested against the simulated ESP32's own printer and against
  noise, plus the abort() and assert variants and a broken-off backtrace;
- addresses named from an ELF's symbols: a gcc-linked ELF (binutils' ``nm`` is the reference)
  and the simulated firmware's;
- the whole path on the simulated Cortex-M boards through the real pyocd: a running board is
  not stopped by the watch, a crashed one is halted and decoded with its function names.

The end-to-end runs of the conformance suite on a crashing board of each family are in
``tests/test_crash_suite.py``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_board import SimBoard, SimSetup, wait_for

from hil.drivers.crash import (
    CFSR_BITS,
    HFSR_BITS,
    CortexMState,
    PanicParser,
    SwdFaultWatch,
    check,
    decode_cfsr,
    decode_cortex_m,
    decode_hfsr,
    fault_active,
    read_cortex_m,
)
from hil.drivers.elf import ElfSymbols
from hil.errors import FirmwareCrash
from hil.sim.esp32 import PANIC_REGISTERS, panic_output
from hil.sim.probe import board as probe_board
from hil.sim.probe import read_spec
from hil.sim.symbols import functions, write_elf

# ================================================================================ fault status
CFSR_NAMES = {0: "IACCVIOL", 1: "DACCVIOL", 3: "MUNSTKERR", 4: "MSTKERR", 5: "MLSPERR",
              7: "MMARVALID", 8: "IBUSERR", 9: "PRECISERR", 10: "IMPRECISERR",
              11: "UNSTKERR", 12: "STKERR", 13: "LSPERR", 15: "BFARVALID", 16: "UNDEFINSTR",
              17: "INVSTATE", 18: "INVPC", 19: "NOCP", 24: "UNALIGNED", 25: "DIVBYZERO"}


@pytest.mark.parametrize("bit", sorted(CFSR_NAMES))
def test_each_cfsr_bit_is_named_where_the_architecture_puts_it(bit: int) -> None:
    [decoded] = decode_cfsr(1 << bit)
    assert decoded.name == CFSR_NAMES[bit]
    assert decoded.register == ("MMFSR" if bit < 8 else "BFSR" if bit < 16 else "UFSR")
    assert decoded.words


def test_reserved_cfsr_bits_and_an_empty_register_say_nothing() -> None:
    reserved = sum(1 << bit for bit in range(32) if bit not in CFSR_NAMES)
    assert decode_cfsr(reserved) == ()
    assert decode_cfsr(0) == ()
    assert [bit.name for bit in decode_cfsr(0xFFFFFFFF)] == [CFSR_NAMES[b] for b in
                                                               sorted(CFSR_NAMES)]
    assert len(CFSR_BITS) == len(CFSR_NAMES)


def test_hfsr_bits() -> None:
    assert [bit.name for bit in decode_hfsr(0x40000000)] == ["FORCED"]
    assert [bit.name for bit in decode_hfsr(0x80000002)] == ["VECTTBL", "DEBUGEVT"]
    assert decode_hfsr(0x3FFFFFFD) == ()
    assert {bit.name for bit in HFSR_BITS} == {"VECTTBL", "FORCED", "DEBUGEVT"}


def _registers(**changes: int) -> dict[str, int]:
    registers = {name: 0 for name in ("r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8",
                                      "r9", "r10", "r11", "r12", "sp", "lr", "pc", "xpsr",
                                      "msp", "psp")}
    registers.update(lr=0xFFFFFFF9, pc=0x0000C340, xpsr=0x01000003, msp=0x2000FEE0,
                     sp=0x2000FEE0, psp=0x2000A000)
    registers.update(changes)
    return registers


FRAME = {"r0": 0, "r1": 1, "r2": 2, "r3": 3, "r12": 12, "lr": 0x0000C65B, "pc": 0x0000C82E,
         "xpsr": 0x01000000}


@pytest.fixture(scope="module")
def nrf_symbols(tmp_path_factory: pytest.TempPathFactory) -> ElfSymbols:
    return ElfSymbols(write_elf("nrf52832", tmp_path_factory.mktemp("elf") / "nrf.elf"))


def test_a_forced_hardfault_is_decoded_from_its_stacked_frame(nrf_symbols: ElfSymbols) -> None:
    state = CortexMState(_registers(), cfsr=0x8200, hfsr=0x40000000, mmfar=0x1234, bfar=0,
                         frame=FRAME)
    crash = decode_cortex_m(state, nrf_symbols)
    assert crash.cause == "HardFault"
    assert crash.pc == 0x0000C82E
    assert crash.where == "0x0000c82e (ota_store_chunk+0x2e)"
    assert crash.function == "ota_store_chunk"
    assert [frame.where for frame in crash.backtrace] == [
        "0x0000c82e (ota_store_chunk+0x2e)", "0x0000c65a (ota_download+0x5a)"]
    assert crash.fault_address == 0            # BFAR: BFARVALID is set; MMFAR is not valid
    assert [word.partition(":")[0] for word in crash.words] == \
        ["FORCED", "PRECISERR", "BFARVALID"]
    assert crash.summary() == (
        "HardFault on Cortex-M at 0x0000c82e (ota_store_chunk+0x2e), called from 0x0000c65a "
        "(ota_download+0x5a): FORCED, PRECISERR, BFARVALID; fault address 0x00000000")
    report = crash.report()
    assert "PRECISERR: precise data bus error" in report
    assert "CFSR     0x00008200" in report
    assert "HFSR     0x40000000" in report
    assert "HardFault_Handler" in report       # where the core spins now


def test_the_faulting_address_comes_from_mmfar_only_when_it_is_valid() -> None:
    mem = decode_cortex_m(CortexMState(_registers(xpsr=0x01000004), cfsr=0x82, hfsr=0,
                                       mmfar=0x20010004, bfar=0, frame=FRAME))
    assert (mem.cause, mem.fault_address) == ("MemManage", 0x20010004)
    imprecise = decode_cortex_m(CortexMState(_registers(), cfsr=0x400, hfsr=0x40000000,
                                             mmfar=0x1, bfar=0x2, frame=FRAME))
    assert imprecise.fault_address is None
    usage = decode_cortex_m(CortexMState(_registers(xpsr=0x01000006), cfsr=1 << 25, hfsr=0,
                                         mmfar=0, bfar=0, frame=FRAME))
    assert (usage.cause, usage.words[0].partition(":")[0]) == ("UsageFault", "DIVBYZERO")


def test_a_fault_in_a_task_reads_its_frame_from_the_process_stack() -> None:
    # EXC_RETURN 0xFFFFFFFD: back to Thread mode on the PSP (an RTOS task).
    from hil.drivers.crash import stacked_sp

    assert stacked_sp(_registers(lr=0xFFFFFFFD)) == 0x2000A000
    assert stacked_sp(_registers(lr=0xFFFFFFF9)) == 0x2000FEE0
    assert stacked_sp(_registers(lr=0xFFFFFFF1)) == 0x2000FEE0


def test_without_an_elf_or_a_frame_the_addresses_stand_alone() -> None:
    crash = decode_cortex_m(CortexMState(_registers(), cfsr=0, hfsr=0x40000000, mmfar=0,
                                         bfar=0, frame=None))
    assert crash.where == "0x0000c340"
    assert crash.function is None
    assert "no exception frame could be read at SP" in crash.report()
    lockup = decode_cortex_m(CortexMState(_registers(pc=0xEFFFFFFE), cfsr=0, hfsr=0, mmfar=0,
                                          bfar=0, frame=None, lockup=True))
    assert lockup.cause == "lockup"


# ================================================================================ ESP32 panics
# As ESP-IDF v4 prints a LoadProhibited (one space after "Core" in that version).
ESP_IDF_V4_PANIC = """\
Guru Meditation Error: Core 1 panic'ed (LoadProhibited). Exception was unhandled.
Core 1 register dump:
PC      : 0x400d3b21  PS      : 0x00060e30  A0      : 0x800d1f6e  A1      : 0x3ffb1f90
A2      : 0x00000000  A3      : 0x3ffc0a1c  A4      : 0x00000001  A5      : 0x00000000
A6      : 0x00000000  A7      : 0x00000000  A8      : 0x800d3b1c  A9      : 0x3ffb1f70
A10     : 0x00000000  A11     : 0x00000000  A12     : 0x00000000  A13     : 0x00000000
A14     : 0x00000000  A15     : 0x00000000  SAR     : 0x00000004  EXCCAUSE: 0x0000001c
EXCVADDR: 0x00000010  LBEG    : 0x4000c2e0  LEND    : 0x4000c2f6  LCOUNT  : 0xffffffff

Backtrace: 0x400d3b21:0x3ffb1f90 0x400d1f6b:0x3ffb1fb0 0x40088b7d:0x3ffb1fd0

Rebooting...
"""


def _feed(parser: PanicParser, text: str) -> list:
    return [crash for line in text.splitlines() if (crash := parser.feed(line)) is not None]


def test_an_esp_idf_panic_is_parsed_as_printed() -> None:
    [crash] = _feed(PanicParser(), ESP_IDF_V4_PANIC)
    assert (crash.core, crash.cause, crash.pc) == ("ESP32 core 1", "LoadProhibited", 0x400D3B21)
    assert crash.fault_address == 0x10           # EXCVADDR: a read through a NULL struct
    assert crash.words == ("LoadProhibited: a load from an address the MMU forbids (a NULL or "
                           "wild pointer read)",)
    assert [(frame.pc, frame.sp) for frame in crash.backtrace] == [
        (0x400D3B21, 0x3FFB1F90), (0x400D1F6B, 0x3FFB1FB0), (0x40088B7D, 0x3FFB1FD0)]
    assert dict(crash.registers)["EXCCAUSE"] == 0x1C
    assert crash.evidence.splitlines()[0].startswith("Guru Meditation Error: Core 1")
    assert crash.evidence.splitlines()[-1].startswith("Backtrace:")


def test_the_backtrace_is_named_from_the_elf(tmp_path: Path) -> None:
    symbols = ElfSymbols(write_elf("esp32", tmp_path / "esp32.elf"))
    table = functions("esp32")
    pc, caller = table["ota_store_chunk"].at(0x10), table["ota_download"].at(0x20)
    text = panic_output("StoreProhibited", {"PC": pc, "A1": 0x3FFB5000},
                        [(pc, 0x3FFB5000), (caller, 0x3FFB5030), (0x40000400, 0x3FFB5060)])
    [crash] = _feed(PanicParser(symbols), text)
    assert crash.function == "ota_store_chunk"
    assert [frame.where for frame in crash.backtrace] == [
        f"{pc:#010x} (ota_store_chunk+0x10)", f"{caller:#010x} (ota_download+0x20)",
        "0x40000400"]                        # ROM code: no symbol in the application's ELF


def test_abort_assert_and_a_corrupted_backtrace() -> None:
    [abort] = _feed(PanicParser(), "abort() was called at PC 0x400d2c3f on core 0\r\n\r\n"
                    "Backtrace: 0x40081b2e:0x3ffb4e50 0x400d2c42:0x3ffb4e70 |<-CORRUPTED\r\n")
    assert (abort.cause, abort.core, len(abort.backtrace)) == ("abort()", "ESP32 core 0", 2)
    assert any("CORRUPTED" in note for note in abort.notes)
    [failed] = _feed(PanicParser(), "assert failed: ota_write ota.c:42 (len > 0)\n"
                     "Backtrace: 0x40081b2e:0x3ffb4e50\n")
    assert failed.cause == "assert failed"
    assert "assert failed: ota_write ota.c:42 (len > 0)" in failed.report()


def test_a_panic_that_reboots_before_its_backtrace_still_counts() -> None:
    [crash] = _feed(PanicParser(), ESP_IDF_V4_PANIC.replace(
        "Backtrace: 0x400d3b21:0x3ffb1f90 0x400d1f6b:0x3ffb1fb0 0x40088b7d:0x3ffb1fd0", ""))
    assert crash.pc == 0x400D3B21
    # No backtrace printed: the PC and the caller from A0 (a windowed call's return address).
    assert [frame.pc for frame in crash.backtrace] == [0x400D3B21, 0x400D1F6E]


WORD = st.integers(min_value=0, max_value=0xFFFFFFFF)
CAUSES = st.sampled_from(["LoadProhibited", "StoreProhibited", "IllegalInstruction",
                          "InstrFetchProhibited", "IntegerDivideByZero", "LoadStoreAlignment",
                          "Unhandled debug exception", "Interrupt wdt timeout on CPU1"])


@settings(max_examples=200, deadline=None)
@given(cause=CAUSES, core=st.integers(0, 1),
       registers=st.fixed_dictionaries({name: WORD for name in PANIC_REGISTERS}),
       backtrace=st.lists(st.tuples(WORD, WORD), min_size=1, max_size=12),
       before=st.lists(st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t),
                       max_size=5))
def test_whatever_the_panic_handler_prints_is_read_back(
        cause: str, core: int, registers: dict[str, int], backtrace: list[tuple[int, int]],
        before: list[str]) -> None:
    noise = [line for line in before if "Guru" not in line and "abort()" not in line
             and "assert failed" not in line]
    text = "\n".join(noise) + "\n" + panic_output(cause, registers, backtrace, core=core)
    crashes = _feed(PanicParser(), text)
    assert len(crashes) == 1
    [crash] = crashes
    assert (crash.cause, crash.core, crash.pc) == (cause, f"ESP32 core {core}", registers["PC"])
    assert dict(crash.registers) == registers
    assert [(frame.pc, frame.sp) for frame in crash.backtrace] == backtrace


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=120), max_size=30))
def test_lines_without_a_panic_never_make_one(lines: list[str]) -> None:
    parser = PanicParser()
    for line in lines:
        if "Guru Meditation Error" in line or "abort() was called" in line \
                or "assert failed: " in line:
            continue
        assert parser.feed(line) is None


# ================================================================================ ELF symbols
def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"this test links a real ELF and needs `{name}` on PATH")
    return path


def test_function_at_agrees_with_binutils(tmp_path: Path) -> None:
    (tmp_path / "fw.c").write_text("int a(int x) { return x * 3 + 1; }\n"
                                   "int b(int x) { return a(x) - a(x + 1); }\n"
                                   "void start(void) { for (;;) b(7); }\n")
    subprocess.run([tool("gcc"), "-O0", "-nostdlib", "-static", "-Wl,-e,start",
                    "-Wl,--build-id=none", "-o", "fw.elf", "fw.c"], cwd=tmp_path, check=True,
                   timeout=60)
    listing = subprocess.run([tool("nm"), "-S", "fw.elf"], cwd=tmp_path, capture_output=True,
                             text=True, check=True, timeout=60).stdout
    sized = {fields[3]: (int(fields[0], 16), int(fields[1], 16))
             for fields in (line.split() for line in listing.splitlines()) if len(fields) == 4}
    symbols = ElfSymbols(tmp_path / "fw.elf")
    for name in ("a", "b", "start"):
        address, size = sized[name]
        assert symbols.function_at(address) == (name, 0)
        assert symbols.function_at(address + size - 1) == (name, size - 1)
    assert symbols.function_at(0) is None


def test_the_simulated_firmwares_elf_is_read_as_an_arm_linkers(tmp_path: Path) -> None:
    elf = write_elf("gd32", tmp_path / "gd32.elf")
    listing = subprocess.run([tool("nm"), "-S", str(elf)], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    # The table holds Thumb addresses (bit 0 set), as an ARM linker writes them...
    assert "08008801 00000090 T ota_store_chunk" in listing
    symbols = ElfSymbols(elf)
    # ...and an address is named without it; an LR (bit 0 set) too.
    assert symbols.function_at(0x08008800) == ("ota_store_chunk", 0)
    assert symbols.function_at(0x0800865B) == ("ota_download", 0x5A)
    assert symbols.describe(0x08008890) == "0x08008890"    # just past its end


# ================================================================================ through pyocd
@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimSetup]:
    with SimSetup(tmp_path, monkeypatch) as setup:
        yield setup


@pytest.mark.parametrize("board", ["nrf52832", "gd32"])
def test_a_crashed_cortex_m_is_halted_and_decoded_through_pyocd(setup: SimSetup, board: str,
                                                                tmp_path: Path) -> None:
    sim: SimBoard = setup.board(board, defects=("crashes-mid-download",))
    flasher = sim.parts.flasher()
    assert flasher is not None
    symbols = ElfSymbols(write_elf(board, tmp_path / "fw.elf"))
    assert sim.rig.sim_state_dir is not None
    core = probe_board(read_spec(sim.rig.sim_state_dir)).core
    # Running normally: the watch finds nothing and leaves the core running.
    assert read_cortex_m(flasher, symbols) is None
    assert not core.halted
    setup.task(sim, "1.1.0")
    sim.board.start_update()
    wait_for(lambda: fault_active(flasher), timeout=30)
    assert not core.halted                     # spinning in its handler, not stopped
    watch = SwdFaultWatch(lambda: flasher, symbols)
    watch.start()
    with pytest.raises(FirmwareCrash) as caught:
        check(watch)
    crash = caught.value.crash
    assert core.halted                         # left halted in the fault, as evidence
    assert crash.cause == "HardFault"
    assert crash.function == "ota_store_chunk"
    assert crash.backtrace[1].where.endswith("(ota_download+0x5a)")
    assert [word.partition(":")[0] for word in crash.words] == \
        ["FORCED", "PRECISERR", "BFARVALID"]
    assert crash.fault_address == 0
    assert str(caught.value).startswith(f"firmware crash: HardFault on Cortex-M at "
                                        f"{functions(board)['ota_store_chunk'].at(0x2E):#010x}")
    # A reset clears the fault: the board boots and the watch finds nothing again.
    since = sim.board.console.mark()
    flasher.reset()
    sim.board.wait_boot(since=since)
    watch.start()
    assert watch.poll() is None


def test_the_swd_watch_looks_at_most_every_interval() -> None:
    reads: list[int] = []

    class Probe:
        def read_memory(self, address: int, size: int) -> bytes:
            reads.append(address)
            return bytes(size)

        def halt(self) -> None:
            raise AssertionError("a running core must not be halted")

        def read_core_registers(self, names: list[str]) -> dict[str, int]:
            raise AssertionError("not halted, not read")

    now = [100.0]
    watch = SwdFaultWatch(Probe, every=0.5, clock=lambda: now[0])
    watch.start()
    assert watch.poll() is None
    looked = len(reads)
    now[0] += 0.2
    assert watch.poll() is None
    assert len(reads) == looked
    now[0] += 0.4
    assert watch.poll() is None
    assert len(reads) == 2 * looked


def test_a_probe_that_does_not_answer_is_no_crash_and_is_asked_again() -> None:
    # A test's power cut leaves a real target deaf to its probe for a moment.
    from hil.errors import RigFault

    answers = [RigFault("flasher", "reading 4 bytes at 0xe000ed04 failed: no ACK")]

    class Probe:
        def read_memory(self, address: int, size: int) -> bytes:
            if answers:
                raise answers.pop()
            return bytes(size)

        def halt(self) -> None:
            raise AssertionError("a running core must not be halted")

        def read_core_registers(self, names: list[str]) -> dict[str, int]:
            raise AssertionError("not halted, not read")

    now = [0.0]
    watch = SwdFaultWatch(Probe, every=0.5, clock=lambda: now[0])
    watch.start()
    assert watch.poll() is None
    now[0] += 1
    assert watch.poll() is None
    assert not answers


def test_the_panic_watch_never_opens_the_console_and_follows_a_reopened_one() -> None:
    from hil.drivers.base import LogLine
    from hil.drivers.crash import ConsolePanicWatch

    class Log:
        def __init__(self, text: str) -> None:
            self.log = [LogLine(0.0, line) for line in text.splitlines()]

        def mark(self) -> int:
            return len(self.log)

        def lines(self) -> list[LogLine]:
            return list(self.log)

    before = Log("boot version=1.0.0\nota phase=download offset=0 status=206\n" * 20)
    opened: list[Log | None] = [before]
    now = [0.0]
    watch = ConsolePanicWatch(lambda: opened[0], every=0.0, clock=lambda: now[0])
    watch.start()
    opened[0] = None                       # the flasher has the port: nothing to read
    assert watch.poll() is None
    opened[0] = Log(ESP_IDF_V4_PANIC)      # reopened: a new log, shorter than the old one
    crash = watch.poll()
    assert crash is not None
    assert crash.cause == "LoadProhibited"
