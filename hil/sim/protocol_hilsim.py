"""pyserial URL handler ``hilsim://<state_dir>``: the serial port of a simulated ESP32 board.

URL: ``hilsim://`` followed by the board's state directory, percent-encoded where needed; an
absolute path gives three slashes (``hilsim:///tmp/rig/esp32``), a relative one is taken from the
working directory. The directory holds the board's flash (``flash.bin``) and MAC (``esp32.json``),
created on first use (``hil.sim.esp32``). No query options.

pyserial finds this module because ``hil.sim`` is listed in ``serial.protocol_handler_packages``
(done when ``hil.drivers`` is imported); pyserial then imports ``hil.sim.protocol_hilsim`` the
first time it sees the scheme. So ``serial.serial_for_url("hilsim:///...")``, hil's drivers and
esptool's Python API all open a simulated board the way they open a USB serial bridge.

The port behaves as a USB serial bridge wired to a DevKitC-style board: writes reach the chip's
UART at once (no wire time), reads wait for what the chip sends up to the timeout, ``dtr``/``rts``
drive EN and IO0 through the auto-program circuit, and what is sent at another baud rate than the
port's arrives as garbage. Opening asserts DTR and RTS together and closing releases them
together, as the kernel does, so neither resets the board; the board keeps running between opens.
One port per board at a time (a second open fails as a busy device does).

Modem lines are reachable only through pyserial's ``dtr``/``rts`` properties, not through an ioctl
on a file descriptor: ``fileno()`` fails with ENOTTY, as a pseudo-terminal's TIOCMGET does. esptool
(5.6) tries its atomic ioctl reset first; on ENOTTY it warns once per process ("Chip was NOT
reset"), syncs without a reset (which succeeds if the board is already in its bootloader) and
then moves on to its classic DTR/RTS sequence, which resets the board into download mode: two
connect attempts (about 0.75 s each) are spent per connect when the board runs its application.
"""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from serial.serialutil import PortNotOpenError, SerialBase, SerialException

from hil.sim.esp32 import BoardBusy, Esp32Board, _garble, board_for

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

SCHEME = "hilsim"
def state_dir_of(url: str) -> Path:
    """The state directory a ``hilsim://`` URL names."""
    prefix = f"{SCHEME}://"
    if not url.lower().startswith(prefix):
        raise SerialException(f"expected a URL of the form {prefix}<state_dir>, not {url!r}")
    rest = url[len(prefix):]
    if "?" in rest or "#" in rest:
        raise SerialException(f"{url!r}: {SCHEME}:// URLs take no options")
    path = unquote(rest)
    if not path:
        raise SerialException(f"{url!r}: no state directory after {prefix}")
    return Path(path)


class Serial(SerialBase):
    """A pyserial port on a simulated ESP32 board (see the module docstring)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._board: Esp32Board | None = None
        self._rx = bytearray()
        self._rx_ready = threading.Condition()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------- lifecycle
    def open(self) -> None:
        if self.is_open:
            raise SerialException("Port is already open.")
        if self.port is None:
            raise SerialException("Port must be configured before it can be used.")
        state_dir = state_dir_of(self.port)
        try:
            board = board_for(state_dir)
            board.attach(self._from_board)
        except BoardBusy as err:
            raise SerialException(errno.EBUSY, str(err)) from err
        except OSError as err:
            raise SerialException(err.errno, f"{self.port}: cannot open the board: {err}") from err
        self._board = board
        with self._rx_ready:
            self._rx.clear()
        self.is_open = True
        # The kernel raises both lines at once on open: no reset through the circuit.
        board.set_lines(self.dtr, self.rts)

    def close(self) -> None:
        board, self._board = self._board, None
        if self.is_open and board is not None:
            self.is_open = False
            board.set_lines(False, False)    # HUPCL drops both at once
            board.detach()
        self.is_open = False
        with self._rx_ready:
            self._rx_ready.notify_all()     # a reader on another thread sees the close

    def _require_board(self) -> Esp32Board:
        board = self._board
        if not self.is_open or board is None:
            raise PortNotOpenError()
        return board

    # ----------------------------------------------------------------------------- settings
    def _reconfigure_port(self) -> None:
        if not 0 < self.baudrate < 2 ** 32:
            raise ValueError(f"invalid baud rate: {self.baudrate!r}")

    def _update_dtr_state(self) -> None:
        if self._board is not None:
            self._board.set_lines(self.dtr, self.rts)

    def _update_rts_state(self) -> None:
        if self._board is not None:
            self._board.set_lines(self.dtr, self.rts)

    def _update_break_state(self) -> None:
        pass    # a break reaches the chip as line noise between frames: nothing to model

    def fileno(self) -> int:
        raise OSError(errno.ENOTTY, f"{self.port}: no file descriptor (modem lines are set "
                                    "through dtr and rts)")

    @property
    def cts(self) -> bool:
        return False     # CTS, DSR, RI and CD are not wired on the board

    @property
    def dsr(self) -> bool:
        return False

    @property
    def ri(self) -> bool:
        return False

    @property
    def cd(self) -> bool:
        return False

    # ----------------------------------------------------------------------------- data
    def _from_board(self, data: bytes, sent_at: int) -> None:
        """The chip's UART output; a port at another rate hears garbage."""
        baud = self.baudrate
        if sent_at != baud:
            data = _garble(data, sent_at, baud)
        with self._rx_ready:
            self._rx += data
            self._rx_ready.notify_all()

    def write(self, b: ReadableBuffer, /) -> int | None:
        board = self._require_board()
        data = bytes(b)
        board.receive(data, self.baudrate)
        return len(data)

    @property
    def in_waiting(self) -> int:
        board = self._require_board()
        board.poll()
        with self._rx_ready:
            return len(self._rx)

    def read(self, size: int = 1) -> bytes:
        """Up to ``size`` bytes: fewer only when ``timeout`` (seconds; None waits for all, 0
        takes what is there) runs out first, as a serial port does."""
        board = self._require_board()
        timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        out = bytearray()
        while len(out) < size:
            board.poll()     # outside the condition: the board may call back into it
            with self._rx_ready:
                take = min(size - len(out), len(self._rx))
                out += self._rx[:take]
                del self._rx[:take]
                if len(out) >= size or not self.is_open:
                    break
                if deadline is None:
                    self._rx_ready.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._rx_ready.wait(left)
        return bytes(out)

    def reset_input_buffer(self) -> None:
        board = self._require_board()
        board.poll()
        with self._rx_ready:
            self._rx.clear()

    def reset_output_buffer(self) -> None:
        self._require_board()    # writes reach the chip at once: nothing is ever pending

    @property
    def out_waiting(self) -> int:
        self._require_board()
        return 0

    def send_break(self, duration: float = 0.25) -> None:
        self._require_board()
