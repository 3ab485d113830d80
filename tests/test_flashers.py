"""The two flasher drivers, as far as they can be proven with no board: real pyocd, real esptool.

What runs here is the real tool every time, never a stand-in:

- SWD (pyocd 0.46): probe enumeration (there is no probe on a CI runner, so pyocd really finds
  none); the target check against pyocd's builtin target table, its installed-pack index (pointed
  at an empty directory, so a developer's installed packs cannot change the outcome) and CMSIS
  packs parsed by pyocd's own pack reader (a minimal .pack built here); symbol lookup in a real ELF
  linked by gcc, checked against binutils' ``nm``.
- ESP (esptool 5.6): a port that does not exist; then a real pseudo-terminal whose other end stays
  silent, so esptool runs its whole reset-and-sync loop against it. A pty has no modem lines:
  setting DTR/RTS fails with ENOTTY/EINVAL, which esptool itself treats as "chip was not reset"
  and carries on to the SYNC, so the failure that reaches us is esptool's "Failed to connect". Two
  connect attempts (about 0.75 s each) keep the test to seconds.

Deliberately left for the simulated boards of a later issue, because they need something on the
other end that answers:

- a simulated nRF52832 behind a pyocd debug-probe plugin (entry point ``pyocd.probe``): open a
  session, ``program()`` with smart flash (a second run skips unchanged sectors), progress
  (done, total), ``reset()``/``halt()``/``resume()``, ``read_memory``/``write_memory`` and
  ``read_symbol`` against target memory; a GD32F103 through its CMSIS pack's flash algorithm;
- an emulated ESP32 ROM bootloader on a pty (SLIP framing, SYNC, READ_REG with the chip magic,
  the stub upload, CHANGE_BAUDRATE, SPI_ATTACH, compressed flash writes, SPI_FLASH_MD5): chip
  detection, the wrong-chip fault, ``program()`` with MD5 verification and progress,
  ``read_mac()``, and the reconnect after ``reset()``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial
from esp_pylib.logger import EspLog
from esp_pylib.logger import log as esptool_log

from hil.drivers.base import FlasherProtocol
from hil.drivers.esp import EspFlasher, _esptool_output
from hil.drivers.swd import SwdFlasher, _TwoPassProgress, elf_symbol, list_probes
from hil.errors import ConfigError, RigFault

PROBE_ID = "0240000034544e45001a00018e8e000000000000"   # a DAPLink-style id no desk has

PDSC = """<?xml version="1.0" encoding="UTF-8"?>
<package schemaVersion="1.4" xmlns:xs="http://www.w3.org/2001/XMLSchema-instance">
  <vendor>GigaDevice</vendor>
  <name>GD32F10x_DFP</name>
  <description>The part of GigaDevice's pack that names devices (no flash algorithm).</description>
  <devices>
    <family Dfamily="GD32F10x Series" Dvendor="GigaDevice:123">
      <processor Dcore="Cortex-M3" DcoreVersion="r1p1" Dfpu="0" Dmpu="0" Dendian="Little-endian"/>
      <subFamily DsubFamily="GD32F103">
        <device Dname="GD32F103C8">
          <memory id="IROM1" start="0x08000000" size="0x10000" startup="1" default="1"/>
          <memory id="IRAM1" start="0x20000000" size="0x5000" init="0" default="1"/>
        </device>
        <device Dname="GD32F103CB">
          <memory id="IROM1" start="0x08000000" size="0x20000" startup="1" default="1"/>
          <memory id="IRAM1" start="0x20000000" size="0x5000" init="0" default="1"/>
        </device>
      </subFamily>
    </family>
  </devices>
</package>
"""

FIRMWARE_C = """
const unsigned int fw_version = 0x00020001u;
unsigned char ota_state[16] = {1};
static int boots;
int bump(void) { return ++boots; }
"""


def connected_listing() -> str:
    """What the driver's message should list: the probes pyocd really sees (none on CI)."""
    return ", ".join(f"{uid} ({description})" for uid, description in list_probes()) or "none"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"these tests build a real ELF and need `{name}` on PATH")
    return path


