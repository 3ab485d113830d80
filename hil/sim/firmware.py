"""The firmware of a simulated board: a test build with the console contract's shell, the OneNET
OTA agent a well-behaved device runs, the bootloader that installs what it downloads, and the
state it keeps in flash. The same model runs on every simulated board; the board (``Platform``)
gives it a console, flash, a reset line, a battery and a radio.

One OTA attempt (``ota check``), as ONENET.md has real devices do it:

1. ``POST /ota/device/version`` with the version running now (answer not needed to go on);
2. detect (``type=2``, SOTA: the MCU application) with the board's manuf/model, its version, its
   signal and battery level; anything but errno 0 ends the attempt (there is no token to report
   with);
3. the task's thresholds, checked by the device (``meets_threshold``: strictly above): battery
   105, signal 106; then free package storage 102;
4. token check: 12 (expired), 20 (finished), 22 (cancelled) end the attempt without a report, any
   other errno is reported 107;
5. ranged download in ``chunk_size`` pieces straight into the secondary slot, every answer checked
   (206, ``Content-Length`` present, ``Content-Range`` exactly the range asked for, the body that
   long); the offset and token are persisted after every chunk, so a reboot or power cut resumes
   where it stopped (detect hands a live task's token back). A one-byte error body ``1``, ``2``,
   ``3`` or ``5`` is final (107); a timeout, a connection error, a wrong answer or error body
   ``4``/``6`` is retried up to the task's ``retry`` times, ``interval`` seconds apart; when no
   try is left the device reports what the last failure was, as the user's API document names
   the codes: 104 (request timeout) for a timeout or a stall, 103 (memory overflow) for a range
   answer longer than the range asked (its ``Content-Length`` says more than the receive buffer,
   one chunk, holds: the board reads none of it), 107 (unknown) otherwise. Before
   each chunk the battery is read again: below the task's threshold the download stops with 105
   ("download failed: low battery", the user's API document); a board does not go on writing
   its flash on a battery the task says is too low (ONENET.md is silent on when a device checks;
   this model checks before every chunk, so a battery falling mid-download is a 105, and one
   falling after the last chunk a 202);
6. 101 once the whole package is in flash (the transfer completed), then its md5: a mismatch is
   205; then the image's header: an image that says it is larger than the slot it is to run
   from is 203 ("upgrade failed: memory overflow"; MCUboot's ``boot_check_header_valid`` and
   ESP-IDF's image loader refuse it, so the board does not ask for an install that cannot be);
7. flash: the battery is checked again (202 below the task's threshold), the image is marked for
   installation, read back: a write that fails, a bad sector, is 206 "upgrade failed: unknown",
   and the board goes on running its old image; then the board reboots.
   - nRF52832, GD32: MCUboot (``hil.sim.mcuboot``, swap using scratch). The mark is a *test*
     upgrade (``boot_request_upgrade``: the trailer magic at the secondary slot's end,
     ``image_ok`` unset). The bootloader validates the secondary image (its hash, its ED25519
     signature with the key it was built with, its size, its version not older than the
     running one: ``MCUBOOT_DOWNGRADE_PREVENTION``), refusing it (erased, the old image boots)
     or swapping the slots unit by unit with its progress in the primary slot's trailer, so that
     a power cut mid-swap resumes at the next boot and ends with one complete image in each
     slot. It prints ``ota phase=flash bytes=N`` as its first write into the primary slot
     begins, and its progress as ``I:`` lines; the writes take the parts' erase and program
     times (``Layout.install_timing``, scaled by ``mcuboot.SWAP_TIME_SCALE``). The new image,
     once booted, runs its self-test and confirms itself (``image_ok``); a build whose
     self-test fails (``images.build_image(fails_self_test=True)``) resets before it confirms,
     and the next boot swaps the old image back (a revert), which then reports.
   - ESP32: ESP-IDF's A/B scheme (``hil.sim.otadata``): the package went to the slot that
     does not run; the install is ``esp_ota_end`` and ``esp_ota_set_boot_partition``,
     announced as ``ota phase=flash bytes=N``: the image read back and checked (twice, as
     both calls do) and the otadata sector written, the switch to the new slot in state NEW
     (``SWITCH_TIME_SCALE``). The install is recorded in the settings before the switch, so a
     board cut before the switch took boots its old image and makes the switch again. The
     bootloader boots the new slot as PENDING_VERIFY after checking its image (Secure Boot V2
     signature, anti-rollback ``secure_version`` against the eFuse); the app confirms itself
     after its self-test (``esp_ota_mark_app_valid_cancel_rollback``, which also burns its
     secure_version into the eFuse); an app reset before that is rolled back at the next
     boot, and an image the bootloader refuses is not booted (the old slot is).
   The MCUboot trailer's sector is not package storage: the free space is the secondary slot
   less it (the ESP32's whole update slot);
8. after the boot (and the new image's confirm), 201 if the image the board booted carries the
   target version, 204 otherwise (not installed: refused by the bootloader or reverted; or
   installed but of another version).

Every step is narrated on the console as contract events (``ota phase=...``, ``boot
version=V``, ``ota end`` once the attempt is over, after the post-boot report when there was one).

Persistence: ``<state_dir>/nvs.json`` is the firmware's settings partition (the OTA server, the
attempt in progress), written atomically after each change; the flash files are the board's.
The attempt in progress is bound to the image that started it (a digest of the primary slot,
its MCUboot trailer excluded): a board reflashed with another image since forgets it instead
of resuming someone else's update.
One reflashed with the very same image resumes, as real settings partitions survive a reflash;
a new task (a new token) or ``test factory`` starts afresh (it erases MCUboot's trailers too:
nothing pending, nothing to revert). Fault-hook values (``test power``,
``signal``, ``space``) live in RAM and are gone after a reset.

Defects (``Defect``), off by default and chosen per board, make the firmware misbehave the way
real firmware does, so the conformance suite's power to catch them can be measured.

**Shipped mode** (``shipped=True``, a rig's ``sim.shipped``): the same agent as production firmware
runs it. No shell: console input is ignored, the console is a read-only log (``I: app: firmware
version V`` at boot, ``I: ota: ...`` lines, never the contract's events). At every boot it reports
the outcome of a pending install (201/204), then runs one attempt (steps 1..7); with a
``check_period`` it runs one again every that many seconds. It talks to the host and port its
build names (``host``, ``port``: the rig's ``ota.host``/``ota.port``; ``Host:`` carries the
name), whose address it asks the network for at each attempt (``Platform.resolve``: the rig's
DNS, hil's); a name that does not resolve skips the check, logged (``cannot resolve``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests

from hil.boards import board_family
from hil.errors import ProtocolError
from hil.onenet.auth import Authorization, product_res
from hil.onenet.codes import (
    DownloadError,
    Errno,
    ResultCode,
    TaskType,
    decode_error_body,
    meets_threshold,
)
from hil.onenet.messages import DetectAnswer
from hil.sim import mcuboot, otadata
from hil.sim.defects import Defect
from hil.sim.flash import FlashWriteError, SimFlash
from hil.sim.images import fails_self_test, image_span, image_version
from hil.sim.layout import Layout, Slot, layout_of
from hil.sim.symbols import NullWrite

NVS_FILE = "nvs.json"
FACTORY_FILE = "factory.bin"
CHUNK_SIZE = 4096
HTTP_TIMEOUT_S = 5.0
TOKEN_LIFETIME_S = 3600          # how far ahead the firmware dates its Authorization
_RETRY_FLOOR_S = 0.05            # a "retries forever" board still does not spin flat out
# The ESP32's install (esp_ota_end, then esp_ota_set_boot_partition) reads the new image back
# twice to check it, at the SPI flash's read rate (40 MHz, dual I/O: 10 MB/s), then erases and
# programs one otadata sector (the part's typical times, hil.sim.layout): about 0.07 s for the
# 1.1.0 test image. Stretched by this so that it lasts about as long as the MCUboot boards'
# swaps (hundreds of ms), far longer than a host takes to cut the power once the board has
# announced it (tens of ms on a loaded machine): a real ESP32's switch is over sooner, and a
# lab rig's power-cut-while-flashing scenario lands only if the host is that quick.
SPI_READ_BYTES_PER_S = 10_000_000
SWITCH_TIME_SCALE = 5.0
# What the board draws from its supply while doing each thing, in mA (``Firmware.draw_ma``, read
# by the simulated supply's MEAS:CURR?): of the order of a Cortex-M with a cellular or Wi-Fi radio.
DRAW_MA = {"off": 0.0, "idle": 12.0, "boot": 30.0, "radio": 85.0, "cpu": 20.0, "flash": 45.0}
SELF_TEST_S = 0.2                # how long a new image's self-test runs before it confirms

def install_request_at(layout: Layout, flash: SimFlash) -> int:
    """The sector the next install request is written to (a bench's bad-sector fault marks
    it, ``hil.faults.catalog``): on the MCUboot boards the unit holding the secondary slot's
    trailer (its last); on the ESP32 the otadata sector the next switch writes."""
    if layout.otadata is not None:
        sector = otadata.pending_sector(otadata.read_entries(flash, layout.otadata))
        return layout.otadata.address + sector * otadata.SECTOR
    slot = layout.secondary
    return slot.address + slot.size - max(flash.sector_size, layout.trailer)


def erase_boot_state(layout: Layout, flash: Callable[[str], SimFlash]) -> None:
    """The bootloader's state erased, as a full chip erase would (nothing pending, nothing to
    revert; the base image in the primary slot boots): MCUboot's trailers and scratch area, or
    ESP-IDF's otadata. Only what is not erased already is erased."""
    if layout.otadata is None:
        mcuboot.erase_boot_state(layout, flash)
    else:
        mcuboot.erase_areas(flash, [layout.otadata])


