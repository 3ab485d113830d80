"""Rig leases: one process at a time uses a rig, whatever runs on the host.

A lease is an OS file lock (``flock``, through filelock) on ``<lock dir>/<rig>.lock``. The kernel
drops it when its process dies, SIGKILL included, so a killed pytest worker never leaves a rig
blocked. Beside it, ``<rig>.holder`` says who leased it (pid, host, since when), for the lines
another process gets: ``rig bench-01 is busy (held by pid 4242 on lab-pc since 10:02:11),
waiting up to 600 s`` when it starts to wait, and past the timeout the RigFault ``rig bench-01:
lease: busy for 600 s, held by pid 4242 ...``.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from hil.errors import RigFault

DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "hil-leases"
DEFAULT_LEASE_TIMEOUT = 600.0     # a whole conformance suite on one rig takes a few minutes


def _to_stderr(line: str) -> None:
    print(f"hil: {line}", file=sys.stderr, flush=True)


class RigLease:
    """Holds ``rig`` for this process; a context manager. Re-entrant within the process: every
    RigLease of one rig shares one lock (a fixture and a test may both lease the rig).

    ``on_wait`` gets one line when the rig is busy and the wait begins (default: stderr)."""

    def __init__(self, rig: str, lock_dir: Path = DEFAULT_LOCK_DIR,
                 timeout: float = DEFAULT_LEASE_TIMEOUT,
                 on_wait: Callable[[str], None] = _to_stderr) -> None:
        self.rig = rig
        self.timeout = timeout
        self.on_wait = on_wait
        self.path = lock_dir / f"{rig}.lock"
        self._holder = lock_dir / f"{rig}.holder"
        # One lock object per path in the process (is_singleton), held by the process rather
        # than a thread, and never the soft, file-exists fallback that would outlive a SIGKILL.
        self._lock = FileLock(self.path, is_singleton=True, thread_local=False,
                              fallback_to_soft=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> RigLease:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            self.on_wait(f"rig {self.rig} is busy (held by {self._read_holder()}), waiting up "
                         f"to {self.timeout:g} s")
            try:
                self._lock.acquire(timeout=self.timeout)
            except Timeout:
                raise RigFault("lease", f"busy for {self.timeout:g} s, held by "
                               f"{self._read_holder()} ({self.path})", self.rig) from None
        # Who holds it, for those waiting (best effort: the lock itself is the truth).
        self._holder.write_text(f"pid {os.getpid()} on {socket.gethostname()} since "
                                f"{time.strftime('%H:%M:%S')}", encoding="utf-8")
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def _read_holder(self) -> str:
        try:
            return self._holder.read_text(encoding="utf-8")
        except OSError:
            return "another process"

    def __enter__(self) -> RigLease:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
