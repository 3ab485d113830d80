"""A simulated device's serial port: a real pseudo-terminal, reachable at a stable path.

The device holds the pty's master side; the host opens the slave the way it opens a USB serial
adapter (pyserial, ``port: <path>`` in a rig file). Because pty numbers change from run to run,
``PtyPort`` puts a symlink at the path the rig file names and removes it when it stops.

It behaves as a UART behind a USB bridge does: what the device sends while no host has the port
open is lost (the kernel would otherwise queue it and hand a later opener stale lines), and what
the host writes is delivered to ``on_data`` on the port's own thread. The pty is raw from the
start: no echo, no line-ending translation.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import tty
from collections.abc import Callable
from pathlib import Path

_IDLE_S = 0.05   # how long the thread waits before looking again while no host has the port


class PtyPort:
    """A pty whose slave is linked at ``path``; ``on_data(bytes)`` gets what the host writes.

    ``start()`` / ``stop()`` (or ``with``): nothing outlives ``stop()``, not the thread, not the
    file descriptors, not the symlink."""

    def __init__(self, path: Path, on_data: Callable[[bytes], None], *, name: str = "pty") -> None:
        self.path = path
        self.name = name
        self._on_data = on_data
        self._master = -1
        self._write_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_read = self._wake_write = -1
        self.error: BaseException | None = None

    def start(self) -> PtyPort:
        master, slave = os.openpty()
        tty.setraw(slave)
        target = os.ttyname(slave)
        # Closing our slave end lets the master tell whether a host has the port open (POLLHUP).
        os.close(slave)
        os.set_blocking(master, False)
        self._master = master
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.path.symlink_to(target)
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name=f"hil-sim {self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        os.write(self._wake_write, b"x")
        thread.join(timeout=5)
        with self._write_lock:
            os.close(self._master)
            self._master = -1
        os.close(self._wake_read)
        os.close(self._wake_write)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_symlink():
                self.path.unlink()

    def __enter__(self) -> PtyPort:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def host_attached(self) -> bool:
        """Whether a host has the port open now."""
        if self._master < 0:
            return False
        poller = select.poll()
        poller.register(self._master, select.POLLHUP)
        return not any(event & select.POLLHUP for _, event in poller.poll(0))

    def write(self, data: bytes) -> None:
        """Send ``data`` to the host; lost if no host has the port open, as on a real wire.
        A host that stops reading (a full buffer) loses the rest too, never the device's time."""
        with self._write_lock:
            if self._master < 0 or not self.host_attached:
                return
            view = memoryview(data)
            while view:
                try:
                    written = os.write(self._master, view)
                except (BlockingIOError, OSError):
                    return
                view = view[written:]

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.host_attached:
                    self._stopping.wait(_IDLE_S)
                    continue
                ready, _, _ = select.select([self._master, self._wake_read], [], [], _IDLE_S)
                if self._master not in ready:
                    continue
                try:
                    data = os.read(self._master, 4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:      # EIO: the host closed the port between poll and read
                    continue
                if data:
                    self._on_data(data)
        except BaseException as error:   # kept for the owner, which re-raises it on stop
            self.error = error