# ================================================================================ SWD: probes
def test_the_drivers_implement_the_flasher_protocol() -> None:
    assert isinstance(SwdFlasher(probe=PROBE_ID, target="nrf52832"), FlasherProtocol)
    assert isinstance(EspFlasher(port="/dev/ttyUSB0"), FlasherProtocol)


def test_list_probes_enumerates_without_waiting() -> None:
    started = time.monotonic()
    probes = list_probes()
    assert time.monotonic() - started < 10
    assert isinstance(probes, list)
    for unique_id, description in probes:
        assert isinstance(unique_id, str)
        assert isinstance(description, str)


def test_a_probe_that_is_not_connected_is_named_with_what_is() -> None:
    flasher = SwdFlasher(probe=PROBE_ID, target="nrf52832")   # builtin: the probe is the problem
    with pytest.raises(RigFault) as caught:
        flasher.open()
    fault = caught.value
    assert fault.part == "flasher"
    assert fault.message == (f"SWD probe {PROBE_ID} not found; "
                             f"probes connected: {connected_listing()}")
    flasher.close()   # nothing was opened; closing is still fine


# ================================================================================ SWD: targets
@pytest.fixture
def no_installed_packs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyocd's installed-pack index (cmsis-pack-manager, under XDG_DATA_HOME) is empty."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture
def gd32_pack(tmp_path: Path) -> Path:
    pack = tmp_path / "GigaDevice.GD32F10x_DFP.2.1.0.pack"
    with zipfile.ZipFile(pack, "w") as archive:
        archive.writestr("GigaDevice.GD32F10x_DFP.pdsc", PDSC)
    return pack


@pytest.mark.usefixtures("no_installed_packs")
def test_a_target_pyocd_lacks_says_how_to_get_its_pack_before_looking_for_a_probe() -> None:
    with pytest.raises(RigFault) as caught:
        SwdFlasher(probe=PROBE_ID, target="gd32f103c8").open()
    assert caught.value.message == (
        "target gd32f103c8 needs its CMSIS pack: `pyocd pack install gd32f103c8` "
        "or name the .pack file in the rig (flasher.pack)")


def test_a_missing_pack_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "packs" / "GigaDevice.GD32F10x_DFP.2.1.0.pack"
    with pytest.raises(RigFault) as caught:
        SwdFlasher(probe=PROBE_ID, target="gd32f103c8", pack=missing).open()
    assert caught.value.message == f"CMSIS pack {missing} does not exist (flasher.pack)"


@pytest.mark.usefixtures("no_installed_packs")
def test_a_pack_that_describes_the_target_gets_as_far_as_the_probe(gd32_pack: Path) -> None:
    with pytest.raises(RigFault, match=f"SWD probe {PROBE_ID} not found"):
        SwdFlasher(probe=PROBE_ID, target="gd32f103c8", pack=gd32_pack).open()
    with pytest.raises(RigFault, match=f"SWD probe {PROBE_ID} not found"):
        SwdFlasher(probe=PROBE_ID, target="GD32F103CB", pack=gd32_pack).open()


@pytest.mark.usefixtures("no_installed_packs")
def test_a_pack_for_other_parts_lists_the_parts_it_has(gd32_pack: Path) -> None:
    with pytest.raises(RigFault) as caught:
        SwdFlasher(probe=PROBE_ID, target="gd32f303cc", pack=gd32_pack).open()
    assert caught.value.message == (f"CMSIS pack {gd32_pack} does not describe target gd32f303cc; "
                                    "it describes: gd32f103c8, gd32f103cb")


def test_a_file_that_is_not_a_pack_is_named(tmp_path: Path) -> None:
    not_a_pack = tmp_path / "GD32F10x.pack"
    not_a_pack.write_text("<html>404 Not Found</html>")
    with pytest.raises(RigFault, match=re.escape(f"CMSIS pack {not_a_pack} cannot be read")):
        SwdFlasher(probe=PROBE_ID, target="gd32f103c8", pack=not_a_pack).open()


