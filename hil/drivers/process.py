"""A host build run as the board: a Linux program in a board's place, with the same drivers' faces.

``ProcessBoard`` runs one program (a firmware built for Linux, as Zephyr's native_sim or ESP-IDF's
linux target are) the way a bench runs a board (../shared/DESIGN.md, "host builds as boards"):

- its console is a real pty (``hil.sim.pty.PtyPort``: a UART behind a USB bridge, lines sent
  while no host listens are lost) linked at ``console_path``; the program's stdout and stderr
  are written to it, and what the host writes to it goes to the program's stdin (its shell, if
  it has one; a program without one never reads it). ``ProcessConsole`` is the ``SerialConsole``
  opened on that pty: the same log, ``expect``, ``mark`` and report attachment as any board;
- power (``ProcessPower``): off is SIGKILL to the program's process group (a power cut: nothing
  is flushed), on starts it. It has no battery: ``set_level`` is ``Unsupported``;
- flasher (``ProcessFlasher``): ``program(image)`` halts the program, writes the image as
  ``<state_dir>/primary.bin`` and erases the OTA state (``ota.state``, ``secondary.bin``), as a
  chip erase and program do; ``reset()`` is SIGTERM, a wait, and a restart;
- a program that exits by itself is restarted, as a board reboots (exit 0 after an install is
  how a host build reboots). ``BOOT_LOOP_EXITS`` exits within ``BOOT_LOOP_WITHIN_S`` is a boot
  loop: the board is left off and every console wait raises ``BootLoop`` (a firmware fault)
  naming the exit statuses, until the board is reset, reflashed or power-cycled.

Each start gets ``env`` as it is at that moment (``set_env`` changes it for the next start: the
gateway's URL is known only after the board is up). hil's own notes (``[hil] ...``) go to the
console too, so the log explains a restart. ``stop()`` leaves nothing behind: no process, no
thread, no file descriptor, no symlink.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hil.drivers.base import DriverBase, LogLine, Progress
from hil.drivers.console import SerialConsole
from hil.errors import BootLoop, RigFault, Unsupported
from hil.sim.pty import PtyPort

PRIMARY, SECONDARY, OTA_STATE = "primary.bin", "secondary.bin", "ota.state"
BOOT_LOOP_EXITS = 5          # this many exits by itself ...
BOOT_LOOP_WITHIN_S = 30.0    # ... within this long is a boot loop, not reboots
TERM_GRACE_S = 5.0           # a reset waits this long for SIGTERM before it kills
LOOP_NOTE = "a boot loop; the board is left off"   # ends hil's console note of a boot loop
_READ = 64 * 1024


def describe_status(status: int) -> str:
    """``3`` -> ``status 3``, ``-11`` -> ``SIGSEGV``: how a program ended, for messages."""
    if status >= 0:
        return f"status {status}"
    with contextlib.suppress(ValueError):
        return signal.Signals(-status).name
    return f"signal {-status}"


class _Run:
    """One start of the program: its process and the read end of its output pipe."""

    def __init__(self, process: subprocess.Popen[bytes], output: int) -> None:
        self.process = process
        self.output = output            # closed by the pump at end of file
        self.stopped_by_us = False      # a power cut, a reset, a halt: not a reboot


class ProcessBoard:
    """The program ``command`` run as a board over ``state_dir`` (see the module docstring).

    ``start()`` brings the console up and powers the board on (the program starts);
    ``stop()`` takes everything down. A context manager."""

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str], state_dir: Path,
                 console_path: Path, name: str) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.state_dir = state_dir
        self.console_path = console_path
        self.name = name
        self.exits: list[tuple[float, int]] = []       # (when, status) of exits by itself
        self.boot_loop: str | None = None              # why the board is stuck, once it is
        self.loops = 0                                 # boot loops so far (notes written)
        self.loop_at = 0.0                             # when the last one was declared
        self.on_change: Callable[[], None] | None = None   # the console's waits wake on it
        self._powered = False
        self._run: _Run | None = None
        self._fresh: list[_Run] = []     # started, not yet taken by the pump
        self._lock = threading.RLock()
        self._port: PtyPort | None = None
        self._pump: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_read = self._wake_write = -1

    # ================================================================== lifecycle
    def start(self) -> ProcessBoard:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._port = PtyPort(self.console_path, self._to_program, name=f"{self.name} console")
        self._port.start()
        self._wake_read, self._wake_write = os.pipe()
        self._stopping.clear()
        self._pump = threading.Thread(target=self._pump_output, name=f"hil-proc {self.name}",
                                      daemon=True)
        self._pump.start()
        try:
            self.power(True)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        with self._lock:
            self._powered = False
            self._kill(signal.SIGKILL)
        pump, self._pump = self._pump, None
        if pump is not None:
            self._stopping.set()
            os.write(self._wake_write, b"x")
            pump.join(timeout=5)
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1
        port, self._port = self._port, None
        if port is not None:
            port.stop()

    def __enter__(self) -> ProcessBoard:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ================================================================== what the parts do
    @property
    def running(self) -> bool:
        with self._lock:
            return self._run is not None

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._run.process.pid if self._run is not None else None

    def set_env(self, **values: str) -> None:
        """Settings for the next start (the running program keeps those it started with)."""
        with self._lock:
            self.env.update(values)

    def power(self, on: bool) -> None:
        """Off: SIGKILL, a power cut. On: the program starts (if it is not running)."""
        with self._lock:
            self._powered = on
            if not on:
                self._kill(signal.SIGKILL)
                return
            self._clear_boot_loop()
            if self._run is None:
                self._start()

    def reset(self) -> None:
        """SIGTERM (the program may finish its write), a wait, then a restart."""
        with self._lock:
            if not self._powered:
                raise RigFault("flasher", f"{self.name}: cannot reset a board that is off")
            self._clear_boot_loop()
            self._kill(signal.SIGTERM)
            self._start()

    def program(self, image: Path) -> None:
        """Halt the program, put ``image`` in its flash as the running image, erase the OTA
        state. The board stays halted until ``reset()`` (or a power cycle)."""
        data = image.read_bytes()
        with self._lock:
            self._kill(signal.SIGKILL)
            self._clear_boot_loop()
            for name in (OTA_STATE, SECONDARY):
                (self.state_dir / name).unlink(missing_ok=True)
            staged = self.state_dir / f".{PRIMARY}.hil"
            staged.write_bytes(data)
            staged.replace(self.state_dir / PRIMARY)

    def note(self, text: str) -> None:
        """A line of hil's own on the console (why the board restarted)."""
        port = self._port
        if port is not None:
            port.write(f"[hil] {text}\n".encode())

    # ================================================================== the program
    def _start(self) -> None:
        """Start the program (lock held)."""
        output, into = os.pipe()
        try:
            process = subprocess.Popen(  # noqa: S603 (the rig file's own command)
                self.command, env=self.env, stdin=subprocess.PIPE,
                stdout=into, stderr=into, start_new_session=True, close_fds=True)
        except OSError as error:
            os.close(output)
            raise RigFault("console", f"{self.name}: cannot start {self.command[0]}: "
                           f"{error}") from None
        finally:
            os.close(into)
        assert process.stdin is not None
        os.set_blocking(process.stdin.fileno(), False)
        self._run = _Run(process, output)
        self._fresh.append(self._run)
        self._wake()

    def _kill(self, sig: signal.Signals) -> None:
        """Stop the running program and wait for it (lock held). The whole process group:
        a shell's children go with it, as everything on a board stops when its power does."""
        run, self._run = self._run, None
        if run is None:
            return
        run.stopped_by_us = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.process.pid, sig)
        try:
            run.process.wait(TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()
        with contextlib.suppress(ProcessLookupError):   # what the group left behind
            os.killpg(run.process.pid, signal.SIGKILL)
        if run.process.stdin is not None:
            with contextlib.suppress(OSError):
                run.process.stdin.close()

    def _clear_boot_loop(self) -> None:
        self.boot_loop = None
        self.exits.clear()

    def _to_program(self, data: bytes) -> None:
        """What the host typed on the console, to the program's stdin (dropped when it does
        not read it, as a UART's receiver overruns)."""
        with self._lock:
            run = self._run
            if run is None or run.process.stdin is None:
                return
            with contextlib.suppress(OSError):
                os.write(run.process.stdin.fileno(), data)

    def _wake(self) -> None:
        if self._wake_write >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b"x")

    # ================================================================== the pump thread
    def _pump_output(self) -> None:
        """Copy each run's output to the console until its end of file, then see why it
        ended: a program that stopped by itself is rebooted (or is a boot loop)."""
        draining: list[_Run] = []     # runs whose output is still open
        while not self._stopping.is_set():
            with self._lock:
                draining += self._fresh
                self._fresh.clear()
            fds = [self._wake_read, *(run.output for run in draining)]
            ready, _, _ = select.select(fds, [], [], 0.5)
            if self._wake_read in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_read, 4096)
            for run in [run for run in draining if run.output in ready]:
                data = os.read(run.output, _READ)
                if data:
                    if self._port is not None:
                        self._port.write(data)
                    continue
                draining.remove(run)
                os.close(run.output)
                self._ended(run)
        with self._lock:
            draining += self._fresh
            self._fresh.clear()
        for run in draining:
            os.close(run.output)

    def _ended(self, run: _Run) -> None:
        status = run.process.wait()
        with self._lock:
            if run.stopped_by_us or run is not self._run:
                return
            self._run = None
            if run.process.stdin is not None:
                with contextlib.suppress(OSError):
                    run.process.stdin.close()
            now = time.monotonic()
            self.exits = [(at, code) for at, code in self.exits
                          if now - at < BOOT_LOOP_WITHIN_S] + [(now, status)]
            if len(self.exits) >= BOOT_LOOP_EXITS:
                statuses = ", ".join(describe_status(code) for _, code in self.exits)
                self.boot_loop = (f"{self.command[0]} exited {len(self.exits)} times within "
                                  f"{BOOT_LOOP_WITHIN_S:g} s ({statuses}): {LOOP_NOTE}")
                self.loops += 1
                self.loop_at = time.monotonic()
                self.note(self.boot_loop)
            else:
                self.note(f"{self.command[0]} ended with {describe_status(status)}: "
                          "rebooting (started again)")
                try:
                    self._start()
                except RigFault as fault:
                    self.boot_loop = str(fault)
        if self.on_change is not None:
            self.on_change()


