"""The SWD flasher: nRF52832 and GD32F103 boards programmed and inspected with pyocd's Python API.

One pyocd ``Session`` per open driver, on the probe the rig names by unique id (``pyocd list``)
and the target the rig names (``nrf52832`` is built into pyocd; ``gd32f103c8`` comes from
GigaDevice's CMSIS pack, installed with ``pyocd pack install`` or named in the rig as a .pack file).

What ``open()`` checks, in this order, so the most useful message comes first:

1. the target: pyocd's builtin table, then the pack the rig names (it must exist and describe the
   target), then the packs installed by ``pyocd pack install``. This needs no probe, so a rig that
   lacks a pack says how to get it even on a desk with nothing plugged in;
2. the probe: enumerated without waiting (pyocd would otherwise wait forever for one), matched by
   its exact unique id; a missing one is reported with the ids that are connected;
   a probe on another host, ``remote:HOST:PORT``, is pyocd's remote probe client to the
   ``pyocd server`` there (a labgrid place's probe: hil.rig.providers.labgrid), not enumerated;
3. the connection itself (probe open, SWD clock, target init).

The session is opened in ``attach`` mode: opening the flasher does not stop the firmware under
test (a test may read a variable of a running board). Programming halts the core itself (pyocd's
flash algorithm needs it), and the image runs after ``reset()``. ``close()`` resumes the core.

Configuration comes from the rig only: pyocd's own config files (``pyocd.yaml`` in the working
directory) are not read, so a run does not depend on the directory it was started from.

Every pyocd failure becomes a ``RigFault("flasher", ...)`` naming the probe: the bench (probe,
cable, target power), not the firmware, failed.
"""

from __future__ import annotations

import importlib.resources as importlib_resources
import io
import logging
import threading
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyocd.core import exceptions as pyocd_errors
from pyocd.core.helpers import ConnectHelper
from pyocd.core.session import Session
from pyocd.debug.svd import loader as svd_loader
from pyocd.flash.file_programmer import FileProgrammer
from pyocd.probe.aggregator import DebugProbeAggregator
from pyocd.target import normalise_target_type_name
from pyocd.target.builtin import BUILTIN_TARGETS
from pyocd.target.pack.cmsis_pack import CmsisPack
from pyocd.target.pack.pack_target import (
    ManagedPacks,
)

from hil.drivers.base import DriverBase, Progress
from hil.drivers.elf import elf_symbol
from hil.errors import RigFault

log = logging.getLogger(__name__)


def _read_builtin_svd(cls: Any, svd_name: str) -> Any:
    """pyocd 0.46's ``SVDFile.from_builtin`` opens its ``svd_data.zip`` for every nRF52 target it
    builds and never closes it (a ResourceWarning each time, an error under warnings-as-errors).
    The same SVD, read into memory with the archive closed."""
    archive_path = importlib_resources.files("pyocd").joinpath(svd_loader.BUILTIN_SVD_DATA_PATH)
    with archive_path.open("rb") as stream, zipfile.ZipFile(stream) as archive:
        return cls(io.BytesIO(archive.read(svd_name)))


svd_loader.SVDFile.from_builtin = classmethod(_read_builtin_svd)

PART = "flasher"
IMAGE_FORMATS = ("hex", "bin", "elf", "axf")   # what pyocd's FileProgrammer reads, by suffix
# pyocd raises its own Error tree; USB transport failures (pyusb, hidapi) arrive as OSError.
_PROBE_ERRORS = (pyocd_errors.Error, OSError)


# --------------------------------------------------------------------------------- probes
def list_probes() -> list[tuple[str, str]]:
    """The debug probes connected now, as (unique id, description), sorted like ``pyocd list``.

    Never waits for a probe to appear. A probe that cannot be queried is listed with the reason.
    """
    return [(unique_id, description) for unique_id, description, _ in _connected_probes()]


def _connected_probes() -> list[tuple[str, str, Any]]:
    try:
        probes = ConnectHelper.get_all_connected_probes(blocking=False, print_wait_message=False)
    except _PROBE_ERRORS as err:
        raise RigFault(PART, f"cannot enumerate SWD probes: {err}") from err
    found: list[tuple[str, str, Any]] = []
    for probe in probes:
        unique_id = str(probe.unique_id)
        try:
            description = str(probe.description)
        except _PROBE_ERRORS as err:
            description = f"inaccessible ({err})"
        found.append((unique_id, description, probe))
    return found


