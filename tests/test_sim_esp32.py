"""The simulated ESP32 (hil/sim/esp32.py) behind its pyserial URL (hil/sim/protocol_hilsim.py),
flashed by the real esptool 5.6 through hil's unchanged EspFlasher and through esptool.cmds.

The first tests drive the model without any port (bytes and line levels in, bytes out, on a
fake clock); the rest go through ``hilsim://<state_dir>`` the way a rig does. esptool's first
two connect attempts cannot reset a port without a file descriptor (see protocol_hilsim), so a
connect to a board running its application takes about 1.7 s; tests that are not about the
reset start from a board already held in its bootloader, where esptool connects at once.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial
from esptool.cmds import attach_flash, detect_chip, read_flash, run_stub, write_flash
from esptool.loader import ESPLoader
from esptool.util import FatalError

from hil.drivers.esp import EspFlasher, _esptool_output
from hil.errors import RigFault
from hil.sim.esp32 import (
    ROM_BAUD,
    STRAP_SAMPLE_DELAY,
    Esp32Board,
    Esp32Registers,
    Mode,
    Op,
    RomLoader,
    Send,
    SetBaud,
    SlipDecoder,
    StubLoader,
    board_for,
    checksum,
    format_mac,
    slip_encode,
)
from hil.sim.flash import SimFlash
from hil.sim.protocol_hilsim import state_dir_of

APP_OFFSET = 0x10000
IMAGE_SIZE = 256 * 1024
CONNECT_ATTEMPTS = 3     # two that cannot reset a URL port, one classic DTR/RTS reset


# ----------------------------------------------------------------------------- helpers
def url_of(state_dir: Path) -> str:
    return f"hilsim://{state_dir}"


def flash_bytes(state_dir: Path, address: int, length: int) -> bytes:
    with SimFlash(state_dir / "flash.bin", size=4 * 1024 * 1024) as flash:
        return flash.read(address, length)


def compressible_image() -> bytes:
    rng = random.Random(7)
    words = [rng.randbytes(16) for _ in range(64)]
    return b"".join(rng.choice(words) for _ in range(IMAGE_SIZE // 16))


def incompressible_image() -> bytes:
    return random.Random(11).randbytes(IMAGE_SIZE)


def hold_in_bootloader(state_dir: Path) -> None:
    """esptool's classic reset sequence through pyserial's dtr/rts, then close: the board
    waits in its ROM bootloader (closing drops both lines at once, which resets nothing)."""
    with serial.serial_for_url(url_of(state_dir), baudrate=ROM_BAUD) as port:
        port.dtr = False
        port.rts = True          # EN low
        time.sleep(0.01)
        port.dtr = True          # EN released (both asserted)...
        port.rts = False         # ...and IO0 low before the chip samples it
        time.sleep(STRAP_SAMPLE_DELAY * 2)
        port.dtr = False
        assert b"waiting for download" in port.read(port.in_waiting)
    assert board_for(state_dir).mode is Mode.DOWNLOAD


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "esp32-board"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "app.bin"
    path.write_bytes(compressible_image())
    return path


@pytest.fixture
def rom(state_dir: Path) -> Iterator[ESPLoader]:
    """esptool's ROM loader object on a board held in its bootloader; the port closed after."""
    hold_in_bootloader(state_dir)
    with _esptool_output():
        esp = detect_chip(url_of(state_dir), connect_attempts=1)
    try:
        yield esp
    finally:
        esp._port.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------- sans-IO model
def test_slip_frames_survive_escapes_noise_and_split_reads() -> None:
    payloads = [b"\x00\xc0\xdb\xdc\xdd", b"plain", b"\xdb\xdb\xc0\xc0"]
    stream = b"boot banner noise\r\n" + b"".join(slip_encode(p) for p in payloads)
    decoder = SlipDecoder()
    frames = [frame for index in range(0, len(stream), 3)
              for frame in decoder.feed(stream[index:index + 3])]
    assert frames == payloads
    assert decoder.feed(b"\xc0\xdb\x01\xc0" + slip_encode(b"ok")) == [b"ok"]   # bad escape


