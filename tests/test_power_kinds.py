"""Power without a bench supply: a USB hub port (uhubctl), a relay or PDU through its commands.

Everything here runs real programs: Debian's uhubctl (installed by .ci/run; this machine has no
USB hub, so the real one can only say it finds none), a fake ``uhubctl`` put first on PATH that
prints what uhubctl prints (its status lines, as uhubctl.c words them) and records the
arguments it was run with, and relay scripts written into the test's directory that keep their
state in a file. What the real uhubctl does to a real hub's port is not exercised here.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from contract_device import ContractDevice

from hil.configfile import validate
from hil.drivers.power import power_cycle
from hil.drivers.switched import CommandLinePower, UsbHubPortPower, parse_uhubctl
from hil.errors import ConfigError, RigFault
from hil.faults.catalog import needs_a_shell
from hil.rig.board import Board
from hil.rig.model import Rig
from hil.rig.parts import RigParts

ROOT = Path(__file__).resolve().parents[1]
HIL = [sys.executable, "-m", "hil.cli"]
HUB_DESCRIPTION = "2109:2817 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 4 ports, ppps"
STLINK = "0483:374b STMicroelectronics STM32 STLink 0669FF"


def hil(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HIL, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def rig(power: dict[str, Any], *, shell: str = "contract", console: str = "/dev/hil-unused",
        **more: Any) -> Rig:
    document = {"name": "bench-usb", "board": "esp32",
                "identity": {"product_id": "245528", "dev_id": "1"},
                "console": {"port": console, "shell": shell}, "power": power, **more}
    return validate(Rig, document, "bench-usb.yaml")


def rig_file(rigs: Path, body: str, name: str = "bench-usb") -> Path:
    rigs.mkdir(exist_ok=True)
    path = rigs / f"{name}.yaml"
    path.write_text(f"name: {name}\nboard: esp32\nidentity: {{product_id: '245528', "
                    f"dev_id: '1'}}\n{body}")
    return path


# ------------------------------------------------------------------------------ the rig file
def test_the_rig_file_keys_of_both_kinds():
    hub = rig({"kind": "usb-hub", "hub": "1-1.4", "port": 2})
    assert (hub.power.hub, hub.power.port, hub.power.uhubctl, hub.power.off_s) == \
        ("1-1.4", 2, ("uhubctl",), 2.0)
    # A bare on/off key is a boolean in YAML 1.1: the rig file says it as a user writes it.
    relay = yaml.safe_load("""
        kind: command
        on: relay --port 3 on
        off: [relay, --port, "3", "off"]
        status: "relay --port 3 'state of'"
        off_s: 1.5
    """)
    assert True in relay
    assert False in relay
    power = rig(relay).power
    assert power.on == ("relay", "--port", "3", "on")
    assert power.off == ("relay", "--port", "3", "off")
    assert power.status == ("relay", "--port", "3", "state of")
    assert power.cycle is None
    assert power.off_s == 1.5


@pytest.mark.parametrize(("power", "key", "says"), [
    ({"kind": "usb-hub", "hub": "usb1", "port": 2}, "power.hub", "not a hub location"),
    ({"kind": "usb-hub", "hub": "1-1", "port": 15}, "power.port", "less than or equal to 14"),
    ({"kind": "usb-hub", "hub": "1-1", "port": 2, "uhubctl": ""}, "power.uhubctl",
     "an empty command"),
    ({"kind": "command", "on": "relay 'on", "off": "relay off"}, "power.on",
     "is not a command line (No closing quotation)"),
    ({"kind": "command", "on": [], "off": "relay off"}, "power.on", "an empty command"),
    ({"kind": "command", "on": "relay on"}, "power.off", "Field required"),
    ({"kind": "command", "on": "a", "off": "b", "timeout": 0}, "power.timeout",
     "greater than 0"),
    ({"kind": "relay"}, "power", "kind must be one of scpi, usb-hub, command, console"),
])
def test_a_mistake_in_a_power_section_is_one_line_naming_the_key(power, key, says):
    with pytest.raises(ConfigError) as caught:
        rig(power)
    assert str(caught.value).startswith(f"bench-usb.yaml: {key}: ")
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("power", [{"kind": "usb-hub", "hub": "1-1", "port": 1},
                                   {"kind": "command", "on": "relay on", "off": "relay off"}])
def test_a_switch_cuts_and_sets_a_level_only_through_the_shell(power):
    assert {"power", "power_cut"} <= rig(power).capabilities
    shell_less = rig(power, shell="none", ota={"trigger": "power-cycle"})
    assert "power_cut" in shell_less.capabilities
    assert "power" not in shell_less.capabilities    # no supply to lower, no `test power`


def test_a_simulated_rig_keeps_its_bench_supply():
    with pytest.raises(ConfigError, match=r"power\.kind: usb-hub switches a real board's power"):
        validate(Rig, {"name": "sim-x", "board": "esp32", "identity": {"product_id": "1",
                       "dev_id": "1"}, "console": {"url": "hilsim:///tmp/x"},
                       "power": {"kind": "usb-hub", "hub": "1-1", "port": 1},
                       "sim": {}}, "sim-x.yaml")


@pytest.mark.parametrize(("fault", "needs"), [
    ("low-power", "a bench supply that sets a level (power.kind: scpi) or the firmware hook "
                  "`test power`"),
    ("bad-signal", "an attenuator (rf.kind: attenuator) or the firmware hook `test signal`"),
])
@pytest.mark.parametrize("kind", ["usb-hub", "command"])
def test_low_power_and_bad_signal_say_what_a_board_without_a_shell_needs(fault, needs, kind):
    # What OtaScenario.inject skips with on a shell-less board ("rig X has no shell: fault
    # low-power needs ..."): a switch cuts the power but sets no voltage.
    assert needs_a_shell(fault, {}, power=kind, rf="none") == needs
    assert needs_a_shell("power-cut", {"during": "download"}, power=kind, rf="none") is None


# ------------------------------------------------------------------------------ uhubctl
def test_the_real_uhubctl_finding_no_hub_is_one_fault_line(tmp_path):
    assert shutil.which("uhubctl", path="/usr/sbin:/sbin:/usr/bin:/bin"), \
        "uhubctl is not installed (apt-get install uhubctl; .ci/run installs it)"
    rig_file(tmp_path / "rigs", "console: {url: 'loop://'}\n"
                                "power: {kind: usb-hub, hub: '9-9.9.9', port: 3}\n")
    result = hil("rigs", "check", "--rigs-dir", str(tmp_path / "rigs"), "bench-usb")
    assert result.returncode == 1
    power = [line for line in result.stdout.splitlines() if " power " in line]
    assert len(power) == 1, result.stdout
    assert power[0].startswith("bench-usb        power    FAULT  power.hub: ")
    assert "uhubctl -l 9-9.9.9 -p 3 failed with status 1: " in power[0]
    assert power[0].endswith("No compatible devices detected at location 9-9.9.9!")
    assert "Traceback" not in result.stdout + result.stderr


def test_a_missing_uhubctl_is_one_fault_line(tmp_path):
    rig_file(tmp_path / "rigs", "console: {url: 'loop://'}\n"
                                "power: {kind: usb-hub, hub: '1-1', port: 1, "
                                "uhubctl: hil-no-such-uhubctl}\n")
    result = hil("rigs", "check", "--rigs-dir", str(tmp_path / "rigs"), "bench-usb")
    assert result.returncode == 1
    assert ("bench-usb        power    FAULT  power.uhubctl: hil-no-such-uhubctl not found "
            "(install Debian's uhubctl package: apt-get install uhubctl)") in result.stdout


class FakeUhubctl:
    """An executable ``uhubctl`` on PATH: one hub at ``hub`` with 4 ports and an ST-Link on
    port 2, answering as uhubctl 2.5 does; every run's arguments go to ``calls``. ``mode``:
    ``ok``; ``no-permission`` (uhubctl could not open the hub: no port lines, exit 0);
    ``stuck`` (the port does not switch, exit 0)."""

    FAKE = r'''#!{python}
import json, sys, pathlib
here = pathlib.Path({here!r})
config = json.loads((here / "config.json").read_text())
args = sys.argv[1:]
with open(here / "calls", "a") as calls:
    calls.write(" ".join(args) + "\n")
opts = dict(zip(args[::2], args[1::2]))
hub, location = config["hub"], opts.get("-l", "")
if location != hub:
    sys.stderr.write(f"No compatible devices detected at location {{location}}!\n"
                     "Run with -h to get usage info.\n")
    sys.exit(1)
state = here / "state"
def status(heading):
    print(f"{{heading}} status for hub {{hub}} [{description}]")
    if config["mode"] == "no-permission":
        return
    port = int(opts["-p"])
    if port > 4:
        return
    if port == 2 and state.read_text() == "on":
        print("  Port 2: 0503 power highspeed enable connect [{stlink}]")
    elif port == 2:
        print("  Port 2: 0000 off")
    else:
        print(f"  Port {{port}}: 0100 power")
def switch(on):
    status("Current")
    if config["mode"] == "ok":
        state.write_text("on" if on else "off")
    print(f"Sent power {{'on' if on else 'off'}} request")
    status("New")
action = opts.get("-a")
if action is None:
    status("Current")
elif action == "cycle":
    switch(False)
    switch(True)
else:
    switch(action == "on")
'''

    def __init__(self, directory: Path, hub: str = "1-1.4", mode: str = "ok",
                 description: str = HUB_DESCRIPTION) -> None:
        directory.mkdir()
        self.directory = directory
        (directory / "config.json").write_text(json.dumps({"hub": hub, "mode": mode}))
        (directory / "state").write_text("on")
        executable(directory / "uhubctl", self.FAKE.format(
            python=sys.executable, here=str(directory), description=description,
            stlink=STLINK))

    @property
    def calls(self) -> list[str]:
        path = self.directory / "calls"
        return path.read_text().splitlines() if path.exists() else []

    @property
    def state(self) -> str:
        return (self.directory / "state").read_text()


@pytest.fixture
def fake_uhubctl(tmp_path, monkeypatch):
    fake = FakeUhubctl(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake.directory}:{Path(sys.executable).parent}:/usr/bin:/bin")
    return fake


def test_rigs_check_reports_the_port_state_without_switching_it(tmp_path, fake_uhubctl):
    rig_file(tmp_path / "rigs", "console: {url: 'loop://'}\n"
                                "power: {kind: usb-hub, hub: '1-1.4', port: 2}\n")
    result = hil("rigs", "check", "--rigs-dir", str(tmp_path / "rigs"), "bench-usb")
    power = [line for line in result.stdout.splitlines() if " power " in line]
    assert power == [
        f"bench-usb        power    ok     USB hub 1-1.4 port 2: power on (power highspeed "
        f"enable connect), {STLINK} attached; hub {HUB_DESCRIPTION}; battery level through "
        "the firmware's `test power`"], result.stdout + result.stderr
    assert fake_uhubctl.calls == ["-l 1-1.4 -p 2"]     # a status query, nothing switched
    assert fake_uhubctl.state == "on"


def test_the_port_is_switched_off_on_and_cycled_through_uhubctl(fake_uhubctl):
    with UsbHubPortPower("1-1.4", 2, off_s=0.2) as port:
        port.output(False)
        assert fake_uhubctl.state == "off"
        assert "power off" in port.identify()
        port.output(True)
        assert fake_uhubctl.state == "on"
        port.cycle()
    assert fake_uhubctl.calls == ["-l 1-1.4 -p 2 -a off", "-l 1-1.4 -p 2",
                                  "-l 1-1.4 -p 2 -a on", "-l 1-1.4 -p 2 -a cycle -d 0.2"]
    assert fake_uhubctl.state == "on"


def test_uhubctl_leaving_the_port_on_is_a_rig_fault_not_a_cut(tmp_path, monkeypatch):
    # uhubctl exits 0 when it could not switch: the state it prints afterwards is what counts.
    fake = FakeUhubctl(tmp_path / "bin", mode="stuck")
    monkeypatch.setenv("PATH", f"{fake.directory}:/usr/bin:/bin")
    with UsbHubPortPower("1-1.4", 2) as port, pytest.raises(RigFault) as caught:
        port.output(False)
    assert caught.value.message.startswith("power.port: uhubctl -a off left USB hub 1-1.4 "
                                           "port 2 on (power highspeed enable connect): ")


@pytest.mark.parametrize(("mode", "port", "says"), [
    ("no-permission", 2, "power.port: uhubctl could not read USB hub 1-1.4 port 2 (no "
                         "permission to open the hub?"),
    ("ok", 7, "power.port: hub 1-1.4 has 4 ports, no port 7"),
])
def test_a_port_uhubctl_cannot_read_is_one_line_saying_why(tmp_path, monkeypatch, mode, port,
                                                           says):
    fake = FakeUhubctl(tmp_path / "bin", mode=mode)
    monkeypatch.setenv("PATH", f"{fake.directory}:/usr/bin:/bin")
    with UsbHubPortPower("1-1.4", port) as power, pytest.raises(RigFault) as caught:
        power.identify()
    assert caught.value.message.startswith(says)


def test_a_ganged_hub_is_named_so_in_the_check(tmp_path, monkeypatch):
    # Its ports are cut together: the check says so, for the other boards on that hub.
    ganged = HUB_DESCRIPTION.replace("ppps", "ganged")
    fake = FakeUhubctl(tmp_path / "bin", description=ganged)
    monkeypatch.setenv("PATH", f"{fake.directory}:/usr/bin:/bin")
    with UsbHubPortPower("1-1.4", 2) as port:
        assert port.identify().endswith(f"hub {ganged}; ganged: every port of this hub is cut "
                                        "together")


def test_uhubctl_output_is_read_per_hub_and_port():
    output = (f"Current status for hub 1-1.4 [{HUB_DESCRIPTION}]\n"
              f"  Port 2: 0503 power highspeed enable connect [{STLINK}]\n"
              "Sent power off request\n"
              f"New status for hub 1-1.4 [{HUB_DESCRIPTION}]\n"
              "  Port 2: 0000 off\n"
              "New status for hub 2-1.4 [2109:0817 VIA Labs, Inc. USB3.0 Hub, USB 3.00, "
              "4 ports, ppps]\n"
              "  Port 2: 02a0 power 5gbps Rx.Detect\n")
    hubs, readings = parse_uhubctl(output)
    assert list(hubs) == ["1-1.4", "2-1.4"]
    assert [(r.new, r.hub, r.port, r.powered, r.device) for r in readings] == [
        (False, "1-1.4", 2, True, STLINK), (True, "1-1.4", 2, False, ""),
        (True, "2-1.4", 2, True, "")]


# ------------------------------------------------------------------------------ a relay command
RELAY = r'''#!{python}
"""A relay board's command-line tool: relay <on|off|cycle|state>; its state in a file."""
import pathlib, sys, time
here = pathlib.Path({here!r})
state, log = here / "relay.state", here / "relay.log"
what = sys.argv[1]
with open(log, "a") as record:
    record.write(what + "\n")
