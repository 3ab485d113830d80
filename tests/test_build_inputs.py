"""The build under test checked before any test runs (hil.rig.inputs): per-board options, and
each bad input stopping pytest (exit 4) and `hil suite` (exit 2) in one line naming the file,
with no test run. Real files (hil.sim.images), real boots on simulated boards."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.boards import BOARDS
from hil.errors import ConfigError
from hil.rig.inputs import SUITE_FLAGS, BadInput, check_builds, per_board, resolve_builds
from hil.rig.model import load_rig
from hil.sim.images import MCUBOOT_HEADER_SIZE, build_image
from tests.private_rig import private_sim_rig

ROOT = Path(__file__).resolve().parent.parent
THREE = ["esp32", "nrf52832", "gd32"]


# ---------------------------------------------------------------------------------- options
def test_plain_and_per_board_values():
    assert per_board("--hil-package", ["app.bin"]) == {None: "app.bin"}
    assert per_board("--hil-package", ["esp32=a.bin", "gd32=/x/b=c.bin", "./d=e.bin"]) == \
        {"esp32": "a.bin", "gd32": "/x/b=c.bin", None: "./d=e.bin"}
    assert per_board("--hil-target-version", []) == {}


@pytest.mark.parametrize(("values", "message"), [
    (["esp8266=a.bin"], "--hil-package: 'esp8266=a.bin': unknown board 'esp8266'; give "
     "BOARD=VALUE with BOARD one of esp32, nrf52832, gd32, or a plain value"),
    (["esp32=a.bin", "esp32=b.bin"], "--hil-package: given twice for esp32: 'a.bin' and 'b.bin'"),
    (["a.bin", "b.bin"], "--hil-package: given twice for every board: 'a.bin' and 'b.bin'"),
    (["gd32="], "--hil-package: 'gd32=': empty value"),
])
def test_bad_per_board_values_are_one_line(values, message):
    with pytest.raises(ConfigError) as caught:
        per_board("--hil-package", values)
    assert str(caught.value) == message


VALUES = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1,
                 max_size=30)
# A plain value is one that does not start like BOARD= (a path such as ./x=y.bin).
PLAIN = VALUES.filter(lambda value: not re.match(r"[A-Za-z0-9_]+=", value))


@given(own=st.dictionaries(st.sampled_from(list(BOARDS)), VALUES, max_size=3),
       plain=st.none() | PLAIN)
@settings(max_examples=200, deadline=None)
def test_per_board_values_round_trip(own, plain):
    values = [f"{board}={value}" for board, value in own.items()]
    if plain is not None:
        values.append(plain)
    parsed = per_board("--x", values)
    assert parsed == {**own, **({None: plain} if plain is not None else {})}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Real files for each case: images of every board and version the tests need, a file of
    random bytes, an unsigned (raw) nRF52832 binary."""
    folder = tmp_path_factory.mktemp("images")
    files = {}
    for board in THREE:
        for version in ("1.0.0", "1.1.0", "1.2.0"):
            files[f"{board}-{version}"] = folder / f"{board}-{version}.bin"
            files[f"{board}-{version}"].write_bytes(build_image(board, version))
    files["random"] = folder / "random.bin"
    files["random"].write_bytes(random.Random(5).randbytes(70_000))
    files["raw"] = folder / "nrf52832-raw.bin"
    files["raw"].write_bytes(build_image("nrf52832", "1.0.0")[MCUBOOT_HEADER_SIZE:])
    return files


def test_no_options_take_the_fixtures(tmp_path):
    builds = resolve_builds(THREE, firmware=[], package=[], target=[], root=ROOT)
    for board in THREE:
        build = builds[board]
        assert build.package == ROOT / "fixtures" / "images" / f"{board}-1.1.0.bin"
        assert build.base == ROOT / "fixtures" / "images" / f"{board}-1.0.0.bin"
        assert (build.target, build.firmware, build.package_given) == ("1.1.0", None, False)
    # And in a project without fixtures there is nothing to deliver: the ota fixture skips.
    bare = resolve_builds(["esp32"], firmware=[], package=[], target=[], root=tmp_path)
    assert (bare["esp32"].package, bare["esp32"].base) == (None, None)


