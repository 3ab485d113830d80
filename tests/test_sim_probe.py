"""Simulated SWD boards behind hil's pyocd probe plugin, driven by the real pyocd 0.46.

Every test goes through pyocd's own machinery, never around it: the plugin is found through the
``pyocd.probe`` entry point group (a throwaway distribution in a temporary site directory, put on
``sys.path`` and ``PYTHONPATH``, so ``pyocd`` started as a subprocess finds it too), probes come
from ``HIL_SIM_PROBES``, and pyocd's DAP layer, CoreSight discovery, nRF52 target, FlashBuilder
(smart flash, CRC analyzer, double buffering) and reset logic do what they do with a USB probe.
What the simulated board did is checked on the board: its flash file, ``SimFlash``, the count of
flash algorithm routines it ran, its core state.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import filelock
import pytest
from intelhex import IntelHex
from pyocd.core.helpers import ConnectHelper
from pyocd.core.plugin import load_plugin_classes_of_type
from pyocd.core.session import Session
from pyocd.flash.file_programmer import FileProgrammer
from pyocd.probe.aggregator import PROBE_CLASSES
from pyocd.probe.debug_probe import DebugProbe

from hil.boards import board_family
from hil.drivers.swd import SwdFlasher, list_probes
from hil.errors import RigFault
from hil.sim import probe as sim_probe
from hil.sim.cortex_m import (
    CORTEX_M3,
    CSYSPWRUPREQ,
    STICKYERR,
    Bus,
    BusFault,
    CoreState,
    CortexM,
    DebugPort,
    MemAp,
    Ram,
)
from hil.sim.flash import SimFlash

NRF = board_family("nrf52832")
GD32 = board_family("gd32")
NRF_UID, GD32_UID = "sim-nrf52832-1", "sim-gd32-1"
NRF_RAM_TOP, GD32_RAM_TOP = 0x20010000, 0x20005000
SITE_PACKAGES_NAME = "hil_sim_probe_under_test-0.dist-info"


# ================================================================================ fixtures
@pytest.fixture(autouse=True)
def svd_threads_end_in_their_test() -> Iterator[None]:
    """pyocd sessions these tests open themselves parse the SVD on a background thread per
    connect (hil's SwdFlasher skips it); let it end inside the test that started it."""
    yield
    for thread in threading.enumerate():
        if thread.name == "load-svd":
            thread.join(timeout=30)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The plugin installed the way pyproject.toml will install it: an entry point in group
    ``pyocd.probe``, loaded by pyocd's own plugin loader (here and in subprocesses)."""
    site = tmp_path / "site"
    dist = site / SITE_PACKAGES_NAME
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hil-sim-probe-under-test\n"
                                   "Version: 0\n")
    (dist / "entry_points.txt").write_text(
        '[pyocd.probe]\nhilsim = hil.sim.probe_plugin:SimProbePlugin\n')
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    saved = dict(PROBE_CLASSES)
    load_plugin_classes_of_type("pyocd.probe", PROBE_CLASSES, DebugProbe)
    assert PROBE_CLASSES["hilsim"] is sim_probe.SimProbe
    yield
    PROBE_CLASSES.clear()
    PROBE_CLASSES.update(saved)


@pytest.fixture
def no_installed_packs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyocd's installed-pack index (cmsis-pack-manager, under XDG_DATA_HOME) is empty."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


def plug_in(monkeypatch: pytest.MonkeyPatch, *specs: sim_probe.SimProbeSpec) -> None:
    monkeypatch.setenv(sim_probe.ENV_VAR, os.pathsep.join(str(s.state_dir) for s in specs))


@pytest.fixture
def nrf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        plugin: None) -> sim_probe.SimProbeSpec:
    spec = sim_probe.provision(tmp_path / "nrf-board", NRF_UID, "nrf52832")
    plug_in(monkeypatch, spec)
    return spec


@pytest.fixture
def gd32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
         plugin: None) -> sim_probe.SimProbeSpec:
    spec = sim_probe.provision(tmp_path / "gd32-board", GD32_UID, "gd32f103c8")
    plug_in(monkeypatch, spec)
    return spec


