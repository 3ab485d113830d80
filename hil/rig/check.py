"""Does each part of a rig answer? The check ``hil rigs check`` prints, and the plugin runs once
per rig before a suite's first test on it (``--hil-check-rigs``).

One ``PartCheck`` per part the rig has: the console (the test shell answers its version
command), the flasher (pyocd lists the SWD probe; an ESP32's bootloader is checked at flash
time), the supply and the attenuator (each answers with its identity). Power that is switched
is asked its state and never switched: a USB hub port through ``uhubctl -l <hub> -p <port>``
(the hub must be listed and the port read), a relay through the rig's ``status`` command (or,
without one, its commands must be found) (``hil.drivers.switched``).

``boots_on_sim(board, image)`` is the check of a base image: it is flashed, through the real
flasher, onto a throwaway simulated board of that family (its own state directory and probe,
gone after), which must print its boot line; the check of the build before a suite
(``hil.rig.inputs``) and ``hil rigs check --firmware`` run it.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hil.configfile import validate
from hil.drivers.base import PowerProtocol, RfProtocol
from hil.errors import ExpectTimeout, FirmwareFault, RigFault
from hil.rig.board import Board
from hil.rig.model import Rig
from hil.rig.parts import RigParts


@dataclass(frozen=True)
class PartCheck:
    part: str
    ok: bool
    detail: str          # what answered, or what is wrong


def _run(part: str, check: Callable[[], str]) -> PartCheck:
    try:
        return PartCheck(part, True, check())
    except (RigFault, OSError) as fault:
        return PartCheck(part, False, fault.message if isinstance(fault, RigFault) else str(fault))
    except FirmwareFault as fault:    # silent or not booting: the first line says which
        return PartCheck(part, False, str(fault).splitlines()[0])


def check_rig(rig: Rig) -> list[PartCheck]:
    with RigParts(rig) as parts:
        def console() -> str:
            if rig.console.command is not None:
                # A host build has no shell to ask: it is reset and must speak. Its flash may
                # still be blank (the suite flashes the base image): then it says so.
                log, flasher = parts.console(), parts.flasher()
                since = log.mark()
                if flasher is not None:
                    flasher.reset()
                first = log.expect(r"\S", BOOT_CHECK_S, since=since).string
                try:
                    version = log.expect(parts.contract.events["boot"], 1.0, since=since)
                    return f"{rig.console.address}, firmware {version.group('version')}"
                except FirmwareFault:
                    return f"{rig.console.address} runs; it says {first.strip()!r}"
            board = Board(parts)
            if not board.boot_line:       # no shell, no boot line: only the service can tell
                parts.console()
                return f"{rig.console.address}, a read-only log (no shell)"
            return f"{rig.console.address}, firmware {board.version()}"

        def flasher() -> str:
            spec = rig.flasher
            if spec.kind == "swd":
                from hil.drivers.swd import is_remote, list_probes

                if rig.labgrid is not None or (spec.probe and is_remote(spec.probe)):
                    # A probe on another host (a place's pyocd server): connected to, as
                    # it is not listed here.
                    swd = parts.flasher()
                    return f"{getattr(swd, 'name', 'the SWD probe')} connected"
                probes = [probe_id for probe_id, _ in list_probes()]
                if spec.probe not in probes:
                    raise RigFault("flasher", f"SWD probe {spec.probe} not found; probes "
                                   f"connected: {', '.join(probes) or 'none'}")
                return f"SWD probe {spec.probe} listed by pyocd"
            if spec.kind == "process":
                return f"the host build's flash: {rig.process_state_dir}"
            port = spec.port if spec.kind == "esp" else None
            return f"ESP32 bootloader on {port or rig.console.address} (checked at flash)"

        def instrument(get: Callable[[], PowerProtocol | RfProtocol | None]) -> str:
            driver = get()
            assert driver is not None
            return driver.identify()

        checks = [_run("console", console)]
        if rig.flasher.kind != "none":
            checks.append(_run("flasher", flasher))
        if rig.power.kind != "none":
            checks.append(_run("power", lambda: instrument(parts.power)))
        if rig.rf.kind != "none":
            checks.append(_run("rf", lambda: instrument(parts.rf)))
    return checks


BOOT_CHECK_S = 20.0         # a simulated board boots in milliseconds; this is for a loaded host
BOOT_CHECK_KEY_ENV = "HIL_BOOT_CHECK_ACCESS_KEY"
# What a bootloader prints when it refuses an image: MCUboot's "E: ..." lines, ESP-IDF's
# "E (123) esp_image: ...". Seeing one ends the wait at once, with the reason.
BOOTLOADER_ERROR = r"^E(?::|\s\(\d+\))\s"


# The throwaway bench's factory image carries a version no build is expected to have, so its
# boot line is never taken for the checked image's.
BOOT_CHECK_FACTORY = "0.0.0"


def _boot_rig(board: str, state_dir: Path) -> Rig:
    """A minimal simulated rig of ``board`` under ``state_dir``: console and flasher only."""
    import pyocd.probe.aggregator  # noqa: F401  (pyocd first: its plugins import hil.sim.chips)

    from hil.boards import BOARDS, FlasherKind
    from hil.sim.bench import expected_addresses
    from hil.sim.chips import CHIPS

    family = BOARDS[board]
    name = f"boot-check-{board}"
    document: dict[str, object] = {
        "name": name, "board": board,
        "identity": {"product_id": "0", "dev_id": name, "access_key_env": BOOT_CHECK_KEY_ENV},
        "sim": {"state_dir": str(state_dir), "factory_version": BOOT_CHECK_FACTORY}}
    if family.flasher is FlasherKind.ESP:
        document["flasher"] = {"kind": "esp"}
    else:
        chip = CHIPS[family.default_chip if family.default_chip in CHIPS else board]
        document["flasher"] = {"kind": "swd", "probe": f"hilsim-{state_dir.name}",
                               "target": chip.pyocd_target_key}
    addresses = expected_addresses(validate(Rig, {**document, "console": {"port": "?"}}, name))
    document["console"] = {key.split(".")[1]: value for key, value in addresses.items()
                           if key.startswith("console.")}
    return validate(Rig, document, name)


def boots_on_sim(board: str, image: Path) -> PartCheck:
    """Does ``image`` boot on a simulated ``board``? ok with the booted version as the detail,
    else what the board printed instead (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="hil-boot-check-") as work:
        rig = _boot_rig(board, Path(work))
        try:
            with RigParts(rig) as parts:
                contract = parts.contract
                if rig.flasher.kind == "esp":
                    parts.release("console")     # esptool takes the console's port
                else:
                    parts.console()              # open before the reset: its boot line counts
                flasher = parts.flasher()
                assert flasher is not None
                flasher.program(image)
                # Only what follows the reset into the new image: the factory image the bench
                # booted at start prints a boot line too, maybe while the image was written.
                since: int | None = 0 if rig.flasher.kind == "esp" else parts.console().mark()
                flasher.reset()
                parts.release("flasher")
                console = parts.console()
                pattern = f"(?:{contract.events['boot'].pattern})|(?:{BOOTLOADER_ERROR})"
                deadline = time.monotonic() + BOOT_CHECK_S
                if rig.flasher.kind == "esp":
                    return _esp_booted(Board(parts), pattern, deadline)
                while True:
                    try:
                        line = console.expect(pattern, max(deadline - time.monotonic(), 0.0),
                                              since=since)
                    except ExpectTimeout:
                        return PartCheck("boot", False,
                                         f"no boot line within {BOOT_CHECK_S:g} s")
                    since = None                 # the next line after this one
                    booted = contract.events["boot"].search(line.string)
                    # The bench's own factory image may print its boot line late (its pty is
                    # read from when the console opens): that line is not the image's.
                    if booted is None or booted.group("version") != BOOT_CHECK_FACTORY:
                        break
                if booted is None:
                    return PartCheck("boot", False, f"the bootloader said {line.string.strip()!r}")
                return PartCheck("boot", True, booted.group("version"))
        except RigFault as fault:
            return PartCheck("boot", False, fault.message)


def _esp_booted(board: Board, pattern: str, deadline: float) -> PartCheck:
    """An ESP32's boot line comes while esptool still holds the port (its reset is on the
    same USB bridge), so it may be gone: ask the booted firmware its version, as
    ``Board.restore_base`` does, watching for what its bootloader said meanwhile."""
    console = board.console
    while True:
        try:
            version = board.version(timeout=0.3)
        except ExpectTimeout:
            said = [line for line in console.log_text().splitlines()
                    if re.search(BOOTLOADER_ERROR, line)]
            if said:
                return PartCheck("boot", False, f"the bootloader said {said[-1].strip()!r}")
            if time.monotonic() > deadline:
                return PartCheck("boot", False, f"no boot within {BOOT_CHECK_S:g} s (no "
                                 "answer to the version query)")
            continue
        if version != BOOT_CHECK_FACTORY:
            return PartCheck("boot", True, version)
