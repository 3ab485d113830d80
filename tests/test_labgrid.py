"""A rig that is a labgrid place, reached only through a real labgrid coordinator and exporter.

The module starts, on loopback, a simulated nRF52832 bench host (``tests/bench_host.py``: the
bench, and its SWD probe served by pyocd's remote probe server, as ``pyocd server`` serves a USB
probe on a lab's bench host), a real ``labgrid-coordinator`` and a real ``labgrid-exporter``
(labgrid from PyPI, in dev.py's .venv-labgrid) that exports the board's console pty through
ser2net (a ``RawSerialPort``), a ``NetworkPowerPort`` (labgrid's ``simplerest`` model) whose HTTP
relay here switches the simulated bench supply, and the probe server as a ``NetworkService``
named ``pyocd``. The place ``bench-lg`` (tags ``board=nrf52832``) holds all three. hil reaches
the board only through the place: reserved, acquired, its console over rfc2217, its power
through ``labgrid-client power``, its SWD probe as ``remote:host:port``.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from bench_host import bench_host
from private_rig import ROOT, private_sim_rig

from hil.errors import ConfigError, RigFault
from hil.rig.model import load_rig
from hil.rig.parts import RigParts
from hil.rig.providers.labgrid import LabgridClient, Snapshot, client_path, release_held

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="labgrid's exporter and ser2net are Linux'"),
              pytest.mark.xdist_group("labgrid")]

PLACE = "bench-lg"
EXPORTER = "hil-test"
SER2NET_DELAY_S = 1.0      # ser2net listens this late after the exporter publishes its port
DEADLINE_S = 60.0          # generous: a loaded 2-CPU host starts three Python programs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, condition, timeout: float = DEADLINE_S):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.2)


class SupplyRelay:
    """labgrid's ``simplerest`` power model, answered by switching the simulated bench supply
    (hil's SCPI driver on its pty): GET /power/1 on, /power/0 off, /power its state."""

    def __init__(self, supply: str) -> None:
        from hil.drivers.power import ScpiPower

        self.supply = ScpiPower(supply)
        self.supply.open()
        self.on = True
        self.switched: list[bool] = []
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                value = self.path.rstrip("/").rsplit("/", 1)[-1]
                if value in ("0", "1"):
                    relay.on = value == "1"
                    relay.supply.output(relay.on)
                    relay.switched.append(relay.on)
                body = b"1" if relay.on else b"0"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.supply.close()


@dataclass
class Lab:
    coordinator: str
    client: LabgridClient
    rig_path: Path
    rigs_dir: Path
    env: dict[str, str]
    relay: SupplyRelay
    tmp: Path
    probe: str = ""           # host:port of the bench host's pyocd probe server


def slow_ser2net(env: dict[str, str], tmp: Path, delay_s: float) -> dict[str, str]:
    """The exporter's environment with a ser2net that starts listening ``delay_s`` late, as on
    a loaded host: the exporter (found on its PATH) publishes ser2net's port once it has not
    exited within 0.5 s, not once it listens, so a run that opens the console at once is
    refused unless it waits (``hil.rig.providers.labgrid.wait_listening``)."""
    real = next(path for path in ("/usr/sbin/ser2net", "/usr/bin/ser2net") if Path(path).exists())
    slow = tmp / "slow-bin"
    slow.mkdir(exist_ok=True)
    (slow / "ser2net").write_text(f'#!/bin/sh\n[ "$1" = -v ] || sleep {delay_s:g}\n'
                                  f'exec {real} "$@"\n')
    (slow / "ser2net").chmod(0o755)
    return {**env, "PATH": f"{slow}{os.pathsep}{env['PATH']}"}


def started(argv: list[str], *, cwd: Path, env: dict[str, str], log: Path
                ) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stopped(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("labgrid")
    client = client_path()      # a RigFault here: dev.py setup did not install labgrid
    bin_dir = client.parent
    ser2net = [path for path in ("/usr/sbin/ser2net", "/usr/bin/ser2net") if Path(path).exists()]
    assert ser2net, "ser2net is not installed (apt-get install ser2net; .ci/run does)"
    sim = private_sim_rig(tmp, name=f"lg-sim-{os.getpid()}")
    address = f"127.0.0.1:{free_port()}"
    env = {**sim.env, "LG_COORDINATOR": address}
    for name in ("LG_PLACE", "LG_TOKEN", "LG_ENV"):
        env.pop(name, None)
    with bench_host(sim.path, sim.env, "--probe-server") as up:
        relay = SupplyRelay(up.addresses["power"])
        console = os.path.realpath(up.addresses["console"])    # the exporter wants /dev/pts/N
        probe_host, probe_port = up.addresses["probe"].rsplit(":", 1)
        (tmp / "exporter.yaml").write_text(textwrap.dedent(f"""\
            bench:
              RawSerialPort:
                port: {console}
                speed: 115200
              NetworkPowerPort:
                model: simplerest
                host: 'http://127.0.0.1:{relay.port}/power/{{value}}'
                index: 0
              pyocd:
                cls: NetworkService
                address: {probe_host}
                port: {probe_port}
                username: pyocd
            """))
        coordinator = started([str(bin_dir / "labgrid-coordinator"), "-l", address], cwd=tmp,
                              env=env, log=tmp / "coordinator.log")
        exporter = None
        try:
            lg = LabgridClient(address, client=client)
            wait_for("the coordinator answers", lambda: _answers(lg))
            exporter = started([str(bin_dir / "labgrid-exporter"), "--hostname", "127.0.0.1",
                                "-n", EXPORTER, str(tmp / "exporter.yaml")], cwd=tmp,
                               env=slow_ser2net(env, tmp, SER2NET_DELAY_S),
                               log=tmp / "exporter.log")
            wait_for("the exporter's resources", lambda: len(lg.snapshot().resources) == 3)
            lg.run("-p", PLACE, "create")
            lg.run("-p", PLACE, "add-match", f"{EXPORTER}/bench/*")
            lg.run("-p", PLACE, "set-tags", "board=nrf52832")
            rigs_dir = tmp / "rigs"
            rigs_dir.mkdir()
            rig_path = rigs_dir / "lab-lg.yaml"
            rig_path.write_text(yaml.safe_dump({
                "name": "lab-lg", "board": "nrf52832",
                "identity": sim.document["identity"],
                "labgrid": {"place": PLACE, "coordinator": address, "wait": 120},
                "flasher": {"kind": "swd"},      # the place's probe: its pyocd server
                "power": {"kind": "labgrid", "off_s": 0.5},
                "rf": {"kind": "console"},
            }))
            yield Lab(address, lg, rig_path, rigs_dir, env, relay, tmp, up.addresses["probe"])
        finally:
            if exporter is not None:
                stopped(exporter)
            stopped(coordinator)
            relay.close()


def _answers(client: LabgridClient) -> bool:
    try:
        client.snapshot(timeout=10)
    except RigFault:
        return False
    return True


def place_state(lab: Lab) -> str:
    snapshot: Snapshot = lab.client.snapshot()
    return snapshot.state(snapshot.places[PLACE])


def holder(lab: Lab, name: str, go: Path) -> subprocess.Popen[str]:
    """Another run on the place: acquires it (through RigParts, as a suite would), prints
    ``<name> acquired``, holds it until ``go`` exists, then closes the rig (``<name> released``)."""
    script = textwrap.dedent("""\
        import sys, time
        from pathlib import Path
        from hil.rig.model import load_rig
        from hil.rig.parts import RigParts
        from hil.rig.providers.labgrid import release_held
        rig_path, name, go = sys.argv[1:]
        with RigParts(load_rig(Path(rig_path))) as parts:
            parts.console()
            print(name, "acquired", flush=True)
            while not Path(go).exists():
                time.sleep(0.05)
        release_held()      # as at the run's exit (labgrid.hold: run)
        print(name, "released", flush=True)
        """)
    return subprocess.Popen([sys.executable, "-c", script, str(lab.rig_path), name, str(go)],
                            env=lab.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ended(process: subprocess.Popen[str]) -> None:
    try:
        process.wait(DEADLINE_S)
    finally:
        process.kill()
        process.communicate()


def read_line(process: subprocess.Popen[str], lab: Lab) -> str:
    """The run's next line; when it ended instead, why: its stderr and the tails of the
    coordinator's and exporter's logs (a ser2net that could not start shows there)."""
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line:
        process.wait(DEADLINE_S)
        assert process.stderr is not None
        logs = "".join(f"\n--- {name} (tail)\n" + "\n".join(
            (lab.tmp / name).read_text(errors="replace").splitlines()[-15:])
            for name in ("coordinator.log", "exporter.log"))
        raise AssertionError(f"the run ended ({process.returncode}): "
                             f"{process.stderr.read()}{logs}")
    return line


# ------------------------------------------------------------------------------ the tests
def test_the_board_is_reached_through_the_place_console_power_and_probe(lab: Lab) -> None:
    rig = load_rig(lab.rig_path)
    with RigParts(rig) as parts:
        assert place_state(lab).startswith("acquired by ")
        console = parts.console()
        assert console.name.startswith("rfc2217://127.0.0.1:")
        # The simulated firmware's shell answers through ser2net and the coordinator's place.
        assert any(line.startswith("version=") for line in console.command("sys version"))
        power = parts.power()
        assert power is not None
        assert "is on" in power.identify()
        # A switch sets no battery level: the firmware's hook does (capability "power").
        assert {"power", "power_cut"} <= rig.capabilities
        power.set_level(40)
        # A power cycle through labgrid's power driver cuts the simulated supply: a new boot.
        mark = console.mark()
        power.cycle()
        console.expect(r"^boot ", timeout=DEADLINE_S, since=mark)
        assert lab.relay.switched[-2:] == [False, True]
        # The SWD probe is the place's pyocd server (its NetworkService "pyocd"): the rig
        # names no probe. A reset through it is a new boot.
        flasher = parts.flasher()
        assert flasher is not None
        assert flasher.name == f"SWD probe remote:{lab.probe} (nrf52832)"  # type: ignore[attr-defined]
        mark = console.mark()
        flasher.reset()
        console.expect(r"^boot ", timeout=DEADLINE_S, since=mark)
        token = parts.provider.token
    # Held for the run (labgrid.hold: run): the next test's parts take it back at once.
    assert place_state(lab).startswith("acquired by ")
    with RigParts(rig) as parts:
        assert parts.provider.token == token
        assert any(line.startswith("version=") for line in parts.console().command("sys version"))
    assert list(lab.client.snapshot().reservations) == [token]
    release_held()          # what the run's exit does
    assert place_state(lab) == "free"
    assert not lab.client.snapshot().reservations


def test_a_place_held_test_by_test_is_released_after_each(lab: Lab, tmp_path: Path) -> None:
    document = yaml.safe_load(lab.rig_path.read_text())
    document["labgrid"]["hold"] = "test"
    path = tmp_path / "lab-lg.yaml"
    path.write_text(yaml.safe_dump(document))
    with RigParts(load_rig(path)) as parts:
        parts.console()
        assert place_state(lab).startswith("acquired by ")
    assert place_state(lab) == "free"
    assert not lab.client.snapshot().reservations


def test_two_runs_on_one_place_are_served_one_after_the_other(lab: Lab, tmp_path: Path) -> None:
    go_a, go_b = tmp_path / "go-a", tmp_path / "go-b"
    first = holder(lab, "A", go_a)
    second = None
    try:
        assert read_line(first, lab) == "A acquired"
        second = holder(lab, "B", go_b)
        # B is in the coordinator's queue (a waiting reservation) while A holds the place.
        wait_for("B's reservation waiting", lambda: any(
            res.state == "waiting" for res in lab.client.snapshot().reservations.values()))
        assert place_state(lab) == f"acquired by {socket.gethostname()}/" \
            f"{os.environ.get('LG_USERNAME') or _login()}-hil{first.pid}"
        # hil rigs tells who holds it.
        listed = subprocess.run([sys.executable, "-m", "hil.cli", "rigs", "--rigs-dir",
                                 str(lab.rigs_dir)], env=lab.env, capture_output=True,
                                text=True, timeout=DEADLINE_S, check=False)
        assert listed.returncode == 0, listed.stderr
        assert f"place {PLACE:<16} acquired by " in listed.stdout
        assert f"-hil{first.pid}  ({lab.coordinator})" in listed.stdout
        go_a.touch()
        assert read_line(first, lab) == "A released"
        assert read_line(second, lab) == "B acquired"     # only after A let go
        go_b.touch()
        assert read_line(second, lab) == "B released"
    finally:
        go_a.touch()
        go_b.touch()
        for run in (first, second):
            if run is not None:
                ended(run)
    assert first.returncode == 0
    assert second is not None
    assert second.returncode == 0
    assert place_state(lab) == "free"


def test_a_killed_run_gives_its_place_back(lab: Lab, tmp_path: Path) -> None:
    killed = holder(lab, "A", tmp_path / "never")
    queued = None
    try:
        assert read_line(killed, lab) == "A acquired"
        assert place_state(lab).startswith("acquired by ")
        # A run killed while it waits in the queue leaves no reservation behind either (else
        # the place would go to it, unclaimed, until the coordinator expired it).
        queued = holder(lab, "C", tmp_path / "never")
        wait_for("C's reservation waiting", lambda: any(
            res.state == "waiting" for res in lab.client.snapshot().reservations.values()))
        queued.kill()
        wait_for("C's reservation cancelled", lambda: [
            res.state for res in lab.client.snapshot().reservations.values()] == ["acquired"])
        killed.kill()            # no teardown: the guard it left releases the place
    finally:
        ended(killed)
        if queued is not None:
            ended(queued)
    wait_for("the place free again", lambda: place_state(lab) == "free")
    # The next run gets it: `hil rigs check` reserves it and asks each part.
    checked = subprocess.run([sys.executable, "-m", "hil.cli", "rigs", "check", "--rigs-dir",
                              str(lab.rigs_dir)], env=lab.env, capture_output=True, text=True,
                             timeout=DEADLINE_S * 2, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert any(line.startswith("lab-lg           console  ok") for line in lines), lines
    assert any(line.startswith("lab-lg           power    ok") and "is on" in line
               for line in lines), lines
    assert any(line.startswith("lab-lg           flasher  ok") and
               f"SWD probe remote:{lab.probe} (nrf52832) connected" in line
               for line in lines), lines
    assert not lab.client.snapshot().reservations


def test_no_such_place_is_one_line_after_the_wait(lab: Lab, tmp_path: Path) -> None:
    path = tmp_path / "lab-none.yaml"
    path.write_text(yaml.safe_dump({
        "name": "lab-none", "board": "nrf52832",
        "identity": {"product_id": "245528", "dev_id": "x"},
        "labgrid": {"tags": {"board": "esp32"}, "coordinator": lab.coordinator, "wait": 2},
    }))
    with pytest.raises(RigFault) as caught, RigParts(load_rig(path)):
        pass
    assert str(caught.value) == (f"rig lab-none: labgrid: no place for board=esp32 within 2 s "
                                 f"at {lab.coordinator} (labgrid.wait); `hil rigs` shows who "
                                 "holds it")
    assert not lab.client.snapshot().reservations     # cancelled, not left in the queue


def _login() -> str:
    import getpass

    return getpass.getuser()


@pytest.mark.parametrize(("section", "message"), [
    ({"labgrid": {"place": "b", "tags": {"board": "x"}}},
     "labgrid: give exactly one of place (a name) or tags (key: value)"),
    ({"labgrid": {"tags": {"Board": "x"}}}, "labgrid.tags.Board"),
    ({"labgrid": {"place": "b"}, "console": {"port": "/dev/ttyACM0"}},
     "console.port: a labgrid place's console is its NetworkSerialPort"),
    ({"power": {"kind": "labgrid"}, "console": {"port": "/dev/ttyACM0"}},
     "power.kind: labgrid is a labgrid place's power port"),
])
def test_a_wrong_labgrid_section_is_one_line_naming_the_key(tmp_path: Path, section: dict,
                                                            message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "board": "nrf52832",
                                    "identity": {"product_id": "1", "dev_id": "x"}, **section}))
    with pytest.raises(ConfigError) as caught:
        load_rig(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ")
    assert message in text
    assert "\n" not in text


def test_the_example_rig_and_exporter_config_are_what_the_lab_needs() -> None:
    rig = load_rig(ROOT / "rigs" / "labgrid" / "bench-07.yaml")
    assert rig.labgrid is not None
    assert rig.labgrid.filters == ("name=bench-07",)
    assert rig.power.kind == "labgrid"
    assert rig.flasher.kind == "swd"
    assert rig.flasher.probe is None          # the place's
    exported = yaml.safe_load((ROOT / "rigs" / "labgrid" / "exporter.yaml").read_text())
    assert set(exported["bench-07"]) == {"USBSerialPort", "NetworkPowerPort", "pyocd"}
    assert exported["bench-07"]["pyocd"]["cls"] == "NetworkService"


def test_places_are_told_free_reserved_or_acquired_and_matched_by_name_or_tags() -> None:
    """What ``hil rigs`` prints, from the coordinator's state as labgrid's library gives it."""
    serial = {"path": ["exp", "bench", "NetworkSerialPort", "RawSerialPort"],
              "cls": "NetworkSerialPort", "acquired": "b-1", "avail": True,
              "params": {"host": "10.0.0.5", "port": 4001, "protocol": "raw"}}
    snapshot = Snapshot.from_json({
        "places": {
            "b-1": {"acquired": "h1/ann-hil7", "reservation": "T1", "tags": {"board": "gd32"},
                    "acquired_resources": [serial["path"]]},
            "b-10": {"acquired": None, "reservation": "T2", "tags": {"board": "nrf52832"},
                     "acquired_resources": []},
            "b-2": {"acquired": None, "reservation": None, "tags": {"board": "nrf52832"},
                    "acquired_resources": []}},
        "resources": [serial],
        "reservations": {"T1": {"owner": "h1/ann-hil7", "state": "acquired", "places": ["b-1"]},
                         "T2": {"owner": "h2/bob", "state": "allocated", "places": ["b-10"]}}})
    states = {name: snapshot.state(place) for name, place in snapshot.places.items()}
    assert states == {"b-1": "acquired by h1/ann-hil7", "b-10": "reserved for h2/bob",
                      "b-2": "free"}
    from hil.rig.model import Labgrid
    from hil.rig.providers.labgrid import console_url

    # A name is the whole name (labgrid-client -p would take b-1 as a part of b-10 too).
    assert [p.name for p in snapshot.matching(Labgrid(place="b-1"))] == ["b-1"]
    assert [p.name for p in snapshot.matching(Labgrid(tags={"board": "nrf52832"}))] == \
        ["b-10", "b-2"]
    assert console_url(snapshot.places["b-1"].resources[0]) == "socket://10.0.0.5:4001"


def test_a_coordinator_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))      # bound, never listening: connections refused
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        path = tmp_path / "lab-x.yaml"
        path.write_text(yaml.safe_dump({
            "name": "lab-x", "board": "nrf52832",
            "identity": {"product_id": "245528", "dev_id": "x"},
            "labgrid": {"place": "bench-x", "coordinator": address}}))
        with pytest.raises(RigFault) as caught, RigParts(load_rig(path)):
            pass
    assert str(caught.value) == (f"rig lab-x: labgrid: labgrid-client reserve name=bench-x "
                                 f"(coordinator {address}) failed: Server error: Error: Could "
                                 "not connect to coordinator")


def test_a_remote_probe_whose_server_is_not_there_is_one_line() -> None:
    """A place's probe server that does not answer (its `pyocd server` not started) is a rig
    fault naming the address, as a USB probe not plugged in is."""
    from hil.drivers.swd import SwdFlasher

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))      # bound, never listening: connections refused
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        with pytest.raises(RigFault) as caught:
            SwdFlasher(probe=f"remote:{address}", target="nrf52832").open()
    assert str(caught.value) == (
        f"flasher: SWD probe remote:{address} (nrf52832): no pyocd server answers at {address} "
        "(`pyocd server` on the probe's host): Connection refused")
    with pytest.raises(RigFault) as caught:
        SwdFlasher(probe="remote:bench-07", target="nrf52832").open()
    assert str(caught.value) == ("flasher: SWD probe remote:bench-07: a remote probe is "
                                 "remote:HOST:PORT (the host and port its `pyocd server` "
                                 "listens on)")
