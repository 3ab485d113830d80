"""Simulated SWD boards as pyocd debug probes: the real pyocd (``pyocd list``, ``FileProgrammer``,
``hil.drivers.swd.SwdFlasher``) drives them where it would drive a probe on a USB port.

The plugin is registered under pyocd's ``pyocd.probe`` entry point group as ``hilsim``::

    [project.entry-points."pyocd.probe"]
    hilsim = "hil.sim.probe_plugin:SimProbePlugin"

Which boards are plugged in: the environment variable ``HIL_SIM_PROBES``, a list of board state
directories separated by ``os.pathsep`` (like ``PATH``), so a ``pyocd`` started as another process
sees the same boards. A state directory is the board: ``board.json`` names its probe's unique id
and its chip (written by ``provision()``), ``flash.bin`` (and ``uicr.bin`` for an nRF52) hold its
flash through ``SimFlash``, so the firmware model finds there what was flashed. A unique id is
used like a USB serial number: ``pyocd list`` shows it, ``-u <uid>`` or ``hilsim:<uid>`` picks it.

How it plugs into pyocd (0.46): the probe is an ADIv5 SW-DP as pyocd's DAP layer drives a
CMSIS-DAP probe: ``read_dp``/``write_dp`` and ``read_ap``/``write_ap`` reach the emulated DP and
APs of ``hil.sim.cortex_m`` (pyocd writes SELECT itself, does the power-up handshake, scans the
APs and reads the ROM table); only memory transfers take the short cut pyocd offers probes with
their own memory commands (``get_memory_interface_for_ap``, as the ST-Link does), which keeps a
256 KiB flash well under a second. The target type comes from ``create_associated_board``: the
board's chip unless the session names another target; a GD32 gets the project's own target class
(``hil.sim.chips``), registered as ``hilsim_gd32f103c8`` when pyocd loads the plugin, so no CMSIS
pack is needed and ``pyocd list`` marks the target as available.

One process at a time owns a board while its probe is open (a lock file in the state directory),
as one host owns a USB probe; in-process, the board's core and RAM persist across sessions, so a
halted core stays halted for the next session, as on a real bench.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
from pyocd.board.board import Board
from pyocd.board.board_ids import BoardInfo
from pyocd.core import exceptions
from pyocd.core.memory_interface import MemoryInterface
from pyocd.coresight.ap import APv1Address
from pyocd.probe.debug_probe import DebugProbe
from pyocd.target import TARGET, normalise_target_type_name

from hil.sim.chips import CHIPS, ChipModel
from hil.sim.cortex_m import BusFault, Chip, CortexM, FlashOps, MemAp

log = logging.getLogger(__name__)

ENV_VAR = "HIL_SIM_PROBES"
BOARD_FILE = "board.json"
PLUGIN_NAME = "hilsim"          # hil.sim.probe_plugin.NAME, the entry point's name
# A unique id must survive pyocd's "<probe type>:<uid>" syntax and a shell: no colons, no spaces.
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ================================================================================ boards
@dataclass(frozen=True)
class SimProbeSpec:
    """A simulated board's identity: its probe's unique id, its chip, its state directory."""

    uid: str
    chip: str
    state_dir: Path

    @property
    def model(self) -> ChipModel:
        return CHIPS[self.chip]


def provision(state_dir: Path, uid: str, chip: str) -> SimProbeSpec:
    """Create (or re-identify) a board in ``state_dir``: its ``board.json``. Flash files appear
    erased on first use. Add ``state_dir`` to ``HIL_SIM_PROBES`` to plug the board in."""
    if not _UID.fullmatch(uid):
        raise ValueError(f"simulated probe id {uid!r}: letters, digits, '.', '_' and '-' only")
    if chip not in CHIPS:
        raise ValueError(f"simulated chip {chip!r}: known chips are {', '.join(CHIPS)}")
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / BOARD_FILE).write_text(json.dumps({"uid": uid, "chip": chip}) + "\n")
    return SimProbeSpec(uid, chip, state_dir.resolve())


def read_spec(state_dir: Path) -> SimProbeSpec:
    """The board in ``state_dir``; ValueError names the file and what is wrong with it."""
    path = state_dir / BOARD_FILE
    try:
        data = json.loads(path.read_text())
        uid, chip = str(data["uid"]), str(data["chip"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a simulated board ({err})") from err
    if not _UID.fullmatch(uid) or chip not in CHIPS:
        raise ValueError(f"{path}: uid {uid!r} or chip {chip!r} is not valid "
                         f"(chips: {', '.join(CHIPS)})")
    return SimProbeSpec(uid, chip, state_dir.resolve())


def plugged_in() -> list[SimProbeSpec]:
    """The boards ``HIL_SIM_PROBES`` lists. A broken entry is logged and skipped, the way pyocd
    skips a USB device it cannot read, so the other probes stay usable."""
    specs: list[SimProbeSpec] = []
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if not entry.strip():
            continue
        try:
            specs.append(read_spec(Path(entry)))
        except ValueError as err:
            log.warning("%s: %s", ENV_VAR, err)
    return specs


class SimBoard:
    """One simulated board: its identity and its chip. Obtain it with ``board(spec)``: one object
    per state directory per process, so state lives as long as the process, like a powered board.

    The firmware model hooks in here: ``on_reset`` after every reset (the board boots),
    ``on_run`` when the core starts running the firmware, ``on_halt`` when a debugger stops it.
    They are called with the chip's lock held: keep them short (start a thread if needed).
    """

    def __init__(self, spec: SimProbeSpec) -> None:
        self.spec = spec
        self.model = spec.model
        self.chip: Chip = self.model.build(spec.state_dir, spec.uid)
        self._lock_file = filelock.FileLock(str(spec.state_dir / "probe.lock"), timeout=0)
        self._owner: object | None = None
        self.traffic = MemoryTraffic()   # through any probe's memory commands, since reset()

    @property
    def core(self) -> CortexM:
        return self.chip.core

    @property
    def flash_ops(self) -> FlashOps:
        """What the flash algorithms did since the last ``flash_ops.reset()``."""
        return self.chip.core.flash_ops

    @property
    def on_reset(self) -> Callable[[], None] | None:
        return self.chip.core.on_reset

    @on_reset.setter
    def on_reset(self, hook: Callable[[], None] | None) -> None:
        self.chip.core.on_reset = hook

    @property
    def on_run(self) -> Callable[[], None] | None:
        return self.chip.core.on_run

    @on_run.setter
    def on_run(self, hook: Callable[[], None] | None) -> None:
        self.chip.core.on_run = hook

    @property
    def on_halt(self) -> Callable[[], None] | None:
        return self.chip.core.on_halt

    @on_halt.setter
    def on_halt(self, hook: Callable[[], None] | None) -> None:
        self.chip.core.on_halt = hook

    def connect(self, owner: object) -> None:
        """A probe takes the board: lock it against other processes and probes, open flash."""
        with self.chip.lock:
            if self._owner is not None:
                raise exceptions.ProbeError(f"simulated probe {self.spec.uid} is already open "
                                            "in this process")
            try:
                self._lock_file.acquire()
            except filelock.Timeout as err:
                raise exceptions.ProbeError(
                    f"simulated probe {self.spec.uid} is in use by another process "
                    f"({self._lock_file.lock_file})") from err
            try:
                self.chip.attach()
            except BaseException:
                self._lock_file.release()
                raise
            self._owner = owner

    def disconnect(self, owner: object) -> None:
        with self.chip.lock:
            if self._owner is not owner:
                return
            self._owner = None
            try:
                self.chip.detach()
            finally:
                self._lock_file.release()


_boards: dict[Path, SimBoard] = {}
_boards_lock = threading.Lock()


def board(spec: SimProbeSpec) -> SimBoard:
    """The process's board object for ``spec`` (created on first use)."""
    with _boards_lock:
        existing = _boards.get(spec.state_dir)
        if existing is None or existing.spec != spec:
            existing = _boards[spec.state_dir] = SimBoard(spec)
        return existing


