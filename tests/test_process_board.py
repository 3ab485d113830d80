"""A host build run as the board (``hil.rig.providers.process``, ``hil.drivers.process``): the C
OneNET agent (examples/onenet-agent) built by its rig's ``build`` and started through
``RigParts`` against hil's real mock service, driven only through the rig's parts, as a scenario
drives a board without a shell: the flasher programs ``primary.bin`` and resets, the power part
cuts (SIGKILL) and restores, the console is a real pty carrying the program's stdout and stderr.

What a user relies on: an update runs end to end (the agent exits to reboot and hil starts it
again, which reports 201); a power cut in the middle of the download resumes where the flash
says; a reset is SIGTERM and a new start; a program that keeps exiting is a boot loop, a
firmware fault naming the exit statuses; nothing (process, thread, descriptor, pty link) is left
when the rig closes; and a bad rig file or a failing build is one line.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hil.errors import BootLoop, ConfigError, RigFault, Unsupported
from hil.onenet.messages import Endpoint
from hil.onenet.tasks import Package
from hil.rig.model import Rig, load_rig
from hil.rig.parts import RigParts
from hil.service.config import read_package
from hil.service.server import MockOneNet, new_access_key
from hil.service.timeline import Exchange

ROOT = Path(__file__).resolve().parent.parent
AGENT_DIR = ROOT / "examples" / "onenet-agent"
IMAGES = ROOT / "fixtures" / "images"
KEY_ENV = "HIL_PROCESS_TEST_KEY"
PRODUCT, DEV = "245528", "proc-agent"
CHUNK = 4096
DEADLINE = 60.0                      # generous: CI runs with a CPU hog beside it
BOOT = r"^boot version=(?P<version>\S+)"

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or (shutil.which("cc") or shutil.which("gcc")) is None,
    reason="no make or C compiler on this machine; .ci/run installs gcc and make")


@pytest.fixture(scope="session")
def agent_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the rigs' build puts the agent (built by the first test, then up to date)."""
    return tmp_path_factory.mktemp("process-agent") / "agent"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    value = new_access_key()
    monkeypatch.setenv(KEY_ENV, value)
    return value


@pytest.fixture
def onenet(key: str) -> Iterator[MockOneNet]:
    with MockOneNet(PRODUCT, key) as mock:
        yield mock
        mock.service.raise_crashes()


def rig_of(tmp_path: Path, console: dict[str, Any], **sections: Any) -> Rig:
    document = {"name": "proc-agent", "board": "nrf52832",
                "identity": {"product_id": PRODUCT, "dev_id": DEV, "access_key_env": KEY_ENV},
                "console": {"state_dir": str(tmp_path / "flash"), **console},
                "flasher": {"kind": "process"}, "power": {"kind": "process"}, **sections}
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return load_rig(path)


@pytest.fixture
def agent_rig(tmp_path: Path, agent_out: Path) -> Callable[..., Rig]:
    def make(**console: Any) -> Rig:
        return rig_of(tmp_path, {
            "command": [str(agent_out)],
            "build": ["make", "-s", "-C", str(AGENT_DIR), "AGENT={out}", "DEFECTS={defines}"],
            "env": {"HIL_HTTP_TIMEOUT": "2"}, **console})
    return make


@pytest.fixture
def package() -> Package:
    return read_package(IMAGES / "nrf52832-1.1.0.bin", "the test's package")


def flashed(parts: RigParts) -> str:
    """The base image programmed and the board reset: the version it boots."""
    console, flasher = parts.console(), parts.flasher()
    assert flasher is not None
    flasher.program(IMAGES / "nrf52832-1.0.0.bin")
    since = console.mark()
    flasher.reset()
    return console.expect(BOOT, DEADLINE, since=since).group("version")


def new_task(onenet: MockOneNet, package: Package) -> None:
    onenet.service.add_device(DEV)
    onenet.service.create_task(DEV, "1.1.0", package, manuf="102", model="10201", retry=2,
                               interval=0)


def downloads(onenet: MockOneNet) -> list[str | None]:
    return [e.range for e in onenet.timeline.exchanges(DEV, Endpoint.DOWNLOAD)]


def leftovers() -> tuple[set[str], set[str]]:
    """This process's threads and file descriptors (what a closed rig must give back)."""
    return ({thread.name for thread in threading.enumerate()},
            set(os.listdir("/proc/self/fd")))


# ------------------------------------------------------------------------------ the board
def test_an_update_runs_end_to_end_and_the_exit_to_reboot_restarts_the_program(
        agent_rig, onenet, package, key):
    rig = agent_rig()
    with RigParts(rig) as parts:
        assert flashed(parts) == "1.0.0"
        console = parts.console()
        console.expect("^ota end$", DEADLINE)     # its check at start: no gateway known yet
        assert onenet.timeline.exchanges(DEV) == [], "before point_at it reaches nothing"

        assert parts.point_at(onenet.url) is True  # for its next start
        new_task(onenet, package)
        since = console.mark()
        flasher = parts.flasher()
        assert flasher is not None
        flasher.reset()                            # how a board without a shell is started
        assert console.expect(BOOT, DEADLINE, since=since).group("version") == "1.0.0"
        console.expect("^ota phase=flash", DEADLINE)
        console.expect(r"^\[hil\] .* ended with status 0: rebooting", DEADLINE)
        assert console.expect(BOOT, DEADLINE).group("version") == "1.1.0"
        onenet.timeline.wait_for(lambda e: e.result == 201, dev_id=DEV, timeout=DEADLINE)
        assert onenet.timeline.reported_codes(DEV) == [101, 201]
        assert key not in console.log_text()
    assert (rig.process_state_dir / "primary.bin").read_bytes() == package.data