def test_checksum_is_the_roms_xor_seeded_with_0xef() -> None:
    rng = random.Random(3)
    for size in (0, 1, 2, 3, 1023, 16384):
        block = rng.randbytes(size)
        expected = 0xEF
        for byte in block:
            expected ^= byte
        assert checksum(block) == expected == ESPLoader.checksum(block)


def request(op: int, data: bytes = b"", chk: int = 0) -> bytes:
    return struct.pack("<BBHI", 0, op, len(data), chk) + data


def test_rom_answers_sync_eight_times_and_the_stub_with_value_zero(tmp_path: Path) -> None:
    board = Esp32Board(tmp_path)
    rom = RomLoader(board._hw)
    sync = request(Op.SYNC, b"\x07\x07\x12\x20" + b"\x55" * 32)
    answers = rom.handle(sync)
    assert len(answers) == 8
    assert all(isinstance(a, Send) and a.packet == bytes.fromhex("010804000720555500000000")
               for a in answers)
    stub_answers = StubLoader(rom).handle(sync)
    assert [a.packet for a in stub_answers if isinstance(a, Send)] == \
        [bytes.fromhex("0108020000000000" "0000")] * 8


def test_rom_and_stub_word_failures_as_esptool_decodes_them(tmp_path: Path) -> None:
    board = Esp32Board(tmp_path)
    rom = RomLoader(board._hw)
    stub = StubLoader(rom)
    # An ESP32 ROM has no GET_SECURITY_INFO: "received message is invalid".
    assert rom.handle(request(Op.GET_SECURITY_INFO)) == [
        Send(bytes.fromhex("011404000000000001050000"))]
    assert stub.handle(request(Op.GET_SECURITY_INFO)) == [
        Send(bytes.fromhex("01140200000000" "00ff00"))]
    # CHANGE_BAUDRATE: answered at the old rate, then the switch.
    assert stub.handle(request(Op.CHANGE_BAUDRATE, struct.pack("<II", 460800, 115200)))[1:] \
        == [SetBaud(460800)]


def test_registers_hold_the_chip_magic_the_mac_and_a_flash_that_answers_rdid() -> None:
    mac = bytes.fromhex("240ac4a1b2c3")
    registers = Esp32Registers(mac, 4 * 1024 * 1024)
    assert registers.read(0x40001000) == 0x00F01D83
    word2, word1 = registers.read(0x3FF5A008), registers.read(0x3FF5A004)
    assert struct.pack(">II", word2, word1)[2:8] == mac     # how esptool reads the MAC
    spi = 0x3FF42000
    registers.write(spi + 0x1C, 1 << 31 | 1 << 28)           # USR: command + MISO
    registers.write(spi + 0x2C, 23)                          # 24 bits in
    registers.write(spi + 0x24, 7 << 28 | 0x9F)              # RDID
    registers.write(spi + 0x80, 0)
    registers.write(spi + 0x00, 1 << 18)                     # go
    assert registers.read(spi + 0x00) & (1 << 18) == 0       # done at once
    assert registers.read(spi + 0x80) == 0x1640EF            # Winbond, 2**0x16 bytes


def test_reset_circuit_ignores_an_open_and_boots_on_en_pulses(tmp_path: Path) -> None:
    clock = FakeClock()
    board = Esp32Board(tmp_path, clock=clock, self_timed=False)
    heard: list[bytes] = []
    boots: list[str] = []
    board.on_boot = lambda: boots.append("boot")
    board.on_reset = lambda: boots.append("reset")
    board.attach(lambda data, baud: heard.append(data))
    try:
        board.set_lines(dtr=True, rts=True)        # a port opens: both lines at once
        clock.now += 1
        assert board.mode is Mode.APP
        assert boots == []
        board.set_lines(dtr=False, rts=True)       # EN low
        assert board.mode is Mode.RESET
        assert boots == ["reset"]
        board.set_lines(dtr=False, rts=False)      # EN released, IO0 high
        clock.now += STRAP_SAMPLE_DELAY
        assert board.mode is Mode.APP
        assert boots == ["reset", "boot"]
        assert b"boot:0x13 (SPI_FAST_FLASH_BOOT)" in b"".join(heard)
        # esptool's tight sequence: EN low, then EN released with IO0 low, IO0 high 50 ms later.
        board.set_lines(dtr=False, rts=True)
        clock.now += 0.1
        board.set_lines(dtr=True, rts=False)
        clock.now += 0.05
        board.set_lines(dtr=False, rts=False)
        assert board.mode is Mode.DOWNLOAD
        assert b"waiting for download" in heard[-1]
        # A software reset keeps the latched download strapping; the firmware sees no boot.
        board.software_reset()
        assert board.mode is Mode.DOWNLOAD
        assert boots == ["reset", "boot", "reset"]
    finally:
        board.detach()


