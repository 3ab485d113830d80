"""What a restore to the base image writes, and how long it takes, on each simulated rig: the
smart restore (only the sectors that differ) beside the full-flash reference.

    .venv/bin/python benchmarks/bench_restore.py [--runs N] [--board esp32 ...]

Each simulated rig (``rigs/sim-<board>.yaml``, a private copy of it: its own state directory,
probe and name, so nothing meets another run's boards) is restored to its base image (the
1.0.0 image of ``fixtures/images``, as ``--hil-firmware`` flashes it before every test) with
``Board.restore_base``, through the real flashers (pyocd on the SWD boards, esptool on the
ESP32), three ways:

- **unchanged**: the board already runs the base image (a test that changed nothing);
- **after 1.1.0**: an OTA through the mock service installed ``fixtures/images/<board>-1.1.0.bin``
  (its payload is another pseudo-random stream: every sector of the image differs);
- **after 1.1.0 patch**: an OTA installed a 1.1.0 built from the base's payload (the version in
  its header and its hash trailer differ, the code does not: what a one-line fix looks like
  when the link does not move).

each with the smart restore (the default) and the full reference (``full=True``, what
``--hil-full-restore`` does; the ESP32's restore did this before the smart one existed).

Figures per case, median of ``--runs``: bytes programmed and erased as the simulated chip
counts them (the SWD probe's flash algorithm, the ESP32's ROM/stub loaders), the regions the
flasher had the chip check (pyocd's CRC32 analyzer, esptool's SPI_FLASH_MD5), the wall time of
the restore (flash, settings, reset, boot and the board's answer), and the time the real part
would take to erase and program those bytes by its datasheet (``hil.sim.layout``; the
simulated flash itself is instant, the serial and SWD wires are not timed). Exit status 1 if a
restore did not bring the board back to 1.0.0.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hil.configfile import read_yaml, validate  # noqa: E402
from hil.conformance.power import defect_rig  # noqa: E402
from hil.onenet.tasks import Package  # noqa: E402
from hil.rig.board import Board  # noqa: E402
from hil.rig.model import Rig  # noqa: E402
from hil.rig.parts import RigParts  # noqa: E402
from hil.service.server import MockOneNet  # noqa: E402
from hil.sim.bench import sim_access_key  # noqa: E402
from hil.sim.images import DEFAULT_PAYLOAD_SIZE, build_image  # noqa: E402
from hil.sim.layout import layout_of  # noqa: E402

BOARDS = ("esp32", "nrf52832", "gd32")
BASE, TARGET = "1.0.0", "1.1.0"
CASES = ("unchanged", "after 1.1.0", "after 1.1.0 patch")


@dataclass
class Counts:
    programmed: int = 0
    erased: int = 0
    checked: int = 0          # regions the chip hashed or CRC'd for the flasher
    wire: int = 0             # bytes over the wire: to the ESP32's UART; SWD memory traffic
    wire_s: float = 0.0       # the ESP32's at its UART's rates (SWD: not modelled)


class ChipCounter:
    """The simulated chip's own count of what the flasher did to its flash."""

    def __init__(self, rig: Rig) -> None:
        assert rig.sim_state_dir is not None
        self.state_dir = rig.sim_state_dir
        self.esp = rig.board == "esp32"

    def _board(self) -> Any:
        if self.esp:
            from hil.sim.esp32 import board_for

            return board_for(self.state_dir)
        from hil.sim.probe import board, read_spec

        return board(read_spec(self.state_dir))

    def reset(self) -> None:
        board = self._board()
        board.flash_ops.reset()
        if not self.esp:
            board.traffic.reset()

    def counts(self) -> Counts:
        board = self._board()
        ops = board.flash_ops
        if self.esp:
            return Counts(ops.programmed, ops.erased, ops.md5_regions, ops.received, ops.wire_s)
        erased = sum(size for routine, _, size in ops.log if routine.name == "ERASE_SECTOR")
        return Counts(ops.bytes_programmed, erased, ops.crc_regions,
                      board.traffic.read + board.traffic.written)


@dataclass
class Sample:
    counts: Counts
    seconds: float


def private_rig(board: str, root: Path) -> Rig:
    base = read_yaml(ROOT / "rigs" / f"sim-{board}.yaml")
    base["name"] = f"bench-restore-{board}-{os.getpid()}"
    document = defect_rig(base, validate(Rig, base, board), None, root)
    rig: Rig = validate(Rig, document, document["name"])
    return rig


