"""Energy per update: the board's current sampled through a measuring supply during an attempt,
cut into the attempt's phases, and checked against the product's budget.

    sampler = CurrentSampler(supply)          # a CurrentMeter (hil.drivers.base)
    sampler.start()                           # at the attempt's start
    ...                                       # the attempt
    curve = sampler.stop()                    # at its end: Samples stamped with wall-clock time
    phases = per_phase(curve, phase_marks(...))
    check_budget(phases, {"download": 40.0})  # EnergyOverBudget naming the phase

The core (``integrate``, ``per_phase``, ``phase_marks``, ``check_budget``) is sans-IO: plain
numbers in and out. Only ``CurrentSampler`` does I/O, on its own thread, through the rig's power
driver; its samples carry ``time.time()`` (the midpoint of each query), the clock the gateway's
timeline and the console's lines are stamped with, so the curve lines up with both.

The phases, as hil can see them from outside the board (the service's exchanges and the console's
lines):

- ``detect``: from the attempt's start to its first download request (version report, detect,
  token check: the radio on for a few round trips);
- ``download``: from the first download request to the end of the last one;
- ``verify``: from there to the install's flash announcement (``ota phase=flash``) or, without
  one, the next boot: the 101 report, the md5 check, the reboot into the bootloader;
- ``flash``: from the flash announcement to the boot line (the bootloader's copy);
- ``report``: from the boot line to the attempt's end (the boot into the new image, its 201).

An attempt that stops earlier (a refused detect, a failed download) has only the phases it went
through. A charge is mA·s (mAs): mA integrated over seconds, trapezoids between the samples, the
curve interpolated at each phase's edges.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from hil.drivers.base import CurrentMeter, LogLine
from hil.drivers.contract import Event
from hil.errors import ConformanceFailure, HilError
from hil.onenet.messages import Endpoint
from hil.service.timeline import Exchange

ENERGY_PHASES = ("detect", "download", "verify", "flash", "report")
SAMPLE_INTERVAL_S = 0.05


@dataclass(frozen=True, slots=True)
class Sample:
    at: float      # Unix seconds
    ma: float


@dataclass(frozen=True)
class Curve:
    """The current an attempt drew: its samples, from ``start`` to ``end`` (Unix seconds)."""

    samples: tuple[Sample, ...]
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class PhaseCharge:
    phase: str
    start: float
    end: float
    mas: float         # the charge drawn, mA·s
    samples: int       # how many samples fell inside (0: the phase was shorter than a sample)

    @property
    def mean_ma(self) -> float:
        span = self.end - self.start
        return self.mas / span if span > 0 else 0.0


class EnergyOverBudget(ConformanceFailure):
    """A phase drew more charge than the product's expectation profile allows."""


def _value_at(samples: Sequence[Sample], at: float) -> float:
    """The curve at ``at``: linear between the samples around it, flat beyond the ends."""
    if at <= samples[0].at:
        return samples[0].ma
    if at >= samples[-1].at:
        return samples[-1].ma
    low, high = 0, len(samples) - 1
    while high - low > 1:
        middle = (low + high) // 2
        if samples[middle].at <= at:
            low = middle
        else:
            high = middle
    a, b = samples[low], samples[high]
    if b.at == a.at:
        return b.ma
    return a.ma + (b.ma - a.ma) * (at - a.at) / (b.at - a.at)


def integrate(samples: Sequence[Sample], start: float, end: float) -> float:
    """mA·s between ``start`` and ``end``: trapezoids over the samples inside, the curve's value
    at both edges interpolated (held flat beyond the first and the last sample). No sample: 0."""
    if not samples or end <= start:
        return 0.0
    points = [(start, _value_at(samples, start)),
              *((s.at, s.ma) for s in samples if start < s.at < end),
              (end, _value_at(samples, end))]
    return sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in itertools.pairwise(points))


def per_phase(curve: Curve, marks: Sequence[tuple[float, str]]) -> list[PhaseCharge]:
    """The curve cut at ``marks`` ((when, the phase that begins), in time order; the first at or
    before the curve's start), each piece ending where the next begins, the last at the curve's
    end. Marks outside the curve are clamped to it."""
    charges = []
    clamped = [(min(max(at, curve.start), curve.end), phase) for at, phase in marks]
    for index, (start, phase) in enumerate(clamped):
        end = clamped[index + 1][0] if index + 1 < len(clamped) else curve.end
        end = max(end, start)
        inside = sum(1 for s in curve.samples if start <= s.at < end)
        charges.append(PhaseCharge(phase, start, end, integrate(curve.samples, start, end),
                                   inside))
    return charges