def test_console_hooks_carry_the_applications_io_only_while_it_runs(tmp_path: Path) -> None:
    clock = FakeClock()
    board = Esp32Board(tmp_path, clock=clock, self_timed=False)
    heard: list[tuple[bytes, int]] = []
    typed: list[bytes] = []
    board.on_console_input = typed.append
    board.attach(lambda data, baud: heard.append((data, baud)))
    try:
        board.receive(b"sys version\r\n", ROM_BAUD)
        board.console_write(b"version=1.0\r\nOK\r\n")
        assert typed == [b"sys version\r\n"]
        assert heard == [(b"version=1.0\r\nOK\r\n", ROM_BAUD)]
        board.receive(b"typed at the wrong rate", 9600)
        assert typed[-1]
        assert typed[-1] == bytes(len(typed[-1]))     # garbage, not the text
        board.set_lines(dtr=False, rts=True)                          # held in reset
        board.console_write(b"lost")
        board.receive(b"lost", ROM_BAUD)
        assert heard[-1][0] == b"version=1.0\r\nOK\r\n"
        assert len(typed) == 2
    finally:
        board.detach()


def test_the_mac_is_derived_once_per_state_dir_and_kept(tmp_path: Path) -> None:
    first = Esp32Board(tmp_path / "a")
    assert first.mac[:3] == bytes.fromhex("240ac4")
    assert Esp32Board(tmp_path / "a").mac == first.mac
    assert Esp32Board(tmp_path / "b").mac != first.mac
    stored = json.loads((tmp_path / "a" / "esp32.json").read_text())
    assert stored == {"mac": format_mac(first.mac)}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "esp32.json").write_text('{"mac": "24:0a:c4:00:00:01"}')
    assert Esp32Board(tmp_path / "c").mac == bytes.fromhex("240ac4000001")


# ----------------------------------------------------------------------- the URL handler
def test_urls_name_a_state_dir_and_a_board_takes_one_port(state_dir: Path) -> None:
    assert state_dir_of("hilsim:///tmp/x%20y") == Path("/tmp/x y")
    assert state_dir_of("hilsim://relative/dir") == Path("relative/dir")
    for bad in ("hilsim://", "hilsim:///tmp/x?baud=1", "loop://"):
        with pytest.raises(serial.SerialException):
            state_dir_of(bad)
    with serial.serial_for_url(url_of(state_dir), timeout=0) as port:
        assert port.read(10) == b""                        # the application is silent
        with pytest.raises(serial.SerialException, match="already open"):
            serial.serial_for_url(url_of(state_dir))
        with pytest.raises(OSError, match="no file descriptor"):
            port.fileno()
    with serial.serial_for_url(url_of(state_dir)) as port:   # free again after close
        assert port.is_open


def test_read_waits_for_the_timeout_and_returns_what_came(state_dir: Path) -> None:
    with serial.serial_for_url(url_of(state_dir), baudrate=ROM_BAUD, timeout=0.2) as port:
        start = time.monotonic()
        assert port.read(1) == b""
        assert 0.19 <= time.monotonic() - start < 1.0
        board_for(state_dir).console_write(b"hello")
        assert port.read(100) == b"hello"
        port.baudrate = 9600                               # a port at the wrong rate
        board_for(state_dir).console_write(b"hello")
        assert port.read(100) == b"\x00"                    # ~1 bit time fits: one framing error


# ------------------------------------------------------------------ esptool through the driver
def test_esp_flasher_programs_256k_and_esptool_verifies_the_md5(
        state_dir: Path, image: Path) -> None:
    flasher = EspFlasher(port=url_of(state_dir), connect_attempts=CONNECT_ATTEMPTS)
    start = time.monotonic()
    flasher.open()
    try:
        connected = time.monotonic()
        flasher.program(image)
        done = time.monotonic()
        assert board_for(state_dir).mode is Mode.STUB
        assert board_for(state_dir).uart_baud == 460800
    finally:
        flasher.close()
    print(f"\nconnect from a running app: {connected - start:.2f} s; "
          f"256 KiB compressed write + md5: {(done - connected) * 1000:.1f} ms")
    assert flash_bytes(state_dir, APP_OFFSET, IMAGE_SIZE) == image.read_bytes()
    assert flash_bytes(state_dir, APP_OFFSET + IMAGE_SIZE, 4096) == b"\xff" * 4096