def test_a_power_cut_mid_download_is_sigkill_and_power_on_resumes_at_the_stored_offset(
        agent_rig, onenet, package):
    with RigParts(agent_rig()) as parts:
        flashed(parts)
        power, console = parts.power(), parts.console()
        assert power is not None
        assert power.can_cut
        parts.point_at(onenet.url)
        new_task(onenet, package)
        cut = threading.Event()

        def at_third_range(exchange: Exchange) -> None:
            if not cut.is_set() and exchange.range == f"bytes={2 * CHUNK}-{3 * CHUNK - 1}":
                power.output(False)     # before it is answered: the timeline records first
                cut.set()

        onenet.timeline.subscribe(at_third_range)
        since = console.mark()
        power.output(False)
        power.output(True)              # a power cycle starts the attempt too
        assert cut.wait(DEADLINE)
        assert len(downloads(onenet)) == 3
        assert parts.provider.board.running is False      # type: ignore[attr-defined]

        power.output(True)
        console.expect("resuming the download at offset 8192", DEADLINE, since=since)
        onenet.timeline.wait_for(lambda e: e.result == 201, dev_id=DEV, timeout=DEADLINE)
        resumed = downloads(onenet)[3:]
        assert resumed[0] == f"bytes={2 * CHUNK}-{3 * CHUNK - 1}", "not from byte 0"
        assert onenet.timeline.reported_codes(DEV) == [101, 201]
        with pytest.raises(Unsupported, match="reads no battery"):
            power.set_level(10)


def test_a_shell_less_host_build_comes_with_its_base_and_is_told_the_gateway_by_its_env(
        agent_rig, onenet, package):
    """As a conformance scenario drives it: a new board (an empty state directory) boots the
    image it came with; without --hil-firmware it is brought back to that image (its flash
    reset, as a production line flashes it); ``point_at`` reaches it through ``HIL_OTA_URL`` at
    its next start, which is what starts its attempt (``ota.trigger: reset``)."""
    from hil.rig.board import Board

    rig = agent_rig(shell="none", events={"boot": BOOT})
    assert not (rig.process_state_dir / "primary.bin").exists()
    with RigParts(rig) as parts:
        board = Board(parts)
        assert board.revive() is False, "no shell to ask"
        assert board.restore_base(None) == "1.0.0"
        board.point_at(onenet.url)
        new_task(onenet, package)
        board.start_update()
        onenet.timeline.wait_for(lambda e: e.result == 201, dev_id=DEV, timeout=DEADLINE)
        assert onenet.timeline.reported_codes(DEV) == [101, 201]
        assert board.restore_base(None) == "1.0.0", "back to the image it came with"
    assert (rig.process_state_dir / "primary.bin").read_bytes() == \
        (IMAGES / "nrf52832-1.0.0.bin").read_bytes()


def test_a_reset_is_sigterm_then_a_new_start(agent_rig):
    with RigParts(agent_rig()) as parts:
        flashed(parts)
        board = parts.provider.board                     # type: ignore[attr-defined]
        console, flasher = parts.console(), parts.flasher()
        assert flasher is not None
        console.expect("^ota end$", DEADLINE)
        before = board.pid
        since = console.mark()
        flasher.reset()
        console.expect("^I: agent: SIGTERM, stopping$", DEADLINE, since=since)
        console.expect(BOOT, DEADLINE, since=since)
        assert board.pid not in (None, before)
        assert board.exits == [], "a reset is not the program exiting by itself"


def test_a_program_that_keeps_exiting_is_a_boot_loop_naming_its_status(tmp_path):
    rig = rig_of(tmp_path, {"command": ["sh", "-c", "echo to stdout; echo to stderr >&2; "
                                        "exit 3"]})
    with RigParts(rig) as parts:
        console = parts.console()
        flasher = parts.flasher()
        assert flasher is not None
        since = console.mark()
        flasher.reset()
        with pytest.raises(BootLoop, match=r"exited 5 times .*status 3, status 3") as caught:
            console.expect("^never printed$", DEADLINE, since=since)
        assert isinstance(caught.value, AssertionError), "a firmware fault: failed, not broken"
        texts = [line.text for line in console.lines()]
        assert "to stdout" in texts
        assert "to stderr" in texts
        assert any(text.startswith("[hil] ") and text.endswith(
            "sh ended with status 3: rebooting (started again)") for text in texts)
        board = parts.provider.board                     # type: ignore[attr-defined]
        assert board.running is False, "a boot loop leaves the board off"