def totals(charges: Iterable[PhaseCharge]) -> dict[str, float]:
    """mA·s per phase name (a phase met twice, e.g. two downloads, counts once, summed)."""
    summed: dict[str, float] = {}
    for charge in charges:
        summed[charge.phase] = summed.get(charge.phase, 0.0) + charge.mas
    return summed


def phase_marks(start: float, exchanges: Sequence[Exchange], console: Sequence[LogLine],
                event_of: Callable[[str], Event | None]) -> list[tuple[float, str]]:
    """Where each phase of an attempt begun at ``start`` began (see the module docstring), from
    its exchanges and the console's lines (``event_of`` reads a line as the board's contract
    does: its phase lines, its boot line). Marks are in time order."""
    marks = [(start, "detect")]
    downloads = [e for e in exchanges if e.phase is Endpoint.DOWNLOAD]
    after = start
    if downloads:
        first = min(e.at - e.duration_ms / 1000 for e in downloads)
        after = max(e.at for e in downloads)
        marks += [(max(first, start), "download"), (after, "verify")]
    flashed: float | None = None
    for line in console:
        if line.sent or line.at < after:
            continue
        event = event_of(line.text)
        if event is None:
            continue
        if flashed is None and event.fields.get("phase") == "flash":
            flashed = line.at
            marks.append((line.at, "flash"))
        elif event.tag == "boot" and downloads:
            marks.append((line.at, "report"))
            break
    return sorted(marks, key=lambda mark: mark[0])


def check_budget(charges: Iterable[PhaseCharge], budget: Mapping[str, float], *,
                 where: str) -> None:
    """EnergyOverBudget naming the first phase (in the attempt's order) whose charge is over
    its budget, the measured and the budget; ``where``: the profile it came from."""
    summed = totals(charges)
    for phase in ENERGY_PHASES:
        if phase in budget and phase in summed and summed[phase] > budget[phase]:
            raise EnergyOverBudget(
                phase, f"the {phase} phase drew {summed[phase]:.1f} mAs, over its budget of "
                f"{budget[phase]:g} mAs (energy_budget_mas.{phase} in {where})")


def table_csv(charges_by_attempt: Sequence[Sequence[PhaseCharge]], origin: float) -> str:
    """The per-phase charges as CSV: one row per phase of each attempt, times in seconds from
    ``origin``."""
    rows = ["attempt,phase,start_s,end_s,mAs,mean_mA,samples"]
    for number, charges in enumerate(charges_by_attempt, start=1):
        rows += [f"{number},{c.phase},{c.start - origin:.3f},{c.end - origin:.3f},{c.mas:.2f},"
                 f"{c.mean_ma:.1f},{c.samples}" for c in charges]
    return "\n".join(rows) + "\n"


class CurrentSampler:
    """Samples ``meter.measure_amps()`` every ``interval`` seconds on its own thread, from
    ``start()`` to ``stop()``. A meter that fails (a RigFault: the supply vanished) ends the
    sampling; ``stop()`` raises that error, so the test is broken, not silently curve-less."""

    def __init__(self, meter: CurrentMeter, interval: float = SAMPLE_INTERVAL_S) -> None:
        if interval <= 0:
            raise ValueError(f"sample interval must be positive, not {interval}")
        self.meter = meter
        self.interval = interval
        self._samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: HilError | None = None
        self._start = 0.0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a sampler samples once: make another")
        self._start = time.time()
        self._sample()        # one at the start: the curve has a value from its first instant
        self._thread = threading.Thread(target=self._run, name="hil energy sampler", daemon=True)
        self._thread.start()

    def stop(self) -> Curve:
        if self._thread is None:
            raise RuntimeError("the sampler was not started")
        self._stop.set()
        self._thread.join()
        if self._error is None:
            self._sample()
        end = time.time()
        if self._error is not None:
            raise self._error
        return Curve(tuple(self._samples), self._start, end)

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and self._error is None:
            self._sample()

    def _sample(self) -> None:
        before = time.time()
        try:
            amps = self.meter.measure_amps()
        except HilError as error:
            self._error = error
            return
        self._samples.append(Sample((before + time.time()) / 2, amps * 1000))