# ================================================================================ the probe
def _fault(err: BusFault) -> exceptions.TransferFaultError:
    return exceptions.TransferFaultError(str(err), fault_address=err.address, length=err.length)


@dataclass
class MemoryTraffic:
    """The bytes the host moved through the probe's memory commands: what crosses the SWD wire
    in bulk (a flash algorithm and its page buffers going in, smart flash's read-back coming
    out), which the simulation moves at no cost. Single register accesses are not counted."""

    read: int = 0
    written: int = 0

    def reset(self) -> None:
        self.read = self.written = 0


class SimMemoryInterface(MemoryInterface):  # type: ignore[misc]   # pyocd ships no type hints
    """Block memory transfers through the emulated AHB-AP (the probe's "memory commands")."""

    def __init__(self, chip: Chip, mem_ap: MemAp, traffic: MemoryTraffic | None = None) -> None:
        self._chip = chip
        self._ap = mem_ap
        self._traffic = traffic if traffic is not None else MemoryTraffic()

    def _read(self, address: int, length: int) -> bytes:
        with self._chip.lock:
            try:
                data = self._ap.read_block(address & 0xFFFFFFFF, length)
            except BusFault as err:
                raise _fault(err) from err
            self._traffic.read += length
            return data

    def _write(self, address: int, data: bytes) -> None:
        with self._chip.lock:
            try:
                self._ap.write_block(address & 0xFFFFFFFF, data)
            except BusFault as err:
                raise _fault(err) from err
            self._traffic.written += len(data)

    def write_memory(self, addr: int, data: int, transfer_size: int = 32, **attrs: Any) -> None:
        size = transfer_size // 8
        self._write(addr, (data & ((1 << transfer_size) - 1)).to_bytes(size, "little"))

    def read_memory(self, addr: int, transfer_size: int = 32, now: bool = True,
                    **attrs: Any) -> int | Callable[[], int]:
        value = int.from_bytes(self._read(addr, transfer_size // 8), "little")
        return value if now else (lambda: value)

    def write_memory_block32(self, addr: int, data: Sequence[int], **attrs: Any) -> None:
        self._write(addr, b"".join((word & 0xFFFFFFFF).to_bytes(4, "little") for word in data))

    def read_memory_block32(self, addr: int, size: int, **attrs: Any) -> list[int]:
        raw = self._read(addr, size * 4)
        return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]

    def write_memory_block8(self, addr: int, data: Sequence[int], **attrs: Any) -> None:
        self._write(addr, bytes(data))

    def read_memory_block8(self, addr: int, size: int, **attrs: Any) -> list[int]:
        return list(self._read(addr, size))


class SimProbe(DebugProbe):  # type: ignore[misc]   # pyocd ships no type hints
    """The debug probe of one simulated board (see the module docstring)."""

    @classmethod
    def get_all_connected_probes(cls, unique_id: str | None = None,
                                 is_explicit: bool = False) -> list[SimProbe]:
        return [cls(spec) for spec in plugged_in()]

    @classmethod
    def get_probe_with_id(cls, unique_id: str, is_explicit: bool = False) -> SimProbe | None:
        return next((cls(spec) for spec in plugged_in()
                     if spec.uid.casefold() == unique_id.casefold()), None)

    def __init__(self, spec: SimProbeSpec) -> None:
        super().__init__()
        self._spec = spec
        self._board: SimBoard | None = None
        self._protocol: Any = None
        self._memory_interfaces: dict[int, SimMemoryInterface] = {}
        self._clock = 0.0

    # ----------------------------------------------------------------------------- identity
    @property
    def vendor_name(self) -> str:
        return "hil"

    @property
    def product_name(self) -> str:
        return f"simulated {self._spec.model.part}"

    @property
    def unique_id(self) -> str:
        return self._spec.uid

    @property
    def supported_wire_protocols(self) -> list[Any]:
        return [DebugProbe.Protocol.DEFAULT, DebugProbe.Protocol.SWD]

    @property
    def wire_protocol(self) -> Any:
        return self._protocol

    @property
    def is_open(self) -> bool:
        return self._board is not None

    @property
    def capabilities(self) -> set[Any]:
        # None: pyocd selects APs by writing SELECT itself and needs no SWJ sequences.
        return set()

    @property
    def target_names(self) -> tuple[str, ...]:
        """Target names this probe resolves itself (``create_associated_board``): the chip's
        name as rigs use it, and the pyocd target it stands for."""
        model = self._spec.model
        return tuple(dict.fromkeys((model.name, model.pyocd_target_key)))

    @property
    def associated_board_info(self) -> BoardInfo:
        # The pyocd target actually used, so `pyocd list` can tell it is installed.
        model = self._spec.model
        return BoardInfo(f"Simulated {model.part}", model.pyocd_target_key, None, "hil")

    def create_associated_board(self) -> Any:
        """The board with the chip's pyocd target, unless the session names another target
        (then pyocd resolves that name itself, as it would for a real probe)."""
        session = self.session
        requested = session.options.get("target_override") \
            if session.options.is_set("target_override") else None
        if requested is not None and normalise_target_type_name(requested) not in \
                self.target_names:
            return None
        register_targets()
        return Board(session, target=self._spec.model.pyocd_target_key,
                     board_info=self.associated_board_info)

    # ----------------------------------------------------------------------------- lifecycle
    def _chip(self) -> Chip:
        if self._board is None:
            raise exceptions.ProbeError(f"simulated probe {self._spec.uid} is not open")
        return self._board.chip

    def open(self) -> None:
        if self._board is not None:
            return
        sim_board = board(self._spec)
        sim_board.connect(self)
        self._board = sim_board

    def close(self) -> None:
        sim_board, self._board = self._board, None
        self._memory_interfaces.clear()
        self._protocol = None
        if sim_board is not None:
            sim_board.disconnect(self)

    def connect(self, protocol: Any = None) -> None:
        if protocol not in (None, DebugProbe.Protocol.DEFAULT, DebugProbe.Protocol.SWD):
            raise exceptions.ProbeError(f"simulated probe {self._spec.uid} speaks SWD only")
        self._chip()
        self._protocol = DebugProbe.Protocol.SWD

    def disconnect(self) -> None:
        self._memory_interfaces.clear()
        self._protocol = None

    def set_clock(self, frequency: float) -> None:
        self._clock = frequency   # any SWD clock works: the wire is a function call

    # ----------------------------------------------------------------------------- reset pin
    def reset(self) -> None:
        chip = self._chip()
        chip.assert_reset(True)
        chip.assert_reset(False)

    def assert_reset(self, asserted: bool) -> None:
        self._chip().assert_reset(asserted)

    def is_reset_asserted(self) -> bool:
        return self._chip().reset_asserted

    # ----------------------------------------------------------------------------- DAP access
    def _dap(self, action: Callable[[Chip], int | None]) -> int | None:
        chip = self._chip()
        with chip.lock:
            try:
                return action(chip)
            except BusFault as err:
                raise _fault(err) from err

    def read_dp(self, addr: int, now: bool = True) -> int | Callable[[], int]:
        value = int(self._dap(lambda chip: chip.dp.read_dp(addr)) or 0)
        return value if now else (lambda: value)

    def write_dp(self, addr: int, data: int) -> None:
        self._dap(lambda chip: chip.dp.write_dp(addr, data))

    def _read_ap(self, addr: int) -> int:
        return int(self._dap(lambda chip: chip.dp.read_ap(addr)) or 0)

    def read_ap(self, addr: int, now: bool = True) -> int | Callable[[], int]:
        value = self._read_ap(addr)
        return value if now else (lambda: value)

    def write_ap(self, addr: int, data: int) -> None:
        self._dap(lambda chip: chip.dp.write_ap(addr, data))

    def read_ap_multiple(self, addr: int, count: int = 1,
                         now: bool = True) -> list[int] | Callable[[], list[int]]:
        values = [self._read_ap(addr) for _ in range(count)]
        return values if now else (lambda: values)

    def write_ap_multiple(self, addr: int, values: Sequence[int]) -> None:
        for value in values:
            self.write_ap(addr, value)

    def get_memory_interface_for_ap(self, ap_address: Any) -> SimMemoryInterface | None:
        chip = self._chip()
        if not isinstance(ap_address, APv1Address) or chip.dp.aps.get(ap_address.apsel) \
                is not chip.mem_ap:
            return None   # other APs (nRF52 CTRL-AP) are reached through AP registers only
        interface = self._memory_interfaces.get(ap_address.apsel)
        if interface is None:
            interface = self._memory_interfaces[ap_address.apsel] = SimMemoryInterface(
                chip, chip.mem_ap, self._board.traffic if self._board is not None else None)
        return interface


def register_targets() -> None:
    """Put the targets the project defines for simulated chips into pyocd's TARGET table, under
    names no CMSIS pack uses (``hilsim_<chip>``), so they shadow nothing (``hil.sim.chips``)."""
    for model in CHIPS.values():
        if model.target_class is not None:
            TARGET.setdefault(model.pyocd_target_key, model.target_class)


def _register_with_pyocd() -> None:
    """When this module was what first imported pyocd, pyocd loaded its plugins while this
    module was half-made and ``hil.sim.probe_plugin`` stood aside: register the probe now."""
    from pyocd.probe.aggregator import PROBE_CLASSES

    if PLUGIN_NAME not in PROBE_CLASSES:
        register_targets()
        PROBE_CLASSES[PLUGIN_NAME] = SimProbe


_register_with_pyocd()
