"""The C OneNET OTA agent (examples/onenet-agent), built with the system compiler and run as a
process the way hil runs a host build as a board: its env names the service and its state
directory (its flash), its stdout is the console log, a power cut is SIGKILL, and when it exits
to reboot it is started again. It talks to hil's real mock service over loopback, and the
service's timeline is what the tests read.

Flows: a whole update (101, exit, restart, 201 and ``boot version=1.1.0``); a power cut in the
middle of the download (the next start resumes at the stored offset); a package whose md5 does
not match (101 then 205, primary.bin untouched); a package that does not carry the target version
(204); download failures retried up to the task's ``retry``. Then each compiled-in defect
(``-DDEFECT_...``) misbehaving in one of those flows, as its name says.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hil.gateway import Fault, FaultKind, Gateway
from hil.onenet.codes import TaskState
from hil.onenet.messages import Endpoint
from hil.onenet.tasks import Package
from hil.report.signoff import coverage_of, read_results
from hil.service.config import read_package
from hil.service.server import MockOneNet, new_access_key
from hil.service.timeline import Exchange, Timeline

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples" / "onenet-agent" / "agent.c"
IMAGES = ROOT / "fixtures" / "images"
DEV = "527776559"
MANUF, MODEL = "102", "10201"        # nRF52832 in ONENET.md's chip table
CHUNK = 4096
DEADLINE = 60.0                      # generous: CI runs with a CPU hog beside it
COMPILER = shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(
    COMPILER is None, reason="no C compiler (cc or gcc) on this machine; .ci/run installs gcc")


# ------------------------------------------------------------------------------ building
@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Compile the agent with the given defects (once per set per session)."""
    built: dict[frozenset[str], Path] = {}
    where = tmp_path_factory.mktemp("c-agent")

    def compile_agent(*defects: str) -> Path:
        key = frozenset(defects)
        if key not in built:
            binary = where / ("agent-" + ("-".join(sorted(defects)) or "good")).lower()
            command = [str(COMPILER), "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror",
                       *(f"-DDEFECT_{name}" for name in sorted(defects)),
                       "-o", str(binary), str(SOURCE), "-lcrypto"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
            built[key] = binary
        return built[key]

    return compile_agent


# ------------------------------------------------------------------------------ the board
class Agent:
    """The agent as a board: started, killed, restarted over one state directory."""

    def __init__(self, binary: Path, state_dir: Path, env: dict[str, str]) -> None:
        self.binary = binary
        self.state_dir = state_dir
        self.env = env
        self.process: subprocess.Popen[str] | None = None
        self.log: list[str] = []          # every line of every boot
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None

    def start(self) -> Agent:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.process = subprocess.Popen([str(self.binary)], env=self.env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        process = self.process
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        with process.stdout:
            for line in process.stdout:
                with self._changed:
                    self.log.append(line.rstrip("\n"))
                    self._changed.notify_all()

    def boots(self) -> list[list[str]]:
        """The log split at each start."""
        runs: list[list[str]] = []
        for line in self.log:
            if line.startswith("I: onenet-agent"):
                runs.append([])
            if runs:
                runs[-1].append(line)
        return runs

    def wait_line(self, line: str, *, after: int = 0) -> int:
        """The index of the first log line equal to ``line`` at or after ``after``."""
        deadline = time.monotonic() + DEADLINE
        with self._changed:
            while True:
                for index in range(after, len(self.log)):
                    if self.log[index] == line:
                        return index
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {line!r} in the agent's log:\n" + "\n".join(self.log)
                self._changed.wait(remaining)

    def wait_exit(self) -> int:
        assert self.process is not None
        code = self.process.wait(DEADLINE)
        if self._reader is not None:
            self._reader.join(DEADLINE)
        return code

    def power_cut(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.wait_exit()

    def stop(self) -> int | None:
        """SIGTERM (a reset line held): the exit status, None if it was not running."""
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.terminate()
        return self.wait_exit()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def primary(self) -> bytes:
        return (self.state_dir / "primary.bin").read_bytes()


@pytest.fixture
def onenet() -> Iterator[MockOneNet]:
    with MockOneNet(access_key=new_access_key()) as mock:
        yield mock
        mock.service.raise_crashes()


@pytest.fixture
def package() -> Package:
    return read_package(IMAGES / "nrf52832-1.1.0.bin", "the test's package")


@pytest.fixture
def board(onenet: MockOneNet, tmp_path: Path, build: Callable[..., Path]
          ) -> Iterator[Callable[..., Agent]]:
    """A factory: an agent (with ``defects``) whose flash holds the 1.0.0 image, talking to
    ``url`` (the mock by default)."""
    made: list[Agent] = []

    def make(*defects: str, url: str | None = None) -> Agent:
        state = tmp_path / f"state-{len(made)}"
        state.mkdir()
        shutil.copyfile(IMAGES / "nrf52832-1.0.0.bin", state / "primary.bin")
        base = url or onenet.url
        host, port = base.removeprefix("http://").rsplit(":", 1)
        env = {"PATH": os.environ.get("PATH", ""), "HIL_OTA_URL": base, "HIL_OTA_HOST": host,
               "HIL_OTA_PORT": port, "HIL_PRODUCT_ID": onenet.product_id, "HIL_DEV_ID": DEV,
               "HIL_ACCESS_KEY": onenet._access_key, "HIL_STATE_DIR": str(state),
               "HIL_HTTP_TIMEOUT": "5"}
        agent = Agent(build(*defects), state, env)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.kill()
            agent.wait_exit()


def new_task(onenet: MockOneNet, package: Package, target: str = "1.1.0", *, retry: int = 2,
             interval: int = 0) -> str:
    task = onenet.service.create_task(DEV, target, package, manuf=MANUF, model=MODEL,
                                      retry=retry, interval=interval)
    return task.token


def downloads(timeline: Timeline) -> list[Exchange]:
    return timeline.exchanges(DEV, Endpoint.DOWNLOAD)


def ranges(timeline: Timeline) -> list[str | None]:
    return [exchange.range for exchange in downloads(timeline)]


def chunk_ranges(size: int, start: int = 0) -> list[str]:
    return [f"bytes={a}-{min(a + CHUNK, size) - 1}" for a in range(start, size, CHUNK)]


def with_md5(package: Package, md5: str) -> Package:
    """The same bytes, announced with another md5 (what a corrupted transfer looks like to the
    device: the bytes it got do not hash to what detect said)."""
    announced = type("AnnouncedPackage", (Package,), {"md5": property(lambda self: md5)})
    return announced(package.data, package.filename)  # type: ignore[no-any-return]


def reported(onenet: MockOneNet) -> list[int]:
    return onenet.timeline.reported_codes(DEV)


# ------------------------------------------------------------------------------ good agent
def test_a_whole_update_installs_reboots_and_reports_201(onenet, board, package):
    agent = board()
    new_task(onenet, package)
    agent.start()
    assert agent.wait_exit() == 0, "it exits to reboot into the new image"
    phases = [exchange.phase for exchange in onenet.timeline.exchanges(DEV)]
    assert phases[:3] == [Endpoint.VERSION, Endpoint.DETECT, Endpoint.TOKEN_CHECK]
    detect = onenet.timeline.exchanges(DEV, Endpoint.DETECT)[0]
    assert "manuf=102&model=10201&type=2&version=1.0.0" in detect.target
    assert ranges(onenet.timeline) == chunk_ranges(package.size)
    assert all(e.status == 206 for e in downloads(onenet.timeline))
    assert reported(onenet) == [101]
    assert agent.primary == package.data, "the new image is in primary.bin before the reboot"

    agent.start()                                    # hil restarts a board that exited
    onenet.timeline.wait_for(lambda e: e.result == 201, dev_id=DEV, timeout=DEADLINE)
    # After the install's outcome, the check every start makes: its version report is how the
    # service (and a scenario on a board without a shell) hears what now runs.
    version = onenet.timeline.wait_for(
        lambda e: e.phase is Endpoint.VERSION and e.seq > reported_at(onenet, 201),
        dev_id=DEV, timeout=DEADLINE)
    assert b'"s_version":"1.1.0"' in version.request_body.encode()
    onenet.timeline.wait_for(lambda e: e.phase is Endpoint.DETECT and e.seq > version.seq,
                             dev_id=DEV, timeout=DEADLINE)
    second_boot = agent.wait_line("ota end", after=len(agent.boots()[0]))
    agent.wait_line("ota end", after=second_boot + 1)
    assert reported(onenet) == [101, 201]
    assert onenet.service.task(DEV).state is TaskState.SUCCEEDED
    assert agent.boots()[1][1] == "boot version=1.1.0"
    assert agent.stop() == 0, "SIGTERM ends it cleanly"
    assert "ota phase=flash bytes=66192" in agent.boots()[0]


def reported_at(onenet: MockOneNet, result: int) -> int:
    """The timeline number of the first report of ``result``."""
    return next(e.seq for e in onenet.timeline.exchanges(DEV, Endpoint.REPORT)
                if e.result == result)


def test_a_power_cut_during_the_install_copies_the_image_again_at_the_next_start(
        onenet, board, package):
    """The install writes primary.bin page by page, announced (``ota phase=flash bytes=N``) and
    taking a flash's time: a power cut in the middle leaves half an image, and the next start
    copies the intact secondary.bin again, announcing it again, then boots the target (as
    MCUboot's overwrite upgrade resumes), and reports 201 once."""
    agent = board()
    agent.env["HIL_FLASH_PAGE_MS"] = "200"           # 17 pages: ~3.4 s to cut into
    new_task(onenet, package)
    agent.start()
    agent.wait_line("ota phase=flash bytes=66192")
    agent.power_cut()
    assert agent.primary != package.data, "the cut came after the copy (machine too slow?)"

    agent.env["HIL_FLASH_PAGE_MS"] = "0"
    agent.start()
    agent.wait_line("boot version=1.1.0")
    restart = agent.boots()[1]
    assert restart[1] == "ota phase=flash bytes=66192", restart
    assert restart.index("I: bootloader: copied 66192 of 66192 bytes") < \
        restart.index("boot version=1.1.0")
    assert agent.primary == package.data
    onenet.timeline.wait_for(lambda e: e.result == 201, dev_id=DEV, timeout=DEADLINE)
    assert reported(onenet) == [101, 201]


def test_it_reexecutes_itself_when_asked_to_reboot_in_place(onenet, board, package):
    agent = board()
    agent.env["HIL_AGENT_REBOOT"] = "exec"
    new_task(onenet, package)
    agent.start()
    onenet.timeline.wait_for(lambda e: e.result == 201, dev_id=DEV, timeout=DEADLINE)
    # the service can hear the 201 before the reader thread has the boot line out of the pipe
    agent.wait_line("boot version=1.1.0")
    assert agent.running, "one process throughout"
    assert "boot version=1.1.0" in agent.boots()[1]


def kill_at(onenet: MockOneNet, agent: Agent, offset: int) -> threading.Event:
    """Cut the agent's power when it asks for the range at ``offset``, before it is answered
    (the timeline records an exchange before its answer goes out)."""
    done = threading.Event()

    def listener(exchange: Exchange) -> None:
        if not done.is_set() and exchange.phase is Endpoint.DOWNLOAD \
                and exchange.range == f"bytes={offset}-{offset + CHUNK - 1}":
            assert agent.process is not None
            agent.process.send_signal(signal.SIGKILL)
            done.set()

    onenet.timeline.subscribe(listener)
    return done


def test_a_power_cut_mid_download_resumes_at_the_stored_offset(onenet, board, package):
    agent = board()
    new_task(onenet, package)
    killed = kill_at(onenet, agent, 2 * CHUNK)      # the third range
    agent.start()
    assert killed.wait(DEADLINE)
    assert agent.wait_exit() == -signal.SIGKILL
    before = len(downloads(onenet.timeline))
    assert before == 3

    agent.start()
    assert agent.wait_exit() == 0
    after = ranges(onenet.timeline)[before:]
    assert after == chunk_ranges(package.size, 2 * CHUNK), "resumed where the flash said"
    assert "I: agent: resuming the download at offset 8192" in agent.boots()[1]
    assert reported(onenet) == [101]
    agent.start()
    onenet.timeline.wait_for(lambda e: e.result == 201, dev_id=DEV, timeout=DEADLINE)


def test_an_md5_mismatch_is_205_and_nothing_is_installed(onenet, board, package):
    agent = board()
    new_task(onenet, with_md5(package, "0" * 32))
    agent.start()
    end = agent.wait_line("ota end")
    assert reported(onenet) == [101, 205]
    assert "ota phase=verify md5=bad" in agent.log[:end]
    assert not any(line.startswith("ota phase=flash") for line in agent.log)
    assert agent.primary == (IMAGES / "nrf52832-1.0.0.bin").read_bytes()
    assert agent.running, "idle, not rebooting"
    assert agent.stop() == 0


def test_an_image_of_another_version_is_reported_204(onenet, board, package):
    agent = board()
    new_task(onenet, package, target="1.2.0")       # the package carries 1.1.0
    agent.start()
    assert agent.wait_exit() == 0
    agent.start()
    onenet.timeline.wait_for(lambda e: e.phase is Endpoint.REPORT and e.result == 204,
                             dev_id=DEV, timeout=DEADLINE)
    assert reported(onenet) == [101, 204]


def test_an_answer_that_is_not_the_range_asked_for_is_retried(onenet, board, package):
    with Gateway(onenet.url) as gateway:
        agent = board(url=gateway.url)
        gateway.arm(Fault(FaultKind.WHOLE_FILE, phase=Endpoint.DOWNLOAD, index=2))
        new_task(onenet, package, retry=1)
        agent.start()
        assert agent.wait_exit() == 0
        asked = [e.range for e in gateway.timeline.exchanges(DEV, Endpoint.DOWNLOAD)]
        assert asked[:3] == chunk_ranges(package.size)[:1] + chunk_ranges(package.size)[1:2] * 2
        assert reported(onenet) == [101]
        assert agent.primary == package.data


def test_download_errors_are_retried_up_to_the_tasks_retry_then_107(onenet, board, package):
    with Gateway(onenet.url) as gateway:
        agent = board(url=gateway.url)
        gateway.arm(Fault(FaultKind.ERROR_BYTE, phase=Endpoint.DOWNLOAD, code=4, count=None))
        new_task(onenet, package, retry=2)
        agent.start()
        agent.wait_line("ota end")
        assert len(gateway.timeline.exchanges(DEV, Endpoint.DOWNLOAD)) == 3   # 1 + 2 retries
        assert reported(onenet) == [107]


def test_an_image_that_is_not_bootable_is_a_board_that_does_not_boot(board):
    agent = board()
    (agent.state_dir / "primary.bin").write_bytes(b"\xff" * 1024)
    agent.start()
    assert agent.wait_exit() == 1
    assert agent.log[-1] == ("E: no bootable image in primary.bin: not an MCUboot image: "
                             "magic 0xffffffff, expected 0x96f3b83d")


# ------------------------------------------------------------------------------ defects
def test_defect_skips_md5_installs_what_failed_its_md5(onenet, board, package):
    agent = board("SKIPS_MD5")
    new_task(onenet, with_md5(package, "0" * 32))
    agent.start()
    assert agent.wait_exit() == 0
    assert reported(onenet) == [101], "no 205"
    assert agent.primary == package.data
    agent.start()
    agent.wait_line("boot version=1.1.0")


def test_defect_restarts_download_starts_at_0_after_a_power_cut(onenet, board, package):
    agent = board("RESTARTS_DOWNLOAD")
    new_task(onenet, package)
    killed = kill_at(onenet, agent, 2 * CHUNK)
    agent.start()
    assert killed.wait(DEADLINE)
    agent.wait_exit()
    agent.start()
    assert agent.wait_exit() == 0
    assert ranges(onenet.timeline)[3:] == chunk_ranges(package.size)


def test_defect_early_101_reports_before_the_package_is_whole(onenet, board, package):
    agent = board("EARLY_101")
    new_task(onenet, package)
    agent.start()
    assert agent.wait_exit() == 0
    phases = [(e.phase, e.result) for e in onenet.timeline.exchanges(DEV)]
    first_101 = phases.index((Endpoint.REPORT, 101))
    assert phases[first_101 - 1] == (Endpoint.DOWNLOAD, None)
    assert (Endpoint.DOWNLOAD, None) in phases[first_101 + 1:], "downloads after its 101"


def test_defect_no_boot_report_never_reports_after_the_reboot(onenet, board, package):
    agent = board("NO_BOOT_REPORT")
    new_task(onenet, package)
    agent.start()
    assert agent.wait_exit() == 0
    agent.start()
    agent.wait_line("ota end", after=len(agent.log))
    assert "boot version=1.1.0" in agent.boots()[1]
    # Its check after the reboot tells the service the version it runs (which completes the
    # task there, as OneNET's does); the 201 it owed never comes.
    onenet.timeline.wait_for(lambda e: e.phase is Endpoint.VERSION and "1.1.0" in e.request_body,
                             dev_id=DEV, timeout=DEADLINE)
    assert reported(onenet) == [101]


def test_defect_201_on_old_image_claims_success_on_the_wrong_version(onenet, board, package):
    agent = board("201_ON_OLD_IMAGE")
    new_task(onenet, package, target="1.2.0")
    agent.start()
    assert agent.wait_exit() == 0
    agent.start()
    onenet.timeline.wait_for(lambda e: e.phase is Endpoint.REPORT and e.result == 201,
                             dev_id=DEV, timeout=DEADLINE)
    assert reported(onenet) == [101, 201]


def test_defect_trusts_any_2xx_writes_a_whole_file_answer_at_the_chunk(onenet, board, package):
    with Gateway(onenet.url) as gateway:
        agent = board("TRUSTS_ANY_2XX", url=gateway.url)
        gateway.arm(Fault(FaultKind.WHOLE_FILE, phase=Endpoint.DOWNLOAD, index=2))
        new_task(onenet, package, retry=1)
        agent.start()
        agent.wait_line("ota end")
        assert len(gateway.timeline.exchanges(DEV, Endpoint.DOWNLOAD)) == 2, "took it as whole"
        assert reported(onenet) == [101, 205]


def test_defect_retries_forever_ignores_the_tasks_retry(onenet, board, package):
    with Gateway(onenet.url) as gateway:
        agent = board("RETRIES_FOREVER", url=gateway.url)
        gateway.arm(Fault(FaultKind.ERROR_BYTE, phase=Endpoint.DOWNLOAD, code=4, count=None))
        new_task(onenet, package, retry=2)
        agent.start()
        gateway.timeline.wait_for(lambda e: e.phase is Endpoint.DOWNLOAD and e.seq > 0
                                  and len(gateway.timeline.exchanges(DEV, Endpoint.DOWNLOAD))
                                  >= 8, dev_id=DEV, timeout=DEADLINE)
        assert reported(onenet) == []
        assert agent.stop() == 0


def test_the_defect_builds_name_their_defects_at_start(board):
    agent = board("SKIPS_MD5", "EARLY_101")
    (agent.state_dir / "primary.bin").unlink()
    agent.start()
    assert agent.wait_exit() == 1
    assert agent.log[0] == "I: onenet-agent (nrf52832, MCUboot) starting; defects: early-101 " \
                           "skips-md5"


def test_the_authorization_is_hils_to_the_byte(onenet, board, package):
    """The mock checks every signature; here the header is also compared with hil's own."""
    onenet.service.add_device(DEV)
    agent = board()
    agent.start()
    agent.wait_line("ota end")
    detect = onenet.timeline.exchanges(DEV, Endpoint.DETECT)[0]
    sent = detect.request_headers["authorization"]
    et = int(sent.split("&et=")[1].split("&")[0])
    assert sent == onenet.authorization(et=et).rsplit("&sign=", 1)[0] + "&sign=<redacted>"
    assert detect.errno == 11, "signature accepted (a bad one is errno 1); no task: 11"


# ------------------------------------------------------------------------------ the suite
# A skip names what would run it: the firmware hook, or (a flash write that fails; a bootloader
# that tests, verifies and reverts images) a simulated board's flash or bootloader, for which the
# console contract has no hook and the host build no part.
HOOK_SKIP = re.compile(r"^rig host-agent has no shell: fault .+ needs ((.+ or )?the firmware hook "
                       r"`|a simulated board's (flash|bootloader))")


@pytest.mark.slow
def test_the_conformance_suite_passes_on_the_host_build_rig(tmp_path):
    """testcases/ unchanged on rigs/host-agent.yaml: the agent built by the rig, run as a board
    without a shell (each attempt started by a reset, read at the service, the power cut while
    flashing timed by its own `ota phase=flash` line). Every scenario passes, or skips naming the
    firmware hook it needs (the agent reads no battery or signal and has no `test space`), and
    those skips are the only coverage gaps."""
    results, junit = tmp_path / "results", tmp_path / "junit.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "testcases", "--hil-rig", "host-agent",
         f"--alluredir={results}", f"--junitxml={junit}", "-o", "junit_family=xunit2",
         "-p", "no:cacheprovider", "-p", "no:randomly", "-q", "-rfEs", "--no-header"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-6000:]
    assert "failed" not in summary, summary
    assert "error" not in summary, summary
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    skipped = {case.get("name", ""): skip.get("message", "") for case in cases
               if (skip := case.find("skipped")) is not None}
    wrong = {name: why for name, why in skipped.items() if not HOOK_SKIP.search(why)}
    assert not wrong, f"skips that do not name the firmware hook they need: {wrong}"
    assert len(cases) - len(skipped) >= 50, summary

    [board] = coverage_of(read_results([results]))
    assert board.board == "nrf52832"
    assert len(board.gaps) == len(skipped), [gap.text() for gap in board.gaps]
    assert all(HOOK_SKIP.search(gap.why.partition("skipped: ")[2]) for gap in board.gaps), \
        [gap.text() for gap in board.gaps]