# Token check answers after which a device ends the attempt without a report (ONENET.md).
END_WITHOUT_REPORT = frozenset({Errno.TOKEN_EXPIRED, Errno.TASK_FINISHED, Errno.TASK_CANCELLED})
# One-byte download error bodies that no retry can fix (not found, size, token, parameters).
FINAL_DOWNLOAD_ERRORS = frozenset({DownloadError.NOT_FOUND, DownloadError.SIZE_MISMATCH,
                                   DownloadError.INVALID_TOKEN, DownloadError.BAD_PARAMETERS})


class Platform(Protocol):
    """What the board gives its firmware."""

    @property
    def board(self) -> str:
        """The board family (``hil.boards``)."""

    def console_write(self, data: bytes) -> None: ...

    def reset(self) -> None:
        """A software reset: the firmware stops (``Firmware.stop``) and boots again."""

    def flash(self, chip: str) -> SimFlash:
        """The flash chip named in the layout (``internal``, ``spi``)."""

    def battery_percent(self) -> int:
        """What the battery gauge reads now (the bench supply's voltage, on a simulated rig)."""

    def signal(self) -> int:
        """The signal level the radio reports now (after the rig's attenuator)."""

    def resolve(self, host: str, port: int) -> str | None:
        """The base URL the network takes ``host:port`` to (its DNS answer), or None when the
        name does not resolve. ``port`` 0: the free port a simulated build was given, which the
        network knows. Shipped firmware only."""

    def crash(self, fault: NullWrite) -> None:
        """The firmware faulted (``Defect.CRASHES_MID_DOWNLOAD``): the chip shows it as it
        would (a HardFault, a panic). The firmware has stopped itself."""


@dataclass(frozen=True)
class DeviceIdentity:
    product_id: str
    dev_id: str
    access_key: str = ""

    def __repr__(self) -> str:        # the key never reaches a log through a repr
        return f"DeviceIdentity(product_id={self.product_id!r}, dev_id={self.dev_id!r})"