def test_a_given_package_is_its_own_target_unless_one_is_given(images):
    given = resolve_builds(["nrf52832"], firmware=[], package=[str(images["nrf52832-1.2.0"])],
                           target=[], root=ROOT)["nrf52832"]
    assert (given.package, given.target, given.package_given) == \
        (images["nrf52832-1.2.0"], "1.2.0", True)
    pinned = resolve_builds(["nrf52832"], firmware=[], package=[str(images["nrf52832-1.2.0"])],
                            target=["nrf52832=1.1.0", "9.9"], root=ROOT)["nrf52832"]
    assert pinned.target == "1.1.0"


def test_once_a_board_has_a_package_every_selected_board_needs_one(images):
    with pytest.raises(ConfigError) as caught:
        resolve_builds(THREE, firmware=[], target=[], root=ROOT,
                       package=[f"esp32={images['esp32-1.1.0']}"])
    assert str(caught.value) == "--hil-package: none for nrf52832 (given for esp32 only): " \
        "give --hil-package nrf52832=FILE"


def test_a_missing_file_is_refused_even_for_a_board_not_selected(tmp_path):
    with pytest.raises(ConfigError, match=r"^--hil-firmware: no such file .*/none\.bin$"):
        resolve_builds(["esp32"], firmware=[f"gd32={tmp_path / 'none.bin'}"], package=[],
                       target=[], root=ROOT)


# ---------------------------------------------------------------------------------- checks
def _rigs() -> list:
    return [load_rig(ROOT / "rigs" / f"sim-{board}.yaml") for board in THREE]


def test_the_fixtures_pass_and_each_base_boots_on_a_simulated_board():
    builds = resolve_builds(THREE, firmware=[], package=[], target=[], root=ROOT)
    report = check_builds(builds, _rigs())
    assert report.warnings == []
    for board in THREE:
        assert f"{board}: base {board}-1.0.0.bin: " \
            f"{'ESP-IDF app' if board == 'esp32' else 'MCUboot'} image, version 1.0.0, for " \
            f"{board}; boots 1.0.0 on a simulated {board}" in report.lines


# The five bad inputs of issue 12, and what each says. {file} is the file's path.
BAD = {
    "not an image": (["--package", "random"], [],
                     "{file}: package: not a firmware image: 70000 bytes starting "),
    "another board": (["--package", "gd32-1.1.0"], [],
                      "{file}: package: MCUboot image, version 1.1.0, for gd32, but rig "
                      "RIG's board is nrf52832"),
    "other version": (["--package", "nrf52832-1.2.0"], ["--target-version", "1.1.0"],
                      "{file}: package carries version 1.2.0, not the target version 1.1.0 "
                      "(--target-version)"),
    "base is target": (["--firmware", "nrf52832-1.1.0"], [],
                       "{file}: base image carries version 1.1.0, the target version: the "
                       "update would change nothing"),
    "base does not boot": (["--firmware", "raw"], [],
                           "{file}: base image does not boot on a simulated nrf52832: the "
                           "bootloader said 'E: no bootable image in the primary slot: not an "
                           "MCUboot image"),
}


def _args(images: dict[str, Path], case: str, prefix: str) -> tuple[list[str], Path]:
    (flag, name), extra, _ = BAD[case]
    options = [prefix + flag.removeprefix("--"), str(images[name])]
    if extra:
        options += [prefix + extra[0].removeprefix("--"), extra[1]]
    return options, images[name]


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_input_is_refused_by_the_check(images, case):
    options, file = _args(images, case, "--")
    values = dict(zip(options[::2], options[1::2], strict=True))
    builds = resolve_builds(["nrf52832"], firmware=[values["--firmware"]] if "--firmware" in
                            values else [], package=[values["--package"]] if "--package" in
                            values else [], target=[values["--target-version"]] if
                            "--target-version" in values else [], root=ROOT)
    rig = load_rig(ROOT / "rigs" / "sim-nrf52832.yaml")
    with pytest.raises(BadInput) as caught:
        check_builds(builds, [rig], flags=SUITE_FLAGS)
    expected = BAD[case][2].format(file=file).replace("RIG", rig.name)
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_a_damaged_package_is_refused(images, tmp_path):
    data = bytearray(images["nrf52832-1.1.0"].read_bytes())
    data[4000] ^= 0xFF
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(bytes(data))
    builds = resolve_builds(["nrf52832"], firmware=[], package=[str(damaged)], target=[],
                            root=ROOT)
    with pytest.raises(BadInput, match="package is damaged: its SHA256 does not match"):
        check_builds(builds, [load_rig(ROOT / "rigs" / "sim-nrf52832.yaml")])


