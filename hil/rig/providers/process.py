"""A host build as the board (``console: {command: [...]}``): hil builds it, runs it, and gives
the rig its console, power and flasher (``hil.drivers.process``).

At ``start()``:

1. ``console.build`` runs (in the directory hil runs in, one build at a time per program across
   processes; ``make`` decides whether anything is out of date), ``{out}`` in its arguments
   replaced by the program's path and ``{defines}`` by the ``-DDEFECT_<NAME>`` flags of
   ``console.defects``. Its failure is a ``RigFault`` with the build's last output line.
2. The program starts as the board, in ``HIL_STATE_DIR``, with (DESIGN.md's host-build contract)
   ``HIL_OTA_URL``, ``HIL_OTA_HOST``, ``HIL_OTA_PORT``, ``HIL_PRODUCT_ID``, ``HIL_DEV_ID``,
   ``HIL_ACCESS_KEY`` (from ``identity.access_key_env``; a fresh key when the variable is unset,
   as for a simulated board, never logged) and ``HIL_STATE_DIR`` (``Rig.process_state_dir``),
   then ``console.env`` (which may override any of them), over hil's own environment.

The gateway's URL is known only once the board is up: until ``point_at(url)`` the program's
OTA URL is an address that refuses connections (a loopback port hil holds bound, not listening:
a board whose server is down). ``point_at`` changes it for the next start, not the running
program: the next reset or power cycle (what starts an attempt on a board without a shell)
boots it pointed at the gateway, and nothing is sent meanwhile.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import filelock

from hil.drivers.base import ConsoleProtocol, FlasherProtocol, PowerProtocol
from hil.drivers.process import (
    PRIMARY,
    ProcessBoard,
    ProcessConsole,
    ProcessFlasher,
    ProcessPower,
)
from hil.errors import RigFault
from hil.rig.inputs import DEFAULT_BASE
from hil.rig.model import PROCESS_ROOT, Rig
from hil.rig.providers import fresh_access_key

BUILD_WAIT_S = 600.0       # another process building the same program
STATE_WAIT_S = 600.0       # another process running a board over the same state directory


def program_path(rig: Rig, root: Path | None = None) -> Path:
    """The program of ``console.command`` (relative to ``root``, default the current
    directory; a bare name is looked up on PATH)."""
    assert rig.console.command is not None
    name = rig.console.command[0]
    if "/" not in name:
        found = shutil.which(name)
        return Path(found) if found else Path(name)
    return ((root or Path.cwd()) / name).resolve()


def defines(defects: tuple[str, ...]) -> str:
    """``("skips-md5",)`` -> ``-DDEFECT_SKIPS_MD5``: what a defect is compiled in with."""
    return " ".join(f"-DDEFECT_{name.upper().replace('-', '_')}" for name in defects)


def build(rig: Rig) -> Path:
    """Run the rig's ``console.build`` (if any) and return the program, which must exist."""
    program = program_path(rig)
    spec = rig.console
    if spec.build:
        command = [arg.replace("{out}", str(program)).replace("{defines}", defines(spec.defects))
                   for arg in spec.build]
        key = hashlib.sha256(str(program).encode()).hexdigest()[:16]
        PROCESS_ROOT.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(PROCESS_ROOT / f"build-{key}.lock"), is_singleton=False,
                                 thread_local=False)
        try:
            with lock.acquire(timeout=BUILD_WAIT_S):
                done = subprocess.run(command, capture_output=True, text=True,  # noqa: S603
                                      check=False)
        except FileNotFoundError:
            raise RigFault("console", f"console.build: {command[0]} not found") from None
        except filelock.Timeout:
            raise RigFault("console", f"console.build: {program} has been built by another "
                           f"process for more than {BUILD_WAIT_S:g} s") from None
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise RigFault("console", f"console.build: {' '.join(command)} failed with status "
                           f"{done.returncode}: {said[-1] if said else 'no output'}")
    if not os.access(program, os.X_OK):
        raise RigFault("console", f"console.command: {program} is not an executable program "
                       f"(relative paths are taken from {Path.cwd()})")
    return program


