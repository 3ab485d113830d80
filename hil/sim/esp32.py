"""A simulated ESP32 as esptool sees it: the ROM serial bootloader, the flasher stub esptool
uploads into RAM, the reset circuit on DTR/RTS, and the eFuses that name the chip and its MAC.

Layers, innermost first:

- ``SlipDecoder`` / ``slip_encode``: the framing of the serial protocol.
- ``Esp32Registers``: what ``READ_REG``/``WRITE_REG`` reach: the chip-detect magic word, the
  eFuse words (MAC, revision), the UART clock divider, the RTC calibration, the strapping
  register, and the SPI1 flash controller, whose "user commands" esptool drives register by
  register to read the flash JEDEC ID and SFDP table.
- ``RomLoader`` and ``StubLoader``: sans-IO command handlers. A frame (one request) in, a tuple
  of effects out (``Send`` a response, ``SetBaud``, ``Jump`` to RAM code, ``Reboot``,
  ``RunUserCode``). They differ where the real ones differ: the ROM answers with 4 status bytes
  (``01 07 00 00`` = failed, checksum error), the stub with a big-endian code (``C1 00``); the
  ROM erases the whole region at FLASH_BEGIN, the stub erases sector by sector as data arrives;
  the ROM answers SPI_FLASH_MD5 in hex text, the stub in 16 raw bytes; the stub acknowledges a
  data block before writing it, so a write failure is reported on the next command; only the
  stub has READ_FLASH, ERASE_FLASH and ERASE_REGION, only the ROM READ_FLASH_SLOW. Both count
  what they erase, program and hash for the host (``FlashOps``, ``Esp32Board.flash_ops``).
- ``Esp32Board``: the chip on its board. DTR/RTS drive EN and IO0 through the usual two-transistor
  auto-program circuit (ESP32-DevKitC): EN is pulled low only while RTS is asserted and DTR is
  not, IO0 only while DTR is asserted and RTS is not, so opening a port (both asserted) resets
  nothing. The RC on EN delays the release of reset: the chip samples IO0 ``STRAP_SAMPLE_DELAY``
  after EN rises, which is what lets esptool's sequences (EN low; then IO0 low as EN rises;
  IO0 high again 50 ms later) enter download mode and a plain EN pulse boot the application.
  The board prints the ROM's boot banner at 115200 Bd (esptool reads it to tell the boot mode),
  runs the ROM loader, then the stub, and leaves for the application on a normal boot.

Hooks for the firmware model (not implemented here): ``on_boot()`` is called each time the chip
boots its application from flash, ``on_reset()`` each time the running application stops (EN
pulled low, a software reset), ``on_console_input(data)`` with what the host writes while the
application runs; the firmware answers with ``console_write(data)``, reboots with
``software_reset()``, and crashes with ``panic(output)`` (ESP-IDF's panic handler output,
``panic_output``, then a restart, as its default "print registers and reboot" does). Hooks
run on the thread that caused them (the host's port thread, or a timer thread when the boot
follows an EN release by itself), outside the board's lock, so they may call back into the
board; they should return quickly.

What is modelled loosely: the code uploaded to RAM and started by MEM_END is taken to be the
flasher stub (any entry point inside uploaded RAM starts it; another one halts the chip); wire
time is not simulated (a 115200 Bd port moves data as fast as a 2 MBd one); a baud rate mismatch
turns bytes into NULs rather than random noise.

State lives in ``<state_dir>``: ``flash.bin`` (4 MiB of NOR through ``SimFlash``, base 0) and
``esp32.json`` (the base MAC, derived once from the directory's path, then kept). One
``Esp32Board`` per state directory and process: ``board_for(state_dir)``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hil.sim.flash import SimFlash

FLASH_SIZE = 4 * 1024 * 1024
SECTOR_SIZE = 4096
ROM_BAUD = 115200               # the ROM and the application console start at this rate
# EN's RC: the chip leaves reset, and samples IO0, this long after EN rises. esptool's sequences
# keep IO0 low for 50 ms after that edge; its classic one pulls IO0 low a moment *after* EN
# rises (two pyserial calls), so the sample must come later than that moment, and before 50 ms.
STRAP_SAMPLE_DELAY = 0.030
ESPRESSIF_OUI = bytes.fromhex("240ac4")
STATE_FILE = "esp32.json"
FLASH_FILE = "flash.bin"

# ------------------------------------------------------------------------------------ SLIP
_END, _ESC = b"\xc0", b"\xdb"
_BAD_ESCAPE = re.compile(rb"\xdb(?![\xdc\xdd])")


def slip_encode(packet: bytes) -> bytes:
    return _END + packet.replace(_ESC, b"\xdb\xdd").replace(_END, b"\xdb\xdc") + _END


class SlipDecoder:
    """SLIP frames out of a byte stream. Bytes outside a frame (a boot banner, line noise) are
    dropped, as the ROM drops them; a frame with a bad escape is dropped whole."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._in_frame = False

    def reset(self) -> None:
        self._pending.clear()
        self._in_frame = False

    def feed(self, data: bytes) -> list[bytes]:
        frames: list[bytes] = []
        self._pending += data
        while True:
            if not self._in_frame:
                start = self._pending.find(_END)
                if start < 0:
                    self._pending.clear()
                    break
                del self._pending[:start + 1]
                self._in_frame = True
            end = self._pending.find(_END)
            if end < 0:
                break
            raw = bytes(self._pending[:end])
            del self._pending[:end + 1]
            if not raw:
                continue   # back-to-back delimiters: the previous one closed nothing
            self._in_frame = False
            if not _BAD_ESCAPE.search(raw):
                # \xdb\xdc first: unescaping \xdb\xdd cannot create a new \xdb\xdc to undo.
                frames.append(raw.replace(b"\xdb\xdc", _END).replace(b"\xdb\xdd", _ESC))
        return frames