if (here / "broken").exists():
    sys.stderr.write("relay: USB relay board 0x16c0 not found\n")
    sys.exit(3)
if what in ("on", "off"):
    state.write_text(what)
elif what == "cycle":
    state.write_text("off")
    time.sleep(0.1)
    state.write_text("on")
print(f"relay 1: {{state.read_text() if state.exists() else 'unknown'}}")
'''


@pytest.fixture
def relay(tmp_path) -> Path:
    return executable(tmp_path / "relay", RELAY.format(python=sys.executable,
                                                       here=str(tmp_path)))


def relay_log(relay: Path) -> list[str]:
    log = relay.parent / "relay.log"
    return log.read_text().splitlines() if log.exists() else []


def test_rigs_check_runs_the_status_command_and_switches_nothing(tmp_path, relay):
    with ContractDevice("pty", version="1.0.0") as device:
        rig_file(tmp_path / "rigs", f"console: {{port: {device.port}}}\n"
                 f"power: {{kind: command, on: {relay} on, off: {relay} off, "
                 f"status: {relay} state}}\n")
        result = hil("rigs", "check", "--rigs-dir", str(tmp_path / "rigs"), "bench-usb")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"bench-usb        console  ok     {device.port}, firmware 1.0.0",
        f"bench-usb        power    ok     {relay} state: relay 1: unknown; battery level "
        "through the firmware's `test power`"]
    assert relay_log(relay) == ["state"]


def test_rigs_check_without_a_status_command_finds_the_programs(tmp_path, relay):
    rigs = tmp_path / "rigs"
    rig_file(rigs, f"console: {{url: 'loop://', shell: none}}\n"
             f"power: {{kind: command, on: {relay} on, off: {relay} off}}\n"
             "ota: {trigger: power-cycle}\n")
    rig_file(rigs, "console: {url: 'loop://', shell: none}\n"
             f"power: {{kind: command, on: {relay} on, off: {tmp_path}/no-relay off}}\n"
             "ota: {trigger: power-cycle}\n", name="bench-gone")
    result = hil("rigs", "check", "--rigs-dir", str(rigs))
    lines = [line for line in result.stdout.splitlines() if " power " in line]
    assert lines == [
        f"bench-gone       power    FAULT  power.off: {tmp_path}/no-relay not found",
        f"bench-usb        power    ok     power commands found (on={relay} on, "
        f"off={relay} off); no status command to ask"], result.stdout
    assert relay_log(relay) == []


def test_a_failing_relay_command_is_one_line_with_what_it_said(relay):
    (relay.parent / "broken").touch()
    with CommandLinePower([str(relay), "on"], [str(relay), "off"]) as power, \
            pytest.raises(RigFault) as caught:
        power.output(False)
    assert caught.value.part == "power"
    assert caught.value.message == (f"power.off: {relay} off failed with status 3: relay: "
                                    "USB relay board 0x16c0 not found")


def test_a_hung_relay_command_is_stopped_with_its_children(tmp_path):
    # A relay tool that hangs in a child of its own: stopping the tool alone would leave the
    # child running (and holding the relay's port) after the test.
    hung = executable(tmp_path / "hung", f"#!/bin/sh\nsleep 120 &\necho $! > {tmp_path}/child"
                      "\nwait\n")
    with CommandLinePower([str(hung)], [str(hung)], timeout=1.0) as power, \
            pytest.raises(RigFault) as caught:
        power.output(True)
    assert caught.value.message == f"power.on: {hung} did not finish within 1 s (stopped)"
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 30.0
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child), f"the relay's child {child} outlived the timeout"


def running(pid: int) -> bool:
    """Alive, not a zombie waiting for its parent."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_the_board_is_power_cycled_through_the_relay(relay):
    bench = rig({"kind": "command", "on": f"{relay} on", "off": f"{relay} off"})
    with RigParts(bench) as parts:
        Board(parts).power_cycle()
    assert relay_log(relay) == ["off", "on"]
    assert (relay.parent / "relay.state").read_text() == "on"


def test_a_cycle_command_is_one_step_and_without_one_it_is_off_then_on(relay):
    with CommandLinePower([str(relay), "on"], [str(relay), "off"],
                          cycle=[str(relay), "cycle"]) as power:
        power_cycle(power, 0.1)
    assert relay_log(relay) == ["cycle"]
    with CommandLinePower([str(relay), "on"], [str(relay), "off"], off_s=0.1) as power:
        power_cycle(power, 0.1)
    assert relay_log(relay) == ["cycle", "off", "on"]


def test_a_battery_level_goes_to_the_shell_hook_beside_a_switch(relay):
    with ContractDevice("pty", version="1.0.0") as device:
        bench = rig({"kind": "command", "on": f"{relay} on", "off": f"{relay} off"},
                    console=device.port)
        with RigParts(bench) as parts:
            Board(parts).set_power(20)
            assert device.hooks["power"] == [20]
    shell_less = rig({"kind": "command", "on": f"{relay} on", "off": f"{relay} off"},
                     shell="none", ota={"trigger": "power-cycle"})
    with RigParts(shell_less) as parts, pytest.raises(RigFault) as caught:
        Board(parts).set_power(20)
    assert caught.value.message == (
        "a relay command (power.kind: command) switches the board's power and sets no "
        "battery level: a low-battery test needs a bench supply (power.kind: scpi) or a "
        "firmware with the `test power` hook")
    assert relay_log(relay) == []
