"""Rig leases: an OS file lock per rig, held by one process, dropped by the kernel when it dies."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hil.errors import RigFault
from hil.rig.lease import RigLease

# Another process that takes a lease, says so, and holds it until it is killed.
HOLDER = """
import sys, time
from pathlib import Path
from hil.errors import RigFault
from hil.rig.lease import RigLease

lease = RigLease(sys.argv[1], Path(sys.argv[2]), timeout=float(sys.argv[3]))
print("waiting", flush=True)
try:
    lease.acquire()
except RigFault as fault:
    print("fault", fault, flush=True)
    sys.exit(3)
print("held", flush=True)
time.sleep(120)   # until killed
"""

LINE_TIMEOUT = 20.0   # a python starting and importing hil, on a slow CI machine


class Holder:
    """A subprocess running HOLDER; its stdout is read a line at a time, with a deadline."""

    def __init__(self, rig: str, lock_dir: Path, timeout: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, rig, str(lock_dir), str(timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.process.pid

    def line(self, timeout: float = LINE_TIMEOUT) -> str | None:
        """The next line, or None if none came within ``timeout`` seconds."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def expect(self, wanted: str, timeout: float = LINE_TIMEOUT) -> str:
        line = self.line(timeout)
        if line is None or not line.startswith(wanted):
            self.stop()
            pytest.fail(f"holder said {line!r}, not {wanted!r}; stderr: {self.stderr}")
        return line

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        _, self.stderr = self.process.communicate(timeout=10)   # waits; closes the pipes
        self._reader.join(timeout=10)

    stderr = ""


@pytest.fixture
def spawn() -> Iterator[Callable[..., Holder]]:
    holders: list[Holder] = []

    def start(rig: str, lock_dir: Path, timeout: float = 10.0) -> Holder:
        holder = Holder(rig, lock_dir, timeout)
        holders.append(holder)
        return holder

    yield start
    for holder in holders:
        holder.stop()


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "leases"


def _held_by(spawn, rig: str, lock_dir: Path) -> Holder:
    holder = spawn(rig, lock_dir)
    holder.expect("waiting")
    holder.expect("held")
    return holder


# ------------------------------------------------------------------------- in one process
def test_acquire_and_release(lock_dir):
    lease = RigLease("bench-01", lock_dir, timeout=1)
    assert not lease.held
    assert lease.acquire() is lease
    assert lease.held
    assert lease.path == lock_dir / "bench-01.lock"
    assert lease.path.exists()
    lease.release()
    assert not lease.held
    lease.release()   # releasing a lease not held is harmless
    assert not lease.held
    lease.acquire()   # and it can be taken again
    assert lease.held
    lease.release()
    assert not lease.held


def test_the_lock_dir_is_created_if_missing(tmp_path):
    lock_dir = tmp_path / "not" / "yet" / "there"
    assert not lock_dir.exists()
    with RigLease("bench-01", lock_dir, timeout=1) as lease:
        assert lock_dir.is_dir()
        assert lease.path.parent == lock_dir
        assert lease.path.exists()


def test_a_context_manager_and_re_entrant(lock_dir):
    lease = RigLease("bench-01", lock_dir, timeout=1)
    with lease as entered:
        assert entered is lease
        assert lease.held
        with lease:   # re-entrant: the same lease again does not block on itself
            assert lease.held
        assert lease.held   # the inner exit keeps the outer hold
    assert not lease.held


def test_the_context_manager_releases_on_an_exception(lock_dir, spawn):
    lease = RigLease("bench-01", lock_dir, timeout=1)
    with pytest.raises(ZeroDivisionError), lease:
        1 / 0   # noqa: B018
    assert not lease.held
    _held_by(spawn, "bench-01", lock_dir)   # another process gets it


def test_a_second_lease_on_the_same_rig_in_the_same_process_does_not_block(lock_dir):
    # "Holds `rig` for this process ... Re-entrant within the process" (RigLease's docstring):
    # a second RigLease object for a rig this process already holds must not wait on itself.
    with RigLease("bench-01", lock_dir, timeout=1):
        started = time.monotonic()
        with RigLease("bench-01", lock_dir, timeout=1) as again:
            assert again.held
        assert time.monotonic() - started < 0.5


def test_the_holder_file_names_this_process(lock_dir):
    with RigLease("bench-01", lock_dir, timeout=1):
        holder = (lock_dir / "bench-01.holder").read_text(encoding="utf-8")
    assert f"pid {os.getpid()}" in holder


