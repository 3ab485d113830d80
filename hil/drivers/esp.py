"""The ESP32 flasher: the chip's serial ROM bootloader, through esptool's Python API.

``open()`` takes the serial port (a device path or any pyserial URL) and nothing more. The first
operation that needs the bootloader (``program()``, ``read_mac()``) resets the board into its ROM
bootloader with esptool's DTR/RTS sequence (again at each connect attempt), detects the chip and
checks it is the family the rig expects, loads esptool's flasher stub (as the esptool command does
by default), switches to the working baud rate and attaches the SPI flash. ``program()`` puts the
application image at the app partition offset: the chip's own MD5 of its flash tells which 4 KiB
sectors already hold it, only the others are written (compressed), and esptool verifies what it
wrote by MD5; with ``full=True`` the whole image is written, as ``esptool write-flash`` does.
``reset()`` pulses EN through RTS: the board leaves the bootloader and runs its application, so the
next bootloader operation (``program()``, ``read_mac()``) connects again by itself.

Over the network, ``rfc2217://host:port`` (a lab's ser2net in ``telnet(rfc2217)`` mode, a labgrid
place's NetworkSerialPort) carries DTR and RTS to the USB-UART, so the same reset sequences work:
their line changes are sent as they come rather than each after the server's answer
(``_Rfc2217Lines``), and the port's read timeout stays local (``_Rfc2217Port``). A raw TCP port
(``socket://``) carries no lines: the board cannot be reset into its bootloader through it.

On most ESP32 boards the console and the bootloader share one USB serial bridge: the rig closes
the console before it opens this flasher (``RigParts.release``), and this driver gives the port
back on ``close()``.

esptool prints to the console through one process-wide logger. While this driver runs an esptool
call, that logger is replaced by one that turns esptool's lines into records of this module's
``logging`` logger and its progress bar into the caller's ``progress(done, total)`` (bytes sent
over the wire, as esptool counts them), and the previous logger is put back afterwards.

Failures are ``RigFault("flasher", "<port>: ...")``, one line, esptool's own reason included:
a port that cannot be opened, a bootloader that does not answer (the board is not in download
mode, or DTR/RTS are not wired to EN/IO0), another chip than the rig says, a failed write.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import serial
from esp_pylib.logger import EspLog, EspLogBase
from esptool.cmds import (
    attach_flash,
    detect_chip,
    reset_chip,
    run_stub,
    write_flash,
)
from esptool.loader import (
    DEFAULT_CONNECT_ATTEMPTS,
    ESPLoader,
)
from esptool.reset import ClassicReset, HardReset
from esptool.targets import CHIP_DEFS
from esptool.util import FatalError
from rich.errors import MarkupError
from rich.text import Text
from serial import rfc2217

from hil.boards.otadata import settled_on_first_slot
from hil.drivers.base import DriverBase, Progress, rfc2217_quiet
from hil.errors import ConfigError, RigFault

log = logging.getLogger(__name__)

PART = "flasher"
SECTOR: int = ESPLoader.FLASH_SECTOR_SIZE   # the SPI NOR's erase unit (4 KiB)
COMPARE_BLOCK = 0x10000   # one MD5 per 64 KiB block, then per sector only where a block differs
ROM_BAUD: int = ESPLoader.ESP_ROM_BAUD   # the ROM bootloader talks at 115200 until told otherwise
# esptool words the failure of its connect loop (reset, then SYNC) this way; anything else went
# wrong after the bootloader answered.
_NO_ANSWER_PREFIX = "Failed to connect"


def _one_line(err: BaseException) -> str:
    """An esptool message without its line breaks (it adds hints and URLs on further lines)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def _plain(text: str) -> str:
    """esptool's messages are Rich markup (``[bold]``, escaped ``\\[``): the text without it."""
    try:
        return Text.from_markup(text).plain
    except MarkupError:
        return text