class _Stopped(Exception):
    """The board reset or lost power under a running thread: it unwinds without a word."""


class _Failed(Exception):
    """An attempt ends with this result code reported (or none, for ``None``)."""

    def __init__(self, result: ResultCode | None) -> None:
        super().__init__(result)
        self.result = result


class _Unanswered(Exception):
    """A report got no answer: the attempt ends, its state kept for the next one."""


class Nvs:
    """The settings partition: a JSON object written atomically (a power cut never tears it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, Any]:
        with self._lock:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
            return data if isinstance(data, dict) else {}

    def update(self, **values: Any) -> None:
        with self._lock:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            data.update(values)
            data = {key: value for key, value in data.items() if value is not None}
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
            os.replace(temporary, self.path)

    def erase(self) -> None:
        with self._lock:
            self.path.unlink(missing_ok=True)


def slot_digest(flash: SimFlash, slot: Slot, trailer: int = 0) -> str:
    """The digest of what a slot holds, its MCUboot trailer (``trailer`` bytes at its end,
    changed by a confirm or a swap's bookkeeping) excluded."""
    return hashlib.sha256(flash.read(slot.address, slot.size - trailer)).hexdigest()


class _BootIo:
    """What MCUboot (``hil.sim.mcuboot``) gets from the firmware model during one boot."""

    def __init__(self, firmware: Firmware, generation: int) -> None:
        self._firmware, self._generation = firmware, generation

    def flash(self, chip: str) -> SimFlash:
        return self._firmware.platform.flash(chip)

    def say(self, line: str) -> None:
        self._firmware._say(self._generation, line)

    def wait(self, seconds: float) -> None:
        self._firmware._sleep(self._generation, seconds)

    def draw(self, activity: str) -> None:
        self._firmware._draw(self._generation, activity)


class Firmware:
    """The firmware running on ``platform`` (see the module docstring).

    The board calls ``boot()`` when the chip starts the firmware (power-on, reset released, a
    software reset), ``stop()`` when it stops running it (reset held, power lost, a debugger's
    halt) and ``console_input(data)`` with what the host sends; each returns at once. Work runs
    on the firmware's own threads, which a ``stop()`` strands: they unwind at their next step
    without touching the console, the flash or the network again. ``shutdown()`` stops and
    waits for them (the simulation's end)."""

    def __init__(self, platform: Platform, state_dir: Path, identity: DeviceIdentity, *,
                 defects: frozenset[Defect] = frozenset(), http_timeout: float = HTTP_TIMEOUT_S,
                 chunk_size: int = CHUNK_SIZE, clock: Callable[[], float] = time.time,
                 shipped: bool = False, host: str | None = None, port: int = 80,
                 check_period: float | None = None) -> None:
        self.platform = platform
        self.board = platform.board
        self.family = board_family(platform.board)
        self.layout: Layout = layout_of(platform.board)
        self.state_dir = state_dir
        self.identity = identity
        self.defects = defects
        self.http_timeout = http_timeout
        self.chunk_size = chunk_size
        self.clock = clock
        self.nvs = Nvs(state_dir / NVS_FILE)
        self.shipped = shipped
        self.host, self.port = host, port
        self.check_period = check_period
        self.version: str | None = None      # of the image running now; None: not running
        self._lock = threading.Lock()
        self._generation = 0                 # one per boot; a thread of an older one is stranded
        self._running = False
        self._halt = threading.Event()       # set on stop(): wakes a stranded thread's waits
        self._threads: list[threading.Thread] = []
        self._busy: threading.Thread | None = None   # the OTA attempt (or post-boot report)
        self._booted: dict[int, threading.Event] = {}  # per boot: set when its main thread ends
        self._line = bytearray()
        self._power_override: int | None = None
        self._signal_override: int | None = None
        self._space_override: int | None = None
        self._boot_slot = 0                  # which of layout.slots the bootloader started
        self.draw_ma = DRAW_MA["off"]        # what it draws now (the simulated supply reads it)

    # =========================================================================== board events
    def boot(self) -> None:
        with self._lock:
            self._generation += 1
            self._running = True
            self._halt = threading.Event()
            self._line.clear()
            self._power_override = self._signal_override = self._space_override = None
            self._busy = None
            generation = self._generation
            self._booted = {g: e for g, e in self._booted.items() if g > generation - 4}
            self._booted[generation] = threading.Event()
            self.draw_ma = DRAW_MA["boot"]
        self._spawn(lambda g: self._run_main(g), generation, "main")

    def _run_main(self, generation: int) -> None:
        try:
            self._main(generation)
        finally:
            done = self._booted.get(generation)
            if done is not None:
                done.set()

    @property
    def generation(self) -> int:
        """One per boot (and per stop): what ``wait_boot_done`` counts from."""
        return self._generation

    def wait_boot_done(self, after: int, timeout: float) -> bool:
        """Wait for a boot later than ``after`` (a ``generation``) to have done what a boot
        does by itself (boot line, an install's report, a shipped firmware's check at boot);
        False if none did within ``timeout``. A shipped firmware with a ``check_period`` never
        ends its boot's work: its first check is what is waited for then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                later = [g for g in self._booted if g > after]
                done = self._booted[max(later)] if later else None
            if done is not None and (self.check_period is not None or
                                     done.wait(min(0.05, max(deadline - time.monotonic(), 0)))):
                return True
            if done is None:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        with self._lock:
            self._generation += 1
            self._running = False
            self.version = None
            self._halt.set()
            self.draw_ma = DRAW_MA["off"]

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop and wait for every thread (at most an HTTP timeout: a request in flight is let
        finish, as the radio would)."""
        self.stop()
        limit = timeout if timeout is not None else self.http_timeout + 2
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(limit)
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    def console_input(self, data: bytes) -> None:
        if self.shipped:
            return                # no shell: the UART's receive line goes nowhere
        with self._lock:
            if not self._running:
                return            # powered off or held in reset: the UART hears nothing
            self._line += data    # the UART driver buffers what comes before the shell is up
            generation = self._generation
        self._serve_shell(generation)

    def _serve_shell(self, generation: int) -> None:
        """Run the complete command lines received so far, once the shell is up."""
        with self._lock:
            if generation != self._generation or self.version is None:
                return
            lines = []
            while True:
                end = min((i for i in (self._line.find(b"\n"), self._line.find(b"\r"))
                           if i >= 0), default=-1)
                if end < 0:
                    break
                lines.append(bytes(self._line[:end]))
                del self._line[:end + 1]
        for line in lines:
            text = line.decode("ascii", errors="replace").strip()
            if text:
                with contextlib.suppress(_Stopped):
                    self._command(generation, text)

    # =========================================================================== threads
    def _spawn(self, target: Callable[[int], None], generation: int, name: str
               ) -> threading.Thread:
        def run() -> None:
            with contextlib.suppress(_Stopped):
                target(generation)

        thread = threading.Thread(target=run, name=f"hil-sim {self.board} {name}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()
        return thread

    def _alive(self, generation: int) -> None:
        if generation != self._generation:
            raise _Stopped

    def _say(self, generation: int, line: str) -> None:
        if self.shipped:
            line = _shipped_log(line)
        with self._lock:
            self._alive(generation)
            self.platform.console_write(line.encode("ascii", errors="replace") + b"\r\n")

    def _crash(self, generation: int, fault: NullWrite) -> None:
        """The firmware stops where it stands and the chip takes ``fault``."""
        with self._lock:
            self._alive(generation)
        self.stop()
        self.platform.crash(fault)
        raise _Stopped

    def _draw(self, generation: int, activity: str) -> None:
        """What the board draws from here on (a stranded thread's work draws nothing)."""
        with self._lock:
            if generation == self._generation:
                self.draw_ma = DRAW_MA[activity]

    def _sleep(self, generation: int, seconds: float) -> None:
        halt = self._halt
        self._alive(generation)
        if halt.wait(seconds):
            raise _Stopped
        self._alive(generation)

    # =========================================================================== boot
    def _main(self, generation: int) -> None:
        if not self._bootloader(generation):
            self._draw(generation, "idle")
            return            # a board with no firmware: no shell, no boot line
        running = self._running_slot()
        primary = self.platform.flash(running.chip)
        try:
            version = image_version(self.board, primary.read(running.address, running.size))
        except ValueError as error:
            self._say(generation, f"E: no bootable image in the primary slot: {error}")
            self._draw(generation, "idle")
            return
        with self._lock:
            self._alive(generation)
            self.version = version
        self._say(generation, f"boot version={version}")
        self._draw(generation, "idle")
        if not self._self_test(generation, primary):
            return
        self._serve_shell(generation)      # what the host typed while the board booted
        self._finish_install(generation)
        if self.shipped:
            self._checks(generation)

    def _finish_install(self, generation: int) -> None:
        """Step 8 after a boot that followed an install; forget an attempt of another image."""
        ota = self.nvs.load().get("ota")
        if not isinstance(ota, dict):
            return
        running = self._running_digest()
        if ota.get("running") not in (None, running) and not self._booted_package(ota):
            # Someone flashed another image: this attempt belongs to a firmware that is gone.
            self.nvs.update(ota=None)
            return
        if ota.get("stage") == "install":
            with self._lock:
                self._alive(generation)
                self._busy = threading.current_thread()
            if self.layout.otadata is not None and not ota.get("switched") \
                    and ota.get("running") == running:
                # Cut before its switch took: the old image runs, the package waits whole in
                # the other slot. The switch is made again.
                self._say(generation, "I: ota: the install was cut short; switching again")
                self._resume_switch(generation, ota)
                return
            self._after_install(generation, ota)

    def _checks(self, generation: int) -> None:
        """Shipped firmware: one attempt at boot, then one every ``check_period`` seconds."""
        while True:
            server = self._server(generation)
            if server is not None:
                with self._lock:
                    self._alive(generation)
                    self._busy = threading.current_thread()
                self._attempt(generation, server)
            if self.check_period is None:
                return
            self._sleep(generation, self.check_period)

    def _server(self, generation: int) -> str | None:
        """The OTA service's base URL: ``ota server`` (the shell) in a test build; the
        hard-coded host as the network resolves it in shipped firmware."""
        if not self.shipped:
            server = self.nvs.load().get("server")
            return server if isinstance(server, str) else None
        resolved = self.platform.resolve(self.host, self.port) if self.host else None
        if resolved is None:
            self._say(generation, f"E: ota: cannot resolve {self.host}; no update check")
        return resolved

    def _self_test(self, generation: int, primary: SimFlash) -> bool:
        """The image, once booted, runs its self-test and then confirms itself (MCUboot's
        ``boot_set_confirmed``, ESP-IDF's ``esp_ota_mark_app_valid_cancel_rollback``: a tested
        image is kept). A build made to fail its self-test resets before confirming, and the
        bootloader reverts it. False when the image reset."""
        running = self._running_slot()
        image = primary.read(running.address, self.layout.image_room)
        if Defect.CONFIRMS_BEFORE_SELF_TEST in self.defects:
            self._confirm(generation, primary, image)
        if fails_self_test(self.board, image):
            self._sleep(generation, SELF_TEST_S)
            self._say(generation, "E: app: self-test failed; resetting before the image is "
                      "confirmed")
            self.platform.reset()
            return False
        self._confirm(generation, primary, image)
        return True

    def _confirm(self, generation: int, primary: SimFlash, image: bytes) -> None:
        self._alive(generation)
        if self.layout.otadata is None:
            confirmed = mcuboot.set_confirmed(primary, mcuboot.trailers(self.layout)[0])
        else:
            flash = self.platform.flash(self.layout.otadata.chip)
            confirmed = otadata.confirm(flash, self.layout.otadata, self._boot_slot, 2)
            if confirmed:
                otadata.burn_app_secure_version(self.state_dir, image)
        if confirmed:
            self._say(generation, "I: app: image confirmed")

    def _bootloader(self, generation: int) -> bool:
        """MCUboot (swap using scratch, ``hil.sim.mcuboot``: install a pending image, resume a
        cut swap, revert an unconfirmed one) or ESP-IDF's (``hil.sim.otadata``: pick the slot,
        roll back an unconfirmed app, check the image). False when nothing can be booted."""
        if self.layout.otadata is None:
            self._say(generation, "I: bootloader: starting")
            mcuboot.Bootloader(self.layout, _BootIo(self, generation), self.defects).run()
            self._boot_slot = 0
            return True
        self._say(generation, "I (31) boot: ESP-IDF bootloader")
        booted = otadata.Bootloader(self.layout, _BootIo(self, generation), self.state_dir,
                                    self.defects).run()
        self._boot_slot = booted or 0
        return booted is not None

    def _running_slot(self) -> Slot:
        """The slot the image running now was started from."""
        return self.layout.slots[self._boot_slot]

    def _update_slot(self) -> Slot:
        """Where a download goes: MCUboot's secondary slot; the ESP32's slot that does not
        run."""
        return self.layout.slots[self._boot_slot ^ 1]

    def _running_digest(self) -> str:
        running = self._running_slot()
        return slot_digest(self.platform.flash(running.chip), running, self.layout.trailer)

    def _booted_package(self, ota: dict[str, Any]) -> bool:
        """Whether the running slot holds the package this attempt downloaded."""
        running = self._running_slot()
        size = int(ota.get("size", 0))
        if not 0 < size <= running.size:
            return False
        data = self.platform.flash(running.chip).read(running.address, size)
        return hashlib.md5(data, usedforsecurity=False).hexdigest() == ota.get("md5")

    def _after_install(self, generation: int, ota: dict[str, Any]) -> None:
        """Step 8: report what was booted, then end the attempt."""
        try:
            if ota.get("reported") or Defect.NO_BOOT_REPORT in self.defects:
                return
            upgraded = self._booted_package(ota) and self.version == ota.get("target")
            if Defect.REPORTS_201_ON_OLD_IMAGE in self.defects:
                upgraded = True
            server = self._server(generation)
            if server is not None:
                with self._session() as http:
                    self._report(generation, http, server, ota["token"],
                                 ResultCode.UPGRADED if upgraded
                                 else ResultCode.UPGRADE_VERSION_MISMATCH)
        finally:
            self._alive(generation)
            self.nvs.update(ota=None)
            self._say(generation, "ota end")
            self._draw(generation, "idle")

    # =========================================================================== shell
    def _command(self, generation: int, line: str) -> None:
        words = line.split()
        match words:
            case ["ota", "server", url]:
                if not url.startswith(("http://", "https://")):
                    self._say(generation, "ERR ota server takes an http(s):// base URL")
                    return
                self.nvs.update(server=url.rstrip("/"))
                self._say(generation, "OK")
            case ["ota", "check"]:
                self._start_attempt(generation)
            case ["sys", "version"]:
                self._say(generation, f"version={self.version}")
                self._say(generation, "OK")
            case ["sys", "reboot"]:
                self._say(generation, "OK")
                self.platform.reset()
            case ["test", ("power" | "signal" | "space") as hook, value]:
                self._hook(generation, hook, value)
            case ["test", "factory"]:
                self._factory(generation)
            case _:
                self._say(generation, f"ERR unknown command: {line[:40]}")

    def _hook(self, generation: int, hook: str, text: str) -> None:
        try:
            value = int(text)
        except ValueError:
            self._say(generation, f"ERR test {hook}: {text[:20]!r} is not an integer")
            return
        if hook == "power" and not 0 <= value <= 100:
            self._say(generation, f"ERR test power: {value} is outside 0..100")
            return
        if hook == "space" and value < 0:
            self._say(generation, f"ERR test space: {value} is negative")
            return
        with self._lock:
            if hook == "power":
                self._power_override = value
            elif hook == "signal":
                self._signal_override = value
            else:
                self._space_override = value
        self._say(generation, "OK")

    def _factory(self, generation: int) -> None:
        factory = self.state_dir / FACTORY_FILE
        if self._attempt_running():
            self._say(generation, "ERR busy: an OTA attempt is running")
            return
        if not factory.is_file():
            self._say(generation, "ERR no factory image on this board")
            return
        image = factory.read_bytes()
        slot = self.layout.primary
        flash = self.platform.flash(slot.chip)
        self.nvs.erase()
        flash.erase(slot.address, slot.size)
        flash.program(slot.address, image[:slot.size])
        flash.flush()
        erase_boot_state(self.layout, self.platform.flash)   # nothing pending, nothing to revert
        self._say(generation, "OK")
        self.platform.reset()

    def _attempt_running(self) -> bool:
        busy = self._busy
        return busy is not None and busy.is_alive()

    def _start_attempt(self, generation: int) -> None:
        server = self.nvs.load().get("server")
        with self._lock:
            self._alive(generation)
        if self._attempt_running():
            self._say(generation, "ERR busy: an OTA attempt is running")
            return
        if not isinstance(server, str):
            self._say(generation, "ERR no OTA server: give ota server <url> first")
            return
        self._say(generation, "OK")
        with self._lock:
            self._alive(generation)
            self._busy = self._spawn(lambda g: self._attempt(g, server), generation, "ota")

    # =========================================================================== the attempt
    def _attempt(self, generation: int, server: str) -> None:
        ended = True
        self._draw(generation, "radio")
        try:
            with self._session() as http:
                ended = self._run_attempt(generation, http, server)
        finally:
            if ended:
                self._say(generation, "ota end")
            self._draw(generation, "idle")

    def _run_attempt(self, generation: int, http: requests.Session, server: str) -> bool:
        """Steps 1..7. False when the board rebooted to install (the attempt goes on there)."""
        version_key = "s_version"   # type 2, SOTA: the MCU application is what is updated
        self._call(generation, http, "POST", server,
                   f"/ota/device/version?dev_id={self.identity.dev_id}",
                   json={version_key: self.version})
        power, signal = self._power(), self._signal()
        task = self._detect(generation, http, server, power, signal)
        if task is None:
            return True
        try:
            return self._run_task(generation, http, server, task, power, signal)
        except _Unanswered:
            return True
        except _Failed as failed:
            self.nvs.update(ota=None)
            if failed.result is not None and Defect.SILENT_AFTER_FAILURE not in self.defects:
                self._report(generation, http, server, task.token, failed.result)
            return True

    def _detect(self, generation: int, http: requests.Session, server: str, power: int,
                signal: int) -> DetectAnswer | None:
        """Step 2: the task, or None (the console says why) when there is none to run."""
        query: dict[str, str | int] = {
            "dev_id": self.identity.dev_id, "manuf": self.family.manuf,
            "model": self.family.model, "type": int(TaskType.SOTA), "version": str(self.version),
            "cdn": "true", "signal": signal, "power": power}
        detect = self._call(generation, http, "GET", server, "/ota/south/check", params=query)
        errno = detect.get("errno") if detect is not None else None
        if errno != Errno.OK:
            self._say(generation, f"ota phase=detect errno={errno}")
            return None
        try:
            task = DetectAnswer.from_data(detect.get("data") if detect else None)
        except ProtocolError as error:      # a detect answer that makes no sense
            self._say(generation, f"ota phase=detect errno=0 error={error.reason[:40]!r}")
            return None
        self._say(generation, f"ota phase=detect errno=0 target={task.target} size={task.size}")
        return task

    def _run_task(self, generation: int, http: requests.Session, server: str,
                  task: DetectAnswer, power: int, signal: int) -> bool:
        running = self._running_digest()
        saved = self.nvs.load().get("ota")
        resumed = isinstance(saved, dict) and saved.get("token") == task.token \
            and saved.get("md5") == task.md5 and saved.get("size") == task.size \
            and saved.get("running") == running
        ota: dict[str, Any] = dict(saved) if resumed and isinstance(saved, dict) else {
            "token": task.token, "target": task.target, "size": task.size, "md5": task.md5,
            "running": running, "offset": 0, "stage": "download"}
        if Defect.RESTARTS_DOWNLOAD in self.defects and ota["stage"] == "download":
            ota["offset"] = 0
        if ota["stage"] == "download":
            # Step 3: the task's conditions, checked by the device before it downloads.
            if not meets_threshold(power, task.power) \
                    and Defect.IGNORES_POWER not in self.defects:
                raise _Failed(ResultCode.DOWNLOAD_LOW_BATTERY)
            if not meets_threshold(signal, task.signal) \
                    and Defect.IGNORES_SIGNAL not in self.defects:
                raise _Failed(ResultCode.DOWNLOAD_BAD_SIGNAL)
            if task.size > self._free_space() and Defect.IGNORES_SPACE not in self.defects:
                raise _Failed(ResultCode.DOWNLOAD_NO_SPACE)
            if ota["offset"] < task.size:
                # A package already whole needs no token: its task may be upgrading already.
                self._token_check(generation, http, server, task)
            self.nvs.update(ota=ota)
            self._download(generation, http, server, task, ota)
            ota["stage"] = "downloaded"
            self.nvs.update(ota=ota)
        if ota["stage"] == "downloaded" and not ota.get("reported_101"):
            if Defect.EARLY_101 not in self.defects:
                answer = self._report(generation, http, server, task.token,
                                      ResultCode.DOWNLOADED)
                # 21: either an earlier 101 got through before a power cut took its answer
                # (the task is upgrading) or the task is paused. Detect tells them apart: an
                # upgrading task comes back with this token, a paused one as errno 19.
                if answer == Errno.INVALID_OPERATION:
                    again = self._detect(generation, http, server, self._power(), self._signal())
                    if again is None or again.token != task.token:
                        raise _Failed(None)
                elif answer is None:
                    # No answer: the service may or may not have it. The package stays, and the
                    # next attempt says 101 again (a 21 then means this one got through).
                    raise _Unanswered
                elif answer != Errno.OK:
                    raise _Failed(None)     # refused (cancelled, finished): nothing to install
            ota["reported_101"] = True
            self.nvs.update(ota=ota)
        self._verify(generation, task)
        self._check_span(generation, task)
        # Step 7: install.
        if not meets_threshold(self._power(), task.power) \
                and Defect.FLASHES_ON_LOW_POWER not in self.defects:
            raise _Failed(ResultCode.UPGRADE_LOW_BATTERY)
        if Defect.REPORTS_201_BEFORE_REBOOT in self.defects:
            self._report(generation, http, server, task.token, ResultCode.UPGRADED)
            ota["reported"] = True
        if self.layout.otadata is not None:
            ota["stage"] = "install"
            if Defect.NON_ATOMIC_INSTALL not in self.defects:
                # Recorded before the switch: a board cut while it switches makes it again.
                self._alive(generation)
                self.nvs.update(ota=ota)
            self._switch(generation, ota)
            return False
        self._request_install(generation)
        ota["stage"] = "install"
        self._alive(generation)
        # Committed before the reboot: a power cut from here on ends with the new image
        # installed and reported (the bootloader installs it, again if it was cut short).
        self.nvs.update(ota=ota)
        self._say(generation, "I: ota: rebooting to install the image")
        self.platform.reset()
        return False

    def _resume_switch(self, generation: int, ota: dict[str, Any]) -> None:
        """The switch made again at boot; a switch that fails now ends the attempt as it
        would have then (206)."""
        try:
            self._switch(generation, ota)
        except _Failed as failed:
            self.nvs.update(ota=None)
            server = self._server(generation)
            if failed.result is not None and server is not None \
                    and Defect.SILENT_AFTER_FAILURE not in self.defects:
                with self._session() as http:
                    self._report(generation, http, server, ota["token"], failed.result)
            self._say(generation, "ota end")
            self._draw(generation, "idle")

    def _switch(self, generation: int, ota: dict[str, Any]) -> None:
        """Step 7 on the ESP32: ``esp_ota_end`` and ``esp_ota_set_boot_partition`` (see the
        module docstring), then the reboot into the new slot."""
        size = int(ota["size"])
        self._say(generation, f"ota phase=flash bytes={size}")
        self._draw(generation, "flash")
        timing = self.layout.install_timing
        self._sleep(generation, 2 * size / SPI_READ_BYTES_PER_S * SWITCH_TIME_SCALE)
        self._sleep(generation, (timing.erase_time(otadata.SECTOR)
                                 + timing.program_time(otadata.ENTRY.size)) * SWITCH_TIME_SCALE)
        self._request_install(generation)
        self._alive(generation)
        ota["switched"] = True
        self.nvs.update(ota=ota)
        self._say(generation, "I: ota: rebooting into the new image")
        self.platform.reset()

    def _token_check(self, generation: int, http: requests.Session, server: str,
                     task: DetectAnswer) -> None:
        answer = self._call(generation, http, "GET", server,
                            f"/ota/south/download/{task.token}/check"
                            f"?dev_id={self.identity.dev_id}")
        errno = answer.get("errno") if answer is not None else None
        self._say(generation, f"ota phase=token errno={errno}")
        if errno == Errno.OK:
            return
        if errno in END_WITHOUT_REPORT and Defect.REPORTS_AFTER_TOKEN_END not in self.defects:
            raise _Failed(None)
        raise _Failed(ResultCode.DOWNLOAD_UNKNOWN)

    def _download(self, generation: int, http: requests.Session, server: str,
                  task: DetectAnswer, ota: dict[str, Any]) -> None:
        """Step 5, into the update slot, from ``ota["offset"]``."""
        slot = self._update_slot()
        flash = self.platform.flash(slot.chip)
        if ota["offset"] == 0:
            self._alive(generation)
            flash.erase(slot.address, max(task.size, 1))
        failures = 0
        early_reported = False
        while ota["offset"] < task.size:
            start = ota["offset"]
            if not meets_threshold(self._power(), task.power) \
                    and not self.defects & {Defect.IGNORES_POWER, Defect.DOWNLOADS_ON_LOW_POWER}:
                self._say(generation, f"ota phase=download offset={start} error=low-power")
                raise _Failed(ResultCode.DOWNLOAD_LOW_BATTERY)
            end = min(start + self.chunk_size, task.size) - 1
            chunk, cause = self._fetch(generation, http, server, task, start, end)
            if chunk is None:
                if cause in FINAL_DOWNLOAD_ERRORS:
                    raise _Failed(ResultCode.DOWNLOAD_UNKNOWN)
                failures += 1
                if failures > task.retry and Defect.RETRIES_FOREVER not in self.defects:
                    raise _Failed(ResultCode.DOWNLOAD_TIMEOUT if cause == "timeout"
                                  else ResultCode.DOWNLOAD_MEMORY_OVERFLOW if cause == "overflow"
                                  else ResultCode.DOWNLOAD_UNKNOWN)
                self._sleep(generation, max(task.interval, _RETRY_FLOOR_S))
                continue
            failures = 0            # `retry` counts the retries of one range
            self._alive(generation)
            if Defect.CRASHES_MID_DOWNLOAD in self.defects and start == 2 * self.chunk_size:
                self._crash(generation, NullWrite("ota_store_chunk", 0x2E, "ota_download",
                                                  0x5A, data=0x20001000, length=len(chunk)))
            flash.program(slot.address + start, chunk[:task.size - start])
            ota["offset"] = start + len(chunk)
            self.nvs.update(ota=ota)
            if Defect.EARLY_101 in self.defects and not early_reported:
                early_reported = True
                self._report(generation, http, server, task.token, ResultCode.DOWNLOADED)
        flash.flush()

    def _fetch(self, generation: int, http: requests.Session, server: str, task: DetectAnswer,
               start: int, end: int) -> tuple[bytes | None, str | DownloadError]:
        """One chunk: its bytes, or None and why (``timeout``, ``answer``, an error body)."""
        self._alive(generation)
        try:
            answer = http.get(f"{server}/ota/south/download/{task.token}",
                              headers=self._headers(server, Range=f"bytes={start}-{end}"),
                              timeout=self.http_timeout)
            body = answer.content
        except requests.Timeout:
            self._say(generation, f"ota phase=download offset={start} error=timeout")
            return None, "timeout"
        except requests.RequestException as error:
            self._say(generation, f"ota phase=download offset={start} "
                      f"error={type(error).__name__}")
            return None, "connection"
        self._alive(generation)
        self._say(generation, f"ota phase=download offset={start} status={answer.status_code}")
        code = decode_error_body(body) if "Content-Length" not in answer.headers else None
        if code is not None and body != bytes([code]) \
                and Defect.RAW_ERROR_BYTES_ONLY in self.defects:
            code = None     # the digit is not understood: a bad answer, retried
        if code is not None:
            return None, code            # OneNET's one-byte error answer, raw or ASCII digit
        if Defect.TRUSTS_ANY_2XX in self.defects and 200 <= answer.status_code < 300:
            return body or None, "answer"
        length = answer.headers.get("Content-Length", "").strip()
        if answer.status_code == 206 and length.isdigit() and int(length) > end - start + 1 \
                and Defect.UNKNOWN_ON_OVERFLOW not in self.defects:
            # More than the range asked, so more than the receive buffer holds: not read.
            self._say(generation, f"ota phase=download offset={start} error=overflow "
                      f"length={length}")
            return None, "overflow"
        if answer.status_code != 206 or "Content-Length" not in answer.headers \
                or answer.headers.get("Content-Range") != f"bytes {start}-{end}/{task.size}" \
                or len(body) != end - start + 1:
            return None, "answer"
        return body, ""

    def _verify(self, generation: int, task: DetectAnswer) -> None:
        self._draw(generation, "cpu")        # the radio idles while the image is hashed
        slot = self._update_slot()
        data = self.platform.flash(slot.chip).read(slot.address, task.size)
        good = hashlib.md5(data, usedforsecurity=False).hexdigest() == task.md5
        self._say(generation, f"ota phase=verify md5={'ok' if good else 'bad'}")
        if not good and Defect.SKIPS_MD5 not in self.defects:
            raise _Failed(ResultCode.UPGRADE_MD5_MISMATCH)

    def _check_span(self, generation: int, task: DetectAnswer) -> None:
        """Step 6's last check: the image fits the slot it is to run from, as its header says
        (203). A header that cannot be read is left to the bootloader, which refuses it (204)."""
        slot = self._update_slot()
        data = self.platform.flash(slot.chip).read(slot.address, task.size)
        try:
            span = image_span(self.board, data)
        except ValueError:
            return
        room = self.layout.image_room
        if span >= room and Defect.INSTALLS_OVERSIZED not in self.defects:
            self._say(generation, f"ota phase=verify image=too-large bytes={span} slot={room}")
            raise _Failed(ResultCode.UPGRADE_MEMORY_OVERFLOW)

    def _request_install(self, generation: int) -> None:
        """The install request written and read back (206 when the write fails or did not
        take): MCUboot's ``boot_request_upgrade`` for a test upgrade (the trailer magic at the
        secondary slot's end; the new image must confirm itself), or the ESP32's otadata switch
        to the update slot (state NEW)."""
        self._alive(generation)
        try:
            if self.layout.otadata is None:
                flash = self.platform.flash(self.layout.secondary.chip)
                written = mcuboot.request_upgrade(flash, mcuboot.trailers(self.layout)[1])
            else:
                flash = self.platform.flash(self.layout.otadata.chip)
                entries = otadata.read_entries(flash, self.layout.otadata)
                sector, entry = otadata.switch_to(entries, self._boot_slot ^ 1, 2)
                otadata.write_entry(flash, self.layout.otadata, sector, entry)
                written = otadata.read_entries(flash, self.layout.otadata)[sector] == entry
            why = "it reads back otherwise"
        except FlashWriteError as error:
            written, why = False, str(error)
        if not written and Defect.IGNORES_FLASH_ERRORS not in self.defects:
            self._say(generation, f"E: ota: the install request was not written: {why}")
            raise _Failed(ResultCode.UPGRADE_UNKNOWN)

    # =========================================================================== HTTP
    @contextlib.contextmanager
    def _session(self) -> Iterator[requests.Session]:
        with requests.Session() as http:
            http.trust_env = False       # a simulated board has no proxy settings
            yield http

    def _headers(self, server: str, **more: str) -> dict[str, str]:
        """Every request's headers: the Authorization, and (shipped) the name of the host it
        was built to reach, whatever address that resolved to, with the port when it is not
        http's 80 (as real clients send it)."""
        headers = {"Authorization": self._authorization(), **more}
        if self.shipped and self.host:
            port = urlsplit(server).port or 80
            headers["Host"] = self.host if port == 80 else f"{self.host}:{port}"
        return headers

    def _authorization(self) -> str:
        et = int(self.clock()) + TOKEN_LIFETIME_S
        return Authorization.build(self.identity.access_key, product_res(self.identity.product_id),
                                   et).header()

    def _call(self, generation: int, http: requests.Session, method: str, server: str,
              path: str, **kwargs: Any) -> dict[str, Any] | None:
        """A JSON call; None when it failed on the way (no answer, not JSON)."""
        self._alive(generation)
        self._draw(generation, "radio")
        try:
            answer = http.request(method, server + path, timeout=self.http_timeout,
                                  headers=self._headers(server), **kwargs)
            body = answer.json()
        except (requests.RequestException, ValueError):
            body = None
        self._alive(generation)
        return body if isinstance(body, dict) else None

    def _report(self, generation: int, http: requests.Session, server: str, token: str,
                result: ResultCode) -> int | None:
        answer = self._call(generation, http, "POST", server,
                            f"/ota/south/report?dev_id={self.identity.dev_id}&token={token}",
                            json={"result": int(result)})
        errno = answer.get("errno") if answer is not None else None
        self._say(generation, f"ota phase=report result={int(result)} errno={errno}")
        return errno if isinstance(errno, int) else None

    # =========================================================================== sensors
    def _power(self) -> int:
        override = self._power_override
        return override if override is not None else self.platform.battery_percent()

    def _signal(self) -> int:
        override = self._signal_override
        return override if override is not None else self.platform.signal()

    def _free_space(self) -> int:
        override = self._space_override
        slot = self._update_slot()
        size = slot.size
        if self.layout.otadata is None:
            size -= self.platform.flash(slot.chip).sector_size     # less the trailer's sector
        return size if override is None else min(size, override)


def _shipped_log(line: str) -> str:
    """A narration line as shipped firmware logs it: its own words, not the contract's events
    (``ota phase=detect errno=0`` -> ``I: ota: detect errno=0``), so that nothing but the
    service's view and the rig's boot-log pattern can tell a test what happened."""
    tag, _, rest = line.partition(" ")
    if tag == "boot" and rest.startswith("version="):
        return f"I: app: firmware version {rest.removeprefix('version=')}"
    if line == "ota end":
        return "I: ota: check done"
    if tag == "ota" and rest.startswith("phase="):
        return f"I: ota: {rest.removeprefix('phase=')}"
    return line