REMOTE = "remote:"      # pyocd's remote probe client: remote:host:port, a `pyocd server`


def is_remote(unique_id: str) -> bool:
    """``remote:host:port``: a probe served by ``pyocd server`` on another host (a lab's bench
    host, a labgrid place's ``pyocd`` NetworkService), reached through pyocd's remote probe
    client rather than found among the probes plugged in here."""
    return unique_id.casefold().startswith(REMOTE)


def _remote_probe(unique_id: str) -> Any:
    """pyocd's remote probe client for ``remote:host:port`` (no I/O until it opens)."""
    address = unique_id[len(REMOTE):]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RigFault(PART, f"SWD probe {unique_id}: a remote probe is remote:HOST:PORT "
                             "(the host and port its `pyocd server` listens on)")
    return DebugProbeAggregator.get_probe_with_id(f"{REMOTE}{address}")


def _find_probe(unique_id: str) -> Any:
    if is_remote(unique_id):
        return _remote_probe(unique_id)
    connected = _connected_probes()
    for probe_id, _, probe in connected:
        if probe_id.casefold() == unique_id.casefold():
            return probe
    listing = ", ".join(f"{probe_id} ({description})" for probe_id, description, _ in connected)
    raise RigFault(PART, f"SWD probe {unique_id} not found; probes connected: {listing or 'none'}")


# --------------------------------------------------------------------------------- targets
def check_target_support(target: str, pack: Path | None = None,
                         probe: str | None = None) -> None:
    """Raise RigFault unless pyocd can drive ``target``: builtin, described by ``pack``,
    described by a pack installed with ``pyocd pack install``, or, last, brought by the probe
    ``probe`` itself (a simulated board's probe plugin defines its chip's target). Files are
    read first; the probe is only asked when they do not know the target."""
    name = normalise_target_type_name(target)
    if pack is not None:
        parts = _pack_part_numbers(pack)
        if name in parts or name in BUILTIN_TARGETS:
            return
        raise RigFault(PART, f"CMSIS pack {pack} does not describe target {target}; "
                             f"it describes: {', '.join(sorted(parts)) or 'no device'}")
    if name in BUILTIN_TARGETS or name in _installed_pack_part_numbers():
        return
    # A remote probe's server is not asked: it serves a probe, not its targets.
    if probe is not None and not is_remote(probe) and _probe_brings_target(probe, name):
        return
    raise RigFault(PART, f"target {target} needs its CMSIS pack: `pyocd pack install {target}` "
                         "or name the .pack file in the rig (flasher.pack)")


def _probe_brings_target(unique_id: str, name: str) -> bool:
    for probe_id, _, probe in _connected_probes():
        if probe_id.casefold() == unique_id.casefold():
            return name in getattr(probe, "target_names", ())
    return False


def _pack_part_numbers(pack: Path) -> set[str]:
    """The (normalised) part numbers a .pack file, or an expanded pack directory, describes."""
    if not pack.exists():
        raise RigFault(PART, f"CMSIS pack {pack} does not exist (flasher.pack)")
    try:
        if pack.is_dir():
            devices = CmsisPack(str(pack)).devices
        else:
            # Opened here, not by pyocd, so the zip file is closed when we are done reading it.
            with zipfile.ZipFile(pack) as archive:
                devices = CmsisPack(archive).devices
        return {normalise_target_type_name(device.part_number) for device in devices}
    except (zipfile.BadZipFile, ET.ParseError, pyocd_errors.Error, OSError) as err:
        raise RigFault(PART, f"CMSIS pack {pack} cannot be read: {err}") from err


def _installed_pack_part_numbers() -> set[str]:
    """Part numbers of the packs ``pyocd pack install`` installed (a local index, no network)."""
    try:
        devices = ManagedPacks.get_installed_targets()
    except (pyocd_errors.Error, OSError, ValueError) as err:
        raise RigFault(PART, f"cannot read pyocd's installed CMSIS packs: {err}") from err
    return {normalise_target_type_name(device.part_number) for device in devices}


