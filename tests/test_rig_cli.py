"""hil rigs / rigs check / flash / console, and the board fixture, against emulated rig parts.

The parts are emulated on real ptys and TCP sockets (tests/contract_device.py for the firmware's
console, tests/scpi_instrument.py for the supply and the attenuator); hil runs as a user runs it,
in a subprocess, and opens them by path or URL like real ones.
"""

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from contract_device import ContractDevice
from scpi_instrument import EmulatedAttenuator, EmulatedSupply, PtyServer, TcpServer

ROOT = Path(__file__).resolve().parents[1]
HIL = [sys.executable, "-m", "hil.cli"]


def hil(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HIL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def rig_file(rigs: Path, name: str, body: str) -> Path:
    rigs.mkdir(exist_ok=True)
    path = rigs / f"{name}.yaml"
    path.write_text(f"name: {name}\nidentity: {{product_id: '245528', dev_id: '1'}}\n{body}")
    return path


@pytest.fixture
def device():
    with ContractDevice("pty", version="1.0.0") as device:
        yield device


def test_rigs_lists_the_lab_examples_and_the_simulated_rigs():
    result = hil("rigs")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"lab-esp32", "lab-gd32", "lab-nrf52832",
                          "sim-esp32", "sim-gd32", "sim-nrf52832", "host-agent",
                          "sim-esp32-shipped", "sim-gd32-shipped", "sim-nrf52832-shipped"}
    assert "flasher=process power=process" in lines["host-agent"]
    assert "nrf52832" in lines["lab-nrf52832"]
    assert lines["lab-nrf52832"].endswith("can: console flasher power power_cut rf space")
    assert "flasher=esp" in lines["lab-esp32"]


def test_rigs_marks_an_invalid_file_and_fails(tmp_path):
    rig_file(tmp_path / "rigs", "good", "board: gd32\nconsole: {url: 'loop://'}\n")
    bad = rig_file(tmp_path / "rigs", "bad", "board: esp32\nconsole: {url: 'loop://'}\n"
                                             "flasher: {kind: swd, probe: '1'}\n")
    result = hil("rigs", "--rigs-dir", str(tmp_path / "rigs"))
    assert result.returncode == 1
    assert f"bad              INVALID  {bad}: flasher.kind: esp32 has no SWD port" in result.stdout
    assert any(line.startswith("good ") for line in result.stdout.splitlines())


def test_rigs_check_passes_when_every_part_answers(tmp_path, device):
    supply, attenuator = EmulatedSupply(), EmulatedAttenuator("scpi", max_db=63.0)
    with TcpServer(supply) as supply_port, PtyServer(attenuator) as attenuator_port:
        rig_file(tmp_path / "rigs", "bench-01", f"""board: nrf52832
console: {{port: {device.port}}}
power: {{kind: scpi, url: "{supply_port.url}"}}
rf: {{kind: attenuator, url: "{attenuator_port.url}", max_db: 63}}
""")
        result = hil("rigs", "check", "--rigs-dir", str(tmp_path / "rigs"), "bench-01")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"bench-01         console  ok     {device.port}, firmware 1.0.0",
        f"bench-01         power    ok     {supply.idn}",
        f"bench-01         rf       ok     {attenuator.idn}",
    ]


def test_rigs_check_explains_each_problem_in_one_line(tmp_path):
    rigs = tmp_path / "rigs"
    rig_file(rigs, "bench-01", """board: nrf52832
console: {port: /dev/hil-no-such-port}
flasher: {kind: swd, probe: "0123456789AB"}
power: {kind: scpi, url: "socket://127.0.0.1:9"}
""")
    bad = rig_file(rigs, "bench-02", "board: nrf52832\nconsole: {port: /dev/x, url: 'loop://'}\n")
    result = hil("rigs", "check", "--rigs-dir", str(rigs))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout   # console, flasher, power of bench-01; bench-02's file
    console, flasher, power, file = lines
    assert console.startswith("bench-01         console  FAULT  /dev/hil-no-such-port")
    assert flasher.startswith("bench-01         flasher  FAULT  SWD probe 0123456789AB not found")
    assert power.startswith("bench-01         power    FAULT  socket://127.0.0.1:9")
    assert file == (f"bench-02         file     FAULT  {bad}: console: give exactly one of port, "
                    "url or serial_number (got port, url)")
    assert "Traceback" not in result.stdout + result.stderr


