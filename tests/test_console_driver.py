"""The serial console driver end to end, against an emulated firmware on real ptys and sockets.

The only fake is the USB port listing in the serial-number tests; every byte goes through a real
pty or TCP socket and pyserial, as it does on a lab rig.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import serial
import serial.tools.list_ports
from contract_device import DEFAULT_OTA_EVENTS, ContractDevice, flood_lines

from hil.drivers.base import ConsoleProtocol
from hil.drivers.console import SerialConsole
from hil.drivers.contract import Event, parse_event
from hil.errors import CommandRefused, ConfigError, ExpectTimeout, RigFault

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def nothing_left_open() -> Iterator[None]:
    """Every reader and device thread a test started has ended when it is over, and every fd
    (ptys, sockets, pyserial's own pipes) is closed."""
    before = set(threading.enumerate())
    fds_before = open_fds()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        left = [thread for thread in threading.enumerate()
                if thread not in before and thread.is_alive()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not left, f"threads left running: {left}"
    assert open_fds() <= fds_before


@pytest.fixture(params=["pty", "tcp"])
def device(request: pytest.FixtureRequest) -> Iterator[ContractDevice]:
    with ContractDevice(request.param, version="1.2.0") as device:
        yield device


@pytest.fixture
def console(device: ContractDevice) -> Iterator[SerialConsole]:
    with SerialConsole(**device.where) as console:
        yield console


def texts(console: SerialConsole) -> list[str]:
    """What the device printed (the log also holds what the host sent, marked as such)."""
    return [line.text for line in console.lines() if not line.sent]


# -- opening ----------------------------------------------------------------------------------
def test_opens_a_pty_by_its_path() -> None:
    with ContractDevice("pty", version="3.1.4") as device, \
            SerialConsole(port=device.port) as console:
        assert console.name == device.port
        assert isinstance(console, ConsoleProtocol)
        assert console.command("sys version") == ["version=3.1.4"]


def test_opens_a_socket_url() -> None:
    with ContractDevice("tcp", version="3.1.4") as device, \
            SerialConsole(url=device.url) as console:
        assert console.name == device.url
        assert console.command("sys version") == ["version=3.1.4"]


@dataclass
class ListedPort:
    """What ``serial.tools.list_ports.comports()`` lists, as far as the driver looks."""

    device: str
    serial_number: str | None


def test_opens_by_usb_serial_number(monkeypatch: pytest.MonkeyPatch) -> None:
    with ContractDevice("pty", version="3.1.4") as device:
        monkeypatch.setattr(serial.tools.list_ports, "comports", lambda: [
            ListedPort("/dev/ttyS0", None), ListedPort(device.port, "HIL-0042")])
        with SerialConsole(serial_number="HIL-0042") as console:
            assert console.name == "HIL-0042"
            assert console.device == device.port
            assert console.command("sys version") == ["version=3.1.4"]


def test_unknown_serial_number_is_a_rig_fault_naming_it_and_the_ports_seen(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serial.tools.list_ports, "comports", lambda: [
        ListedPort("/dev/ttyUSB0", "A50285BI"), ListedPort("/dev/ttyS0", None)])
    console = SerialConsole(serial_number="HIL-0042")
    with pytest.raises(RigFault) as fault:
        console.open()
    assert fault.value.part == "console"
    assert "HIL-0042" in str(fault.value)
    assert "/dev/ttyUSB0 (A50285BI)" in str(fault.value)
    console.close()


def test_a_missing_port_is_a_rig_fault(tmp_path: Path) -> None:
    missing = str(tmp_path / "ttyUSB9")
    console = SerialConsole(port=missing)   # constructing touches nothing
    with pytest.raises(RigFault, match=re.escape(f"{missing}: cannot open")) as fault:
        console.open()
    assert fault.value.part == "console"


def test_a_refused_socket_is_a_rig_fault() -> None:
    with ContractDevice("tcp") as device:
        url = device.url
    with pytest.raises(RigFault, match=re.escape(f"{url}: cannot open")):
        SerialConsole(url=url).open()


def test_a_port_another_session_holds_is_a_rig_fault() -> None:
    """Device paths are locked: two sessions on one console would each miss half its lines."""
    with ContractDevice("pty") as device, SerialConsole(port=device.port) as first, \
            pytest.raises(RigFault, match="cannot open"):
        SerialConsole(port=device.port).open()
    assert first.lines() == []


@pytest.mark.parametrize("where", [{}, {"port": "/dev/ttyUSB0", "url": "loop://"}])
def test_exactly_one_of_port_url_or_serial_number(where: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="exactly one of port, url or serial_number"):
        SerialConsole(**where)


def test_opens_a_custom_url_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """How a simulated board plugs in: a handler package registered with pyserial."""
    package = tmp_path / "hil_test_handlers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "protocol_hilecho.py").write_text(
        "from serial.urlhandler.protocol_loop import Serial\n"
        "def serial_class_for_url(url):\n"
        "    return 'loop://', Serial\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(serial, "protocol_handler_packages",
                        [*serial.protocol_handler_packages, "hil_test_handlers"])
    monkeypatch.delitem(sys.modules, "hil_test_handlers", raising=False)
    with SerialConsole(url="hilecho://bench") as console:
        console.send("echoed back")
        assert console.expect(r"^echoed (\w+)$", timeout=5).group(1) == "back"


# -- commands ---------------------------------------------------------------------------------
def test_command_returns_the_lines_before_ok(console: SerialConsole) -> None:
    assert console.command("sys version") == ["version=1.2.0"]
    assert console.command("ota server http://127.0.0.1:8080") == []


def test_command_records_fault_hooks_at_the_device(
        device: ContractDevice, console: SerialConsole) -> None:
    for line in ("test power 5", "test signal -97", "test space 1024", "test power 80"):
        assert console.command(line) == []
    console.command("ota server http://gw.local:8080/ota")
    assert device.hooks == {"power": [5, 80], "signal": [-97], "space": [1024]}
    assert device.ota_server == "http://gw.local:8080/ota"
    assert device.received[:2] == ["test power 5", "test signal -97"]


def test_err_is_command_refused_with_the_reason(console: SerialConsole) -> None:
    with pytest.raises(CommandRefused) as refused:
        console.command("ota frobnicate")
    assert refused.value.command == "ota frobnicate"
    assert refused.value.reason == "unknown command"
    with pytest.raises(CommandRefused, match="not a number: lots"):
        console.command("test power lots")
    assert console.command("sys version") == ["version=1.2.0"]   # the shell still answers


def test_command_skips_output_from_before_it(
        device: ContractDevice, console: SerialConsole) -> None:
    device.say("version=0.0.1", "OK")   # a stale answer from before the command
    console.expect(r"^OK$")
    assert console.command("sys version") == ["version=1.2.0"]


def _logged(console: SerialConsole, text: str, timeout: float = 5.0) -> None:
    """Wait until the console has logged a line holding ``text`` (without reading it)."""
    deadline = time.monotonic() + timeout
    while not any(text in line.text for line in console.lines()):
        assert time.monotonic() < deadline, f"{text!r} never arrived"
        time.sleep(0.01)


def test_a_command_that_keeps_the_cursor_leaves_unread_events_to_expect(
        device: ContractDevice, console: SerialConsole) -> None:
    device.say("ota phase=download offset=0 status=206")
    console.expect(r"^OK$|^ota phase=download", timeout=5)      # read up to here
    device.say("ota phase=download offset=4096 status=206")
    _logged(console, "offset=4096")
    # A fault hook from another thread, while the test is between two expects.
    assert console.command("test power 20", keep_cursor=True) == []
    assert console.expect(r"^ota phase=download offset=(\d+)", timeout=5).group(1) == "4096"
    # Without keep_cursor the command skips what came before it, as documented.
    device.say("ota phase=download offset=8192 status=206")
    _logged(console, "offset=8192")
    console.command("test power 30")
    with pytest.raises(ExpectTimeout):
        console.expect(r"^ota phase=download offset=8192", timeout=0.3)


def test_ota_check_then_expect_the_events_in_order(console: SerialConsole) -> None:
    console.command("ota check")
    events = []
    while not events or events[-1].tag != "ota end":
        event = parse_event(console.expect(r"^ota ", timeout=5).string)
        assert event is not None
        events.append(event)
    assert [event.fields.get("phase") for event in events] == [
        "detect", "token", "download", "download", "verify", "report", None]
    assert events[3].fields == {"phase": "download", "offset": "4096", "status": "206"}


def test_reboot_prints_the_boot_line(console: SerialConsole) -> None:
    console.command("sys reboot")
    assert console.expect(r"^boot version=(\S+)$").group(1) == "1.2.0"


def test_command_on_a_silent_shell_times_out_naming_the_command(
        device: ContractDevice, console: SerialConsole) -> None:
    device.go_silent()
    started = time.monotonic()
    with pytest.raises(ExpectTimeout, match=r"'sys version'") as timeout:
        console.command("sys version", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert device.received == ["sys version"]   # it was sent; nobody answered
    assert console.name in str(timeout.value)


def test_custom_ok_and_err_patterns_drive_another_shell() -> None:
    with ContractDevice("pty", version="7.0", ok_line="done", err_line="fail: {reason}") \
            as device, SerialConsole(port=device.port, ok_pattern=r"^done$",
                                     err_pattern=r"^fail: (?P<reason>.*)$") as console:
        assert console.command("sys version") == ["version=7.0"]
        with pytest.raises(CommandRefused) as refused:
            console.command("sys frobnicate")
        assert refused.value.reason == "unknown command"


def test_send_writes_one_line_with_the_line_ending(
        device: ContractDevice, console: SerialConsole) -> None:
    console.send("hello there")
    device.wait_received("hello there")
    with pytest.raises(ValueError, match="one line at a time"):
        console.send("two\nlines")


def test_a_device_that_stops_reading_stalls_send_into_a_rig_fault(
        device: ContractDevice) -> None:
    with SerialConsole(**device.where, write_timeout=0.2) as console:
        console.command("sys version")
        device.go_deaf()
        started = time.monotonic()
        with pytest.raises(RigFault, match=r"stalled for 0\.2 s"):
            send_until_it_stalls(console)
        assert time.monotonic() - started < 10.0


def send_until_it_stalls(console: SerialConsole) -> None:
    for _ in range(20_000):   # 20 MB: far more than any pty or socket buffers
        console.send("x" * 1000)


# -- expect and the log -----------------------------------------------------------------------
def test_a_line_is_matched_once(device: ContractDevice, console: SerialConsole) -> None:
    device.say("ready 1", "noise", "ready 2")
    assert console.expect(r"^ready (\d)$").group(1) == "1"
    assert console.expect(r"^ready (\d)$").group(1) == "2"
    with pytest.raises(ExpectTimeout):
        console.expect(r"^ready (\d)$", timeout=0.2)


def test_expect_since_a_mark_looks_back(device: ContractDevice, console: SerialConsole) -> None:
    mark = console.mark()
    device.say("boot version=1.2.0", "wifi up")
    console.expect(r"^wifi up$")   # the cursor passes the boot line
    with pytest.raises(ExpectTimeout):
        console.expect(r"^boot ", timeout=0.1)
    assert console.expect(r"^boot version=(\S+)", since=mark).group(1) == "1.2.0"


def test_expect_timeout_names_the_console_and_pattern_and_shows_the_tail(
        device: ContractDevice, console: SerialConsole) -> None:
    device.say(*(f"line {index:02d}" for index in range(30)))
    console.expect(r"^line 29$")
    started = time.monotonic()
    with pytest.raises(ExpectTimeout) as timeout:
        console.expect(r"^ota phase=\w+ result=(\d+)", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0
    message = str(timeout.value)
    assert console.name in message
    assert r"^ota phase=\w+ result=(\d+)" in message
    assert re.search(rf"^{STAMP}   line 29$", message, re.MULTILINE)
    assert "line 10" in message
    assert "line 09" not in message


def test_expect_timeout_on_a_silent_console_says_nothing_came(console: SerialConsole) -> None:
    with pytest.raises(ExpectTimeout, match="nothing was received"):
        console.expect("anything", timeout=0.1)


def test_the_log_keeps_every_line_stamped_in_order(
        device: ContractDevice, console: SerialConsole, tmp_path: Path) -> None:
    started = time.time()
    console.command("sys version")
    device.write_raw(b"crlf line\r\nbare line\n")
    device.say("second batch")
    console.expect("^second batch$")
    device.write_raw(b"late line\n", delay=0.05)
    console.expect("^late line$")
    ended = time.time()

    assert texts(console) == ["version=1.2.0", "OK", "crlf line", "bare line", "second batch",
                              "late line"]
    assert [line.text for line in console.lines() if line.sent] == ["sys version"]
    stamps = [line.at for line in console.lines()]
    assert stamps == sorted(stamps)
    assert started <= stamps[0]
    assert stamps[-1] <= ended
    assert stamps[-1] - stamps[-2] >= 0.04   # stamped when it came, not when it was read

    text = console.log_text()
    rows = text.splitlines()
    assert len(rows) == 7
    assert all(re.fullmatch(rf"{STAMP} [ >] .*", row) for row in rows)
    assert rows[0].endswith(" > sys version")     # the command, before its answer
    assert rows[1].endswith("   version=1.2.0")
    first = datetime.fromisoformat(rows[0].split(" ")[0]).timestamp()
    assert abs(first - stamps[0]) < 0.001

    saved = console.save_log(tmp_path / "console.log")
    assert saved.read_text(encoding="utf-8") == text


def test_a_921600_baud_flood_of_2_mb_loses_nothing(device: ContractDevice) -> None:
    lines = flood_lines(2 * 1024 * 1024)
    with SerialConsole(**device.where, baudrate=921600) as console:
        device.flood(lines)
        console.expect(re.escape(lines[-1]), timeout=60)
        received = texts(console)
    assert len(received) == len(lines)
    assert received == lines


# -- the port going away ----------------------------------------------------------------------
def test_a_port_vanishing_mid_expect_is_a_rig_fault_not_a_timeout(
        device: ContractDevice, console: SerialConsole) -> None:
    device.say("boot version=1.2.0", "ota phase=download offset=0 status=206")
    console.expect("^ota phase=download")
    device.vanish(delay=0.2)
    started = time.monotonic()
    with pytest.raises(RigFault, match="port vanished") as fault:
        console.expect(r"^ota end$", timeout=10)
    assert time.monotonic() - started < 3.0
    assert fault.value.part == "console"
    assert console.name in str(fault.value)
    assert "ota phase=download offset=0" in str(fault.value)   # the tail is shown
    assert texts(console) == ["boot version=1.2.0", "ota phase=download offset=0 status=206"]

    with pytest.raises(RigFault, match="port vanished"):
        console.command("sys version")
    with pytest.raises(RigFault, match="port vanished"):
        console.send("sys version")


def test_lines_that_came_before_the_cut_still_match(
        device: ContractDevice, console: SerialConsole) -> None:
    device.say("ota end")
    device.vanish(delay=0.2)
    time.sleep(0.5)
    assert console.expect("^ota end$").string == "ota end"
    with pytest.raises(RigFault, match="port vanished"):
        console.expect("^boot ", timeout=10)


def test_a_line_cut_short_by_a_vanishing_socket_is_kept() -> None:
    with ContractDevice("tcp") as device, SerialConsole(url=device.url) as console:
        device.write_raw(b"whole line\nhalf a li")
        device.vanish(delay=0.2)
        with pytest.raises(RigFault, match="port vanished"):
            console.expect("^never$", timeout=10)
        assert texts(console) == ["whole line", "half a li"]


def test_close_twice_and_the_log_outlives_the_port(device: ContractDevice) -> None:
    console = SerialConsole(**device.where)
    console.close()   # never opened: nothing to do
    console.open()
    console.command("sys version")
    console.close()
    console.close()
    assert texts(console) == ["version=1.2.0", "OK"]
    with pytest.raises(RigFault, match="not open"):
        console.expect("^OK$", timeout=1)
    with pytest.raises(RigFault, match="not open"):
        console.send("sys version")


def test_reopening_continues_the_log(device: ContractDevice) -> None:
    console = SerialConsole(**device.where)
    with console:
        console.command("sys version")
    with console:
        assert console.command("sys reboot") == []
        console.expect("^boot version=1.2.0$")
    assert texts(console) == ["version=1.2.0", "OK", "OK", "boot version=1.2.0"]


def test_close_after_the_port_vanished(device: ContractDevice) -> None:
    console = SerialConsole(**device.where)
    console.open()
    device.vanish()
    with pytest.raises(RigFault, match="port vanished"):
        console.expect("never", timeout=10)
    console.close()
    console.close()


# -- events -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("line", "event"), [
    ("ota phase=download offset=4096 status=206",
     Event("ota", {"phase": "download", "offset": "4096", "status": "206"})),
    ("ota phase=detect errno=0 target=V2 size=65536",
     Event("ota", {"phase": "detect", "errno": "0", "target": "V2", "size": "65536"})),
    ("ota phase=report result=101 errno=0",
     Event("ota", {"phase": "report", "result": "101", "errno": "0"})),
    ("boot version=1.2.0", Event("boot", {"version": "1.2.0"})),
    ("ota end", Event("ota end", {})),
    ("  boot version=V  ", Event("boot", {"version": "V"})),
])
def test_parse_event_reads_the_contract_events(line: str, event: Event) -> None:
    assert parse_event(line) == event


@pytest.mark.parametrize("line", [
    "", "OK", "ERR unknown command", "version=1.2.0", "I (312) wifi: connected",
    "ota phase=download offset", "ota phase=download then words",
])
def test_parse_event_rejects_what_is_not_an_event(line: str) -> None:
    assert parse_event(line) is None


def test_every_default_ota_event_parses() -> None:
    assert all(parse_event(line) is not None for line in DEFAULT_OTA_EVENTS)