# ----------------------------------------------------------------- between processes
def test_a_lease_held_by_another_process_blocks_and_names_the_holder(lock_dir, spawn):
    holder = _held_by(spawn, "bench-01", lock_dir)

    lease = RigLease("bench-01", lock_dir, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(RigFault) as caught:
        lease.acquire()
    waited = time.monotonic() - started

    assert 0.25 <= waited < 5
    assert not lease.held
    fault = caught.value
    assert (fault.part, fault.rig) == ("lease", "bench-01")
    message = str(fault)
    assert message.startswith("rig bench-01: lease: ")
    assert f"pid {holder.pid}" in message
    assert "0.3 s" in message
    assert str(lease.path) in message
    assert len(message.splitlines()) == 1


def test_the_context_manager_blocks_too(lock_dir, spawn):
    holder = _held_by(spawn, "bench-01", lock_dir)
    with pytest.raises(RigFault, match=rf"rig bench-01: lease: .*pid {holder.pid}\b"), \
            RigLease("bench-01", lock_dir, timeout=0.2):
        pytest.fail("entered a lease another process holds")


def test_another_process_is_refused_while_this_one_holds(lock_dir, spawn):
    with RigLease("bench-01", lock_dir, timeout=1):
        waiter = spawn("bench-01", lock_dir, timeout=0.3)
        waiter.expect("waiting")
        refused = waiter.expect("fault")
        assert waiter.process.wait(timeout=LINE_TIMEOUT) == 3
    assert "rig bench-01: lease: " in refused
    assert f"pid {os.getpid()}" in refused


def test_a_waiting_process_gets_the_rig_when_it_is_released(lock_dir, spawn):
    lease = RigLease("bench-01", lock_dir, timeout=1).acquire()
    waiter = spawn("bench-01", lock_dir, timeout=30)
    waiter.expect("waiting")
    assert waiter.line(timeout=0.5) is None   # still waiting: the rig is ours
    lease.release()
    waiter.expect("held", timeout=10)
    with pytest.raises(RigFault, match=f"pid {waiter.pid}"):
        RigLease("bench-01", lock_dir, timeout=0.2).acquire()


def test_a_killed_holder_frees_the_rig_at_once(lock_dir, spawn):
    holder = _held_by(spawn, "bench-01", lock_dir)
    with pytest.raises(RigFault):
        RigLease("bench-01", lock_dir, timeout=0.2).acquire()

    holder.process.kill()   # SIGKILL: no handler, no cleanup, no release
    assert holder.process.wait(timeout=10) == -9

    lease = RigLease("bench-01", lock_dir, timeout=10)
    started = time.monotonic()
    lease.acquire()
    try:
        assert lease.held
        assert time.monotonic() - started < 1.0   # the kernel dropped the lock, no stale wait
        holder_text = (lock_dir / "bench-01.holder").read_text(encoding="utf-8")
        assert f"pid {os.getpid()}" in holder_text
    finally:
        lease.release()


def test_different_rigs_do_not_block_each_other(lock_dir, spawn):
    _held_by(spawn, "bench-01", lock_dir)
    _held_by(spawn, "bench-02", lock_dir)   # another process, another rig: not blocked
    started = time.monotonic()
    with RigLease("bench-03", lock_dir, timeout=5) as lease:
        assert lease.held
    assert time.monotonic() - started < 1.0


def test_the_same_rig_in_another_lock_dir_is_another_lease(tmp_path, spawn):
    _held_by(spawn, "bench-01", tmp_path / "one")
    with RigLease("bench-01", tmp_path / "two", timeout=1) as lease:
        assert lease.held


# ----------------------------------------------------------------- saying so while waiting
def test_a_busy_rig_says_who_holds_it_once_then_waits(lock_dir, spawn):
    holder = _held_by(spawn, "bench-01", lock_dir)
    said: list[str] = []
    lease = RigLease("bench-01", lock_dir, timeout=0.3, on_wait=said.append)
    with pytest.raises(RigFault) as caught:
        lease.acquire()
    assert len(said) == 1
    assert said[0].startswith(f"rig bench-01 is busy (held by pid {holder.pid} on ")
    assert said[0].endswith("), waiting up to 0.3 s")
    assert str(caught.value).startswith(
        f"rig bench-01: lease: busy for 0.3 s, held by pid {holder.pid} on ")


def test_a_free_rig_is_taken_without_a_word(lock_dir):
    said: list[str] = []
    with RigLease("bench-01", lock_dir, timeout=1, on_wait=said.append) as lease:
        assert lease.held
    assert said == []


def test_by_default_the_waiting_line_goes_to_stderr(lock_dir, spawn):
    with RigLease("bench-01", lock_dir, timeout=1):
        waiter = spawn("bench-01", lock_dir, timeout=0.5)
        waiter.expect("waiting")
        waiter.expect("fault")
        waiter.stop()
    assert waiter.stderr.splitlines() == [
        line for line in waiter.stderr.splitlines()
        if line.startswith(f"hil: rig bench-01 is busy (held by pid {os.getpid()} on ")]
    assert len(waiter.stderr.splitlines()) == 1