@pytest.fixture
def nrf_flasher(nrf: sim_probe.SimProbeSpec) -> Iterator[SwdFlasher]:
    flasher = SwdFlasher(probe=NRF_UID, target="nrf52832", base_address=NRF.app_address)
    flasher.open()
    yield flasher
    flasher.close()


def image(size: int, base: int, ram_top: int, seed: int) -> bytes:
    """Random code behind a vector table that is valid for ``base``: SP, then a Thumb reset
    handler and HardFault handler inside the image."""
    body = bytearray(random.Random(seed).randbytes(size))
    struct.pack_into("<IIII", body, 0, ram_top, base + 0x101, base + 0x201, base + 0x301)
    return bytes(body)


def write_hex(path: Path, address: int, data: bytes) -> Path:
    hex_file = IntelHex()
    hex_file.frombytes(data, offset=address)
    hex_file.write_hex_file(str(path))
    return path


def flash_file(spec: sim_probe.SimProbeSpec, offset: int, size: int) -> bytes:
    with (spec.state_dir / "flash.bin").open("rb") as stream:
        stream.seek(offset)
        return stream.read(size)


def pyocd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyocd", *args], capture_output=True, text=True,
                          timeout=120, check=False)


# ================================================================================ discovery
def test_plugged_in_boards_are_probes_to_hil_and_to_pyocd_list(
        nrf: sim_probe.SimProbeSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gd32 = sim_probe.provision(tmp_path / "gd32-board", GD32_UID, "gd32f103c8")
    plug_in(monkeypatch, nrf, gd32)

    found = dict(list_probes())
    assert found[NRF_UID] == "hil simulated nRF52832-QFAA"
    assert found[GD32_UID] == "hil simulated GD32F103C8"

    listing = pyocd_cli("list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[-3]: line for line in listing.stdout.splitlines() if "✔︎" in line}
    # pyocd marks a target it can resolve with a tick: builtin, or the project's own GD32.
    assert rows[NRF_UID].split()[-1] == "nrf52832"
    assert rows[GD32_UID].split()[-1] == "hilsim_gd32f103c8"
    assert "Simulated nRF52832-QFAA" in listing.stdout   # the board name, under the probe


def test_a_broken_state_directory_is_skipped_with_a_warning(
        nrf: sim_probe.SimProbeSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    plug_in(monkeypatch, nrf, sim_probe.SimProbeSpec("x", "nrf52832", tmp_path / "nothing"))
    assert [uid for uid, _ in list_probes() if uid.startswith("sim-")] == [NRF_UID]
    assert f"{tmp_path / 'nothing' / 'board.json'}: not a simulated board" in caplog.text


def test_provision_refuses_ids_pyocd_would_split_and_unknown_chips(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        sim_probe.provision(tmp_path, "hilsim:board", "nrf52832")
    with pytest.raises(ValueError, match="known chips are nrf52832, gd32f103c8"):
        sim_probe.provision(tmp_path, "board", "stm32f103rc")


# ================================================================================ nRF52832
@pytest.mark.parametrize("suffix", ["bin", "hex"])
def test_an_image_lands_at_the_app_offset_in_the_boards_flash(
        nrf: sim_probe.SimProbeSpec, nrf_flasher: SwdFlasher, tmp_path: Path,
        suffix: str) -> None:
    app = image(0x10000, NRF.app_address, NRF_RAM_TOP, seed=1)
    path = tmp_path / f"app.{suffix}"
    if suffix == "bin":
        path.write_bytes(app)
    else:
        write_hex(path, NRF.app_address, app)
    progress: list[tuple[int, int]] = []

    nrf_flasher.program(path, progress=lambda done, total: progress.append((done, total)))

    assert flash_file(nrf, NRF.app_address, len(app)) == app
    assert nrf_flasher.read_memory(NRF.app_address, len(app)) == app
    with SimFlash(nrf.state_dir / "flash.bin", size=0x80000, base=0x0) as flash:
        assert flash.read(NRF.app_address, len(app)) == app
        assert flash.read(0, NRF.app_offset) == b"\xff" * NRF.app_offset   # bootloader untouched
    assert progress[-1] == (2000, 2000)
    ops = sim_probe.board(nrf).flash_ops
    assert (ops.sector_erases, ops.pages_programmed) == (16, 16)


def test_smart_flash_touches_nothing_for_the_same_image_and_one_sector_for_one_change(
        nrf: sim_probe.SimProbeSpec, nrf_flasher: SwdFlasher, tmp_path: Path) -> None:
    app = image(0x10000, NRF.app_address, NRF_RAM_TOP, seed=2)
    path = tmp_path / "app.bin"
    path.write_bytes(app)
    nrf_flasher.program(path)
    ops = sim_probe.board(nrf).flash_ops

    ops.reset()
    nrf_flasher.program(path)
    assert (ops.sector_erases, ops.chip_erases, ops.pages_programmed) == (0, 0, 0)
    assert ops.crc_regions == 16   # pyocd asked the core for CRCs: its analyzer ran

    changed = bytearray(app)
    changed[0x5000 + 17] ^= 0xFF
    path.write_bytes(changed)
    ops.reset()
    nrf_flasher.program(path)
    sector = NRF.app_address + 0x5000
    assert [(r.name, address) for r, address, _ in ops.log if r.name != "CRC32"] == [
        ("ERASE_SECTOR", sector), ("PROGRAM_PAGE", sector)]
    assert flash_file(nrf, NRF.app_address, len(changed)) == changed


def test_reset_halt_and_resume_drive_the_core(
        nrf: sim_probe.SimProbeSpec, nrf_flasher: SwdFlasher, tmp_path: Path) -> None:
    board = sim_probe.board(nrf)
    events: list[str] = []
    board.on_reset = lambda: events.append("reset")
    board.on_run = lambda: events.append("run")
    board.on_halt = lambda: events.append("halt")
    try:
        bootloader = image(0x1000, 0x0, NRF_RAM_TOP, seed=3)
        nrf_flasher.program(write_hex(tmp_path / "bootloader.hex", 0x0, bootloader))
        assert board.core.state is CoreState.HALTED   # left on the flash algorithm's BKPT

        events.clear()
        nrf_flasher.reset()
        assert board.core.state is CoreState.RUNNING
        assert board.core.pc == 0x100   # from the reset vector, Thumb bit stripped
        assert events == ["reset", "run"]

        nrf_flasher.halt()
        assert board.core.state is CoreState.HALTED
        nrf_flasher.resume()
        assert board.core.state is CoreState.RUNNING
        assert events == ["reset", "run", "halt", "run"]
    finally:
        board.on_reset = board.on_run = board.on_halt = None


def test_memory_writes_and_reads_reach_ram_and_faults_are_rig_faults(
        nrf_flasher: SwdFlasher) -> None:
    data = bytes(range(256)) * 3 + b"odd"
    nrf_flasher.write_memory(0x20008001, data)
    assert nrf_flasher.read_memory(0x20008001, len(data)) == data
    with pytest.raises(RigFault, match="bus fault at 0x30000000"):
        nrf_flasher.read_memory(0x30000000, 4)


def test_a_locked_nrf52_is_unlocked_by_pyocds_mass_erase_through_the_ctrl_ap(
        nrf: sim_probe.SimProbeSpec, nrf_flasher: SwdFlasher, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    app = tmp_path / "app.bin"
    app.write_bytes(image(0x2000, NRF.app_address, NRF_RAM_TOP, seed=4))
    nrf_flasher.program(app)
    # UICR.APPROTECT = 0x00 through the NVMC, as firmware locks a production part.
    nrf_flasher.write_memory(0x4001E504, (1).to_bytes(4, "little"))
    nrf_flasher.write_memory(0x10001208, bytes(4))
    nrf_flasher.write_memory(0x4001E504, bytes(4))
    # The board's reset button: the lock latches at reset. (A debugger reset would work too, but
    # pyocd then spends its 2 s core-recovery timeout knocking on the locked AHB-AP.)
    chip = sim_probe.board(nrf).chip
    chip.assert_reset(True)
    chip.assert_reset(False)
    with pytest.raises(RigFault, match="access port is disabled"):
        nrf_flasher.read_memory(NRF.app_address, 4)
    nrf_flasher.close()

    with SwdFlasher(probe=NRF_UID, target="nrf52832") as again:
        assert again.read_memory(NRF.app_address, 4) == b"\xff" * 4
    assert "APPROTECT enabled: will try to unlock via mass erase" in caplog.text
    assert flash_file(nrf, 0, 0x80000) == b"\xff" * 0x80000


def test_a_board_belongs_to_one_open_probe(nrf: sim_probe.SimProbeSpec,
                                           nrf_flasher: SwdFlasher) -> None:
    with pytest.raises(RigFault, match="already open in this process"):
        SwdFlasher(probe=NRF_UID, target="nrf52832").open()
    nrf_flasher.close()
    other_process = filelock.FileLock(str(nrf.state_dir / "probe.lock"))
    with other_process, pytest.raises(RigFault, match="in use by another process"):
        SwdFlasher(probe=NRF_UID, target="nrf52832").open()


def test_flashing_256_kib_into_the_nrf52832(nrf: sim_probe.SimProbeSpec, tmp_path: Path) -> None:
    firmware = image(0x40000, 0x0, NRF_RAM_TOP, seed=5)
    path = tmp_path / "firmware.bin"
    path.write_bytes(firmware)
    started = time.perf_counter()
    with SwdFlasher(probe=NRF_UID, target="nrf52832") as flasher:
        connected = time.perf_counter()
        flasher.program(path)
        programmed = time.perf_counter()
    print(f"\n256 KiB into the simulated nRF52832: connect {connected - started:.3f} s, "
          f"program {programmed - connected:.3f} s, total {programmed - started:.3f} s "
          "(goal: under 2 s)")
    assert flash_file(nrf, 0, len(firmware)) == firmware


# ================================================================================ GD32F103
def gd32_session(uid: str) -> Session:
    """A pyocd session as hil's SwdFlasher opens one (same options)."""
    probe = ConnectHelper.get_all_connected_probes(blocking=False, unique_id=uid,
                                                   print_wait_message=False)[0]
    return Session(probe, options={
        "target_override": "gd32f103c8", "frequency": 4_000_000, "connect_mode": "attach",
        "smart_flash": True, "hide_programming_progress": True, "no_config": True})


@pytest.mark.usefixtures("no_installed_packs")
def test_a_gd32f103_programs_at_0x08000000_with_no_pack(gd32: sim_probe.SimProbeSpec,
                                                        tmp_path: Path) -> None:
    app = image(0x8000, GD32.app_address, GD32_RAM_TOP, seed=6)
    path = tmp_path / "app.bin"
    path.write_bytes(app)
    ops = sim_probe.board(gd32).flash_ops

    with gd32_session(GD32_UID) as session:
        assert session.options.get("target_override") == "hilsim_gd32f103c8"
        FileProgrammer(session, smart_flash=True).program(
            str(path), file_format="bin", base_address=GD32.app_address)
        assert bytes(session.target.read_memory_block8(GD32.app_address, len(app))) == app
        assert (ops.sector_erases, ops.pages_programmed) == (32, 32)   # 1 KiB sectors
        ops.reset()
        FileProgrammer(session, smart_flash=True).program(
            str(path), file_format="bin", base_address=GD32.app_address)
        assert (ops.sector_erases, ops.pages_programmed) == (0, 0)
    assert flash_file(gd32, GD32.app_offset, len(app)) == app


@pytest.mark.usefixtures("no_installed_packs")
def test_hils_swd_driver_flashes_a_gd32f103_with_no_pack(gd32: sim_probe.SimProbeSpec,
                                                        tmp_path: Path) -> None:
    # The rig's flasher as a rig builds it: the probe brings its chip's target, no pack needed.
    app = image(0x2000, GD32.app_address, GD32_RAM_TOP, seed=8)
    path = tmp_path / "app.bin"
    path.write_bytes(app)
    with SwdFlasher(probe=GD32_UID, target="gd32f103c8",
                    base_address=GD32.app_address) as flasher:
        flasher.program(path)
        assert flasher.read_memory(GD32.app_address, len(app)) == app
    assert flash_file(gd32, GD32.app_offset, len(app)) == app


@pytest.mark.usefixtures("no_installed_packs")
def test_pyocds_command_line_loads_a_gd32f103_by_target_name(gd32: sim_probe.SimProbeSpec,
                                                             tmp_path: Path) -> None:
    app = image(0x1000, GD32.flash_base, GD32_RAM_TOP, seed=7)
    path = tmp_path / "boot.bin"
    path.write_bytes(app)
    loaded = pyocd_cli("load", "--uid", GD32_UID, "--target", "gd32f103c8", "--format", "bin",
                       "--base-address", hex(GD32.flash_base), str(path))
    assert loaded.returncode == 0, loaded.stderr
    assert flash_file(gd32, 0, len(app)) == app


# ================================================================================ the DAP itself
def test_the_dp_and_mem_ap_registers_behave_as_on_the_wire() -> None:
    """What pyocd's probe short cut skips: SELECT, TAR/DRW byte lanes, STICKYERR."""
    ram = Ram(0x20000000, 0x1000)
    bus = Bus([ram])
    CortexM(CORTEX_M3, bus)
    mem_ap = MemAp(bus)
    dp = DebugPort(0x1BA01477, {0: mem_ap})
    with pytest.raises(BusFault, match="debug power off"):
        dp.read_ap(0xC)
    dp.write_dp(0x4, CSYSPWRUPREQ | (1 << 28))
    assert dp.read_dp(0x4) >> 28 == 0xF   # both requests acknowledged
    dp.write_dp(0x8, 0xF0)   # SELECT: AP #0, bank 0xF; 0xC is then IDR (0xFC)
    assert dp.read_ap(0xC) == 0x24770011
    assert dp.read_ap(0x8) == 0xE00FF003   # BASE: the ROM table, ADIv5 format, present
    dp.write_dp(0x8, (1 << 24) | 0xF0)   # AP #1: nothing there, IDR reads 0
    assert dp.read_ap(0xC) == 0
    dp.write_dp(0x8, 0)   # AP #0, bank 0: CSW, TAR, DRW

    ram.write(0x20000100, bytes.fromhex("11223344"))
    dp.write_ap(0x00, 0x03000040 | 0x10)   # 8-bit, auto-increment
    dp.write_ap(0x04, 0x20000102)
    assert dp.read_ap(0x0C) == 0x33 << 16   # byte 2 arrives on lane 2
    assert dp.read_ap(0x04) == 0x20000103
    dp.write_ap(0x00, 0x03000040 | 0x12)   # 32-bit
    dp.write_ap(0x04, 0xE000ED00)
    assert dp.read_ap(0x0C) == CORTEX_M3.cpuid
    ram.write(0x20000104, bytes.fromhex("efbeadde"))
    dp.write_ap(0x04, 0x20000100)
    dp.write_dp(0x8, 0x10)   # APBANKSEL 1: address 0x4 is BD1, TAR[31:4] + 4
    assert dp.read_ap(0x4) == 0xDEADBEEF
    dp.write_dp(0x8, 0)

    dp.write_ap(0x04, 0x30000000)
    with pytest.raises(BusFault, match="nothing is mapped"):
        dp.read_ap(0x0C)
    assert dp.read_dp(0x4) & STICKYERR
    with pytest.raises(BusFault, match="STICKYERR"):
        dp.read_ap(0x04)
    dp.write_dp(0x0, 1 << 2)   # ABORT.STKERRCLR
    assert dp.read_ap(0x04) == 0x30000000
