"""Rig leases: one process at a time uses a rig, whatever runs on the host.

A lease is an OS file lock (``flock``, through filelock) on ``<lock dir>/<rig>.lock``. The kernel
drops it when its process dies, SIGKILL included, so a killed pytest worker never leaves a rig
blocked. The lock file holds who leased it, for the message another process gets while waiting.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from hil.errors import RigFault

DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "hil-leases"


class RigLease:
    """Holds ``rig`` for this process; a context manager. Re-entrant within the process: every
    RigLease of one rig shares one lock (a fixture and a test may both lease the rig)."""

    def __init__(self, rig: str, lock_dir: Path = DEFAULT_LOCK_DIR, timeout: float = 600.0) -> None:
        self.rig = rig
        self.timeout = timeout
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
            self._lock.acquire(timeout=self.timeout)
        except Timeout:
            raise RigFault("lease", f"still held after {self.timeout:g} s by "
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
