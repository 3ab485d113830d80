"""How fast the simulated rigs are, each figure beside the floor it cannot beat.

    .venv/bin/python benchmarks/bench_sim.py [--runs N] [--package-kib K]

1. **A whole simulated OTA update** on the simulated ESP32 rig (``rigs/sim-esp32.yaml``; its 1 MiB
   slots take a 256 KiB package, the nRF52832's 200 KiB slots do not): the wall time from
   ``ota check`` on the console to the board's 201 at the mock service (version report, detect,
   token check, 4 KiB ranged download into flash with every answer checked and the offset
   persisted per chunk, md5, 101, install, reboot, the bootloader's copy, 201). Reference, run
   beside it: the same package fetched from the same mock in the same 4 KiB ranges by a bare
   ``requests`` loop (no checks, no flash, no board): the service and loopback floor.
2. **Flashing 256 KiB through pyocd** into the simulated nRF52832 (``rigs/sim-nrf52832.yaml``,
   ``SwdFlasher.program`` of a .bin: pyocd's FileProgrammer with smart flash, erase and program
   through the emulated flash algorithm); every run writes other bytes than the last so that
   smart flash cannot skip sectors. Reference, run beside it: the same bytes written straight
   into a ``SimFlash`` file (the simulated NOR's own floor).

Goals (the simulated-rigs issue): an update under 1 s, a flash under 2 s. Prints the median, min
and max of ``--runs`` runs and the ratio to the reference. Exit status 1 if an update did not end
in [101, 201] or a flash did not read back.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hil.onenet.tasks import Package  # noqa: E402
from hil.rig.board import Board  # noqa: E402
from hil.rig.model import Rig, load_rig  # noqa: E402
from hil.rig.parts import RigParts  # noqa: E402
from hil.service.server import MockOneNet  # noqa: E402
from hil.sim.bench import sim_access_key  # noqa: E402
from hil.sim.flash import SimFlash  # noqa: E402
from hil.sim.images import build_image  # noqa: E402

CHUNK = 4096


def timed(action: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    action(*args)
    return time.perf_counter() - start


def summary(name: str, times: list[float], reference: list[float], goal: float) -> str:
    median, ref = statistics.median(times), statistics.median(reference)
    return (f"{name:<34} median {median * 1000:7.1f} ms  (min {min(times) * 1000:.1f}, "
            f"max {max(times) * 1000:.1f})  reference {ref * 1000:6.1f} ms  "
            f"ratio {median / ref:5.1f}x  goal < {goal * 1000:.0f} ms: "
            f"{'met' if median < goal else 'NOT met'}")


# ---------------------------------------------------------------------------------- update
def image_of_size(board: str, version: str, size: int) -> bytes:
    """The largest image for ``board`` of at most ``size`` bytes (an ESP32 image pads its code
    segment to the 64 KiB flash-mapping page, so payload and image sizes differ)."""
    payload = size - (len(build_image(board, version, payload_size=size // 2)) - size // 2)
    image = build_image(board, version, payload_size=payload)
    while len(image) > size:
        payload -= 4
        image = build_image(board, version, payload_size=payload)
    return image


def bench_update(rig: Rig, runs: int, package_kib: int) -> tuple[list[float], list[float]]:
    sim_access_key(rig)
    package = image_of_size(rig.board, "1.1.0", package_kib * 1024)
    base = build_image(rig.board, "1.0.0")
    updates: list[float] = []
    downloads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="hil-bench-") as tmp, \
            MockOneNet(rig.identity.product_id, os.environ[rig.identity.access_key_env],
                       timeline_path=Path(tmp) / "timeline.jsonl") as onenet, \
            RigParts(rig) as parts:
        base_file = Path(tmp) / "base.bin"
        base_file.write_bytes(base)
        board = Board(parts)
        service = onenet.service
        dev_id = rig.identity.dev_id
        print(f"{rig.name}: package {len(package)} bytes ({len(package) / 1024:.1f} KiB)")
        for run in range(runs):
            board.restore_base(base_file)
            service.reset()
            service.add_device(dev_id)
            task = service.create_task(dev_id, "1.1.0", Package(package, "app.bin"),
                                       manuf=rig.family.manuf, model=rig.family.model)
            board.point_at(onenet.url)
            start = time.perf_counter()
            board.start_update()
            service.timeline.wait_for(lambda e: e.result is not None and e.result >= 200,
                                      dev_id=dev_id, timeout=30)
            updates.append(time.perf_counter() - start)
            board.wait_update_end(timeout=30)
            codes = service.timeline.reported_codes(dev_id)
            if codes != [101, 201] or board.version() != "1.1.0":
                raise SystemExit(f"run {run}: the update ended with {codes}")
            downloads.append(timed(_bare_download, onenet, task.token, len(package)))
    return updates, downloads


def _bare_download(onenet: MockOneNet, token: str, size: int) -> None:
    with requests.Session() as http:
        for start in range(0, size, CHUNK):
            end = min(start + CHUNK, size) - 1
            http.get(f"{onenet.url}/ota/south/download/{token}",
                     headers={"Authorization": onenet.authorization(),
                              "Range": f"bytes={start}-{end}"}, timeout=10).raise_for_status()


# ---------------------------------------------------------------------------------- flash
def bench_flash(rig: Rig, runs: int, size: int) -> tuple[list[float], list[float]]:
    flashes: list[float] = []
    floors: list[float] = []
    with tempfile.TemporaryDirectory(prefix="hil-bench-") as tmp, RigParts(rig) as parts:
        flasher = parts.flasher()
        assert flasher is not None
        for run in range(runs):
            data = os.urandom(size)
            image = Path(tmp) / f"image{run}.bin"
            image.write_bytes(data)
            flashes.append(timed(flasher.program, image))
            address = rig.family.app_address
            if flasher.read_memory(address, 64) != data[:64]:  # type: ignore[attr-defined]
                raise SystemExit(f"run {run}: flash does not read back")
            with SimFlash(Path(tmp) / "floor.bin", size=0x80000) as floor:
                floors.append(timed(floor.write, address, data))
        flasher.reset()
    return flashes, floors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--package-kib", type=int, default=256)
    args = parser.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{args.runs} runs each")
    esp32 = load_rig(ROOT / "rigs" / "sim-esp32.yaml")
    nrf = load_rig(ROOT / "rigs" / "sim-nrf52832.yaml")
    updates, downloads = bench_update(esp32, args.runs, args.package_kib)
    flashes, floors = bench_flash(nrf, args.runs, args.package_kib * 1024)
    print(summary(f"update {args.package_kib} KiB (esp32)", updates, downloads, 1.0))
    print(summary(f"pyocd flash {args.package_kib} KiB (nrf52832)", flashes, floors, 2.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