# ====================================================================== the drivers
class ProcessConsole(SerialConsole):
    """The board's pty as a ``SerialConsole``; a boot loop ends every wait as ``BootLoop``."""

    def __init__(self, board: ProcessBoard, **options: Any) -> None:
        super().__init__(port=str(board.console_path), **options)
        self.board = board
        self.name = f"{board.name} ({board.command[0]}, pty {board.console_path})"
        self._opened_at = 0.0
        self._loops_seen = 0      # hil's boot-loop notes this console has logged
        board.on_change = self._board_changed

    def open(self) -> None:
        self._opened_at = time.monotonic()
        super().open()

    def _board_changed(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _record(self, lines: list[LogLine]) -> None:
        self._loops_seen += sum(1 for line in lines
                                if line.text.startswith("[hil] ") and LOOP_NOTE in line.text)
        super()._record(lines)

    def _usable_port(self, doing: str, *, check_vanished: bool = True) -> Any:
        port = super()._usable_port(doing, check_vanished=check_vanished)
        board = self.board
        # Once the log holds the loop's output (hil's note is its last line), or at once when
        # the loop came before this console opened: the fault then shows what the board said.
        if check_vanished and board.boot_loop is not None and (
                self._loops_seen >= board.loops or board.loop_at < self._opened_at):
            raise BootLoop(f"{self.name}: {board.boot_loop} (while {doing}){self._tail()}")
        return port


class _BoardPart(DriverBase):
    """A part that is the board process itself: nothing of its own to open or close."""

    def __init__(self, board: ProcessBoard) -> None:
        self.board = board

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class ProcessPower(_BoardPart):
    """The program's power: off is SIGKILL, on starts it. No battery to set."""

    can_cut = True

    def identify(self) -> str:
        return f"host process {self.board.command[0]} (power: SIGKILL / start)"

    def set_level(self, percent: int) -> None:
        raise Unsupported(f"{self.board.name} is a host build: it reads no battery, so a "
                          f"battery level ({percent} %) cannot be set")

    def output(self, on: bool) -> None:
        self.board.power(on)


class ProcessFlasher(_BoardPart):
    """The program's flash: ``primary.bin`` in its state directory; reset is SIGTERM, restart."""

    def program(self, image: Path, *, progress: Progress | None = None,
                full: bool = False) -> None:
        size = image.stat().st_size     # a file copy: always all of it, ``full`` or not
        self.board.program(image)
        if progress is not None:
            progress(size, size)

    def reset(self) -> None:
        self.board.reset()