class _EsptoolLog(EspLogBase):
    """esptool's output as ``logging`` records, its progress bar as the caller's callback."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._partial = ""   # esptool prints "Connecting..." and its dots without a line end

    def print(self, *args: Any, **kwargs: Any) -> None:
        sep = kwargs.get("sep", " ")
        end = kwargs.get("end", "\n")
        text = self._partial + str(sep).join(str(arg) for arg in args) + str(end)
        *lines, self._partial = text.split("\n")
        for line in lines:
            if line.strip():
                log.info("esptool: %s", _plain(line))

    def flush(self) -> None:
        if self._partial.strip():
            log.info("esptool: %s", _plain(self._partial))
        self._partial = ""

    def note(self, *args: Any) -> None:
        log.info("esptool note: %s", _plain(" ".join(str(arg) for arg in args)))

    def hint(self, *args: Any) -> None:
        log.info("esptool hint: %s", _plain(" ".join(str(arg) for arg in args)))

    def debug(self, *args: Any) -> None:
        log.debug("esptool: %s", _plain("".join(str(arg) for arg in args)))

    def warn(self, *args: Any, suggestion: str | None = None) -> None:
        log.warning("esptool: %s", _plain(" ".join(str(arg) for arg in args)))

    def err(self, *args: Any, suggestion: str | None = None) -> None:
        log.error("esptool: %s", _plain(" ".join(str(arg) for arg in args)))

    # esptool's own logger has these older names too; a few call sites still use them.
    def warning(self, message: str, suggestion: str | None = None) -> None:
        self.warn(message, suggestion=suggestion)

    def error(self, message: str, suggestion: str | None = None) -> None:
        self.err(message, suggestion=suggestion)

    def set_verbosity(self, mode: int | str) -> None:
        pass   # every line becomes a record; logging's levels decide what is shown

    def progress_bar(self, cur_iter: int, total_iters: int, prefix: str = "", suffix: str = "",
                     bar_length: int = 30) -> None:
        if self._progress is not None:
            self._progress(cur_iter, total_iters)


@contextmanager
def _esptool_output(progress: Progress | None = None) -> Iterator[None]:
    """Route esptool's process-wide logger to ``_EsptoolLog`` for the duration of a call."""
    previous = EspLog.instance
    sink = _EsptoolLog(progress)
    EspLog.set_logger(sink)
    try:
        yield
    finally:
        sink.flush()
        EspLog.instance = previous


