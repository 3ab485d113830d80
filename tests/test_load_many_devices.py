"""Two hundred simulated devices updating at once through one gateway in front of one mock service.

Each device is the real reference firmware (``hil.sim.firmware.Firmware``: the OTA agent the
conformance suite trusts) on a board that has nothing but what the agent touches: two small
file-backed flashes, a console buffer and a reset line (``BenchlessBoard``; no pty, no probe, no
instruments). Every device has its own task and its own package (its own bytes and its own size,
so a chunk served to the wrong device breaks its md5 and its ``Content-Range`` total).

What load breaks is crosstalk: a chunk of one package served to another device, a report applied
to another task, an exchange recorded against the wrong device in either timeline. The test
checks all three, the exact exchanges each update needs, and that nothing outlives the run.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from hil.boards import board_family
from hil.gateway import Gateway
from hil.onenet.codes import TaskState
from hil.onenet.messages import Endpoint
from hil.onenet.tasks import Package, Task
from hil.service.server import MockOneNet, new_access_key
from hil.service.timeline import Exchange, Timeline
from hil.sim.firmware import CHUNK_SIZE, DeviceIdentity, Firmware
from hil.sim.flash import SimFlash
from hil.sim.images import build_image
from hil.sim.layout import Slot, layout_of

DEVICES = 200
BOARDS = ("gd32", "nrf52832")          # alternating: two manuf/model pairs in one product
BASE, TARGET = "1.0.0", "1.1.0"
PAYLOAD = 16 * 1024                     # + 4 bytes per device index: every package size differs
RUN_LIMIT_S = 90.0                      # the hard bound on the updates; they take ~10-20 s
SETUP_LIMIT_S = 30.0                    # booting and pointing 200 boards
HTTP_TIMEOUT_S = 15.0                   # a slow answer under load is not a fault under test
SECTOR = 4096


class BenchlessBoard:
    """The ``Platform`` the firmware runs on, minus the bench: flashes that cover just the
    layout's two slots and MCUboot's scratch area (files in ``state_dir``), a console kept as
    lines, a reset that reboots the firmware at once, a full battery and a good signal."""

    def __init__(self, board: str, state_dir: Path, base_image: bytes) -> None:
        self.board = board
        layout = layout_of(board)
        self.layout = layout
        state_dir.mkdir(parents=True)
        areas = [area for area in (layout.primary, layout.secondary, layout.scratch) if area]
        self._flashes = {chip: _flash_over(state_dir / f"{chip}.bin",
                                           [area for area in areas if area.chip == chip])
                         for chip in {layout.primary.chip, layout.secondary.chip}}
        primary = self._flashes[layout.primary.chip]
        primary.program(layout.primary.address, base_image)
        primary.flush()
        self.firmware: Firmware | None = None
        self._lines: list[str] = []
        self._partial = b""
        self._changed = threading.Condition()

    # ------------------------------------------------------------------ Platform
    def console_write(self, data: bytes) -> None:
        with self._changed:
            *complete, self._partial = (self._partial + data).split(b"\r\n")
            self._lines += [line.decode("ascii", "replace") for line in complete]
            self._changed.notify_all()

    def reset(self) -> None:
        firmware = self.firmware
        assert firmware is not None
        firmware.stop()
        firmware.boot()

    def flash(self, chip: str) -> SimFlash:
        return self._flashes[chip]

    def battery_percent(self) -> int:
        return 100

    def signal(self) -> int:
        return 30

    # ------------------------------------------------------------------ the test's side
    def send(self, line: str) -> None:
        assert self.firmware is not None
        self.firmware.console_input(line.encode() + b"\r\n")

    def wait_line(self, wanted: Callable[[str], bool], deadline: float, after: int = 0) -> int:
        """The index of the first console line from ``after`` on that ``wanted`` accepts; -1 if
        none came by ``deadline`` (time.monotonic)."""
        with self._changed:
            while True:
                for index in range(after, len(self._lines)):
                    if wanted(self._lines[index]):
                        return index
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return -1
                self._changed.wait(remaining)

    def lines(self) -> list[str]:
        with self._changed:
            return list(self._lines)

    def read_slot(self, slot: Slot, size: int) -> bytes:
        return self._flashes[slot.chip].read(slot.address, size)

    def close(self) -> None:
        for flash in self._flashes.values():
            flash.close()


def _flash_over(path: Path, slots: list[Slot]) -> SimFlash:
    """A flash file spanning ``slots`` and nothing more (a GD32 needs 64 KiB, not 1 MiB)."""
    base = min(slot.address for slot in slots) // SECTOR * SECTOR
    end = max(slot.address + slot.size for slot in slots)
    return SimFlash(path, size=-(-(end - base) // SECTOR) * SECTOR, base=base)


class Device:
    """One simulated device: its board, its firmware, its task and the package it must end with."""

    def __init__(self, index: int, root: Path, mock: MockOneNet, key: str,
                 base_images: dict[str, bytes]) -> None:
        self.index = index
        self.board_name = BOARDS[index % len(BOARDS)]
        self.dev_id = f"5277{index:05d}"
        self.package = build_image(self.board_name, TARGET, payload_size=PAYLOAD + 4 * index,
                                   seed=f"load-{self.dev_id}")
        self.md5 = hashlib.md5(self.package).hexdigest()
        self.base = base_images[self.board_name]
        self.board = BenchlessBoard(self.board_name, root / self.dev_id, self.base)
        self.firmware = Firmware(self.board, root / self.dev_id,
                                 DeviceIdentity(mock.product_id, self.dev_id, key),
                                 http_timeout=HTTP_TIMEOUT_S)
        self.board.firmware = self.firmware
        family = board_family(self.board_name)
        self.task: Task = mock.service.create_task(
            self.dev_id, TARGET, Package(self.package, f"app-{self.dev_id}.bin"),
            manuf=family.manuf, model=family.model, retry=2, interval=1)
        self.started_at = 0            # the console line index where its `ota check` went

    @property
    def chunks(self) -> int:
        return -(-len(self.package) // CHUNK_SIZE)

    def expected_phases(self) -> list[Endpoint]:
        """An update that goes right: version, detect, token check, the chunks, 101, then 201
        after the reboot into the new image."""
        return [Endpoint.VERSION, Endpoint.DETECT, Endpoint.TOKEN_CHECK,
                *[Endpoint.DOWNLOAD] * self.chunks, Endpoint.REPORT, Endpoint.REPORT]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[MockOneNet, Gateway, list[Device]]]:
    """The mock, the gateway in front of it, and DEVICES booted devices pointed at the gateway;
    everything stopped, joined and closed afterwards, and checked to be gone."""
    threads_before = set(threading.enumerate())
    sockets_before = _open_sockets()
    key = new_access_key()
    mock = MockOneNet(access_key=key, timeline_path=tmp_path / "mock.jsonl").start()
    gateway = Gateway(mock.url, timeline=Timeline(tmp_path / "gateway.jsonl")).start()
    devices: list[Device] = []
    try:
        base_images = {board: build_image(board, BASE) for board in BOARDS}
        devices = [Device(index, tmp_path / "boards", mock, key, base_images)
                   for index in range(DEVICES)]
        for device in devices:
            device.firmware.boot()
        deadline = time.monotonic() + SETUP_LIMIT_S
        for device in devices:
            assert device.board.wait_line(lambda line: line == f"boot version={BASE}",
                                          deadline) >= 0, f"{device.dev_id} did not boot"
            device.board.send(f"ota server {gateway.url}")
            assert device.board.wait_line(lambda line: line == "OK", deadline) >= 0, \
                f"{device.dev_id} did not take its OTA server: {device.board.lines()[-3:]}"
        yield mock, gateway, devices
    finally:
        for device in devices:
            device.firmware.stop()           # all at once: no thread waits on another's join
        for device in devices:
            device.firmware.shutdown(timeout=HTTP_TIMEOUT_S + 2)
            device.board.close()
        gateway.stop()
        gateway.timeline.close()       # the caller's timeline: the gateway does not own it
        mock.stop()
    _assert_nothing_left(threads_before, sockets_before)


@pytest.mark.slow
def test_two_hundred_devices_update_at_once_without_crosstalk(
        fleet: tuple[MockOneNet, Gateway, list[Device]],
        record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> None:
    mock, gateway, devices = fleet
    owner_of_token = {device.task.token: device for device in devices}
    assert len(owner_of_token) == DEVICES
    assert len({device.md5 for device in devices}) == DEVICES
    assert len({len(device.package) for device in devices}) == DEVICES

    began = time.monotonic()
    for device in devices:            # every device at once: nothing paces them but the wire
        device.started_at = len(device.board.lines())
        device.board.send("ota check")
    deadline = began + RUN_LIMIT_S
    stuck = [device for device in devices
             if device.board.wait_line(lambda line: line == "ota end", deadline,
                                       device.started_at) < 0]
    elapsed = time.monotonic() - began
    if stuck:
        pytest.fail(f"{len(stuck)} of {DEVICES} devices did not finish their update within "
                    f"{RUN_LIMIT_S:g} s (the run's hard bound); first: {stuck[0].dev_id}, its "
                    f"console ends with {stuck[0].board.lines()[-4:]}", pytrace=False)
    # A device prints its end on its 201's answer, a moment before the gateway records it.
    assert gateway.wait_recorded(30), "answers the devices had never reached the timeline"
    requests_made = len(gateway.timeline)
    rate = requests_made / elapsed
    in_flight = _peak_in_flight(gateway.timeline, devices)
    record_property("wall_time_s", round(elapsed, 2))
    record_property("requests_per_s", round(rate))
    record_property("peak_devices_in_flight", in_flight)
    with capsys.disabled():
        print(f"\n{DEVICES} devices updated in {elapsed:.1f} s: {requests_made} requests through "
              f"the gateway, {rate:.0f} requests/s, up to {in_flight} devices mid-update at once")
    # "At once" is a fact of the run, not a hope: most updates overlapped.
    assert in_flight >= DEVICES // 4, f"only {in_flight} devices were ever mid-update together"

    mock.service.raise_crashes()
    gateway.raise_errors()
    for device in devices:
        mine = mock.service.task(device.dev_id)
        assert mine.state is TaskState.SUCCEEDED, (device.dev_id, mine.state)
        assert mock.service.device_version(device.dev_id) == TARGET
        assert mock.timeline.reported_codes(device.dev_id) == [101, 201], device.dev_id
        assert gateway.timeline.reported_codes(device.dev_id) == [101, 201], device.dev_id
        assert device.firmware.version == TARGET, device.dev_id   # booted the new image
        # The bootloader installed the device's own package, and MCUboot's swap left the image
        # it ran before in the secondary slot (to revert to, had the new one not confirmed).
        layout = device.board.layout
        assert device.board.read_slot(layout.primary, len(device.package)) == device.package
        assert device.board.read_slot(layout.secondary, len(device.base)) == device.base, \
            device.dev_id

    by_dev_id = {device.dev_id: device for device in devices}
    for timeline in (mock.timeline, gateway.timeline):
        exchanges = timeline.exchanges()
        assert len(exchanges) == sum(len(d.expected_phases()) for d in devices)
        for exchange in exchanges:
            _assert_own_exchange(exchange, by_dev_id, owner_of_token)
        for device in devices:
            assert [e.phase for e in timeline.exchanges(device.dev_id)] \
                == device.expected_phases(), device.dev_id
    # The two views of each device agree request for request: the gateway forwarded every
    # exchange it recorded for a device, and the mock recorded it for that same device.
    for device in devices:
        assert [_request_of(e) for e in gateway.timeline.exchanges(device.dev_id)] \
            == [_request_of(e) for e in mock.timeline.exchanges(device.dev_id)], device.dev_id


def _assert_own_exchange(exchange: Exchange, by_dev_id: dict[str, Device],
                         owner_of_token: dict[str, Device]) -> None:
    """The exchange is recorded against the device whose query and token it carries, it went
    right, and a download's answer is a slice of that device's package, in the range asked."""
    line = exchange.summary()
    assert exchange.dev_id in by_dev_id, line
    device = by_dev_id[exchange.dev_id]
    assert exchange.fault is None, line
    assert exchange.accepted, line
    split = urlsplit(exchange.target)
    query = {name: values[0] for name, values in parse_qs(split.query).items()}
    if exchange.phase is not Endpoint.DOWNLOAD:
        assert query.get("dev_id") == device.dev_id, line
    token = query.get("token") if exchange.phase is Endpoint.REPORT else \
        split.path.split("/")[4] if exchange.phase in (Endpoint.TOKEN_CHECK, Endpoint.DOWNLOAD) \
        else None
    if token is not None:
        assert owner_of_token[token] is device, line
    if exchange.task_id is not None:                        # the mock's view of the task
        assert exchange.task_id == device.task.task_id, line
    if exchange.phase is Endpoint.DETECT:
        assert exchange.answer is not None, line
        data = exchange.answer["data"]
        assert data["token"] == device.task.token, line
        assert (data["size"], data["md5"]) == (len(device.package), device.md5), line
    if exchange.phase is Endpoint.DOWNLOAD:
        size = len(device.package)
        assert exchange.status == 206, line
        assert (exchange.range or "").startswith("bytes="), line
        start, end = (int(n) for n in (exchange.range or "").removeprefix("bytes=").split("-"))
        assert exchange.content_range == f"bytes {start}-{end}/{size}", line
        assert exchange.length == end - start + 1, line


def _peak_in_flight(timeline: Timeline, devices: list[Device]) -> int:
    """The most devices that were between their first and last exchange at one moment."""
    edges: list[tuple[float, int]] = []
    for device in devices:
        mine = timeline.exchanges(device.dev_id)
        edges += [(mine[0].at, 1), (mine[-1].at, -1)]
    peak = now = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], -edge[1])):
        now += step
        peak = max(peak, now)
    return peak


def _request_of(exchange: Exchange) -> tuple[str, str, str | None, str]:
    return exchange.phase.value, exchange.target, exchange.range, exchange.request_body


# ------------------------------------------------------------------------- nothing left behind
def _open_sockets() -> set[str]:
    """This process's open sockets (their inode names), from /proc."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def _assert_nothing_left(threads_before: set[threading.Thread], sockets_before: set[str],
                         grace: float = 5.0) -> None:
    """No thread and no socket the run started is still there (after a moment for threads
    that are on their way out)."""
    deadline = time.monotonic() + grace
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        sockets = _open_sockets() - sockets_before
        if not threads and not sockets:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {len(threads)} thread(s) "
                                 f"{sorted(t.name for t in threads)[:5]}, "
                                 f"{len(sockets)} socket(s)")
        time.sleep(0.05)