def install(board: Board, onenet: MockOneNet, rig: Rig, image: bytes) -> None:
    """A real OTA through the mock: the board downloads ``image`` and its bootloader installs
    it over the primary slot."""
    service = onenet.service
    dev_id = rig.identity.dev_id
    service.reset()
    service.add_device(dev_id)
    service.create_task(dev_id, TARGET, Package(image, "app.bin"),
                        manuf=rig.family.manuf, model=rig.family.model)
    board.point_at(onenet.url)
    board.start_update()
    board.wait_update_end(timeout=60)
    codes = service.timeline.reported_codes(dev_id)
    if codes != [101, 201] or board.version() != TARGET:
        raise SystemExit(f"{rig.name}: the OTA to {TARGET} ended with {codes}")


def restore(board: Board, counter: ChipCounter, base: Path, full: bool) -> Sample:
    counter.reset()
    start = time.perf_counter()
    version = board.restore_base(base, full=full)
    seconds = time.perf_counter() - start
    if version != BASE:
        raise SystemExit(f"{board.rig.name}: the restore booted {version}, not {BASE}")
    return Sample(counter.counts(), seconds)


def bench_board(name: str, runs: int, work: Path) -> dict[tuple[str, bool], list[Sample]]:
    rig = private_rig(name, work / "state")
    sim_access_key(rig)
    base = ROOT / "fixtures" / "images" / f"{name}-{BASE}.bin"
    targets = {"after 1.1.0": (ROOT / "fixtures" / "images" / f"{name}-{TARGET}.bin"
                               ).read_bytes(),
               "after 1.1.0 patch": build_image(name, TARGET, seed=f"{name}|{BASE}|"
                                                f"{DEFAULT_PAYLOAD_SIZE[name]}")}
    samples: dict[tuple[str, bool], list[Sample]] = {}
    with MockOneNet(rig.identity.product_id, os.environ[rig.identity.access_key_env],
                    timeline_path=work / f"{name}.timeline.jsonl") as onenet, \
            RigParts(rig) as parts:
        board = Board(parts)
        counter = ChipCounter(rig)
        board.restore_base(base, full=True)      # from whatever the bench started with
        for _ in range(runs):
            for case in CASES:
                for full in (False, True):
                    if case != "unchanged":
                        install(board, onenet, rig, targets[case])
                    samples.setdefault((case, full), []).append(
                        restore(board, counter, base, full))
    return samples


def report(name: str, samples: dict[tuple[str, bool], list[Sample]]) -> None:
    timing = layout_of(name).install_timing
    image = (ROOT / "fixtures" / "images" / f"{name}-{BASE}.bin").stat().st_size
    print(f"\n{name}: base image {image} bytes; erase {timing.erase_s * 1000:g} ms per "
          f"{timing.page} B, program {timing.program_s * 1e6:g} us per {timing.word} B")
    print(f"  {'case':<18} {'restore':<7} {'programmed':>10} {'erased':>9} {'checked':>7} "
          f"{'wire B':>9} {'wire s':>6} {'wall s':>7} {'x full':>6} {'part s':>6} "
          f"{'x full':>6}")
    for case in CASES:
        reference = samples[(case, True)]
        ref_wall = statistics.median(s.seconds for s in reference)
        ref_part = _part_seconds(timing, reference[0].counts)
        for full in (True, False):
            runs = samples[(case, full)]
            counts = runs[len(runs) // 2].counts
            wall = statistics.median(s.seconds for s in runs)
            part = _part_seconds(timing, counts)
            wire_s = f"{counts.wire_s:6.2f}" if name == "esp32" else f"{'-':>6}"
            print(f"  {case:<18} {'full' if full else 'smart':<7} {counts.programmed:>10,} "
                  f"{counts.erased:>9,} {counts.checked:>7} {counts.wire:>9,} {wire_s} "
                  f"{wall:>7.3f} {wall / ref_wall:>6.2f} {part:>6.2f} "
                  f"{part / ref_part if ref_part else 0:>6.2f}")
            if len({(s.counts.programmed, s.counts.erased) for s in runs}) > 1:
                print(f"    (bytes varied between runs: "
                      f"{sorted({s.counts.programmed for s in runs})})")


def _part_seconds(timing: Any, counts: Counts) -> float:
    seconds: float = timing.erase_time(counts.erased) + timing.program_time(counts.programmed)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--board", action="append", choices=BOARDS,
                        help="a board to measure (repeatable; default: all three)")
    args = parser.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{args.runs} runs each")
    with tempfile.TemporaryDirectory(prefix="hil-bench-restore-") as tmp:
        for name in args.board or BOARDS:
            report(name, bench_board(name, args.runs, Path(tmp) / name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
