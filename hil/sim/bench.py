"""A simulated rig's bench: the board, its console and its instruments, started from the rig file.

``SimBench(rig)`` brings up what the rig file's addresses point at, so the real drivers find a
board where the rig says one is:

- the board: an ESP32 behind the ``hilsim://<state_dir>`` serial URL (``hil.sim.esp32``), or an
  nRF52832 / GD32F103 behind the ``hilsim`` pyocd probe whose id is ``flasher.probe``
  (``hil.sim.probe``; its state directory is put on ``HIL_SIM_PROBES`` for this process) with its
  console on a pty linked at ``<state_dir>/console``;
- the firmware model (``hil.sim.firmware``) on the board, with the rig's identity (the access key
  from ``identity.access_key_env``, in memory only) and ``sim.defects``;
- a SCPI bench supply on a pty at ``<state_dir>/supply`` when ``power.kind`` is ``scpi``: its
  output powers the board, its MEAS:CURR? is what the firmware draws doing what it does now
  (``Firmware.draw_ma``), and its voltage is the battery level the firmware reads (through the
  rig's ``empty_volts``..``full_volts``); switching the output off cuts the board's power;
- a step attenuator on a pty at ``<state_dir>/attenuator`` when ``rf.kind`` is ``attenuator``:
  the signal the firmware reports is ``signal_at_0db - attenuation / db_per_level``.

A board whose primary slot holds no valid image is given the factory image
(``sim.factory_version``), also kept as ``factory.bin`` for ``test factory``; an nRF52832 or GD32
whose bootloader region is blank gets its bootloader's vector table back, as a technician would
reflash MCUboot after a chip erase. The bench starts with the supply on at full charge and the
attenuator at 0 dB.

A shipped-firmware rig (``sim.shipped``) runs the firmware as it ships: no shell, a check at
every boot, built to reach the rig's ``ota.host``:``ota.port``. Its network is the bench's
``resolve``, the one place where the firmware's host name becomes an address: it asks the DNS
server ``route_ota_host`` named (hil's, ``ota.dns``) for the name at every attempt, as a board
asks the DNS its router hands out, and a DNS that does not answer leaves the name unresolved.
The firmware's port is ``ota.port``; ``port: 0`` (a free port, as parallel sessions share the
loopback) is the gateway's, learned from the URL ``route_ota_host`` is given.

``stop()`` powers the board off and stops the firmware's threads, the ptys and the instruments:
nothing outlives the bench. Flash and settings stay in the state directory for the next start.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import filelock

from hil.errors import RigFault
from hil.gateway.dns import ResolveError, resolve
from hil.rig.model import AttenuatorRf, Rig, ScpiPower
from hil.service.server import new_access_key
from hil.sim.defects import Defect
from hil.sim.firmware import FACTORY_FILE, DeviceIdentity, Firmware, erase_boot_state
from hil.sim.flash import SimFlash
from hil.sim.images import build_image, image_version
from hil.sim.instruments import EmulatedAttenuator, EmulatedInstrument, EmulatedSupply, LineSplitter
from hil.sim.layout import SPI_FLASH_FILE, SPI_FLASH_SIZE, layout_of
from hil.sim.pty import PtyPort
from hil.sim.symbols import NullWrite, cortex_m_fault, esp32_panic

log = logging.getLogger(__name__)

BROWN_OUT_VOLTS = 1.8           # below this the board's regulator drops out
DEFAULT_SIGNAL = 31             # what the radio reports on a rig with no attenuator
SUPPLY_IDN = "HIL-SIM,SUPPLY-1,{name},1.0"
ATTENUATOR_IDN = "HIL-SIM,ATTENUATOR,{name},1.0"


def sim_access_key(rig: Rig) -> str:
    """The key the simulated device signs with: the rig's access-key variable, set to a fresh
    key for this process when unset (the mock service reads the same variable)."""
    return os.environ.setdefault(rig.identity.access_key_env, new_access_key())


def expected_addresses(rig: Rig) -> dict[str, str]:
    """What the rig file must say for each simulated part: key -> address."""
    state_dir = rig.sim_state_dir
    assert state_dir is not None
    addresses = {"console.url" if rig.board == "esp32" else "console.port":
                 f"hilsim://{state_dir}" if rig.board == "esp32" else str(state_dir / "console")}
    if isinstance(rig.power, ScpiPower):
        addresses["power.url"] = str(state_dir / "supply")
    if isinstance(rig.rf, AttenuatorRf):
        addresses["rf.url"] = str(state_dir / "attenuator")
    return addresses


def _check_addresses(rig: Rig) -> None:
    given = {"console.url": rig.console.url, "console.port": rig.console.port,
             "power.url": getattr(rig.power, "url", None), "rf.url": getattr(rig.rf, "url", None)}
    for key, expected in expected_addresses(rig).items():
        if given[key] != expected:
            raise RigFault(key.split(".")[0], f"{key} of a simulated rig must be {expected} "
                           f"(sim.state_dir), not {given[key]}", rig.name)


class _Instrument:
    """An emulated instrument answering on a pty."""

    def __init__(self, instrument: EmulatedInstrument, path: Path, name: str) -> None:
        self.instrument = instrument
        self._lines = LineSplitter(instrument.terminator)
        self.port = PtyPort(path, self._heard, name=name)

    def _heard(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            answer = self.instrument.respond(line)
            if answer is not None:
                self.port.write(answer)


BENCH_LOCK = "bench.lock"
# What a state directory's files mean changes with hil: a board's flash from before a change of
# layout or image format (the ESP32's A/B slots and Secure Boot V2 images, MCUboot's signed
# images) would not boot, and a cached factory image would be of the old format. A directory
# whose marker names another format starts afresh (its locks kept).
STATE_FORMAT = "esp-idf-ab-sbv2"
FORMAT_FILE = "format"
_KEPT = frozenset({BENCH_LOCK, "probe.lock", FORMAT_FILE})
DNS_TIMEOUT_S = 1.0                  # a shipped firmware's wait for its DNS answer
_running: set[Path] = set()          # state directories with a bench up in this process
_running_lock = threading.Lock()


class SimBench:
    """The simulated bench of one rig (see the module docstring). A context manager.

    One bench per state directory at a time, across processes (a file lock in the directory,
    waited for up to ``wait`` seconds) and within one (refused at once)."""

    def __init__(self, rig: Rig, *, wait: float = 600.0) -> None:
        if rig.sim is None or rig.sim_state_dir is None:
            raise RigFault("sim", "not a simulated rig (no sim section)", rig.name)
        self.rig = rig
        self.sim = rig.sim
        self.state_dir: Path = rig.sim_state_dir
        self.layout = layout_of(rig.board)
        self.defects = Defect.parse(rig.sim.defects)
        self.firmware: Firmware | None = None
        self.supply: EmulatedSupply | None = None
        self.attenuator: EmulatedAttenuator | None = None
        self._instruments: list[_Instrument] = []
        self._console: PtyPort | None = None
        self._board: Any = None           # Esp32Board or hil.sim.probe.SimBoard
        self._flashes: dict[str, SimFlash] = {}
        self._own_flashes: list[SimFlash] = []
        self._plugged: str | None = None     # our entry in HIL_SIM_PROBES
        self._power_lock = threading.Lock()
        self._started = False
        self._wait = wait
        self._claim: filelock.FileLock | None = None
        # The network (``route_ota_host``): its DNS server, and the gateway's port, the
        # firmware's build-time port when the rig's is 0 (a free one).
        self._dns: tuple[str, int] | None = None
        self._gateway_port: int | None = None

    # ================================================================== lifecycle
    def start(self) -> SimBench:
        _check_addresses(self.rig)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_state_dir()
        self._discard_older_state()
        identity = DeviceIdentity(self.rig.identity.product_id, self.rig.identity.dev_id,
                                  sim_access_key(self.rig))
        try:
            self._start_instruments()
            if self.rig.board == "esp32":
                self._start_esp32()
            else:
                self._start_cortex()
            self._install_factory_image()
            self.firmware = Firmware(self, self.state_dir, identity, defects=self.defects,
                                     http_timeout=self.sim.http_timeout,
                                     chunk_size=self.sim.chunk_size, shipped=self.sim.shipped,
                                     host=self.rig.ota.host, port=self.rig.ota.gateway_port,
                                     check_period=self.rig.ota.check_period)
            self._hook_board()
            self._started = True
            self._apply_power()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._started = False
        self._set_board_power(False)
        if self.firmware is not None:
            self.firmware.shutdown()
        self._unhook_board()
        if self._console is not None:
            self._console.stop()
            self._console = None
        for instrument in self._instruments:
            instrument.port.stop()
        self._instruments.clear()
        for flash in self._own_flashes:
            flash.close()
        self._own_flashes.clear()
        self._flashes.clear()
        board, self._board = self._board, None
        if board is not None:
            if self.rig.board == "esp32":
                board.close_flash()
            else:
                board.chip.detach()
                board.chip.external_power = False
        if self._plugged is not None:
            self._unplug_probe()
        self._give_back_state_dir()

    def _take_state_dir(self) -> None:
        key = self.state_dir.resolve()
        with _running_lock:
            if key in _running:
                raise RigFault("sim", f"a simulation of {self.state_dir} already runs in this "
                               "process", self.rig.name)
            _running.add(key)
        claim = filelock.FileLock(str(self.state_dir / BENCH_LOCK), is_singleton=False,
                                  thread_local=False)
        try:
            claim.acquire(timeout=self._wait)
        except filelock.Timeout:
            with _running_lock:
                _running.discard(key)
            raise RigFault("sim", f"another process has run the simulation in {self.state_dir} "
                           f"for more than {self._wait:g} s", self.rig.name) from None
        self._claim = claim

    def _discard_older_state(self) -> None:
        """Start afresh when the state directory was left by a hil whose files meant something
        else (``STATE_FORMAT``): what is there is removed, as a board would be erased."""
        marker = self.state_dir / FORMAT_FILE
        try:
            found = marker.read_text(encoding="utf-8").strip()
        except OSError:
            found = None
        if found == STATE_FORMAT:
            return
        stale = [entry for entry in self.state_dir.iterdir()
                 if entry.name not in _KEPT and (entry.is_symlink() or entry.is_file())]
        for entry in stale:
            entry.unlink(missing_ok=True)
        if stale:
            log.info("%s: state of another format (%s) discarded: %s", self.state_dir,
                     found or "unmarked", ", ".join(sorted(entry.name for entry in stale)))
        marker.write_text(STATE_FORMAT + "\n", encoding="utf-8")

    def _give_back_state_dir(self) -> None:
        claim, self._claim = self._claim, None
        if claim is None:
            return
        claim.release()
        with _running_lock:
            _running.discard(self.state_dir.resolve())

    # ================================================================== bench faults
    def unplug_console(self, seconds: float) -> None:
        """The console's USB serial adapter drops off the bus for ``seconds`` and comes back
        at the same path, on a new pty (as a USB re-enumeration does): a host that has the port
        open sees it vanish."""
        console = self._console
        if console is None:
            raise RigFault("sim", "this board's console is not a pty (an ESP32's is its "
                           "hilsim:// bridge)", self.rig.name)
        console.stop()

        def replug() -> None:
            time.sleep(seconds)
            if self._started and self._console is console:
                self._console = PtyPort(console.path, self._console_input,
                                        name=console.name).start()

        threading.Thread(target=replug, name=f"hil-sim {self.rig.name} replug",
                         daemon=True).start()

    def hang_firmware(self) -> None:
        """The firmware stops answering (a crashed CPU, still powered) until the board is
        reset or power-cycled."""
        if self.firmware is not None:
            self.firmware.stop()

    # ================================================================== the network
    def route_ota_host(self, base_url: str, dns: tuple[str, int] | None) -> None:
        """The bench's network from now on: ``dns`` ((host, port) of hil's DNS server, None:
        none) answers the firmware's names, and the gateway at ``base_url`` listens on the
        firmware's port (for ``ota.port: 0`` its port is the one the firmware was built with)."""
        self._dns = dns
        self._gateway_port = urlsplit(base_url).port

    def offline(self) -> None:
        """The bench's network answers no name until ``route_ota_host`` again: a board being
        restored boots without reaching any OTA service (its check at boot fails at once)."""
        self._dns = None

    def boot_generation(self) -> int:
        return self.firmware.generation if self.firmware is not None else 0

    def wait_boot_done(self, after: int, timeout: float) -> bool:
        """A boot after ``after`` (``boot_generation``) has done its own work (see
        ``Firmware.wait_boot_done``)."""
        return self.firmware is not None and self.firmware.wait_boot_done(after, timeout)

    def resolve(self, host: str, port: int) -> str | None:
        """Platform.resolve: the base URL ``host:port`` reaches on this bench's network, or None
        when the name does not resolve (no DNS, or it answers no address: REFUSED, NXDOMAIN,
        silence). ``port`` 0: the gateway's, as ``route_ota_host`` learned it."""
        if self._dns is None:
            return None
        try:
            address = resolve(host, server=self._dns, timeout=DNS_TIMEOUT_S)
        except ResolveError:
            return None
        port = port or self._gateway_port or 0
        return f"http://{address}:{port}" if port else None

    @property
    def factory_image(self) -> Path:
        """The image the board came with (``sim.factory_version``): a shell-less board's base
        when no other is given, flashed as a production line would."""
        return self.state_dir / FACTORY_FILE

    def erase_settings(self) -> None:
        """The settings partition erased (the OTA state with it), as a full chip erase does:
        how a shell-less board, which has no ``test factory``, is brought back to its base."""
        if self.firmware is not None:
            self.firmware.nvs.erase()

    def erase_boot_state(self) -> None:
        """MCUboot's state erased (its trailers in both slots and its scratch area), as a full
        chip erase would: after a restore nothing is pending or to be reverted, and the base
        image boots as flashed. Only what is not erased already is erased (a restore after a
        test that changed nothing writes nothing). The ESP32's (its otadata) is erased by its
        flasher, through esptool, as on a lab rig (``hil.drivers.esp``)."""
        if self.layout.otadata is None:
            erase_boot_state(self.layout, self.flash)

    def __enter__(self) -> SimBench:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ================================================================== the board
    def _start_esp32(self) -> None:
        from hil.sim.esp32 import board_for

        board = board_for(self.state_dir)
        self._board = board
        board.set_power(False)
        self._flashes["internal"] = board.open_flash()

    def _start_cortex(self) -> None:
        # pyocd first: loading its probe plugins imports hil.sim.probe, which imports the chips.
        import pyocd.probe.aggregator  # noqa: F401

        from hil.sim.chips import CHIPS
        from hil.sim.probe import ENV_VAR, board, provision

        flasher = self.rig.flasher
        uid = getattr(flasher, "probe", None)
        if uid is None:
            raise RigFault("flasher", "a simulated SWD board needs flasher.kind: swd and a probe "
                           "id", self.rig.name)
        chip = self.rig.part_number if self.rig.part_number in CHIPS else self.rig.board
        if chip not in CHIPS:
            raise RigFault("chip", f"no simulated {self.rig.part_number}; simulated chips: "
                           f"{', '.join(CHIPS)}", self.rig.name)
        try:
            spec = provision(self.state_dir, uid, chip)
        except ValueError as error:
            raise RigFault("flasher", str(error), self.rig.name) from None
        sim_board = board(spec)
        self._board = sim_board
        sim_board.chip.external_power = True
        sim_board.chip.set_power(False)
        sim_board.chip.attach()
        bank = sim_board.chip.banks[0]
        self._flashes["internal"] = bank.flash
        if self.layout.secondary.chip == "spi":
            spi = SimFlash(self.state_dir / SPI_FLASH_FILE, size=SPI_FLASH_SIZE)
            self._own_flashes.append(spi)
            self._flashes["spi"] = spi
        self._restore_bootloader()
        # Plug the probe in for this process (pyocd reads the variable when it lists probes).
        entries = [e for e in os.environ.get(ENV_VAR, "").split(os.pathsep) if e]
        if str(spec.state_dir) not in entries:
            os.environ[ENV_VAR] = os.pathsep.join([*entries, str(spec.state_dir)])
            self._plugged = str(spec.state_dir)
        self._console = PtyPort(self.state_dir / "console", self._console_input,
                                name=f"{self.rig.name} console").start()

    def _unplug_probe(self) -> None:
        """Take this board's entry out of the variable, whatever other benches did meanwhile."""
        from hil.sim.probe import ENV_VAR

        plugged, self._plugged = self._plugged, None
        entries = [e for e in os.environ.get(ENV_VAR, "").split(os.pathsep)
                   if e and e != plugged]
        if entries:
            os.environ[ENV_VAR] = os.pathsep.join(entries)
        else:
            os.environ.pop(ENV_VAR, None)

    def _restore_bootloader(self) -> None:
        """A vector table at the start of the boot region: the core resets into "MCUboot", whose
        work the firmware model does (``Firmware._bootloader``)."""
        region = self.layout.boot_region
        assert region is not None
        flash = self._flashes["internal"]
        if flash.read(region.address, 8) != b"\xff" * 8:
            return
        stack_top = 0x20005000 if self.rig.board == "gd32" else 0x20010000
        reset = (region.address + 0x101) | 1
        flash.write(region.address, struct.pack("<II", stack_top, reset) + b"hil-sim MCUboot")

    def _install_factory_image(self) -> None:
        slot = self.layout.primary
        flash = self._flashes[slot.chip]
        factory = self.state_dir / FACTORY_FILE
        if not factory.is_file():
            factory.write_bytes(build_image(self.rig.board, self.sim.factory_version))
        try:
            image_version(self.rig.board, flash.read(slot.address, slot.size))
        except ValueError:
            flash.erase(slot.address, slot.size)
            flash.program(slot.address, factory.read_bytes())
            flash.flush()

    def _hook_board(self) -> None:
        firmware = self.firmware
        assert firmware is not None
        if self.rig.board == "esp32":
            self._board.on_boot = firmware.boot
            self._board.on_reset = firmware.stop
            self._board.on_console_input = firmware.console_input
        else:
            core = self._board.chip.core
            core.on_reset = firmware.stop
            core.on_halt = firmware.stop
            core.on_run = firmware.boot

    def _unhook_board(self) -> None:
        board = self._board
        if board is None:
            return
        if self.rig.board == "esp32":
            board.on_boot = board.on_reset = board.on_console_input = None
        else:
            core = board.chip.core
            core.on_reset = core.on_halt = core.on_run = None

    # ================================================================== instruments
    def _start_instruments(self) -> None:
        name = self.rig.name
        if isinstance(self.rig.power, ScpiPower):
            supply = EmulatedSupply(channels=max(self.rig.power.channel, 1),
                                    idn=SUPPLY_IDN.format(name=name))
            channel = supply.channels[self.rig.power.channel]
            channel.volts = self.rig.power.full_volts
            channel.current_limit = self.rig.power.current_limit
            channel.output = True
            channel.load_amps = self._board_amps
            supply.on_change = lambda _: self._apply_power()
            self.supply = supply
            self._serve(supply, "supply")
        if isinstance(self.rig.rf, AttenuatorRf):
            attenuator = EmulatedAttenuator(self.rig.rf.dialect, max_db=self.rig.rf.max_db,
                                            step_db=self.rig.rf.step_db,
                                            idn=ATTENUATOR_IDN.format(name=name))
            self.attenuator = attenuator
            self._serve(attenuator, "attenuator")

    def _serve(self, instrument: EmulatedInstrument, name: str) -> None:
        served = _Instrument(instrument, self.state_dir / name, f"{self.rig.name} {name}")
        self._instruments.append(served)
        served.port.start()

    def _supply_volts(self) -> float | None:
        """The voltage at the board's battery terminals; None on a rig without a supply."""
        if self.supply is None or not isinstance(self.rig.power, ScpiPower):
            return None
        return self.supply.channels[self.rig.power.channel].measured_volts()

    def _board_amps(self) -> float:
        """What the board draws from the supply now: its firmware's activity (radio on while it
        downloads, flash writes, boot; ``Firmware.draw_ma``), nothing while it is dark."""
        firmware = self.firmware
        return firmware.draw_ma / 1000 if firmware is not None and self._started else 0.0

    def _apply_power(self) -> None:
        if not self._started:
            return
        volts = self._supply_volts()
        self._set_board_power(volts is None or volts >= BROWN_OUT_VOLTS)

    def _set_board_power(self, on: bool) -> None:
        with self._power_lock:
            board = self._board
            if board is None:
                return
            if self.rig.board == "esp32":
                board.set_power(on)
            else:
                board.chip.set_power(on)

    # ================================================================== Platform (firmware)
    @property
    def board(self) -> str:
        return self.rig.board

    def console_write(self, data: bytes) -> None:
        if self.rig.board == "esp32":
            self._board.console_write(data)
        elif self._console is not None:
            self._console.write(data)

    def _console_input(self, data: bytes) -> None:
        firmware = self.firmware
        if firmware is not None:
            firmware.console_input(data)

    def reset(self) -> None:
        board = self._board
        if board is None:
            return
        if self.rig.board == "esp32":
            board.software_reset()
        else:
            with board.chip.lock:
                if board.chip.powered:
                    board.chip.core.system_reset()

    def flash(self, chip: str) -> SimFlash:
        return self._flashes[chip]

    def crash(self, fault: NullWrite) -> None:
        """Platform.crash: an ESP32 panics (prints, reboots); a Cortex-M core takes a HardFault
        and spins in its handler (``hil.sim.symbols`` says what each shows)."""
        board = self._board
        if board is None:
            return
        if self.rig.board == "esp32":
            board.panic(esp32_panic(fault))
            return
        cause, handler = cortex_m_fault(self.rig.board, fault)
        with board.chip.lock:
            if board.chip.powered:
                board.chip.core.take_fault(cause, handler)

    def battery_percent(self) -> int:
        volts = self._supply_volts()
        power = self.rig.power
        if volts is None or not isinstance(power, ScpiPower):
            return 100
        share = (volts - power.empty_volts) / (power.full_volts - power.empty_volts)
        return max(0, min(100, round(share * 100)))

    def signal(self) -> int:
        rf = self.rig.rf
        if self.attenuator is None or not isinstance(rf, AttenuatorRf):
            return DEFAULT_SIGNAL
        return rf.signal_at_0db - round(self.attenuator.attenuation / rf.db_per_level)
