"""What sampling the board's current costs: one MEAS:CURR? through the real SCPI driver on a
simulated rig's supply, and a whole OTA update with and without the sampler running beside it.

    .venv/bin/python benchmarks/bench_energy.py [--runs N] [--board nrf52832 ...]

Each simulated rig (a private copy of ``rigs/sim-<board>.yaml``) is brought up behind the real
drivers (``RigParts``); its supply is the emulated SCPI supply on a pty, read by ``ScpiPower``.
Figures per board: the median and 95th percentile of 200 ``measure_amps()`` calls; for ``--runs``
updates each way (alternating, a fresh task each time, through the mock service), the median wall
time of the attempt (``ota check`` to ``ota end``) without and with a ``CurrentSampler`` at its
default interval, and the sampler's samples per second and median gap between samples.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hil.configfile import read_yaml, validate  # noqa: E402
from hil.conformance.energy import SAMPLE_INTERVAL_S, CurrentSampler  # noqa: E402
from hil.conformance.power import defect_rig  # noqa: E402
from hil.drivers.base import measures_current  # noqa: E402
from hil.onenet.tasks import Package  # noqa: E402
from hil.rig.board import Board  # noqa: E402
from hil.rig.model import Rig  # noqa: E402
from hil.rig.parts import RigParts  # noqa: E402
from hil.service.server import MockOneNet  # noqa: E402
from hil.sim.bench import sim_access_key  # noqa: E402
from hil.sim.images import build_image  # noqa: E402

BOARDS = ("nrf52832", "gd32", "esp32")


def private_rig(board: str, root: Path) -> Rig:
    base = read_yaml(ROOT / "rigs" / f"sim-{board}.yaml")
    base["name"] = f"bench-energy-{board}-{os.getpid()}"
    document = defect_rig(base, validate(Rig, base, board), None, root)
    rig: Rig = validate(Rig, document, document["name"])
    return rig


def update(board: Board, onenet: MockOneNet, rig: Rig, image: bytes, target: str) -> float:
    service = onenet.service
    dev_id = rig.identity.dev_id
    service.add_device(dev_id)
    service.create_task(dev_id, target, Package(image, "app.bin"),
                        manuf=rig.family.manuf, model=rig.family.model)
    board.point_at(onenet.url)
    began = time.perf_counter()
    board.start_update()
    board.wait_update_end(timeout=60)
    return time.perf_counter() - began


def bench_board(name: str, runs: int, work: Path) -> None:
    rig = private_rig(name, work / name)
    os.environ[rig.identity.access_key_env] = sim_access_key(rig)
    with MockOneNet(access_key=sim_access_key(rig)) as onenet, RigParts(rig) as parts:
        board = Board(parts)
        board.version()
        supply = parts.power()
        assert measures_current(supply)
        queries = []
        for _ in range(200):
            began = time.perf_counter()
            supply.measure_amps()
            queries.append(time.perf_counter() - began)
        queries.sort()
        print(f"{name}: MEAS:CURR? median {statistics.median(queries) * 1000:.2f} ms, "
              f"p95 {queries[int(len(queries) * 0.95)] * 1000:.2f} ms")
        plain, sampled, rates, gaps = [], [], [], []
        for run in range(runs):
            # Each update goes up one version, so each one really downloads and installs.
            plain.append(update(board, onenet, rig, build_image(name, f"1.{2 * run + 1}.0"),
                                f"1.{2 * run + 1}.0"))
            sampler = CurrentSampler(supply)
            sampler.start()
            sampled.append(update(board, onenet, rig, build_image(name, f"1.{2 * run + 2}.0"),
                                  f"1.{2 * run + 2}.0"))
            curve = sampler.stop()
            rates.append(len(curve.samples) / (curve.end - curve.start))
            gaps += [b.at - a.at for a, b in zip(curve.samples, curve.samples[1:], strict=False)]
        print(f"{name}: update {statistics.median(plain):.3f} s without sampling, "
              f"{statistics.median(sampled):.3f} s sampled every {SAMPLE_INTERVAL_S * 1000:g} ms "
              f"({statistics.median(rates):.1f} samples/s, median gap "
              f"{statistics.median(gaps) * 1000:.1f} ms, max {max(gaps) * 1000:.1f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--board", action="append", choices=BOARDS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hil-bench-energy-") as work:
        for name in args.board or BOARDS:
            bench_board(name, args.runs, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
