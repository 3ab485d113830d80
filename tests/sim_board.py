"""Test helpers for the simulated boards: a simulated rig in a temporary directory, the mock
service it updates from, and a fault proxy between them.

    with SimSetup(tmp_path) as setup:
        sim = setup.board(defects=["early-101"])      # nrf52832 unless board= says otherwise
        setup.task(sim, "1.1.0")                       # a task whose package is a 1.1.0 image
        sim.board.start_update()
        events = sim.board.wait_update_end(30)
        assert setup.codes(sim) == [101, 201]

Everything is real: the rig goes through the rig model, the bench (``hil.sim.bench``) brings the
board up behind the real drivers (``RigParts``), the mock is a real HTTP server, and the proxy
is one too. ``FaultProxy`` forwards every request to the mock and lets a test break download
answers (``proxy.on_download``) — a stand-in until the gateway exists.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import requests
import yaml

from hil.onenet.tasks import Package, Task
from hil.rig.board import Board
from hil.rig.model import Rig, load_rig
from hil.rig.parts import RigParts
from hil.service.server import MockOneNet, new_access_key
from hil.sim.bench import SimBench
from hil.sim.images import build_image

KEY_ENV = "HIL_SIM_TEST_ACCESS_KEY"
CHIPS = {"nrf52832": ("nrf52832_xxaa", {"kind": "swd", "probe": "PROBE", "target": "nrf52832"}),
         "gd32": ("gd32f103c8", {"kind": "swd", "probe": "PROBE",
                                 "target": "hilsim_gd32f103c8"}),
         "esp32": ("esp32-wroom-32", {"kind": "esp"})}


def rig_document(name: str, board: str, state_dir: Path, **sim: Any) -> dict[str, Any]:
    """A simulated rig file's content, its addresses under ``state_dir``."""
    chip, flasher = CHIPS[board]
    flasher = {**flasher, "probe": f"hilsim-{name}"} if "probe" in flasher else flasher
    console = {"url": f"hilsim://{state_dir}"} if board == "esp32" else \
        {"port": str(state_dir / "console")}
    return {
        "name": name, "board": board, "chip": chip,
        "identity": {"product_id": "245528", "dev_id": f"dev-{name}", "access_key_env": KEY_ENV},
        "console": console, "flasher": flasher,
        "power": {"kind": "scpi", "url": str(state_dir / "supply")},
        "rf": {"kind": "attenuator", "url": str(state_dir / "attenuator")},
        "sim": {"state_dir": str(state_dir), **sim},
    }


@dataclass
class SimBoard:
    """One simulated rig, up: its rig, its open parts, the board as a test drives it."""

    rig: Rig
    parts: RigParts
    board: Board

    @property
    def bench(self) -> SimBench:
        bench: SimBench = self.parts.bench
        return bench

    @property
    def dev_id(self) -> str:
        return self.rig.identity.dev_id

    def restart(self) -> None:
        """Stop the simulation and start it again (the board keeps its flash and settings)."""
        self.parts.close()
        self.parts = RigParts(self.rig).__enter__()
        self.board = Board(self.parts)
        self.board.version()


