"""How long the OTA conformance suite takes on the three simulated rigs.

    .venv/bin/python benchmarks/bench_suite.py [--workers N] [--no-reference]

Runs ``pytest testcases`` (every scenario on rigs/sim-esp32, sim-nrf52832 and sim-gd32) with
``-n N --dist loadgroup`` (default 3: one worker per rig), and beside it, as the reference, the
same suite with one worker. For each run it prints the wall time, the outcome counts, the median
test time (from pytest's JUnit XML: setup, call and teardown) overall and per rig, and the
slowest tests; then the speed-up of N workers over one.

Goal (the conformance suite issue): the whole suite in at most 90 s wall on this 2-core machine.
Exit status 1 if a run had a failure or an error (a benchmark of a broken suite is no figure).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RIGS = ("sim-esp32", "sim-nrf52832", "sim-gd32")


@dataclass
class Run:
    workers: int
    wall: float
    times: dict[str, float]            # test id -> seconds
    outcomes: dict[str, int]


def run_suite(workers: int, junit: Path) -> Run:
    command = [sys.executable, "-m", "pytest", "testcases", "-p", "no:cacheprovider", "-q",
               "-o", "junit_family=xunit2", f"--junitxml={junit}"]
    if workers > 1:
        command += ["-n", str(workers), "--dist", "loadgroup"]
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - started
    times: dict[str, float] = {}
    outcomes = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in ET.parse(junit).getroot().iter("testcase"):
        times[f"{case.get('classname')}::{case.get('name')}"] = float(case.get("time", 0))
        kind = next((child.tag for child in case if child.tag in outcomes), "passed")
        outcomes["error" if kind == "error" else kind] += 1
    return Run(workers, wall, times, outcomes)


def report(run: Run) -> None:
    counts = ", ".join(f"{count} {kind}" for kind, count in run.outcomes.items() if count)
    values = list(run.times.values())
    print(f"-n {run.workers}: {run.wall:.1f} s wall, {counts}; per test median "
          f"{statistics.median(values):.2f} s, sum {sum(values):.0f} s")
    for rig in RIGS:
        mine = [t for name, t in run.times.items() if f"[{rig}" in name]
        if mine:
            print(f"    {rig:<13} {len(mine)} tests, median {statistics.median(mine):.2f} s, "
                  f"sum {sum(mine):.1f} s")
    slowest = sorted(run.times.items(), key=lambda item: item[1], reverse=True)[:3]
    for name, seconds in slowest:
        print(f"    slowest: {seconds:.2f} s {name.rpartition('::')[2]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the one-worker reference run")
    args = parser.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}")
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for workers in (args.workers,) if args.no_reference else (args.workers, 1):
            run = run_suite(workers, Path(work) / f"junit-{workers}.xml")
            report(run)
            runs.append(run)
    if len(runs) == 2:
        print(f"speed-up of -n {args.workers} over one worker: "
              f"{runs[1].wall / runs[0].wall:.2f}x")
    print(f"goal: the suite in at most 90 s wall: {runs[0].wall:.1f} s "
          f"({'met' if runs[0].wall <= 90 else 'NOT met'})")
    broken = any(run.outcomes["failed"] or run.outcomes["error"] for run in runs)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