# ================================================================================ SWD: ELF symbols
@pytest.fixture(scope="module")
def firmware_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small firmware linked by gcc: variables and a function at real addresses."""
    build = tmp_path_factory.mktemp("elf")
    (build / "fw.c").write_text(FIRMWARE_C)
    subprocess.run([tool("gcc"), "-nostdlib", "-static", "-Wl,-e,bump", "-Wl,--build-id=none",
                    "-o", "fw.elf", "fw.c"], cwd=build, check=True, timeout=60)
    return build / "fw.elf"


def nm_symbols(elf: Path) -> dict[str, tuple[int, int]]:
    """binutils' view of the symbol table: name -> (address, size)."""
    listing = subprocess.run([tool("nm"), "-S", str(elf)], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    symbols = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 4:
            address, size, _kind, name = fields
            symbols[name] = (int(address, 16), int(size, 16))
    return symbols


@pytest.mark.parametrize("name", ["fw_version", "ota_state", "boots", "bump"])
def test_elf_symbol_finds_what_binutils_finds(firmware_elf: Path, name: str) -> None:
    address, size = elf_symbol(firmware_elf, name)
    assert (address, size) == nm_symbols(firmware_elf)[name]
    assert address != 0


def test_elf_symbol_sizes_come_from_the_table(firmware_elf: Path) -> None:
    assert elf_symbol(firmware_elf, "fw_version")[1] == 4
    assert elf_symbol(firmware_elf, "ota_state")[1] == 16


def test_an_unknown_symbol_is_a_key_error_naming_it(firmware_elf: Path) -> None:
    with pytest.raises(KeyError, match="ota_state_typo"):
        elf_symbol(firmware_elf, "ota_state_typo")


def test_an_undefined_reference_is_not_a_definition(tmp_path: Path) -> None:
    (tmp_path / "uses.c").write_text("extern int elsewhere; int use(void) { return elsewhere; }")
    subprocess.run([tool("gcc"), "-c", "-o", "uses.o", "uses.c"], cwd=tmp_path, check=True,
                   timeout=60)
    assert elf_symbol(tmp_path / "uses.o", "use")[1] > 0
    with pytest.raises(KeyError, match="elsewhere"):
        elf_symbol(tmp_path / "uses.o", "elsewhere")


def test_a_stripped_image_or_a_non_elf_says_so(firmware_elf: Path, tmp_path: Path) -> None:
    stripped = tmp_path / "fw.stripped.elf"
    subprocess.run([tool("strip"), "-o", str(stripped), str(firmware_elf)], check=True,
                   timeout=60)
    with pytest.raises(ValueError, match="no symbol table"):
        elf_symbol(stripped, "ota_state")
    not_elf = tmp_path / "fw.bin"
    not_elf.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable ELF"):
        elf_symbol(not_elf, "ota_state")


def test_read_symbol_looks_the_symbol_up_before_touching_the_probe(firmware_elf: Path) -> None:
    flasher = SwdFlasher(probe=PROBE_ID, target="nrf52832")
    with pytest.raises(KeyError, match="no_such_variable"):
        flasher.read_symbol(firmware_elf, "no_such_variable")
    with pytest.raises(RuntimeError, match="not open"):
        flasher.read_symbol(firmware_elf, "ota_state")


# ================================================================================ SWD: the rest
def test_program_refuses_formats_pyocd_cannot_read(tmp_path: Path) -> None:
    image = tmp_path / "app.uf2"
    image.write_bytes(b"UF2\n")
    with pytest.raises(ValueError, match=r"hex, bin, elf, axf"):
        SwdFlasher(probe=PROBE_ID, target="nrf52832").program(image)


def test_operations_before_open_are_a_programming_error(tmp_path: Path) -> None:
    image = tmp_path / "app.hex"
    image.write_text(":00000001FF\n")
    flasher = SwdFlasher(probe=PROBE_ID, target="nrf52832")
    for operation in (lambda: flasher.program(image), flasher.reset, flasher.halt,
                      flasher.resume, lambda: flasher.read_memory(0x20000000, 4),
                      lambda: flasher.write_memory(0x20000000, b"\x00")):
        with pytest.raises(RuntimeError, match="not open"):
            operation()


def test_pyocd_progress_becomes_one_monotonic_done_total() -> None:
    seen: list[tuple[int, int]] = []
    reporter = _TwoPassProgress(lambda done, total: seen.append((done, total)))
    # What pyocd's FlashLoader reports for one image: the erase pass, then the program pass.
    for fraction in (0.0, 0.25, 1.0, 0.0, 0.5, 0.5, 1.0):
        reporter(fraction)
    reporter.finish()
    assert seen == [(0, 2000), (250, 2000), (1000, 2000), (1500, 2000), (2000, 2000)]


# ================================================================================ ESP
@pytest.fixture
def silent_pty() -> Iterator[str]:
    """A real serial device with nothing answering on the other end."""
    controller, device = os.openpty()
    try:
        yield os.ttyname(device)
    finally:
        os.close(device)
        os.close(controller)


def test_a_missing_port_is_named(tmp_path: Path) -> None:
    port = str(tmp_path / "ttyUSB7")
    with pytest.raises(RigFault) as caught:
        EspFlasher(port=port).open()
    assert caught.value.part == "flasher"
    assert caught.value.message.startswith(f"{port}: cannot open")


def test_a_silent_bootloader_is_a_rig_fault_with_the_download_mode_hint(silent_pty: str) -> None:
    flasher = EspFlasher(port=silent_pty, connect_attempts=2)
    flasher.open()                    # the port alone: the bootloader is reached when needed
    started = time.monotonic()
    with pytest.raises(RigFault) as caught:
        flasher.read_mac()
    elapsed = time.monotonic() - started
    message = caught.value.message
    assert message.startswith(
        f"{silent_pty}: no answer from the ESP32 ROM bootloader "
        "(is the board in download mode? DTR/RTS wired?)")
    assert "esptool: Failed to connect" in message        # esptool's own reason rides along
    assert "\n" not in message
    assert "Traceback" not in message
    assert elapsed < 10, f"two connect attempts took {elapsed:.1f} s"
    # Closed, the port is given back: an exclusive open (flock) of the same device succeeds.
    flasher.close()
    with serial.Serial(silent_pty, exclusive=True):
        pass


def test_esptools_logger_is_put_back_after_a_failed_connect(silent_pty: str) -> None:
    before = EspLog.instance
    with pytest.raises(RigFault), EspFlasher(port=silent_pty, connect_attempts=1) as flasher:
        flasher.read_mac()
    assert EspLog.instance is before


def test_esptool_output_becomes_log_records_and_progress(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[int, int]] = []
    with caplog.at_level("INFO", logger="hil.drivers.esp"), \
            _esptool_output(lambda done, total: seen.append((done, total))):
        # The calls esptool makes: a line built from pieces, a note, a progress bar in bytes.
        esptool_log.print("Connecting...", end="")
        esptool_log.print("..", end="")
        esptool_log.print("")
        esptool_log.note("Flash will be erased from [bold]0x00010000[/bold]")
        with esptool_log.progress(total=1000, unit="B") as progress:
            progress.update(advance=400)
            progress.update(advance=600)
    assert [record.getMessage() for record in caplog.records] == [
        "esptool: Connecting.....",
        "esptool note: Flash will be erased from 0x00010000",
    ]
    assert seen == [(400, 1000), (1000, 1000)]


def test_an_unknown_chip_or_endless_retries_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="esptool knows no chip 'esp33'"):
        EspFlasher(port="/dev/ttyUSB0", chip="esp33")
    with pytest.raises(ConfigError, match="at least 1"):
        EspFlasher(port="/dev/ttyUSB0", connect_attempts=0)


def test_esp_operations_before_open_are_a_programming_error(tmp_path: Path) -> None:
    image = tmp_path / "app.bin"
    image.write_bytes(b"\xe9" + bytes(255))
    flasher = EspFlasher(port="/dev/ttyUSB0")
    for operation in (lambda: flasher.program(image), flasher.reset, flasher.read_mac):
        with pytest.raises(RuntimeError, match="not open"):
            operation()
    flasher.close()
    flasher.close()