class SimSetup:
    """A mock service, a fault proxy in front of it, and simulated boards pointed at the proxy."""

    def __init__(self, tmp_path: Path, monkeypatch: Any) -> None:
        self.tmp_path = tmp_path
        key = new_access_key()
        monkeypatch.setenv(KEY_ENV, key)
        self.mock = MockOneNet(access_key=key, timeline_path=tmp_path / "timeline.jsonl")
        self.proxy = FaultProxy(lambda: self.mock.url)
        self.boards: list[SimBoard] = []

    def __enter__(self) -> Self:
        self.mock.start()
        self.proxy.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sim in self.boards:
            sim.parts.close()
        self.proxy.stop()
        self.mock.stop()
        self.mock.service.raise_crashes()

    def board(self, board: str = "nrf52832", *, defects: tuple[str, ...] = (),
              **sim: Any) -> SimBoard:
        name = f"t{len(self.boards)}-{board}"
        state_dir = self.tmp_path / name
        path = self.tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(rig_document(name, board, state_dir,
                                                    defects=list(defects), **sim)))
        rig = load_rig(path)
        parts = RigParts(rig).__enter__()
        simulated = SimBoard(rig, parts, Board(parts))
        self.boards.append(simulated)
        simulated.board.version()          # up and answering
        simulated.board.point_at(self.proxy.url)
        return simulated

    def task(self, sim: SimBoard, target: str = "1.1.0", *, image: bytes | None = None,
             **options: Any) -> Task:
        """A task for ``sim``'s device: ``image`` (default: a ``target`` image) as its package."""
        service = self.mock.service
        service.add_device(sim.dev_id)
        package = image if image is not None else build_image(sim.rig.board, target)
        return service.create_task(sim.dev_id, target, Package(package, f"app-{target}.bin"),
                                   manuf=sim.rig.family.manuf, model=sim.rig.family.model,
                                   **options)

    def codes(self, sim: SimBoard) -> list[int]:
        return self.mock.service.timeline.reported_codes(sim.dev_id)

    def update(self, sim: SimBoard, timeout: float = 30.0) -> list[str]:
        """One ``ota check`` to its ``ota end``: the attempt's phase lines, as printed."""
        sim.board.start_update()
        return [f"{event.tag} " + " ".join(f"{k}={v}" for k, v in event.fields.items())
                for event in sim.board.wait_update_end(timeout)]


# ---------------------------------------------------------------------------------- the proxy
@dataclass
class Answer:
    """What the proxy sends instead of the service's answer to a download."""

    status: int = 200
    body: bytes = b""
    length: bool = True              # send Content-Length (False: a OneNET error answer)
    headers: dict[str, str] = field(default_factory=dict)


DownloadHook = Callable[[int, str, "Forwarded"], "Answer | None"]


@dataclass
class Forwarded:
    """The service's answer to a download, which a hook may look at or change."""

    status: int
    headers: dict[str, str]
    body: bytes


class FaultProxy:
    """A real HTTP server on 127.0.0.1 that forwards to the service. ``on_download(n, range,
    answer)`` is called for the n-th download request (from 1) with the service's answer; it may
    return an ``Answer`` to send instead, sleep (a stall), or change ``answer`` in place."""

    def __init__(self, upstream: Callable[[], str]) -> None:
        self.upstream = upstream
        self.on_download: DownloadHook | None = None
        self.downloads = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.forward(self)

            def do_POST(self) -> None:
                proxy.forward(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {name: value for name, value in handler.headers.items()
                   if name.lower() in ("authorization", "range", "content-type")}
        answer = requests.request(handler.command, self.upstream() + handler.path,
                                  headers=headers, data=body, timeout=10)
        forwarded = Forwarded(answer.status_code,
                              {name: value for name, value in answer.headers.items()
                               if name in ("Content-Range", "Content-Type",
                                           "Content-Disposition")},
                              answer.content)
        has_length = "Content-Length" in answer.headers
        replacement = None
        if "/ota/south/download/" in handler.path and not handler.path.split("?")[0].endswith(
                "/check"):
            with self.lock:
                self.downloads += 1
                count = self.downloads
            hook = self.on_download
            if hook is not None:
                replacement = hook(count, handler.headers.get("Range", ""), forwarded)
        if replacement is not None:
            forwarded = Forwarded(replacement.status, replacement.headers, replacement.body)
            has_length = replacement.length
        handler.send_response(forwarded.status)
        for name, value in forwarded.headers.items():
            handler.send_header(name, value)
        if has_length:
            handler.send_header("Content-Length", str(len(forwarded.body)))
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        handler.wfile.write(forwarded.body)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