class ProcessProvider:
    """The parts of a host-build rig (see the module docstring)."""

    def __init__(self, rig: Rig) -> None:
        if rig.console.command is None or rig.process_state_dir is None:
            raise RigFault("console", "not a host build (no console.command)", rig.name)
        self.rig = rig
        self.state_dir: Path = rig.process_state_dir
        self.board: ProcessBoard | None = None
        self.factory_image: Path | None = None     # written at start (_write_factory_image)
        self._refuser: socket.socket | None = None
        self._claim: filelock.FileLock | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.board is not None:
            return
        program = build(self.rig)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        claim = filelock.FileLock(f"{self.state_dir}.lock", is_singleton=False,
                                  thread_local=False)
        try:
            claim.acquire(timeout=STATE_WAIT_S)
        except filelock.Timeout:
            raise RigFault("console", f"another process has run a board over {self.state_dir} "
                           f"for more than {STATE_WAIT_S:g} s", self.rig.name) from None
        self._claim = claim
        try:
            refuser = self._refuser = socket.socket()
            refuser.bind(("127.0.0.1", 0))      # bound, never listening: connections refused
            nowhere = f"http://127.0.0.1:{refuser.getsockname()[1]}"
            assert self.rig.console.command is not None
            self.factory_image = self._write_factory_image()
            primary = self.state_dir / PRIMARY
            if not primary.is_file():      # a new board: the image it came with
                shutil.copyfile(self.factory_image, primary)
            self.board = ProcessBoard([str(program), *self.rig.console.command[1:]],
                                      env=self._env(nowhere), state_dir=self.state_dir,
                                      console_path=Path(f"{self.state_dir}.console"),
                                      name=self.rig.name)
            self.board.start()
        except BaseException:
            self.stop()
            raise

    def _write_factory_image(self) -> Path:
        """The image the board came with (the suite's base version, built as the simulated
        boards' factory image is): a shell-less board's base when no ``--hil-firmware`` is
        given, and what a new state directory's ``primary.bin`` starts as."""
        from hil.sim.images import build_image

        path = Path(f"{self.state_dir}.factory.bin")
        image = build_image(self.rig.board, DEFAULT_BASE)
        if not path.is_file() or path.read_bytes() != image:
            staged = path.with_suffix(".hil")
            staged.write_bytes(image)
            staged.replace(path)
        return path

    def stop(self) -> None:
        board, self.board = self.board, None
        if board is not None:
            board.stop()
        refuser, self._refuser = self._refuser, None
        if refuser is not None:
            refuser.close()
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()

    def _env(self, url: str) -> dict[str, str]:
        fresh_access_key(self.rig)
        identity = self.rig.identity
        return {**os.environ, **self._url_env(url),
                "HIL_PRODUCT_ID": identity.product_id, "HIL_DEV_ID": identity.dev_id,
                "HIL_ACCESS_KEY": os.environ[identity.access_key_env],
                "HIL_STATE_DIR": str(self.state_dir), **self.rig.console.env}

    @staticmethod
    def _url_env(url: str) -> dict[str, str]:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return {"HIL_OTA_URL": url.rstrip("/"), "HIL_OTA_HOST": parts.hostname or "",
                "HIL_OTA_PORT": str(port)}

    # ------------------------------------------------------------------ the parts
    def _board(self) -> ProcessBoard:
        if self.board is None:
            raise RigFault("console", "the host build is not running (the provider was not "
                           "started)", self.rig.name)
        return self.board

    def console(self, log_path: Path | None) -> ConsoleProtocol | None:
        spec = self.rig.console
        return ProcessConsole(self._board(), baudrate=spec.baudrate, ok_pattern=spec.ok,
                              err_pattern=spec.err, log_path=log_path)

    def flasher(self) -> FlasherProtocol | None:
        return ProcessFlasher(self._board()) if self.rig.flasher.kind == "process" else None

    def power(self) -> PowerProtocol | None:
        return ProcessPower(self._board()) if self.rig.power.kind == "process" else None

    def point_at(self, url: str) -> bool:
        """The gateway's URL, for the program's next start (see the module docstring)."""
        self._board().set_env(**self._url_env(url), **self.rig.console.env)
        return True