# ------------------------------------------------------------------------------- protocol
class Op(enum.IntEnum):
    FLASH_BEGIN = 0x02
    FLASH_DATA = 0x03
    FLASH_END = 0x04
    MEM_BEGIN = 0x05
    MEM_END = 0x06
    MEM_DATA = 0x07
    SYNC = 0x08
    WRITE_REG = 0x09
    READ_REG = 0x0A
    SPI_SET_PARAMS = 0x0B
    SPI_ATTACH = 0x0D
    READ_FLASH_SLOW = 0x0E
    CHANGE_BAUDRATE = 0x0F
    FLASH_DEFL_BEGIN = 0x10
    FLASH_DEFL_DATA = 0x11
    FLASH_DEFL_END = 0x12
    SPI_FLASH_MD5 = 0x13
    GET_SECURITY_INFO = 0x14
    ERASE_FLASH = 0xD0
    ERASE_REGION = 0xD1
    READ_FLASH = 0xD2
    RUN_USER_CODE = 0xD3


SYNC_PAYLOAD = b"\x07\x07\x12\x20" + b"\x55" * 32
ROM_SYNC_VALUE = 0x55552007     # what an ESP32 ROM puts in its SYNC answers (traces show it)
CHECKSUM_SEED = 0xEF
DATA_HEADER = struct.Struct("<IIII")   # length, sequence, 0, 0 before MEM/FLASH data


class Failure(enum.Enum):
    """A failed command: (the ROM's error byte, the stub's response code), as esptool reads them."""

    BAD_DATA_LEN = (0x05, 0xC000)        # ROM: "received message is invalid"
    BAD_CHECKSUM = (0x07, 0xC100)
    INVALID_COMMAND = (0x05, 0xC300)
    FLASH_WRITE = (0x08, 0xC400)         # stub: "failed SPI operation"
    FLASH_READ = (0x09, 0xC400)
    NOT_IN_FLASH_MODE = (0x05, 0xC600)
    INFLATE = (0x0B, 0xC700)
    NOT_ENOUGH_DATA = (0x05, 0xC800)
    TOO_MUCH_DATA = (0x05, 0xC900)
    NOT_IMPLEMENTED = (0x05, 0xFF00)

    @property
    def rom_error(self) -> int:
        return self.value[0]

    @property
    def stub_code(self) -> int:
        return self.value[1]


class CommandFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.name)
        self.failure = failure


def checksum(data: bytes) -> int:
    """The ROM's data checksum: XOR of every byte, seeded with 0xEF."""
    state = CHECKSUM_SEED
    # XOR of a big integer's bytes, folded: far faster than a Python loop over 16 KiB blocks.
    folded = int.from_bytes(data, "little") if data else 0
    width = len(data)
    while width > 1:
        half = (width + 1) // 2
        folded = (folded ^ (folded >> (8 * half))) & ((1 << (8 * half)) - 1)
        width = half
    return state ^ (folded & 0xFF)


# Effects a loader asks of the board, in the order they must happen.
@dataclass(frozen=True, slots=True)
class Send:
    packet: bytes       # one SLIP payload (a response, a READ_FLASH block, "OHAI")


@dataclass(frozen=True, slots=True)
class SetBaud:
    baud: int           # after the frames sent so far, the UART runs at this rate


@dataclass(frozen=True, slots=True)
class Jump:
    entry: int          # MEM_END: run the code uploaded to RAM at this address


@dataclass(frozen=True, slots=True)
class Reboot:
    pass                # FLASH_END "reboot": a software reset (the strapping stays latched)


@dataclass(frozen=True, slots=True)
class RunUserCode:
    pass                # FLASH_END "run user code": leave the ROM for the application in flash


Effect = Send | SetBaud | Jump | Reboot | RunUserCode


# ------------------------------------------------------------------------------ registers
MAGIC_REG = 0x40001000
ESP32_MAGIC = 0x00F01D83
EFUSE_BASE = 0x3FF5A000         # EFUSE_BLK0_RDATA0..6, then BLK1..3
EFUSE_END = 0x3FF5A100
UART0_CLKDIV = 0x3FF40014
GPIO_STRAP = 0x3FF44038
RTC_CALI_CFG1 = 0x3FF5F06C
APB_CTL_DATE = 0x3FF6607C
SPI1_BASE = 0x3FF42000          # the flash controller esptool drives for user commands
SPI_CMD, SPI_ADDR, SPI_USR, SPI_USR1, SPI_USR2 = 0x00, 0x04, 0x1C, 0x20, 0x24
SPI_MOSI_DLEN, SPI_MISO_DLEN, SPI_W0 = 0x28, 0x2C, 0x80
SPI_CMD_USR = 1 << 18
SPI_USR_ADDR, SPI_USR_MISO, SPI_USR_MOSI = 1 << 30, 1 << 28, 1 << 27
STRAP_FLASH_BOOT, STRAP_DOWNLOAD_BOOT = 0x13, 0x03
# 8 MHz oscillator reading and RTC calibration such that the ROM's crystal estimate is 40 MHz
# (esptool derives the ROM's CHANGE_BAUDRATE argument and the stub's crystal from them).
_CK8M_FREQ, _RTC_CALI_VALUE = 50, 2048


def mac_crc8(mac: bytes) -> int:
    """The CRC the ESP32 burns beside its MAC (CRC-8/MAXIM), as espefuse checks it."""
    crc = 0
    for byte in mac:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc


def _sfdp_table(flash_size: int, vendor: int) -> bytes:
    """A JESD216 SFDP table: the "SFDP" signature esptool checks the flash connection with, a
    basic parameter table with the density, and a vendor table header whose ID esptool reads
    to tell an XMC chip (it must not look like one)."""
    table = bytearray(b"\xff" * 256)
    table[0:8] = b"SFDP\x06\x01\x01\xff"                      # rev 1.6, two parameter headers
    table[8:16] = bytes([0x00, 0x06, 0x01, 0x10, 0x80, 0x00, 0x00, 0xFF])   # JEDEC basic
    table[16:24] = bytes([vendor, 0x00, 0x01, 0x04, 0xC0, 0x00, 0x00, 0xFF])
    table[0x84:0x88] = struct.pack("<I", flash_size * 8 - 1)   # density in bits, minus one
    return bytes(table)