# --------------------------------------------------------------------------------- progress
class _TwoPassProgress:
    """pyocd's progress (a fraction) as one monotonic (done, total) for the caller.

    pyocd reports a fraction that runs 0 -> 1 twice per image: once while erasing (or, with smart
    flash, while checking which sectors changed), then again while programming. The caller sees
    per-mille of the whole job: the erase pass is 0..1000 of 2000, the program pass 1000..2000.
    """

    STEPS = 1000
    TOTAL = 2 * STEPS

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._programming = False
        self._last_fraction = 0.0
        self._last_done = -1

    def __call__(self, fraction: float) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        if fraction < self._last_fraction:   # the fraction starts over: programming began
            self._programming = True
        self._last_fraction = fraction
        done = (self.STEPS if self._programming else 0) + round(fraction * self.STEPS)
        self._report(done)

    def finish(self) -> None:
        self._report(self.TOTAL)

    def _report(self, done: int) -> None:
        if done > self._last_done:
            self._last_done = done
            self._progress(done, self.TOTAL)


# --------------------------------------------------------------------------------- the driver
class SwdFlasher(DriverBase):
    """A board behind an SWD debug probe, through pyocd (see the module docstring).

    ``probe`` is the probe's unique id as ``pyocd list`` shows it; ``target`` a pyocd target type
    (``nrf52832``, ``gd32f103c8``); ``pack`` a CMSIS .pack file for targets pyocd lacks;
    ``frequency`` the SWD clock in Hz; ``base_address`` where a raw ``.bin`` image goes (default:
    the start of the target's boot flash; .hex and .elf images carry their addresses).
    """

    def __init__(self, probe: str, target: str, pack: Path | None = None,
                 frequency: int = 4_000_000, base_address: int | None = None) -> None:
        self.probe = probe
        self.target = target
        self.pack = pack
        self.frequency = frequency
        self.base_address = base_address
        self._session: Any = None
        # pyocd's session is not thread-safe: a reset from a fault's hook thread and a crash
        # watch's reads on the test's thread take turns.
        self._lock = threading.RLock()

    @property
    def name(self) -> str:
        """For messages: the probe and the target."""
        return f"SWD probe {self.probe} ({self.target})"

    # ----------------------------------------------------------------------------- lifecycle
    def open(self) -> None:
        if self._session is not None:
            return
        check_target_support(self.target, self.pack, self.probe)
        probe = _find_probe(self.probe)
        options: dict[str, Any] = {
            "target_override": self.target,
            "frequency": self.frequency,
            "connect_mode": "attach",            # do not stop the firmware by looking at it
            "smart_flash": True,                 # sectors that already hold the data are skipped
            "hide_programming_progress": True,   # progress goes to the caller, not to stdout
            "no_config": True,                   # the rig is the configuration, not the cwd
        }
        if self.pack is not None:
            options["pack"] = [str(self.pack)]
        session: Any = None
        try:
            session = Session(probe, auto_open=False, options=options)
            # pyocd parses the part's SVD (register names, for its debugger) on a background
            # thread per connect; flashing and resetting need none of it, so skip the parse (a
            # private attribute of CoreSightTarget; pyocd is pinned).
            if hasattr(session.target, "_svd_location"):
                session.target._svd_location = None
            session.open()
        except _PROBE_ERRORS as err:
            if session is not None:
                self._close_quietly(session)
            if is_remote(self.probe) and isinstance(err, OSError):
                raise RigFault(PART, f"{self.name}: no pyocd server answers at "
                               f"{self.probe[len(REMOTE):]} (`pyocd server` on the probe's "
                               f"host): {err.strerror or err}") from err
            raise RigFault(PART, f"{self.name}: cannot connect: {err}") from err
        self._session = session
        log.info("%s: connected", self.name)

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            self._close_quietly(session)

    def _close_quietly(self, session: Any) -> None:
        # Closing runs after the work is done (or failed): a probe unplugged meanwhile is logged,
        # and must not hide the error that got us here.
        try:
            session.close()
        except _PROBE_ERRORS as err:
            log.warning("%s: error while closing: %s", self.name, err)

    # ----------------------------------------------------------------------------- FlasherProtocol
    def program(self, image: Path, *, progress: Progress | None = None,
                full: bool = False) -> None:
        """Write a .hex, .bin or .elf image to flash; sectors already holding the data are skipped.

        pyocd's smart flash: the target's CRC32 of each sector (its analyzer, run on the core),
        then a read-back of the pages whose CRC matches (a match is not trusted alone), and only
        the sectors that differ are erased and programmed. ``full`` erases and programs every
        sector the image covers whatever they hold (the reference). Either way the rest of a
        sector the image covers in part is read and written back (pyocd's keep_unwritten), so
        both leave the flash the same.

        The core is left halted: ``reset()`` runs the new image. ``progress`` gets (done, total)
        in per-mille of the erase and program passes (see ``_TwoPassProgress``).
        """
        image_format = image.suffix.lower().lstrip(".")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"{image}: pyocd programs {', '.join(IMAGE_FORMATS)} images, "
                             f"not {image.suffix or 'a file without suffix'}")
        if not image.is_file():
            raise FileNotFoundError(f"{image}: no such image")
        session = self._require_open()
        kwargs: dict[str, Any] = {}
        if image_format == "bin" and self.base_address is not None:
            kwargs["base_address"] = self.base_address
        reporter = _TwoPassProgress(progress) if progress is not None else None
        with self._faults(f"programming {image.name}"):
            # Halted first, whatever pyocd goes on to find: the firmware must not run while
            # its flash (and, after, its settings) change, nor after an image that was in
            # place already, until reset().
            session.target.halt()
            # Sector erase, never a chip erase: that would take the bootloader and the settings
            # with it (pyocd's "auto" picks one when it guesses it faster).
            FileProgrammer(session, progress=reporter, smart_flash=not full,
                           chip_erase="sector").program(
                str(image), file_format=image_format, **kwargs)
        if reporter is not None:
            reporter.finish()
        log.info("%s: programmed %s%s", self.name, image, " (every sector)" if full else "")

    def reset(self) -> None:
        """Reset the target (pyocd's default reset type for it) and let it run."""
        session = self._require_open()
        with self._faults("reset"):
            session.target.reset()

    # ----------------------------------------------------------------------------- debug access
    def halt(self) -> None:
        session = self._require_open()
        with self._faults("halt"):
            session.target.halt()

    def resume(self) -> None:
        session = self._require_open()
        with self._faults("resume"):
            session.target.resume()

    def read_memory(self, address: int, size: int) -> bytes:
        session = self._require_open()
        with self._faults(f"reading {size} bytes at {address:#010x}"):
            return bytes(session.target.read_memory_block8(address, size))

    def write_memory(self, address: int, data: bytes) -> None:
        session = self._require_open()
        with self._faults(f"writing {len(data)} bytes at {address:#010x}"):
            session.target.write_memory_block8(address, list(data))
            session.target.flush()   # writes may be queued by the probe; make them happen now

    def read_core_registers(self, names: list[str]) -> dict[str, int]:
        """The core registers ``names`` (pyocd's names: ``pc``, ``lr``, ``xpsr``, ``msp``...);
        the core must be halted (``halt()``)."""
        session = self._require_open()
        with self._faults(f"reading core registers {', '.join(names)}"):
            values = session.target.read_core_registers_raw(names)
        return {name: int(value) & 0xFFFFFFFF for name, value in zip(names, values, strict=True)}

    def read_symbol(self, elf: Path, name: str, size: int | None = None) -> bytes:
        """The bytes of the variable ``name`` (address and size from ``elf``'s symbol table).

        ``size`` overrides the table's size (to read part of a variable, or one the table gives
        no size for). KeyError names a symbol the ELF does not define.
        """
        address, symbol_size = elf_symbol(elf, name)
        count = symbol_size if size is None else size
        if count <= 0:
            raise ValueError(f"symbol {name} in {elf} has no size; pass size=")
        return self.read_memory(address, count)

    # ----------------------------------------------------------------------------- helpers
    def _require_open(self) -> Any:
        if self._session is None:
            raise RuntimeError(f"{self.name}: the flasher is not open")
        return self._session

    @contextmanager
    def _faults(self, what: str) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except _PROBE_ERRORS as err:
                raise RigFault(PART, f"{self.name}: {what} failed: {err}") from err
