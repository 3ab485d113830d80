"""An ESP32 on a labgrid place: flashed through the place's network serial port in RFC 2217 mode.

On a lab's bench host, ser2net in ``telnet(rfc2217)`` mode fronts the board's USB-UART and passes
DTR and RTS on to it, which is how esptool resets the chip into its ROM bootloader. Here the
bench host is ``tests/bench_host.py --rfc2217``: a simulated ESP32 whose ``hilsim://`` bridge
sits behind pyserial's RFC 2217 server (``serial.rfc2217.PortManager``), so esptool's reset
sequences travel through RFC 2217 for real. A real ``labgrid-exporter`` publishes that server as
the place's ``NetworkSerialPort`` (``protocol: rfc2217``) beside a ``NetworkPowerPort`` relayed
to the simulated supply, and a real ``labgrid-coordinator`` hands the place out. A second place
publishes the same port as raw TCP, which carries no modem lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from bench_host import bench_host
from private_rig import ROOT, private_sim_rig
from test_labgrid import SupplyRelay, _answers, free_port, started, stopped, wait_for

from hil.errors import RigFault
from hil.rig.board import Board
from hil.rig.model import load_rig
from hil.rig.parts import RigParts
from hil.rig.providers.labgrid import LabgridClient, client_path, release_held

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="labgrid's exporter is Linux'"),
              pytest.mark.xdist_group("labgrid")]

EXPORTER = "hil-esp"
PLACE, RAW_PLACE = "bench-esp", "bench-esp-raw"
IMAGES = ROOT / "fixtures" / "images"
DEV_ID = "simesp32"          # labgrid's tag values are [a-z0-9_]


@dataclass
class Lab:
    coordinator: str
    client: LabgridClient
    env: dict[str, str]       # the runs': LG_COORDINATOR, the board's key as HIL_ACCESS_KEY
    serial: str               # host:port of the bench host's RFC 2217 server
    tmp: Path
    identity: dict[str, str]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("labgrid-esp32")
    bin_dir = client_path().parent
    sim = private_sim_rig(tmp, "sim-esp32", name=f"lge-{os.getpid()}")
    document = {**sim.document, "identity": {**sim.document["identity"], "dev_id": DEV_ID}}
    sim.path.write_text(yaml.safe_dump(document), encoding="utf-8")
    key_env = document["identity"]["access_key_env"]
    address = f"127.0.0.1:{free_port()}"
    env = {**sim.env, "LG_COORDINATOR": address, "HIL_ACCESS_KEY": sim.env[key_env]}
    for name in ("LG_PLACE", "LG_TOKEN", "LG_ENV"):
        env.pop(name, None)
    with bench_host(sim.path, sim.env, "--rfc2217") as up:
        relay = SupplyRelay(up.addresses["power"])
        host, port = up.addresses["serial"].rsplit(":", 1)
        (tmp / "exporter.yaml").write_text(textwrap.dedent(f"""\
            esp:
              NetworkSerialPort:
                host: {host}
                port: {port}
                speed: 115200
                protocol: rfc2217
              NetworkPowerPort:
                model: simplerest
                host: 'http://127.0.0.1:{relay.port}/power/{{value}}'
                index: 0
            esp-raw:
              NetworkSerialPort:
                host: {host}
                port: {port}
                speed: 115200
                protocol: raw
            """))
        coordinator = started([str(bin_dir / "labgrid-coordinator"), "-l", address], cwd=tmp,
                              env=env, log=tmp / "coordinator.log")
        exporter = None
        try:
            lg = LabgridClient(address)
            wait_for("the coordinator answers", lambda: _answers(lg))
            exporter = started([str(bin_dir / "labgrid-exporter"), "--hostname", "127.0.0.1",
                                "-n", EXPORTER, str(tmp / "exporter.yaml")], cwd=tmp, env=env,
                               log=tmp / "exporter.log")
            wait_for("the exporter's resources", lambda: len(lg.snapshot().resources) == 3)
            for place, group in ((PLACE, "esp"), (RAW_PLACE, "esp-raw")):
                lg.run("-p", place, "create")
                lg.run("-p", place, "add-match", f"{EXPORTER}/{group}/*")
                lg.run("-p", place, "set-tags", "board=esp32",
                       f"product_id={document['identity']['product_id']}", f"dev_id={DEV_ID}")
            yield Lab(address, lg, env, up.addresses["serial"], tmp, document["identity"])
        finally:
            if exporter is not None:
                stopped(exporter)
            stopped(coordinator)
            relay.close()


def place_rig(lab: Lab, tmp_path: Path, place: str, power: str = "labgrid") -> Path:
    path = tmp_path / f"{place}.yaml"
    path.write_text(yaml.safe_dump({
        "name": place, "board": "esp32", "identity": lab.identity,
        "labgrid": {"place": place, "coordinator": lab.coordinator, "wait": 120},
        "flasher": {"kind": "esp"},          # through the place's serial port
        "power": {"kind": power}, "rf": {"kind": "console"}}))
    return path


def test_the_esp32_is_flashed_through_the_place_serial_port(lab: Lab, tmp_path: Path) -> None:
    """esptool resets the chip into its bootloader through RFC 2217's DTR/RTS, writes the
    image, and resets it into the new one; the console, on the same port, then says so."""
    rig = load_rig(place_rig(lab, tmp_path, PLACE))
    try:
        with RigParts(rig) as parts:
            board = Board(parts)
            assert board.restore_base(IMAGES / "esp32-1.1.0.bin") == "1.1.0"
            assert board.restore_base(IMAGES / "esp32-1.0.0.bin") == "1.0.0"
            parts.release("console")         # one port: the console lets go of it
            flasher = parts.flasher()
            assert flasher is not None
            assert flasher.port == f"rfc2217://{lab.serial}?ign_set_control"  # type: ignore[attr-defined]
            assert flasher.read_mac().startswith("24:0a:c4:")  # type: ignore[attr-defined]
            flasher.reset()                  # out of the bootloader: the next run's board runs
    finally:
        release_held()
    assert not lab.client.snapshot().reservations


def test_a_raw_serial_port_cannot_reset_an_esp32_and_says_so(lab: Lab, tmp_path: Path) -> None:
    rig = load_rig(place_rig(lab, tmp_path, RAW_PLACE, power="console"))
    with pytest.raises(RigFault) as caught, RigParts(rig):
        pass
    assert str(caught.value) == (
        f"rig {RAW_PLACE}: flasher: place {RAW_PLACE}'s serial port is raw TCP, which carries "
        "no DTR/RTS for the ESP32's bootloader: export it in rfc2217 mode (NetworkSerialPort "
        "protocol: rfc2217)")
    assert not lab.client.snapshot().reservations


def test_a_run_on_the_esp32_place_restores_and_updates_it(lab: Lab, tmp_path: Path) -> None:
    """A run given only the place (``--hil-place``, no rig file): its rig has the ESP32
    flasher (the place's port is RFC 2217), the base image is restored through it, and an
    update runs to the end. ``hil report`` then says which place the board's tests ran on:
    its name, tags and exporter, in signoff.md, signoff.json and the HTML report's
    Environment widget."""
    results, report = tmp_path / "allure-results", tmp_path / "allure-report"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "testcases/test_detect.py::test_happy_path_updates_to_"
         "the_target_and_the_next_detect_finds_no_task", "--hil-place", PLACE,
         "--hil-firmware", str(IMAGES / "esp32-1.0.0.bin"), f"--alluredir={results}",
         "-p", "no:cacheprovider", "-q", "-rs", "--no-header"], cwd=ROOT, env=lab.env,
        capture_output=True, text=True, timeout=600, check=False)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"^1 passed in ", summary), summary
    assert f"place {PLACE} (" in done.stderr
    assert not lab.client.snapshot().reservations

    reported = subprocess.run([Path(sys.executable).with_name("hil"), "report", str(results),
                               "-o", str(report)], env=lab.env, capture_output=True,
                              text=True, timeout=300, check=False)
    assert reported.returncode in (0, 1), reported.stderr
    tags = f"board=esp32, dev_id={DEV_ID}, product_id={lab.identity['product_id']}"
    signoff = json.loads((report / "signoff.json").read_text())
    assert signoff["places"] == [{"board": "esp32", "rig": PLACE, "place": PLACE, "tags": tags,
                                  "exporter": f"{EXPORTER} (127.0.0.1)", "tests": 1}]
    assert f"| esp32 | {PLACE} | {tags} | {EXPORTER} (127.0.0.1) | 1 | {PLACE} |" in \
        (report / "signoff.md").read_text().splitlines()
    shown = {item["name"]: item["values"] for item in
             json.loads((report / "widgets" / "environment.json").read_text())}
    assert shown["places esp32"] == [
        f"{PLACE} ({tags}; exporter {EXPORTER} (127.0.0.1)): 1 test, rig {PLACE}"]