class Esp32Registers:
    """The registers esptool reads and writes over READ_REG/WRITE_REG (see the module docstring).

    ESP32-D0WD-V3, revision v3.0, 40 MHz crystal, no secure boot or flash encryption, a 4 MiB
    Winbond-like flash (JEDEC ID EF 40 16). Other addresses read back what was written (0 at
    first), like RAM; the eFuse and ROM words ignore writes."""

    def __init__(self, mac: bytes, flash_size: int) -> None:
        jedec = bytes([0xEF, 0x40, flash_size.bit_length() - 1])
        self.flash_id = jedec
        self.sfdp = _sfdp_table(flash_size, jedec[0])
        self.uart_baud = ROM_BAUD
        self.apb_hz = 40_000_000       # the ROM runs the APB from the crystal; the stub at 80 MHz
        self.strap = STRAP_FLASH_BOOT
        efuse = [0] * 64
        efuse[1] = int.from_bytes(mac[2:6], "big")
        efuse[2] = (mac_crc8(mac) << 16) | (mac[0] << 8) | mac[1]
        efuse[3] = (1 << 15) | (1 << 9)      # revision bit 0; package D0WD
        efuse[4] = _CK8M_FREQ
        efuse[5] = 1 << 20                   # revision bit 1 (with APB_CTL_DATE bit 31: v3)
        self._efuse = efuse
        self._fixed = {MAGIC_REG: ESP32_MAGIC, APB_CTL_DATE: 0x80000000 | 0x16042000,
                       RTC_CALI_CFG1: _RTC_CALI_VALUE << 7}
        self._ram: dict[int, int] = {}

    def read(self, address: int) -> int:
        if EFUSE_BASE <= address < EFUSE_END:
            return self._efuse[(address - EFUSE_BASE) // 4]
        if address in self._fixed:
            return self._fixed[address]
        if address == UART0_CLKDIV:
            return round(self.apb_hz / self.uart_baud) & 0xFFFFF
        if address == GPIO_STRAP:
            return self.strap
        return self._ram.get(address, 0)

    def write(self, address: int, value: int, mask: int = 0xFFFFFFFF) -> None:
        if EFUSE_BASE <= address < EFUSE_END or address in self._fixed:
            return
        merged = (self._ram.get(address, 0) & ~mask | value & mask) & 0xFFFFFFFF
        self._ram[address] = merged
        if address == SPI1_BASE + SPI_CMD and merged & SPI_CMD_USR:
            self._run_spi_user_command()
            self._ram[address] = merged & ~SPI_CMD_USR   # done at once: the poll sees it clear

    def _spi(self, offset: int) -> int:
        return self._ram.get(SPI1_BASE + offset, 0)

    def _run_spi_user_command(self) -> None:
        """Run the SPI flash command set up in SPI1's user registers, as the hardware would:
        command byte from USR2, address from ADDR (its top bits), data out of W0.., and the
        answer (MISO) into W0.. for the bits read, the rest of W0 left as it was."""
        usr = self._spi(SPI_USR)
        command = self._spi(SPI_USR2) & 0xFF
        address = None
        if usr & SPI_USR_ADDR:
            address_bits = ((self._spi(SPI_USR1) >> 26) & 0x3F) + 1
            address = self._spi(SPI_ADDR) >> (32 - address_bits)
        if not usr & SPI_USR_MISO:
            return      # status writes, write enable, reset, power down: nothing to answer
        read_bits = (self._spi(SPI_MISO_DLEN) & 0xFFFFFF) + 1
        count = (read_bits + 7) // 8
        if command == 0x9F:                       # RDID
            answer = self.flash_id
        elif command == 0x5A and address is not None:   # RDSFDP
            answer = self.sfdp[address:address + count]
        elif command in (0x05, 0x35, 0x15):       # RDSR, RDSR2, RDSR3: idle, unprotected
            answer = bytes(count)
        else:
            answer = b""
        answer = (answer + b"\xff" * count)[:count]   # an unanswered MISO reads as ones
        for index in range(0, count, 4):
            chunk = answer[index:index + 4]
            mask = (1 << (8 * len(chunk))) - 1
            register = SPI1_BASE + SPI_W0 + index
            old = self._ram.get(register, 0)
            self._ram[register] = (old & ~mask) | int.from_bytes(chunk, "little")


# -------------------------------------------------------------------------------- loaders
@dataclass
class _FlashWrite:
    """A FLASH_BEGIN / FLASH_DEFL_BEGIN in progress."""

    cursor: int                     # where the next decoded byte goes
    remaining: int                  # bytes the host announced and has not written yet
    erase_end: int                  # the stub erases sector by sector up to here
    erased_to: int
    inflater: zlib._Decompress | None = None


@dataclass
class _MemWrite:
    address: int
    cursor: int
    remaining: int


@dataclass
class _FlashRead:
    """A stub READ_FLASH streaming: one block in flight, each acknowledged by the host."""

    cursor: int
    end: int
    packet_size: int
    md5: hashlib._Hash = field(default_factory=lambda: hashlib.md5(usedforsecurity=False))


@dataclass
class FlashOps:
    """What the loaders (ROM and stub) did to the flash for the host, for the tests and
    benchmarks that prove what a flasher did (not) write: bytes erased (whole sectors) and
    programmed, and the SPI_FLASH_MD5 regions hashed; and what the host sent the bootloader
    (``received`` bytes, SLIP-framed as on the wire) with the time those bytes take on a real
    UART at the rate they were sent (``wire_s``, 10 bits a byte), which the simulation does not
    spend. The firmware model's own writes (an OTA install) do not count: they do not come
    through the serial protocol."""

    erased: int = 0
    programmed: int = 0
    md5_regions: int = 0
    md5_bytes: int = 0
    received: int = 0
    wire_s: float = 0.0

    def reset(self) -> None:
        self.erased = self.programmed = self.md5_regions = self.md5_bytes = self.received = 0
        self.wire_s = 0.0


class Hardware:
    """What the loaders act on: the flash (open while a host port or the firmware model holds
    it), the registers, and the RAM code was uploaded to."""

    def __init__(self, registers: Esp32Registers) -> None:
        self.registers = registers
        self.flash: SimFlash | None = None
        self.ram_segments: dict[int, bytearray] = {}
        self.flash_ops = FlashOps()

    def need_flash(self) -> SimFlash:
        if self.flash is None:
            raise CommandFailed(Failure.FLASH_READ)
        return self.flash


class RomLoader:
    """The ESP32 ROM serial bootloader: one request frame in, effects out."""

    STATUS_BYTES = 4
    IS_STUB = False

    def __init__(self, hardware: Hardware) -> None:
        self.hw = hardware
        self.flash_attached = False
        self.flash_size = FLASH_SIZE     # SPI_SET_PARAMS may say otherwise
        self._flash_write: _FlashWrite | None = None
        self._mem_write: _MemWrite | None = None
        self._handlers: dict[int, Callable[[bytes, int], tuple[int, bytes, list[Effect]]]] = {
            Op.SYNC: self._sync,
            Op.READ_REG: self._read_reg,
            Op.WRITE_REG: self._write_reg,
            Op.MEM_BEGIN: self._mem_begin,
            Op.MEM_DATA: self._mem_data,
            Op.MEM_END: self._mem_end,
            Op.SPI_ATTACH: self._spi_attach,
            Op.SPI_SET_PARAMS: self._spi_set_params,
            Op.CHANGE_BAUDRATE: self._change_baudrate,
            Op.FLASH_BEGIN: self._flash_begin,
            Op.FLASH_DATA: self._flash_data,
            Op.FLASH_END: self._flash_end,
            Op.FLASH_DEFL_BEGIN: self._flash_defl_begin,
            Op.FLASH_DEFL_DATA: self._flash_data,
            Op.FLASH_DEFL_END: self._flash_end,
            Op.SPI_FLASH_MD5: self._spi_flash_md5,
            Op.READ_FLASH_SLOW: self._read_flash_slow,
        }

    # ----------------------------------------------------------------------------- framing
    def handle(self, frame: bytes) -> list[Effect]:
        """One request frame: ``00 op len16 chk32 data``. Frames that are no request (too short,
        a response, a length that disagrees with the data) get an "invalid message" answer."""
        if len(frame) < 8:
            return []
        direction, op, length, chk = struct.unpack_from("<BBHI", frame)
        data = frame[8:]
        if direction != 0 or length != len(data):
            return [Send(self.response(op, failure=Failure.BAD_DATA_LEN))]
        handler = self._handlers.get(op)
        if handler is None:
            return [Send(self.response(op, failure=self.unknown_command_failure(op)))]
        try:
            value, payload, effects = handler(data, chk)
        except CommandFailed as failed:
            return [Send(self.response(op, failure=failed.failure))]
        return [Send(self.response(op, value, payload)), *effects]

    def unknown_command_failure(self, op: int) -> Failure:
        return Failure.INVALID_COMMAND

    def response(self, op: int, value: int = 0, payload: bytes = b"",
                 failure: Failure | None = None) -> bytes:
        """ROM answers end with four status bytes: 0 or 1 (failed), the error, two reserved."""
        status = bytes([0, 0, 0, 0]) if failure is None else bytes([1, failure.rom_error, 0, 0])
        body = payload + status
        return struct.pack("<BBHI", 1, op, len(body), value) + body

    # ----------------------------------------------------------------------------- commands
    def _sync(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if data != SYNC_PAYLOAD:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        # Eight answers to one SYNC: the command's own, and seven more.
        extra: list[Effect] = [Send(self.response(Op.SYNC, self.sync_value()))
                               for _ in range(7)]
        return self.sync_value(), b"", extra

    def sync_value(self) -> int:
        return ROM_SYNC_VALUE

    def _read_reg(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 4:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        return self.hw.registers.read(struct.unpack("<I", data)[0]), b"", []

    def _write_reg(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if not data or len(data) % 16:
            raise CommandFailed(Failure.NOT_ENOUGH_DATA)
        for address, value, mask, _delay_us in struct.iter_unpack("<IIII", data):
            self.hw.registers.write(address, value, mask)
        return 0, b"", []

    def _mem_begin(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 16:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        size, _blocks, _block_size, address = struct.unpack("<IIII", data)
        self.hw.ram_segments[address] = bytearray()
        self._mem_write = _MemWrite(address=address, cursor=address, remaining=size)
        return 0, b"", []

    def _block(self, data: bytes, chk: int) -> bytes:
        """The data of a MEM_DATA/FLASH_DATA frame, its length and checksum verified."""
        if len(data) < DATA_HEADER.size:
            raise CommandFailed(Failure.NOT_ENOUGH_DATA)
        length = DATA_HEADER.unpack_from(data)[0]
        block = data[DATA_HEADER.size:]
        if length != len(block):
            raise CommandFailed(Failure.TOO_MUCH_DATA)
        if checksum(block) != chk:
            raise CommandFailed(Failure.BAD_CHECKSUM)
        return block

    def _mem_data(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        write = self._mem_write
        if write is None:
            raise CommandFailed(Failure.NOT_IN_FLASH_MODE)
        block = self._block(data, chk)
        if len(block) > write.remaining:
            raise CommandFailed(Failure.TOO_MUCH_DATA)
        self.hw.ram_segments[write.address] += block
        write.cursor += len(block)
        write.remaining -= len(block)
        return 0, b"", []

    def _mem_end(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 8:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        if self._mem_write is None:
            raise CommandFailed(Failure.NOT_IN_FLASH_MODE)
        self._mem_write = None
        no_jump, entry = struct.unpack("<II", data)
        return 0, b"", [] if no_jump else [Jump(entry)]

    def _spi_attach(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != self.spi_attach_length():
            raise CommandFailed(Failure.BAD_DATA_LEN)
        self.flash_attached = True
        return 0, b"", []

    def spi_attach_length(self) -> int:
        return 8         # the pin configuration word and the ROM's extra "legacy" word

    def _spi_set_params(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 24:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        self.flash_size = struct.unpack_from("<II", data)[1]
        return 0, b"", []

    def _change_baudrate(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 8:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        baud = struct.unpack_from("<I", data)[0]
        if baud <= 0:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        return 0, b"", [SetBaud(baud)]       # answered at the old rate, then switched

    def _flash(self, address: int, length: int, failure: Failure) -> SimFlash:
        """The attached flash, if ``address..+length`` lies in it."""
        flash = self.hw.flash
        if (not self.flash_attached or flash is None or length < 0
                or not flash.contains(address, max(length, 1))
                or address + length > self.flash_size):
            raise CommandFailed(failure)
        return flash

    def _begin(self, data: bytes, *, compressed: bool) -> _FlashWrite:
        if len(data) not in self.flash_begin_lengths():
            raise CommandFailed(Failure.BAD_DATA_LEN)
        size, _blocks, _block_size, offset = struct.unpack_from("<IIII", data)
        write = _FlashWrite(cursor=offset, remaining=size,
                            erase_end=-(-(offset + size) // SECTOR_SIZE) * SECTOR_SIZE,
                            erased_to=offset - offset % SECTOR_SIZE,
                            inflater=zlib.decompressobj() if compressed else None)
        if size:
            self._flash(offset, size, Failure.FLASH_WRITE)
        self.start_erase(write)
        self._flash_write = write
        return write

    def flash_begin_lengths(self) -> tuple[int, ...]:
        return (16,)     # the ESP32 ROM knows no "encrypted" word

    def start_erase(self, write: _FlashWrite) -> None:
        """The ROM erases the whole region before it answers FLASH_BEGIN."""
        if write.erase_end > write.erased_to:
            self._flash(write.erased_to, write.erase_end - write.erased_to,
                        Failure.FLASH_WRITE).erase(write.erased_to,
                                                   write.erase_end - write.erased_to)
            self.hw.flash_ops.erased += write.erase_end - write.erased_to
        write.erased_to = write.erase_end

    def _flash_begin(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        self._begin(data, compressed=False)
        return 0, b"", []

    def _flash_defl_begin(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        self._begin(data, compressed=True)
        return 0, b"", []

    def _flash_data(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        write = self._flash_write
        if write is None:
            raise CommandFailed(Failure.NOT_IN_FLASH_MODE)
        block = self._block(data, chk)
        self.accept_block(write, block)
        return 0, b"", []

    def accept_block(self, write: _FlashWrite, block: bytes) -> None:
        """The ROM decodes and writes a block before it answers."""
        self.write_block(write, block)

    def write_block(self, write: _FlashWrite, block: bytes) -> None:
        if write.inflater is not None:
            try:
                block = write.inflater.decompress(block)
            except zlib.error as err:
                raise CommandFailed(Failure.INFLATE) from err
            if len(block) > write.remaining:
                raise CommandFailed(Failure.TOO_MUCH_DATA)
        else:
            block = self.clip_block(write, block)
        if not block:
            return
        flash = self._flash(write.cursor, len(block), Failure.FLASH_WRITE)
        self.erase_ahead(write, write.cursor + len(block))
        flash.program(write.cursor, block)
        self.hw.flash_ops.programmed += len(block)
        write.cursor += len(block)
        write.remaining = max(0, write.remaining - len(block))

    def clip_block(self, write: _FlashWrite, block: bytes) -> bytes:
        return block     # the ROM programs the padding too (0xFF programs nothing on NOR)

    def erase_ahead(self, write: _FlashWrite, end: int) -> None:
        pass             # the ROM erased everything at FLASH_BEGIN

    def _flash_end(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 4:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        self._flash_write = None
        run_user_code = struct.unpack("<I", data)[0]
        return 0, b"", [RunUserCode() if run_user_code else Reboot()]

    def _spi_flash_md5(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 16:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        address, size = struct.unpack_from("<II", data)
        digest = hashlib.md5(self._flash(address, size, Failure.FLASH_READ).read(address, size),
                             usedforsecurity=False)
        self.hw.flash_ops.md5_regions += 1
        self.hw.flash_ops.md5_bytes += size
        return 0, self.md5_payload(digest.digest()), []

    def md5_payload(self, digest: bytes) -> bytes:
        return digest.hex().encode("ascii")   # the ROM answers in lowercase hex text

    def _read_flash_slow(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 8:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        address, length = struct.unpack("<II", data)
        if length > 64:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        block = self._flash(address, length, Failure.FLASH_READ).read(address, length)
        return 0, block.ljust(64, b"\xff"), []      # always a 64-byte buffer


class StubLoader(RomLoader):
    """esptool's flasher stub (esp-flasher-stub, "stub v2"), started from RAM by the ROM.

    It answers with 2-byte big-endian codes, SYNC with value 0 (how esptool tells it from the
    ROM), MD5 in raw bytes; it erases as it writes; it acknowledges FLASH_DATA and
    FLASH_DEFL_DATA before writing, so a failure to write is the next command's answer."""

    STATUS_BYTES = 2
    IS_STUB = True

    def __init__(self, rom: RomLoader) -> None:
        super().__init__(rom.hw)
        self.flash_attached = True            # the stub attaches the flash when it starts
        self.flash_size = rom.flash_size
        self._deferred: Failure | None = None
        self._read: _FlashRead | None = None
        del self._handlers[Op.READ_FLASH_SLOW]
        self._handlers.update({
            Op.ERASE_FLASH: self._erase_flash,
            Op.ERASE_REGION: self._erase_region,
            Op.READ_FLASH: self._read_flash,
            Op.GET_SECURITY_INFO: self._get_security_info,
        })

    def handle(self, frame: bytes) -> list[Effect]:
        if self._read is not None:
            return self._read_flash_ack(frame)
        if len(frame) >= 8 and frame[1] == Op.RUN_USER_CODE:
            return []    # no answer, and (in this stub version) nothing happens
        if self._deferred is not None and len(frame) >= 8:
            failure, self._deferred = self._deferred, None
            return [Send(self.response(frame[1], failure=failure))]
        return super().handle(frame)

    def response(self, op: int, value: int = 0, payload: bytes = b"",
                 failure: Failure | None = None) -> bytes:
        body = payload + struct.pack(">H", 0 if failure is None else failure.stub_code)
        return struct.pack("<BBHI", 1, op, len(body), value) + body

    def sync_value(self) -> int:
        return 0

    def spi_attach_length(self) -> int:
        return 4

    def flash_begin_lengths(self) -> tuple[int, ...]:
        return (16, 20)

    def start_erase(self, write: _FlashWrite) -> None:
        self.erase_ahead(write, write.cursor + 1)   # starts on the first sector, no waiting

    def erase_ahead(self, write: _FlashWrite, end: int) -> None:
        end = min(-(-end // SECTOR_SIZE) * SECTOR_SIZE, write.erase_end)
        if end > write.erased_to:
            self._flash(write.erased_to, end - write.erased_to,
                        Failure.FLASH_WRITE).erase(write.erased_to, end - write.erased_to)
            self.hw.flash_ops.erased += end - write.erased_to
            write.erased_to = end

    def clip_block(self, write: _FlashWrite, block: bytes) -> bytes:
        return block[:write.remaining]     # the padding of the last block is not written

    def accept_block(self, write: _FlashWrite, block: bytes) -> None:
        try:
            self.write_block(write, block)
        except CommandFailed as failed:
            self._deferred = failed.failure

    def _flash_end(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 4:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        write = self._flash_write
        if write is None:
            raise CommandFailed(Failure.NOT_IN_FLASH_MODE)
        if write.remaining:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        self._flash_write = None
        return 0, b"", []        # this stub reboots on neither flag

    def md5_payload(self, digest: bytes) -> bytes:
        return digest

    def _get_security_info(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        raise CommandFailed(Failure.NOT_IMPLEMENTED)   # not on an ESP32

    def _erase_flash(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        self._flash(0, self.flash_size, Failure.FLASH_WRITE).erase(0, self.flash_size)
        self.hw.flash_ops.erased += self.flash_size
        return 0, b"", []

    def _erase_region(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 8:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        address, size = struct.unpack("<II", data)
        if address % SECTOR_SIZE or size % SECTOR_SIZE:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        if size:
            self._flash(address, size, Failure.FLASH_WRITE).erase(address, size)
            self.hw.flash_ops.erased += size
        return 0, b"", []

    def _read_flash(self, data: bytes, chk: int) -> tuple[int, bytes, list[Effect]]:
        if len(data) != 16:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        address, length, packet_size, _in_flight = struct.unpack("<IIII", data)
        if not 0 < packet_size <= 4096:
            raise CommandFailed(Failure.BAD_DATA_LEN)
        self._flash(address, length, Failure.FLASH_READ)
        self._read = _FlashRead(cursor=address, end=address + length, packet_size=packet_size)
        # The answer, then the first block (this stub keeps one block in flight).
        return 0, b"", self._next_read_block()

    def _next_read_block(self) -> list[Effect]:
        read = self._read
        assert read is not None
        if read.cursor >= read.end:
            self._read = None
            return [Send(read.md5.digest())]
        size = min(read.packet_size, read.end - read.cursor)
        block = self.hw.need_flash().read(read.cursor, size)
        read.md5.update(block)
        read.cursor += size
        return [Send(block)]

    def _read_flash_ack(self, frame: bytes) -> list[Effect]:
        """The host acknowledges each block with the byte count it holds; anything else ends
        the stream at once with the digest of what was sent."""
        read = self._read
        assert read is not None
        if len(frame) != 4:
            self._read = None
            return [Send(read.md5.digest())]
        return self._next_read_block()


# ---------------------------------------------------------------------------------- board
class Mode(enum.Enum):
    RESET = "reset"          # EN held low
    DOWNLOAD = "download"    # the ROM serial bootloader
    STUB = "stub"            # esptool's flasher stub, running from RAM
    APP = "app"              # booted from flash: the firmware (model) runs
    HALTED = "halted"        # jumped to RAM where nothing was loaded


class ResetReason(enum.Enum):
    POWERON = "0x1 (POWERON_RESET)"      # EN released (the ROM calls it a power-on reset too)
    SW_CPU = "0xc (SW_CPU_RESET)"


_ROM_VERSION_LINE = "ets Jul 29 2019 12:21:46\r\n\r\n"   # the ESP32 ECO3 ROM's build date
_BOOT_MODES = {STRAP_FLASH_BOOT: "SPI_FAST_FLASH_BOOT",
               STRAP_DOWNLOAD_BOOT: "DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2)"}

Sink = Callable[[bytes, int], None]   # (bytes the chip's UART sends, at this baud rate)


class BoardBusy(Exception):
    """A second host port on a board that already has one."""


def _load_or_create_mac(state_dir: Path) -> bytes:
    """The board's base MAC: kept in ``esp32.json``; the first time, derived from the state
    directory's absolute path (Espressif's OUI, then three bytes of its SHA-256)."""
    state_file = state_dir / STATE_FILE
    if state_file.exists():
        text = json.loads(state_file.read_text(encoding="utf-8"))["mac"]
        mac = bytes.fromhex(str(text).replace(":", ""))
        if len(mac) != 6:
            raise ValueError(f"{state_file}: mac {text!r} is not six octets")
        return mac
    digest = hashlib.sha256(str(state_dir.resolve()).encode("utf-8")).digest()
    mac = ESPRESSIF_OUI + digest[:3]
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"mac": format_mac(mac)}) + "\n", encoding="utf-8")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in mac)


class Esp32Board:
    """An ESP32 on a board with the auto-program circuit (see the module docstring).

    Stimuli: ``set_lines(dtr, rts)`` and ``receive(data, baud)`` from the host port,
    ``console_write``/``software_reset`` from the firmware model. The chip's UART output goes to
    the ``sink`` given to ``attach()`` (the one host port), tagged with the baud rate it was sent
    at. Thread-safe; hooks and the sink are called outside the board's lock, in order.
    ``clock`` is the monotonic clock the reset timing is measured on; with ``self_timed`` the
    chip leaves reset by itself on a timer thread, without it only when next stimulated or
    ``poll()``-ed (for tests that drive a fake clock)."""

    def __init__(self, state_dir: Path, *, flash_size: int = FLASH_SIZE,
                 clock: Callable[[], float] = time.monotonic, self_timed: bool = True) -> None:
        self.state_dir = state_dir
        self.flash_path = state_dir / FLASH_FILE
        self.flash_size = flash_size
        self.mac = _load_or_create_mac(state_dir)
        self.on_boot: Callable[[], None] | None = None
        self.on_reset: Callable[[], None] | None = None
        self.on_console_input: Callable[[bytes], None] | None = None
        self.boot_count = 0            # application boots since this object was created
        self._clock = clock
        self._self_timed = self_timed
        self._lock = threading.Lock()
        self._deliver_lock = threading.Lock()   # keeps the sink's input in emission order
        self._outbox: list[tuple[bytes, int]] = []
        self._hooks: list[Callable[[], None]] = []
        self._sink: Sink | None = None
        self._hw = Hardware(Esp32Registers(self.mac, flash_size))
        self._loader: RomLoader | None = None
        self._decoder = SlipDecoder()
        # Powered long ago and running its application; nothing holds EN or IO0 low.
        self._mode = Mode.APP
        self._en_high = True
        self._io0_high = True
        self._released_at: float | None = None
        self._timer: threading.Timer | None = None
        self._uart_baud = ROM_BAUD
        self._autobaud = False
        self._powered = True
        self._flash_holders = 0

    @property
    def flash_ops(self) -> FlashOps:
        """What the loaders did to the flash since the last ``flash_ops.reset()``."""
        return self._hw.flash_ops

    # ----------------------------------------------------------------------------- host port
    def attach(self, sink: Sink) -> None:
        """Wire the host port (one at a time); the flash file is open while it is attached."""
        with self._step():
            if self._sink is not None:
                raise BoardBusy(f"{self.state_dir}: the board's serial port is already open")
            self._hold_flash()
            self._sink = sink

    def detach(self) -> None:
        with self._step():
            if self._sink is not None:
                self._sink = None
                self._release_flash()

    def open_flash(self) -> SimFlash:
        """The flash, held open for the firmware model until ``close_flash()``."""
        with self._step():
            return self._hold_flash()

    def close_flash(self) -> None:
        with self._step():
            self._release_flash()

    def _hold_flash(self) -> SimFlash:
        if self._hw.flash is None:
            self._hw.flash = SimFlash(self.flash_path, size=self.flash_size, base=0,
                                      sector_size=SECTOR_SIZE)
        self._flash_holders += 1
        return self._hw.flash

    def _release_flash(self) -> None:
        self._flash_holders = max(self._flash_holders - 1, 0)
        if self._flash_holders == 0:
            flash, self._hw.flash = self._hw.flash, None
            if flash is not None:
                flash.close()

    def set_power(self, on: bool) -> None:
        """The board's supply. Off: the chip stops (the application with it). On: a power-on
        reset, into the application or the bootloader as EN and IO0 say."""
        with self._step():
            self._settle(self._clock())
            if not on and self._powered:
                self._enter_reset()
                self._powered = False
            elif on and not self._powered:
                self._powered = True
                if self._en_high:
                    self._released_at = self._clock() - STRAP_SAMPLE_DELAY
                    self._settle(self._clock())

    @property
    def powered(self) -> bool:
        return self._powered

    def set_lines(self, dtr: bool, rts: bool) -> None:
        """The host's modem lines (pyserial's ``dtr``/``rts``: True = asserted = pin low)."""
        with self._step():
            now = self._clock()
            self._settle(now)
            en_high = not (rts and not dtr)
            io0_high = not (dtr and not rts)
            if self._en_high and not en_high:
                self._enter_reset()
            elif not self._en_high and en_high:
                self._released_at = now
                self._arm_timer(STRAP_SAMPLE_DELAY)
            self._en_high, self._io0_high = en_high, io0_high

    def receive(self, data: bytes, baud: int) -> None:
        """Bytes from the host, sent at ``baud``."""
        with self._step():
            self._settle(self._clock())
            if self._mode is Mode.APP:
                hook = self.on_console_input
                if hook is not None:
                    text = data if baud == self._uart_baud else _garble(data, baud,
                                                                        self._uart_baud)
                    self._hooks.append(lambda: hook(text))
                return
            if self._loader is None:
                return             # in reset or halted: the UART is dead
            self._hw.flash_ops.received += len(data)
            self._hw.flash_ops.wire_s += len(data) * 10 / baud
            if self._mode is Mode.DOWNLOAD and self._autobaud:
                self._set_uart_baud(baud)   # the ROM measures the host's rate on its frames
            if baud != self._uart_baud:
                data = _garble(data, baud, self._uart_baud)
            for frame in self._decoder.feed(data):
                loader = self._current_loader()   # a frame may have started the stub, or left
                if loader is None:
                    break
                for effect in loader.handle(frame):
                    self._apply(effect)

    # ----------------------------------------------------------------------------- firmware side
    def console_write(self, data: bytes) -> None:
        """The running application's console output (dropped unless it runs)."""
        with self._step():
            self._settle(self._clock())
            if self._mode is Mode.APP:
                self._emit(data)

    def software_reset(self) -> None:
        """A software reset (``esp_restart``): the boot mode latched at the last EN release
        stays, so a chip that was reset into download mode comes back to the bootloader."""
        with self._step():
            self._settle(self._clock())
            if self._mode is Mode.RESET or not self._powered:
                return
            self._restart(ResetReason.SW_CPU)

    def panic(self, output: str) -> None:
        """The application crashed: the panic handler prints ``output`` (``panic_output``) on
        the console and restarts the chip (``rst:0xc (SW_CPU_RESET)``), which boots the
        application again, as ESP-IDF's default panic behaviour does."""
        with self._step():
            self._settle(self._clock())
            if self._mode is not Mode.APP:
                return
            self._emit(output.encode("ascii", errors="replace"))
            self._restart(ResetReason.SW_CPU)

    # ----------------------------------------------------------------------------- queries
    @property
    def mode(self) -> Mode:
        with self._step():
            self._settle(self._clock())
            return self._mode

    @property
    def uart_baud(self) -> int:
        return self._uart_baud

    def poll(self) -> None:
        """Let time-driven events happen (the chip leaving reset)."""
        with self._step():
            self._settle(self._clock())

    # ----------------------------------------------------------------------------- internals
    @contextmanager
    def _step(self) -> Iterator[None]:
        """Change state under the lock, then deliver output and run hooks outside it (they may
        call back), in the order they were produced."""
        with self._lock:
            yield
            hooks, self._hooks = self._hooks, []
        with self._deliver_lock:
            with self._lock:
                outbox, self._outbox = self._outbox, []
                sink = self._sink
            if sink is not None:
                for data, baud in outbox:
                    sink(data, baud)
        for hook in hooks:
            hook()

    def _current_loader(self) -> RomLoader | None:
        return self._loader

    def _emit(self, data: bytes) -> None:
        self._outbox.append((data, self._uart_baud))

    def _arm_timer(self, delay: float) -> None:
        # Nobody may touch the port after an EN pulse (esptool's hard reset, then close): the
        # chip still boots, on this timer's thread.
        if not self._self_timed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(delay, self._timer_fired)
        self._timer.daemon = True
        self._timer.start()

    def _timer_fired(self) -> None:
        with self._lock:
            released_at = self._released_at
        if released_at is None:
            return
        remaining = released_at + STRAP_SAMPLE_DELAY - self._clock()
        if remaining > 0:       # a timer may wake a hair early on another clock
            with self._lock:
                self._arm_timer(remaining)
            return
        self.poll()

    def _settle(self, now: float) -> None:
        """If EN was released long enough ago, the chip has sampled IO0 and booted. Called
        before every change, so the IO0 level sampled is the one that held at that moment."""
        if not self._powered or self._released_at is None \
                or now < self._released_at + STRAP_SAMPLE_DELAY:
            return
        self._released_at = None
        self._hw.registers.strap = STRAP_FLASH_BOOT if self._io0_high else STRAP_DOWNLOAD_BOOT
        self._boot(ResetReason.POWERON)

    def _enter_reset(self) -> None:
        self._stop_app()
        self._mode = Mode.RESET
        self._loader = None
        self._released_at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stop_app(self) -> None:
        if self._mode is Mode.APP and self.on_reset is not None:
            self._hooks.append(self.on_reset)

    def _restart(self, reason: ResetReason) -> None:
        self._stop_app()
        self._boot(reason)

    def _boot(self, reason: ResetReason) -> None:
        """The ROM starts: prints its banner at 115200 Bd, then waits for the host (download
        mode) or hands over to the application in flash."""
        strap = self._hw.registers.strap
        self._set_uart_baud(ROM_BAUD)
        self._hw.registers.apb_hz = 40_000_000
        self._decoder.reset()
        banner = f"{_ROM_VERSION_LINE}rst:{reason.value},boot:{strap:#x} ({_BOOT_MODES[strap]})\r\n"
        if strap == STRAP_DOWNLOAD_BOOT:
            self._emit((banner + "waiting for download\r\n").encode("ascii"))
            self._mode = Mode.DOWNLOAD
            self._autobaud = True
            self._hw.ram_segments.clear()
            self._loader = RomLoader(self._hw)
        else:
            self._emit(banner.encode("ascii"))
            self._start_app()

    def _set_uart_baud(self, baud: int) -> None:
        self._uart_baud = baud
        self._hw.registers.uart_baud = baud

    def _start_app(self) -> None:
        self._mode = Mode.APP
        self._loader = None
        self._set_uart_baud(ROM_BAUD)     # the application's console runs at 115200 Bd
        self.boot_count += 1
        if self.on_boot is not None:
            self._hooks.append(self.on_boot)

    def _apply(self, effect: Effect) -> None:
        match effect:
            case Send(packet):
                self._emit(slip_encode(packet))
            case SetBaud(baud):
                self._set_uart_baud(baud)
                self._autobaud = False
            case Jump(entry):
                self._jump(entry)
            case Reboot():
                self._restart(ResetReason.SW_CPU)
            case RunUserCode():
                self._start_app()

    def _jump(self, entry: int) -> None:
        """MEM_END ran the uploaded code: the flasher stub, if the entry point is in it."""
        rom = self._loader
        inside = any(start <= entry < start + len(code)
                     for start, code in self._hw.ram_segments.items())
        if rom is None or not inside:
            self._mode = Mode.HALTED
            self._loader = None
            return
        self._loader = StubLoader(rom)
        self._mode = Mode.STUB
        self._hw.registers.apb_hz = 80_000_000     # the stub clocks the APB from the PLL
        self._decoder.reset()
        self._emit(slip_encode(b"OHAI"))


# ------------------------------------------------------------------------------- panic
# The Xtensa registers ESP-IDF's panic handler dumps, in its order, four to a line.
PANIC_REGISTERS = ("PC", "PS", "A0", "A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8", "A9",
                   "A10", "A11", "A12", "A13", "A14", "A15", "SAR", "EXCCAUSE", "EXCVADDR",
                   "LBEG", "LEND", "LCOUNT")
# EXCCAUSE values of the panics ESP-IDF names after the Xtensa exception cause.
EXCCAUSE = {"IllegalInstruction": 0, "InstrFetchProhibited": 20, "LoadProhibited": 28,
            "StoreProhibited": 29, "LoadStoreAlignment": 9, "IntegerDivideByZero": 6}


def panic_output(cause: str, registers: dict[str, int], backtrace: list[tuple[int, int]], *,
                 core: int = 0, elf_sha256: str = "") -> str:
    """What ESP-IDF's panic handler prints for an unhandled CPU exception (the default
    "print registers and reboot"), as its Fatal Errors guide shows it: the Guru Meditation
    line, the register dump, the backtrace (PC:SP pairs), the ELF's SHA-256 and the reboot."""
    lines = [f"Guru Meditation Error: Core  {core} panic'ed ({cause}). Exception was unhandled.",
             "", f"Core  {core} register dump:"]
    cells = [f"{name:<8}: {registers.get(name, 0) & 0xFFFFFFFF:#010x}  "
             for name in PANIC_REGISTERS]
    lines += ["".join(cells[i:i + 4]) for i in range(0, len(cells), 4)]
    lines += ["", "", "Backtrace: " + " ".join(f"{pc:#010x}:{sp:#010x}" for pc, sp in backtrace),
              "", "", "", f"ELF file SHA256: {elf_sha256 or '0' * 16}", "", "Rebooting..."]
    return "\r\n".join(lines) + "\r\n"


def _garble(data: bytes, sent_at: int, heard_at: int) -> bytes:
    """What a UART at ``heard_at`` Bd makes of ``data`` sent at ``sent_at`` Bd: framing errors,
    read here as NULs, about as many as fit the time (never a SLIP delimiter: no phantom frame)."""
    if not data:
        return b""
    return bytes(max(1, len(data) * heard_at // sent_at))


# ------------------------------------------------------------------------------- registry
_boards: dict[Path, Esp32Board] = {}
_boards_lock = threading.Lock()


def board_for(state_dir: Path) -> Esp32Board:
    """The process's one ``Esp32Board`` for ``state_dir`` (created on first use): every port
    opened on that directory talks to the same chip, which keeps running between opens."""
    key = state_dir.resolve()
    with _boards_lock:
        board = _boards.get(key)
        if board is None:
            board = _boards[key] = Esp32Board(key)
        return board