def test_nothing_outlives_the_rig(agent_rig, onenet):
    threads, fds = leftovers()
    rig = agent_rig()
    with RigParts(rig) as parts:
        flashed(parts)
        parts.point_at(onenet.url)
        board = parts.provider.board                     # type: ignore[attr-defined]
        pid = board.pid
        link = board.console_path
        assert link.is_symlink()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not link.exists()
    assert not link.is_symlink()
    assert leftovers() == (threads, fds)


# ------------------------------------------------------------------------------ rig file
def test_a_failing_build_is_one_rig_fault_line_with_its_last_output(tmp_path):
    rig = rig_of(tmp_path, {"command": [str(tmp_path / "agent")],
                            "build": ["sh", "-c", "echo 'agent.c:1: error: boom' >&2; exit 2"]})
    with pytest.raises(RigFault) as caught, RigParts(rig):
        pass
    message = str(caught.value)
    assert message == ("rig proc-agent: console: console.build: sh -c echo 'agent.c:1: error: "
                       "boom' >&2; exit 2 failed with status 2: agent.c:1: error: boom")


@pytest.mark.parametrize(("console", "sections", "key", "text"), [
    ({"port": "/dev/ttyACM0", "command": ["x"]}, {}, "console",
     "exactly one of port, url or serial_number (got port, command)"),
    ({"port": "/dev/ttyACM0", "env": {"A": "1"}}, {"flasher": {"kind": "none"},
                                                   "power": {"kind": "none"}},
     "console", "env: only for a host build"),
    ({"port": "/dev/ttyACM0"}, {"power": {"kind": "none"}}, "",
     "flasher.kind: process is a host build's; give console.command"),
    ({"command": ["x"], "defects": ["skips-md5"]}, {}, "console",
     "defects: 'skips-md5' is not in known_defects (none)"),
    ({"command": ["x"], "known_defects": ["no-such"]}, {}, "console.known_defects", ""),
])
def test_a_mistake_in_a_host_build_rig_is_one_line_naming_the_key(tmp_path, console, sections,
                                                                   key, text):
    with pytest.raises(ConfigError) as caught:
        rig_of(tmp_path, {"state_dir": None, **console}, **sections)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{tmp_path / 'rig.yaml'}: {key}"), message
    assert text in message, message


# ------------------------------------------------------------------------------ hil defects
def test_a_defect_rig_of_a_host_build_runs_its_own_program_built_with_the_defect(tmp_path, key):
    from hil.configfile import read_yaml, validate
    from hil.conformance.power import defect_rig
    from hil.sim.defects import Defect

    base = read_yaml(ROOT / "rigs" / "host-agent.yaml")
    base["identity"]["access_key_env"] = KEY_ENV
    rig = validate(Rig, base, "host-agent")
    (tmp_path / "programs").mkdir()
    document = defect_rig(base, rig, Defect.SKIPS_MD5, tmp_path)
    defective = validate(Rig, document, document["name"])
    assert defective.console.command == (str(tmp_path / "programs" / "host-agent--skips-md5"),)
    assert defective.process_state_dir == tmp_path / "host-agent--skips-md5"
    cwd = os.getcwd()
    os.chdir(ROOT)            # the rig's build is relative to the project's root, as hil runs
    try:
        with RigParts(defective) as parts:
            flashed(parts)
            first = [line.text for line in parts.console().lines() if "starting" in line.text]
    finally:
        os.chdir(cwd)
    assert first, "the program never started"
    assert first[-1].endswith("defects: skips-md5"), first[-1]


def test_hil_defects_refuses_defects_the_host_build_lacks_in_one_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "hil.cli", "defects", "--root", str(ROOT),
                           "--rig", str(ROOT / "rigs" / "host-agent.yaml"),
                           "--defect", "ignores-power", "--defect", "skips-md5"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "not with ignores-power" in lines[0], lines[0]
    assert "can be built with early-101, restarts-download" in lines[0], lines[0]


# ------------------------------------------------------------------------------ the seam
@pytest.mark.parametrize(("rig", "provider", "imported"), [
    ("lab-nrf52832", "HardwareProvider", "nothing of hil.sim"),
    # A host build reuses two pieces that live in hil.sim: its pty (hil.sim.pty) and the
    # defect names (hil.sim.defects); never the simulated bench.
    ("host-agent", "ProcessProvider", "no bench"),
    ("sim-nrf52832", "SimProvider", "the bench"),
])
def test_each_rig_gets_its_provider_and_only_a_simulated_one_imports_the_bench(
        rig, provider, imported):
    import subprocess
    import sys

    probe = ("import sys; from pathlib import Path; from hil.rig.model import load_rig; "
             "from hil.rig.parts import RigParts; "
             f"parts = RigParts(load_rig(Path({str(ROOT / 'rigs' / rig) + '.yaml'!r}))); "
             "sim = [name for name in sys.modules if name.startswith('hil.sim')]; "
             "print(type(parts.provider).__name__, '|', 'the bench' if 'hil.sim.bench' in sim "
             "else 'no bench' if sim else 'nothing of hil.sim')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{provider} | {imported}"