def test_flash_refuses_a_rig_without_flasher_and_reports_a_missing_probe(tmp_path):
    rigs = tmp_path / "rigs"
    rig_file(rigs, "plain", "board: gd32\nconsole: {url: 'loop://'}\n")
    rig_file(rigs, "swd", "board: nrf52832\nconsole: {url: 'loop://'}\n"
                          "flasher: {kind: swd, probe: '0123456789AB'}\n")
    image = tmp_path / "app.hex"
    image.write_text(":00000001FF\n")
    none = hil("flash", "--rigs-dir", str(rigs), "--rig", "plain", str(image))
    assert none.returncode == 2
    assert none.stderr == "hil flash: error: rig plain has no flasher (flasher.kind: none)\n"
    missing = hil("flash", "--rigs-dir", str(rigs), "--rig", "swd", str(image))
    assert missing.returncode == 1
    assert missing.stderr.startswith("hil flash: rig swd: flasher: SWD probe 0123456789AB not "
                                     "found")
    no_image = hil("flash", "--rigs-dir", str(rigs), "--rig", "swd", str(tmp_path / "x.hex"))
    assert no_image.returncode == 2
    assert "no such image" in no_image.stderr


def read_until(fd: int, text: str, timeout: float = 10.0) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{text!r} not seen; got {seen!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            seen += os.read(fd, 4096)
    return seen.decode(errors="replace")


def test_console_is_an_interactive_terminal_on_the_rigs_console(tmp_path, device):
    rig_file(tmp_path / "rigs", "bench-01", f"board: gd32\nconsole: {{port: {device.port}}}\n")
    # The user's terminal is a pty too: miniterm needs a real tty to read keys from.
    user, terminal = os.openpty()
    process = subprocess.Popen([*HIL, "console", "--rigs-dir", str(tmp_path / "rigs"),
                                "--rig", "bench-01"], stdin=terminal, stdout=terminal,
                               stderr=terminal, cwd=ROOT)
    try:
        read_until(user, "quit with Ctrl-]")
        os.write(user, b"sys version\n")
        read_until(user, "version=1.0.0")
        device.wait_received("sys version")
        os.write(user, b"\x1d")   # Ctrl-]
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(user)
        os.close(terminal)


def test_board_fixture_restores_the_base_and_drives_the_contract(pytester, device):
    rigs = pytester.path / "rigs"
    rig_file(rigs, "bench-01", f"""board: nrf52832
console: {{port: {device.port}}}
power: {{kind: console}}
rf: {{kind: console}}
""")
    pytester.makepyfile(test_board="""
        def test_update(board, power, rf):
            assert board.version() == "1.0.0"
            power.set_level(30)
            rf.set_signal(12)
            board.set_free_space(1024)
            board.point_at("http://127.0.0.1:9999")
            board.start_update()
            events = board.wait_update_end(timeout=10)
            assert [e.fields.get("phase") for e in events][:2] == ["detect", "token"]
            assert events[-1].fields == {"phase": "report", "result": "101", "errno": "0"}
            assert len(events) == 6   # every event the device printed before `ota end`
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hil-rig", "bench-01",
                                           "--hil-lease-dir", str(pytester.path / "leases"))
    result.assert_outcomes(passed=1)
    # The base state came first: is the board awake, then (no flasher) its factory reset.
    assert device.received[:2] == ["sys version", "test factory"]
    assert device.hooks == {"power": [30], "signal": [12], "space": [1024]}
    assert device.ota_server == "http://127.0.0.1:9999"


def test_a_failing_test_shows_the_console_log_with_the_commands(pytester, device):
    rig_file(pytester.path / "rigs", "bench-01", f"board: gd32\nconsole: {{port: {device.port}}}\n")
    pytester.makepyfile(test_board="""
        def test_wrong_version(board):
            assert board.version() == "9.9.9"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hil-rig", "bench-01",
                                           "--hil-lease-dir", str(pytester.path / "leases"))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Captured console bench-01 call*",
                                 "* > test factory", "* > sys version", "*   version=1.0.0"])
