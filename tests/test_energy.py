"""Energy per update: the per-phase integration (sans-IO), the expectation profile's budget, the
simulated supply's draw following what the simulated firmware does, and a real conformance run
on a private simulated rig leaving the current curve and the mA·s per phase in its Allure
results, a phase over its budget failing the test by name."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from private_rig import ROOT, private_sim_rig
from sim_board import SimSetup

from hil.conformance.energy import (
    CurrentSampler,
    Curve,
    EnergyOverBudget,
    PhaseCharge,
    Sample,
    check_budget,
    integrate,
    per_phase,
    totals,
)
from hil.conformance.expectations import load_profile
from hil.drivers.base import measures_current
from hil.errors import ConfigError
from hil.sim.firmware import DRAW_MA

PROFILE = ROOT / "fixtures" / "expectations" / "onenet.yaml"

# ------------------------------------------------------------------------------ sans-IO core
times = st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=30, unique=True)


@given(at=times, level=st.floats(0, 500, allow_nan=False),
       span=st.tuples(st.floats(-10, 110), st.floats(0, 50)))
def test_a_constant_current_charges_level_times_duration(at, level, span):
    samples = [Sample(t, level) for t in sorted(at)]
    start, length = span
    assert integrate(samples, start, start + length) == pytest.approx(level * length, abs=1e-6)


@given(at=times, levels=st.lists(st.floats(0, 500, allow_nan=False), min_size=30, max_size=30),
       cuts=st.lists(st.floats(0, 100, allow_nan=False), max_size=6))
def test_the_phases_add_up_to_the_whole_curve(at, levels, cuts):
    samples = tuple(Sample(t, level) for t, level in zip(sorted(at), levels, strict=False))
    curve = Curve(samples, 0.0, 100.0)
    marks = [(0.0, "detect"), *((cut, f"p{i}") for i, cut in enumerate(sorted(cuts)))]
    charges = per_phase(curve, marks)
    assert sum(c.mas for c in charges) == pytest.approx(integrate(samples, 0.0, 100.0),
                                                        rel=1e-9, abs=1e-6)
    assert all(c.mas >= 0 for c in charges)


def test_each_phase_gets_the_current_drawn_in_it():
    # 10 mA for 2 s, then 80 mA for 3 s, then 40 mA for 1 s, sampled every 10 ms.
    def level(t: float) -> float:
        return 10.0 if t < 2 else 80.0 if t < 5 else 40.0
    samples = tuple(Sample(i / 100, level(i / 100)) for i in range(601))
    charges = per_phase(Curve(samples, 0.0, 6.0),
                        [(0.0, "detect"), (2.0, "download"), (5.0, "flash")])
    got = {c.phase: c for c in charges}
    assert got["detect"].mas == pytest.approx(20, rel=0.02)
    assert got["download"].mas == pytest.approx(240, rel=0.02)
    assert got["flash"].mas == pytest.approx(40, rel=0.02)
    assert got["download"].mean_ma == pytest.approx(80, rel=0.02)


def test_a_phase_met_twice_counts_its_charges_together():
    charges = [PhaseCharge("download", 0, 1, 5.0, 3), PhaseCharge("verify", 1, 2, 1.0, 3),
               PhaseCharge("download", 2, 3, 7.0, 3)]
    assert totals(charges) == {"download": 12.0, "verify": 1.0}


def test_a_phase_over_its_budget_fails_naming_the_phase_the_measured_and_the_budget():
    charges = [PhaseCharge("download", 0, 1, 55.25, 20), PhaseCharge("flash", 1, 2, 9.0, 20)]
    check_budget(charges, {"download": 60, "flash": 10}, where="ours.yaml")
    with pytest.raises(EnergyOverBudget) as failed:
        check_budget(charges, {"download": 50, "flash": 10}, where="ours.yaml")
    assert failed.value.phase == "download"
    assert isinstance(failed.value, AssertionError)      # a firmware fault: the test fails
    assert "55.2 mAs, over its budget of 50 mAs (energy_budget_mas.download in ours.yaml)" \
        in str(failed.value)


class _Meter:
    can_measure = True

    def __init__(self) -> None:
        self.calls = 0

    def measure_amps(self) -> float:
        self.calls += 1
        return 0.05


def test_a_sampler_stamps_its_samples_within_its_span():
    meter = _Meter()
    assert measures_current(meter)
    sampler = CurrentSampler(meter, 0.001)
    sampler.start()
    time.sleep(0.02)
    curve = sampler.stop()
    assert len(curve.samples) >= 2          # one at the start, one at the stop at least
    assert all(curve.start <= s.at <= curve.end and s.ma == 50.0 for s in curve.samples)


# ------------------------------------------------------------------------------ the profile
def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ours.yaml"
    path.write_text(f"extends: {PROFILE}\n{text}", encoding="utf-8")
    return path


def test_a_profile_sets_a_budget_per_phase_and_the_default_sets_none(tmp_path):
    assert load_profile(PROFILE).energy_budget == {}
    profile = load_profile(_profile(tmp_path, "energy_budget_mas: {download: 400, flash: 150.5}"))
    assert profile.energy_budget == {"download": 400, "flash": 150.5}
    assert profile["success"].codes == (101, 201)       # the rest comes from what it extends


@pytest.mark.parametrize(("text", "key"), [
    ("energy_budget_mas: {downlaod: 400}", "energy_budget_mas.downlaod"),
    ("energy_budget_mas: {flash: -3}", "energy_budget_mas.flash"),
    ("energy_budget_mas: {flash: lots}", "energy_budget_mas.flash"),
])
def test_a_bad_budget_is_one_line_naming_the_file_and_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as failed:
        load_profile(_profile(tmp_path, text))
    message = str(failed.value)
    assert "ours.yaml" in message
    assert key in message
    assert "\n" not in message


# ------------------------------------------------------------------------------ the sim supply
def _eventually(read, wanted: float, timeout: float = 30.0) -> float:
    """``read()`` until it is ``wanted`` (±0.5) or ``timeout`` passes; the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while abs(value - wanted) > 0.5 and time.monotonic() < deadline:
        time.sleep(0.02)
        value = read()
    return value