def test_an_incompressible_image_goes_uncompressed_through_the_stub(
        state_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "random.bin"
    image.write_bytes(incompressible_image())
    hold_in_bootloader(state_dir)
    with EspFlasher(port=url_of(state_dir), connect_attempts=1) as flasher:
        start = time.monotonic()
        flasher.program(image)           # esptool: "Cannot compress ... will flash uncompressed"
        elapsed = time.monotonic() - start
    print(f"\n256 KiB uncompressed write (FLASH_BEGIN/DATA/END) + md5: {elapsed * 1000:.1f} ms")
    assert flash_bytes(state_dir, APP_OFFSET, IMAGE_SIZE) == image.read_bytes()


def test_read_mac_is_the_stable_mac_of_the_state_dir(state_dir: Path) -> None:
    hold_in_bootloader(state_dir)
    with EspFlasher(port=url_of(state_dir), connect_attempts=1) as flasher:
        mac = flasher.read_mac()
    assert mac == format_mac(board_for(state_dir).mac)
    assert json.loads((state_dir / "esp32.json").read_text())["mac"] == mac
    hold_in_bootloader(state_dir)            # the stub left at 460800 Bd: back to the ROM
    with EspFlasher(port=url_of(state_dir), connect_attempts=1) as flasher:
        assert flasher.read_mac() == mac


def test_reset_boots_the_application_once_and_a_second_program_reconnects(
        state_dir: Path, image: Path) -> None:
    board = board_for(state_dir)
    events: list[str] = []
    board.on_boot = lambda: events.append("boot")
    board.on_reset = lambda: events.append("reset")
    with EspFlasher(port=url_of(state_dir), connect_attempts=CONNECT_ATTEMPTS) as flasher:
        assert events == []                         # an open port resets nothing
        flasher.program(image)
        assert events[:1] == ["reset"]              # the app stopped for the download reset
        flasher.reset()
        deadline = time.monotonic() + 2
        while not events[1:] and time.monotonic() < deadline:
            time.sleep(0.005)                       # the chip leaves reset on its own
        assert events == ["reset", "boot"]
        assert board.mode is Mode.APP
        image.write_bytes(image.read_bytes()[::-1])
        flasher.program(image)                      # reconnects: reset into download again
        assert events == ["reset", "boot", "reset"]
    assert flash_bytes(state_dir, APP_OFFSET, IMAGE_SIZE) == image.read_bytes()
    assert board.boot_count == 1


def test_a_reset_alone_is_one_pulse_of_en_into_the_application(state_dir: Path) -> None:
    """A reset (how a shipped board's attempt is started) never passes through download mode:
    a reset into the bootloader first would boot the application on its own whenever the
    strap is missed, and that boot's check would begin an attempt the test did not make."""
    board = board_for(state_dir)
    booted_before = board.boot_count
    events: list[str] = []
    board.on_boot = lambda: events.append("boot")
    board.on_reset = lambda: events.append("reset")
    with EspFlasher(port=url_of(state_dir), connect_attempts=CONNECT_ATTEMPTS) as flasher:
        flasher.reset()
        deadline = time.monotonic() + 5
        while not events[1:] and time.monotonic() < deadline:
            time.sleep(0.005)                       # the chip leaves reset on its own
    assert events == ["reset", "boot"]
    assert board.mode is Mode.APP
    assert board.boot_count == booted_before + 1


def test_a_corrupted_block_checksum_fails_the_write_instead_of_hanging(
        state_dir: Path, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hold_in_bootloader(state_dir)
    with EspFlasher(port=url_of(state_dir), connect_attempts=1) as flasher:
        flasher.read_mac()                          # connected, stub running
        monkeypatch.setattr(ESPLoader, "checksum",
                            staticmethod(lambda data, state=0xEF: 0x5A))
        start = time.monotonic()
        with pytest.raises(RigFault, match=r"result was C100: Bad data checksum"):
            flasher.program(image)
        assert time.monotonic() - start < 5


# --------------------------------------------------------------- esptool.cmds on the URL
def test_the_rom_path_without_the_stub_writes_verifies_and_reads(
        rom: ESPLoader, state_dir: Path) -> None:
    assert rom.CHIP_NAME == "ESP32"
    assert not rom.IS_STUB
    assert rom.get_chip_description() == "ESP32-D0WD-V3 (revision v3.0)"
    assert rom.get_crystal_freq() == 40
    data = incompressible_image()[:8192] + b"tail"
    with _esptool_output():
        attach_flash(rom)                           # SPI_ATTACH from the eFuse pads, SFDP check
        write_flash(rom, [(0x20000, data)])         # FLASH_BEGIN/DATA (1 KiB blocks), ROM md5
        assert read_flash(rom, 0x20000, 200) == data[:200]     # READ_FLASH_SLOW, 64 B at a time
        write_flash(rom, [(0x30000, data * 4)], compress=True)  # FLASH_DEFL_* in the ROM
    assert flash_bytes(state_dir, 0x20000, len(data)) == data
    assert flash_bytes(state_dir, 0x30000, len(data) * 4) == data * 4


def test_a_bad_checksum_gets_the_roms_error_answer(rom: ESPLoader) -> None:
    with _esptool_output():
        attach_flash(rom)
        rom.flash_begin(1024, 0x40000)
        block = b"\x12" * 1024
        with pytest.raises(FatalError, match=r"result was 0107: Checksum error"):
            rom.check_command("write to target flash", rom.ESP_CMDS["FLASH_DATA"],
                              struct.pack("<IIII", len(block), 0, 0, 0) + block,
                              checksum(block) ^ 0xFF)
        rom.flash_block(block, 0)                   # the ROM is still listening


def test_the_stub_streams_read_flash_as_in_flash_bin(rom: ESPLoader, state_dir: Path) -> None:
    region = incompressible_image()[:20000]
    with _esptool_output():
        stub = run_stub(rom)
        attach_flash(stub)
        write_flash(stub, [(0x1F000, region)])
        assert read_flash(stub, 0x1F000, len(region) + 100) == \
            flash_bytes(state_dir, 0x1F000, len(region) + 100)
        stub.erase_region(0x20000, 0x1000)
        assert stub.flash_md5sum(0x20000, 0x1000) == hashlib.md5(b"\xff" * 0x1000).hexdigest()
        stub.erase_flash()
        assert stub.flash_md5sum(0x1F000, 0x1000) == hashlib.md5(b"\xff" * 0x1000).hexdigest()


def test_a_stub_left_running_is_found_by_sync(state_dir: Path, image: Path) -> None:
    hold_in_bootloader(state_dir)
    with EspFlasher(port=url_of(state_dir), connect_attempts=1) as flasher:
        flasher.program(image)
    assert board_for(state_dir).mode is Mode.STUB      # closing the port reset nothing
    with _esptool_output():   # at the stub's rate: at 115200 Bd the stub would hear garbage
        esp = detect_chip(url_of(state_dir), baud=460800, connect_attempts=1)
    try:
        assert esp.IS_STUB
        assert esp.sync_stub_detected
        assert esp.flash_md5sum(APP_OFFSET, IMAGE_SIZE) == \
            hashlib.md5(image.read_bytes()).hexdigest()
    finally:
        esp._port.close()


def test_nothing_answers_while_the_board_is_held_in_reset(state_dir: Path) -> None:
    port = serial.serial_for_url(url_of(state_dir), timeout=0.05)
    try:
        port.dtr, port.rts = False, True              # EN held low
        assert board_for(state_dir).mode is Mode.RESET
        with _esptool_output(), pytest.raises(FatalError, match="Failed to connect"):
            detect_chip(port, connect_attempts=1, connect_mode="no-reset")
    finally:
        port.close()                                  # esptool closed it already: harmless
    deadline = time.monotonic() + 2                   # the close released EN: it boots
    while board_for(state_dir).mode is not Mode.APP and time.monotonic() < deadline:
        time.sleep(0.005)
    assert board_for(state_dir).mode is Mode.APP