def test_a_raw_package_needs_a_target_version_and_is_then_taken_with_a_warning(images):
    rig = load_rig(ROOT / "rigs" / "sim-nrf52832.yaml")
    package = [str(images["raw"])]
    unversioned = resolve_builds(["nrf52832"], firmware=[], package=package, target=[],
                                 root=ROOT)
    with pytest.raises(BadInput, match="carries no version: give --hil-target-version"):
        check_builds(unversioned, [rig])
    pinned = resolve_builds(["nrf52832"], firmware=[], package=package, target=["1.1.0"],
                            root=ROOT)
    report = check_builds(pinned, [rig], boots=lambda board, path: (True, "1.0.0"))
    assert report.warnings == [f"{images['raw']}: a raw Cortex-M binary carries no version; "
                               "trusting --hil-target-version 1.1.0"]


def test_a_plain_package_for_several_boards_says_to_give_one_per_board(images):
    builds = resolve_builds(THREE, firmware=[], package=[str(images["esp32-1.1.0"])],
                            target=[], root=ROOT)
    with pytest.raises(BadInput) as caught:
        check_builds(builds, _rigs())
    assert str(caught.value).endswith("but rig sim-nrf52832's board is nrf52832 (several "
                                      "boards: give --hil-package nrf52832=FILE)")


# ---------------------------------------------------------------------------------- end to end
def _no_test_ran(out: Path, stdout: str) -> None:
    assert "PASSED" not in stdout, stdout
    assert "passed" not in stdout, stdout
    timelines = out / "timelines"
    assert not timelines.exists() or not any(timelines.iterdir())


@pytest.mark.parametrize("case", list(BAD))
def test_pytest_stops_before_any_test_in_one_line(images, case, tmp_path):
    rig = private_sim_rig(tmp_path)
    options, file = _args(images, case, "--hil-")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "testcases", "--hil-rig", str(rig.path), "-q",
         "-p", "no:cacheprovider", f"--hil-timeline-dir={tmp_path / 'timelines'}", *options],
        cwd=ROOT, env=rig.env, capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in run.stderr.splitlines() if line]
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert len(lines) == 1, lines
    expected = BAD[case][2].format(file=file).replace("RIG", rig.document["name"]) \
        .replace("(--target-version)", "(--hil-target-version)")
    assert lines[0].startswith(f"ERROR: {expected}"), lines[0]
    _no_test_ran(tmp_path, run.stdout)


@pytest.mark.parametrize("case", list(BAD))
def test_hil_suite_stops_before_starting_pytest_in_one_line(images, case, tmp_path):
    rig = private_sim_rig(tmp_path)
    options, file = _args(images, case, "--")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "hil.cli", "suite", str(rig.path), "--root", str(ROOT),
         "--out", str(out), *options],
        cwd=tmp_path, env=rig.env, capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in run.stderr.splitlines() if line]
    assert run.returncode == 2, run.stdout + run.stderr
    assert len(lines) == 1, lines
    expected = BAD[case][2].format(file=file).replace("RIG", rig.document["name"])
    assert lines[0].startswith(f"hil suite: error: {expected}"), lines[0]
    assert "-m pytest" not in run.stdout          # pytest never started
    _no_test_ran(out, run.stdout)
    assert not (out / "allure-results").exists()


def test_hil_rigs_check_boots_the_base_on_a_simulated_board(images, tmp_path):
    rig = private_sim_rig(tmp_path)
    name = rig.document["name"]

    def check(firmware: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hil.cli", "rigs", "check", str(rig.path), "--firmware",
             f"nrf52832={firmware}"], cwd=tmp_path, env=rig.env, capture_output=True,
            text=True, timeout=120, check=False)

    good = check(images["nrf52832-1.0.0"])
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(rf"^{re.escape(name)} +boot +ok +base nrf52832-1\.0\.0\.bin: MCUboot image, "
                     r"version 1\.0\.0, for nrf52832; boots 1\.0\.0 on a simulated nrf52832$",
                     good.stdout, re.MULTILINE), good.stdout
    bad = check(images["raw"])
    assert bad.returncode == 1
    assert re.search(rf"^{re.escape(name)} +boot +FAULT +{re.escape(str(images['raw']))}: base "
                     r"image does not boot on a simulated nrf52832: the bootloader said",
                     bad.stdout, re.MULTILINE), bad.stdout