def test_the_sim_supply_measures_what_the_firmware_is_doing(tmp_path, monkeypatch):
    with SimSetup(tmp_path, monkeypatch) as setup:
        sim = setup.board()
        supply = sim.parts.power()
        assert measures_current(supply)

        def milliamps() -> float:
            return supply.measure_amps() * 1000

        assert _eventually(milliamps, DRAW_MA["idle"]) == pytest.approx(DRAW_MA["idle"])
        setup.task(sim)
        downloading, release = threading.Event(), threading.Event()

        def hold(count, _range, _answer):
            if count == 2:           # the board waits for its second range: radio on
                downloading.set()
                release.wait(60)

        setup.proxy.on_download = hold
        sampler = CurrentSampler(supply, 0.01)
        sampler.start()
        sim.board.start_update()
        assert downloading.wait(60)
        assert milliamps() == pytest.approx(DRAW_MA["radio"])
        release.set()
        sim.board.wait_update_end(60)      # to its ota end, after the reboot's 201
        curve = sampler.stop()
        assert setup.codes(sim) == [101, 201]
        # The bootloader's copy takes a second of simulated flash time: the sampler saw it.
        assert any(abs(s.ma - DRAW_MA["flash"]) < 0.5 for s in curve.samples)
        assert _eventually(milliamps, DRAW_MA["idle"]) == pytest.approx(DRAW_MA["idle"])
        supply.output(False)
        assert milliamps() == 0.0          # dark: nothing drawn


# ------------------------------------------------------------------------------ a real run
def _run(tmp_path: Path, rig, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "testcases/test_download.py", "--hil-rig",
         str(rig.path), "-k", "every_answer_slowed and latency",
         f"--alluredir={tmp_path / 'results'}", "-p", "no:cacheprovider", "-q", *args],
        cwd=ROOT, env=rig.env, capture_output=True, text=True, timeout=300, check=False)
    [result] = [json.loads(path.read_text())
                for path in (tmp_path / "results").glob("*-result.json")]
    return done, result


def _attachments(tmp_path: Path, result: dict) -> dict[str, Path]:
    return {a["name"]: tmp_path / "results" / a["source"] for a in result["attachments"]}


def test_the_energy_curve_and_its_phases_are_in_the_report(tmp_path):
    """Every answer 20 ms late: the download lasts long enough to see the radio in it."""
    rig = private_sim_rig(tmp_path)
    done, result = _run(tmp_path, rig)
    assert done.returncode == 0, done.stdout[-3000:]
    attachments = _attachments(tmp_path, result)
    png = attachments["the update"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO(attachments["energy per phase"].read_text())))
    first = {row["phase"]: row for row in rows if row["attempt"] == "1"}
    assert list(first) == ["detect", "download", "verify", "flash", "report"]
    download, flash = first["download"], first["flash"]
    assert int(download["samples"]) >= 3
    # The radio on while downloading, well above an idle board; the flash copy in between.
    assert float(download["mean_mA"]) > 3 * DRAW_MA["idle"]
    assert float(download["mAs"]) > float(first["detect"]["mAs"])
    # The flash phase's edges are console stamps, which lag their lines by up to a poll: a
    # sample of the boot and the radio after it may fall inside, never enough to make it radio.
    assert DRAW_MA["idle"] < float(flash["mean_mA"]) < DRAW_MA["radio"]
    for row in rows:
        assert float(row["mAs"]) >= 0
        assert float(row["end_s"]) >= float(row["start_s"])


def test_a_phase_over_its_budget_fails_the_test_naming_it(tmp_path):
    rig = private_sim_rig(tmp_path)
    profile = _profile(tmp_path, "energy_budget_mas: {download: 100000, flash: 1}")
    done, result = _run(tmp_path, rig, f"--hil-expectations={profile}")
    assert done.returncode == 1, done.stdout[-3000:]
    assert result["status"] == "failed"
    message = result["statusDetails"]["message"]
    assert "flash phase: the flash phase drew" in message
    assert "over its budget of 1 mAs (energy_budget_mas.flash in" in message
    assert "energy per phase" in _attachments(tmp_path, result)   # the evidence is there


def test_a_rig_whose_supply_cannot_measure_has_no_curve_and_no_error(tmp_path):
    rig = private_sim_rig(tmp_path)
    document = {**rig.document, "power": {"kind": "none"}}
    rig.path.write_text(yaml.safe_dump(document), encoding="utf-8")
    done, result = _run(tmp_path, rig)
    assert done.returncode == 0, done.stdout[-3000:]
    attachments = _attachments(tmp_path, result)
    assert "the update" in attachments
    assert "energy per phase" not in attachments
