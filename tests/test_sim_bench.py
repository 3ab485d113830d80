"""A simulated rig's bench: it starts with the rig and stops with it, leaving nothing behind but
the board's state; its supply powers the board; the CLI drives it through the real tools."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from private_rig import private_sim_rig
from sim_board import KEY_ENV, rig_document

from hil.errors import ExpectTimeout, RigFault
from hil.rig.board import Board
from hil.rig.model import load_rig
from hil.rig.parts import RigParts
from hil.service.server import new_access_key
from hil.sim.probe import ENV_VAR

ROOT = Path(__file__).resolve().parent.parent
HIL = [sys.executable, "-m", "hil.cli"]


@pytest.fixture(autouse=True)
def access_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, new_access_key())


def write_rig(tmp_path: Path, board: str, **changes: object):
    document = rig_document(f"bench-{board}", board, tmp_path / board)
    document.update(changes)
    path = tmp_path / f"{board}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return load_rig(path)


def sim_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("hil-sim")]


def open_fds() -> set[tuple[str, str]]:
    """This process's open fds and what each is (a path, a pty, a socket's inode)."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:          # the listing's own fd, closed by now
            continue
    return fds


@pytest.mark.parametrize("board", ["nrf52832", "gd32", "esp32"])
def test_nothing_outlives_the_rig_but_the_boards_state(tmp_path, board, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    rig = write_rig(tmp_path, board)
    fds = open_fds()
    with RigParts(rig) as parts:
        board_ = Board(parts)
        assert board_.version() == "1.0.0"
        parts.power(), parts.rf()
        assert sim_threads()
        links = [path for path in (tmp_path / board).iterdir() if path.is_symlink()]
        assert {path.name for path in links} == (
            {"supply", "attenuator"} | ({"console"} if board != "esp32" else set()))
    assert sim_threads() == []
    assert not any(path.is_symlink() for path in (tmp_path / board).iterdir())
    # Nothing the rig opened is left open (an earlier test's garbage may close meanwhile).
    assert open_fds() - fds == set()
    assert ENV_VAR not in os.environ
    # What stays is the board: its flash, its settings, its factory image.
    assert (tmp_path / board / "flash.bin").stat().st_size > 0
    assert (tmp_path / board / "factory.bin").is_file()


def test_one_simulation_per_state_directory(tmp_path):
    rig = write_rig(tmp_path, "nrf52832")
    with RigParts(rig) as parts:
        Board(parts).version()
        with pytest.raises(RigFault, match=r"a simulation of .* already runs in this process"):
            RigParts(rig).__enter__()
        assert Board(parts).version() == "1.0.0"     # the first one is unharmed


def test_an_address_that_is_not_the_simulations_is_named(tmp_path):
    rig = write_rig(tmp_path, "nrf52832", console={"port": "/dev/ttyUSB7"})
    with pytest.raises(RigFault) as fault:
        RigParts(rig).__enter__()
    assert str(fault.value) == (f"rig bench-nrf52832: console: console.port of a simulated rig "
                                f"must be {tmp_path / 'nrf52832' / 'console'} (sim.state_dir), "
                                "not /dev/ttyUSB7")


def test_the_supply_output_powers_the_board(tmp_path):
    rig = write_rig(tmp_path, "nrf52832")
    with RigParts(rig) as parts:
        board = Board(parts)
        board.version()
        power = parts.power()
        assert power is not None
        power.output(False)
        with pytest.raises(ExpectTimeout):
            board.version(timeout=0.5)     # a dark board answers nothing
        since = board.console.mark()
        power.output(True)
        assert board.console.expect(board.contract.events["boot"], 5,
                                    since=since).group("version") == "1.0.0"


@pytest.mark.parametrize(("rig", "image", "tool"), [
    ("sim-nrf52832", "nrf52832-1.1.0.bin", "swd"),
    ("sim-esp32", "esp32-1.1.0.bin", "esp"),
    ("sim-gd32", "gd32-1.1.0.bin", "swd"),
])
def test_hil_flash_and_rigs_check_on_the_simulated_rigs(rig, image, tool, tmp_path):
    # A private copy of the rig: between the two commands no other test may flash it.
    private = private_sim_rig(tmp_path, rig)
    name = private.document["name"]

    def hil(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HIL, *args], capture_output=True, text=True, timeout=120,
                              cwd=ROOT, env=private.env)

    flashed = hil("flash", "--rig", str(private.path), f"fixtures/images/{image}")
    assert flashed.returncode == 0, flashed.stderr
    assert flashed.stdout.rstrip().endswith(f"flashed fixtures/images/{image} on {name}")
    assert f"{tool} ######################### 100%" in flashed.stdout
    checked = hil("rigs", "check", str(private.path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{name:<16} console  ok" in checked.stdout
    assert checked.stdout.splitlines()[0].endswith("firmware 1.1.0")
    assert len(checked.stdout.splitlines()) == 4
    assert "FAULT" not in checked.stdout


def test_benches_unplug_their_own_probe_whatever_the_order(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    first = RigParts(write_rig(tmp_path / "a", "nrf52832")).__enter__()
    second = RigParts(write_rig(tmp_path / "b", "gd32")).__enter__()
    assert os.environ[ENV_VAR].split(os.pathsep) == [str(tmp_path / "a" / "nrf52832"),
                                                    str(tmp_path / "b" / "gd32")]
    first.close()       # not the reverse of the order they started in
    assert os.environ[ENV_VAR] == str(tmp_path / "b" / "gd32")
    second.close()
    assert ENV_VAR not in os.environ