class EspFlasher(DriverBase):
    """An ESP32 board's ROM bootloader on a serial port, through esptool (see the module docstring).

    ``port`` is a device path or a pyserial URL; ``baudrate`` the rate used after the stub is
    loaded; ``app_offset`` where ``program()`` writes the application image; ``chip`` the esptool
    chip name the board must be; ``connect_attempts`` how many reset-and-sync rounds esptool tries
    before giving up (about 0.75 s each without an answer); ``otadata`` the OTA data partition
    (offset, size) that ``program()`` erases, so that the bootloader boots what it wrote and not
    the slot an earlier update switched to (None: a partition table without one).
    """

    def __init__(self, port: str, baudrate: int = 460800, app_offset: int = 0x10000,
                 chip: str = "esp32", connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
                 otadata: tuple[int, int] | None = None) -> None:
        if chip not in CHIP_DEFS:
            raise ConfigError("flasher.chip", f"esptool knows no chip {chip!r}; "
                                              f"it knows: {', '.join(CHIP_DEFS)}")
        if connect_attempts < 1:   # esptool reads 0 as "try forever"
            raise ConfigError("flasher.connect_attempts",
                              f"must be at least 1, not {connect_attempts}")
        self.port = port
        self.baudrate = baudrate
        self.app_offset = app_offset
        self.chip = chip
        self.connect_attempts = connect_attempts
        self.otadata = otadata
        self.chip_name: str = str(CHIP_DEFS[chip].CHIP_NAME)   # "ESP32", as esptool reports it
        self._serial: Any = None   # the open pyserial port; ours, lent to esptool
        self._esp: Any = None      # esptool's loader while the board is in its bootloader

    # ----------------------------------------------------------------------------- lifecycle
    def open(self) -> None:
        if self._serial is not None:
            return
        port: serial.SerialBase
        try:
            if self.port.lower().startswith("rfc2217://"):
                # A lab's network serial port (ser2net's telnet(rfc2217)): it carries DTR/RTS.
                port = _Rfc2217Port(None, exclusive=True)
                port.port = self.port
            else:
                port = serial.serial_for_url(self.port, do_not_open=True, exclusive=True)
            with rfc2217_quiet():
                port.open()
        except (OSError, ValueError) as err:   # SerialException is an OSError
            raise RigFault(PART, f"{self.port}: cannot open: {err}") from err
        self._serial = port
        # The bootloader is reached when something needs it (program, read_mac): a reset alone
        # is one EN pulse, not a reset into download mode, a stub and then a second reset.

    def close(self) -> None:
        port, self._serial, self._esp = self._serial, None, None
        if port is not None:
            port.close()

    # ----------------------------------------------------------------------------- FlasherProtocol
    def program(self, image: Path, *, progress: Progress | None = None,
                full: bool = False) -> None:
        """Put ``image`` (an application .bin) at ``app_offset``, writing only the 4 KiB
        sectors that do not hold it already; esptool verifies what it writes by MD5. Then the
        OTA data partition is erased (when it is not blank already): after an update the
        bootloader starts the slot the update switched to, and only a blank otadata makes it
        start ``ota_0``, the image just written, as a fresh board would.

        The chip hashes its flash itself (SPI_FLASH_MD5, which the ROM and the stub both
        answer): the image's whole span first (nothing differs: nothing is written), then each
        64 KiB block of it, then each sector of a block that differs; the differing sectors
        are written, in runs, by esptool's ``write_flash``. The flash ends as a full write
        leaves it: the last sector's bytes past the image are erased (0xFF) either way.
        ``full`` writes the whole image whatever the flash holds (the reference, and the way
        out when a comparison cannot be trusted).

        The board stays in the flasher stub: ``reset()`` runs the new image. ``progress`` gets
        (done, total): of a full write, the compressed bytes esptool sent and has to send; of
        differing sectors, their bytes, each run's progress in its share of the whole; (0, 0)
        when nothing was to be written.
        """
        if not image.is_file():
            raise FileNotFoundError(f"{image}: no such image")
        esp = self._loader()
        where = f"{image.name} at {self.app_offset:#x}"
        if full or self.app_offset % SECTOR:
            # An offset inside a sector: a write erases the sector's bytes before it too, which
            # no comparison of the image's own span sees. Written whole, as esptool would.
            with _esptool_output(progress), self._faults(f"writing {where}"):
                write_flash(esp, [(self.app_offset, str(image))])
            log.info("%s: wrote %s at %#x (all of it)", self.port, image, self.app_offset)
            self._erase_otadata(esp, full=True)
            return
        wanted = _sector_padded(image.read_bytes())
        with _esptool_output(), self._faults(f"comparing the flash with {where}"):
            runs = _differing_runs(lambda start, size: esp.flash_md5sum(
                self.app_offset + start, size), wanted)
        if not runs:
            log.info("%s: %s already at %#x: nothing written", self.port, image,
                     self.app_offset)
            if progress is not None:
                progress(0, 0)           # done: nothing was to be sent
            self._erase_otadata(esp)
            return
        regions = [(self.app_offset + start, wanted[start:start + size]) for start, size in runs]
        with _esptool_output(_RunsProgress(progress, [size for _, size in runs])
                             if progress is not None else None), \
                self._faults(f"writing {where}"):
            write_flash(esp, regions)
        written = sum(size for _, size in runs)
        log.info("%s: wrote %s at %#x: %d of %d sectors differed", self.port, image,
                 self.app_offset, written // SECTOR, len(wanted) // SECTOR)
        self._erase_otadata(esp)

    def _erase_otadata(self, esp: Any, *, full: bool = False) -> None:
        """The OTA data partition erased, unless what it holds boots ``ota_0`` with nothing
        pending, as a blank one does (``hil.boards.otadata.settled_on_first_slot``: the state
        an unchanged base leaves after its first boot). ``full``: erased whatever it holds."""
        if self.otadata is None:
            return
        offset, size = self.otadata
        where = f"the OTA data partition at {offset:#x}"
        with _esptool_output(), self._faults(f"erasing {where}"):
            if not full and settled_on_first_slot(bytes(esp.read_flash(offset, size))):
                return
            esp.erase_region(offset, size)
        log.info("%s: erased %s", self.port, where)

    def reset(self) -> None:
        """Hard reset through RTS (EN): the board boots its application."""
        port = self._require_open()
        with _esptool_output(), self._faults("hard reset"):
            if self._esp is not None:
                reset_chip(self._esp, "hard-reset")
            else:
                # A port just opened asserts DTR and RTS together, which the auto-program
                # circuit reads as "run": DTR released first (IO0 high whatever follows), so
                # that RTS alone holds EN low.
                port.dtr = False
                HardReset(port)()
        self._esp = None   # the board left the bootloader; the next bootloader call reconnects

    # ----------------------------------------------------------------------------- queries
    def read_mac(self) -> str:
        """The chip's base MAC address (eFuse), as ``aa:bb:cc:dd:ee:ff``."""
        esp = self._loader()
        with _esptool_output(), self._faults("reading the MAC address"):
            mac = esp.read_mac("BASE_MAC")
        return ":".join(f"{octet:02x}" for octet in mac)

    # ----------------------------------------------------------------------------- helpers
    def _connect(self) -> None:
        """Reset into the bootloader, detect and check the chip, load the stub, attach flash."""
        with _esptool_output():
            try:
                esp = self._detect()
            except FatalError as err:
                if str(err).startswith(_NO_ANSWER_PREFIX):
                    raise RigFault(PART, f"{self.port}: no answer from the {self.chip_name} ROM "
                                         "bootloader (is the board in download mode? DTR/RTS "
                                         f"wired?); esptool: {_one_line(err)}") from err
                raise RigFault(PART, f"{self.port}: {_one_line(err)}") from err
            except OSError as err:
                raise RigFault(PART, f"{self.port}: the port failed while connecting: "
                                     f"{err}") from err
            detected = str(esp.CHIP_NAME)
            if detected != self.chip_name:
                raise RigFault(PART, f"{self.port}: the board is an {detected}, "
                                     f"the rig expects an {self.chip_name}")
            with self._faults("loading the flasher stub"):
                esp = run_stub(esp)
            if self.baudrate != ROM_BAUD:
                with self._faults(f"switching to {self.baudrate} Bd"):
                    esp.change_baud(self.baudrate)
            with self._faults("attaching the SPI flash"):
                attach_flash(esp)
        self._esp = esp
        log.info("%s: %s in its bootloader, stub loaded", self.port, self.chip_name)

    def _detect(self) -> Any:
        """esptool's loader on the chip, reset into its ROM bootloader."""
        if _has_file_descriptor(self._serial):
            return detect_chip(self._serial, baud=ROM_BAUD, connect_mode="default-reset",
                               connect_attempts=self.connect_attempts)
        # esptool's default reset starts with an ioctl on the port's descriptor; a URL port
        # (rfc2217, a simulated board) has none, which costs two failed connect attempts
        # before esptool falls back to DTR/RTS. Go straight to DTR/RTS, a reset per attempt
        # as esptool's own rounds do: the classic sequence pulls IO0 low a moment after EN
        # rises (two line changes), and on a loaded host that moment can come after the chip
        # sampled IO0: it boots its application, and only another reset brings it round.
        def reset_and_sync() -> Any:
            with self._faults("resetting into the bootloader"):
                ClassicReset(_unwaited_lines(self._serial))()
            return detect_chip(self._serial, baud=ROM_BAUD, connect_mode="no-reset",
                               connect_attempts=1)

        for _ in range(self.connect_attempts - 1):
            try:
                return reset_and_sync()
            except FatalError as err:
                if not str(err).startswith(_NO_ANSWER_PREFIX):
                    raise
        return reset_and_sync()          # the last attempt's failure is the one reported

    def _require_open(self) -> Any:
        if self._serial is None:
            raise RuntimeError(f"{self.port}: the flasher is not open")
        return self._serial

    def _loader(self) -> Any:
        self._require_open()
        if self._esp is None:
            self._connect()
        return self._esp

    @contextmanager
    def _faults(self, what: str) -> Iterator[None]:
        try:
            yield
        except (FatalError, OSError) as err:
            raise RigFault(PART, f"{self.port}: {what} failed: {_one_line(err)}") from err


def _sector_padded(data: bytes) -> bytes:
    """``data`` padded with 0xFF to the end of its last sector: what the sectors it touches
    hold after esptool wrote it (the stub erases whole sectors)."""
    return data + b"\xff" * (-len(data) % SECTOR)


def _differing_runs(flash_md5: Callable[[int, int], str], wanted: bytes
                    ) -> list[tuple[int, int]]:
    """The (offset, size) runs of whole sectors where the flash does not hold ``wanted``
    (sector-padded), as ``flash_md5(offset, size)`` (the chip's MD5, lowercase hex) tells:
    the whole span first, then each ``COMPARE_BLOCK``, then each sector of a block that
    differs. Adjacent differing sectors are merged into one run (one write, one verify)."""
    def same(start: int, size: int) -> bool:
        expected = hashlib.md5(wanted[start:start + size], usedforsecurity=False).hexdigest()
        return flash_md5(start, size) == expected

    if not wanted or same(0, len(wanted)):
        return []
    blocks = range(0, len(wanted), COMPARE_BLOCK)
    sectors: list[int] = []
    for block in blocks:
        size = min(COMPARE_BLOCK, len(wanted) - block)
        if len(blocks) > 1 and same(block, size):
            continue
        inside = range(block, block + size, SECTOR)
        sectors += inside if len(inside) == 1 else \
            [sector for sector in inside if not same(sector, SECTOR)]
    if not sectors:
        # The span differs and no piece of it does: the flash changed while it was compared.
        # When in doubt, write it all.
        return [(0, len(wanted))]
    runs: list[tuple[int, int]] = []
    for sector in sectors:
        if runs and runs[-1][0] + runs[-1][1] == sector:
            runs[-1] = (runs[-1][0], runs[-1][1] + SECTOR)
        else:
            runs.append((sector, SECTOR))
    return runs


class _RunsProgress:
    """esptool's progress over several writes (one per run, each counted from 0 to its own
    compressed size) as one monotonic (done, total) in bytes of the runs: each run's fraction
    placed in its share of the whole."""

    def __init__(self, progress: Progress, sizes: list[int]) -> None:
        self._progress = progress
        self._starts = [sum(sizes[:index]) for index in range(len(sizes))]
        self._sizes = sizes
        self._total = sum(sizes)
        self._run = 0
        self._last: tuple[int, int] | None = None
        self._reported = -1

    def __call__(self, done: int, total: int) -> None:
        last = self._last
        if last is not None and last[0] >= last[1] and (done, total) != last:
            self._run = min(self._run + 1, len(self._sizes) - 1)   # the previous run is done
        self._last = (done, total)
        fraction = min(done / total, 1.0) if total > 0 else 1.0
        overall = self._starts[self._run] + round(fraction * self._sizes[self._run])
        if overall > self._reported:
            self._reported = overall
            self._progress(overall, self._total)


class _Rfc2217Port(rfc2217.Serial):
    """pyserial's rfc2217 client with its read timeout kept here, where it is used: pyserial
    sends the port's whole setting (baud rate, data bits, parity, stop bits, each awaiting its
    acknowledgement, polled every 50 ms) to the server whenever the timeout changes, and
    esptool changes it around each command: 0.3 s a command, a minute to compare and write
    an image. The baud rate, which is the server's, still goes there."""

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @timeout.setter
    def timeout(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError(f"not a valid timeout: {timeout!r}")
        self._timeout = timeout


class _Rfc2217Lines:
    """An ``rfc2217://`` port as esptool's reset sequences set its DTR and RTS: each change
    sent at once, in order, not after the server acknowledged the one before. pyserial's client
    waits for each acknowledgement (polling every 50 ms; 100 ms each with ``ign_set_control``),
    so the classic sequence's two changes that release EN with IO0 low would reach the board
    50 ms or more apart, the chip out of reset with IO0 still high in between: it boots its
    application. Sent back to back, they reach the USB-UART behind the server (ser2net's
    ``telnet(rfc2217)``) as a local port's do, a moment apart; the sequence's own waits are
    kept. The server's acknowledgements are read by pyserial's reader as usual."""

    def __init__(self, port: Any) -> None:
        self._port = port

    def isOpen(self) -> bool:
        return bool(self._port.is_open)

    def open(self) -> None:
        with rfc2217_quiet():
            self._port.open()

    @property
    def dtr(self) -> bool:
        return bool(self._port.dtr)

    def setDTR(self, state: bool) -> None:
        self._send("_dtr_state", state, rfc2217.SET_CONTROL_DTR_ON, rfc2217.SET_CONTROL_DTR_OFF)

    def setRTS(self, state: bool) -> None:
        self._send("_rts_state", state, rfc2217.SET_CONTROL_RTS_ON, rfc2217.SET_CONTROL_RTS_OFF)

    def _send(self, attribute: str, state: bool, on: bytes, off: bytes) -> None:
        setattr(self._port, attribute, state)      # what pyserial's dtr/rts properties read
        self._port.rfc2217_send_subnegotiation(rfc2217.SET_CONTROL, on if state else off)


def _unwaited_lines(port: Any) -> Any:
    """``port`` as esptool's reset sequences should set its lines (``_Rfc2217Lines``)."""
    return _Rfc2217Lines(port) if isinstance(port, rfc2217.Serial) else port


def _has_file_descriptor(port: Any) -> bool:
    try:
        port.fileno()
    except (OSError, AttributeError, NotImplementedError):
        return False
    return True
