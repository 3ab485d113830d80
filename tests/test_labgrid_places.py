"""Runs given a labgrid place or tags and no rig file (``--hil-place``, ``--hil-place-tags``),
and parallel runs across places (``-n 2``), on a real coordinator and exporter on loopback.

Two simulated nRF52832 benches (``hil sim up``), each exported by one ``labgrid-exporter`` as a
group of its own (a ser2net console, a ``NetworkPowerPort`` switching the bench's supply), make
two places with the same tags ``board=nrf52832`` and each its own board's identity
(``product_id``, ``dev_id``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from private_rig import ROOT, PrivateRig, private_sim_rig, sim_up
from test_labgrid import (
    DEADLINE_S,
    SupplyRelay,
    _answers,
    free_port,
    slow_ser2net,
    started,
    stopped,
    wait_for,
)

from hil.rig.providers.labgrid import LabgridClient, client_path

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="labgrid's exporter and ser2net are Linux'"),
              pytest.mark.xdist_group("labgrid")]

EXPORTER = "hil-places"
SER2NET_DELAY_S = 2
PLACES = ("bench-pa", "bench-pb")
# A case of the conformance suite per worker (xdist sends them one each: fewer tests than
# twice the workers are dealt round), so both places are used.
CASES = ["testcases/test_detect.py::test_happy_path_updates_to_the_target_and_the_next_detect_"
         "finds_no_task",
         "testcases/test_detect.py::test_low_power_at_detect_is_reported_105_and_nothing_is_"
         "downloaded"]

@dataclass
class Lab:
    coordinator: str
    client: LabgridClient
    env: dict[str, str]       # the runs': LG_COORDINATOR and HIL_ACCESS_KEY (the boards' key)
    dev_ids: dict[str, str]   # place -> its board's dev_id
    tmp: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("places")
    bin_dir = client_path().parent
    address = f"127.0.0.1:{free_port()}"
    key = None
    with ExitStack() as stack:
        exported: dict[str, str] = {}
        dev_ids: dict[str, str] = {}
        for index, place in enumerate(PLACES):
            (tmp / place).mkdir()
            sim = private_sim_rig(tmp / place, name=f"lgp-{index}-{os.getpid()}")
            # labgrid's tag values are [a-z0-9_]: the board's dev_id is a tag of its place.
            document = {**sim.document, "identity": {**sim.document["identity"],
                                                     "dev_id": f"simboard{index}"}}
            sim.path.write_text(yaml.safe_dump(document), encoding="utf-8")
            name = document["identity"]["access_key_env"]
            key = key or sim.env[name]      # both boards sign with the one key the run has
            sim = PrivateRig(sim.path, document, {**sim.env, name: key})
            up = stack.enter_context(sim_up(sim))
            relay = SupplyRelay(up.addresses["power"])
            stack.callback(relay.close)
            exported[place] = textwrap.dedent(f"""\
                {place}:
                  RawSerialPort:
                    port: {os.path.realpath(up.addresses["console"])}
                    speed: 115200
                  NetworkPowerPort:
                    model: simplerest
                    host: 'http://127.0.0.1:{relay.port}/power/{{value}}'
                    index: 0
                """)
            dev_ids[place] = document["identity"]["dev_id"]
        (tmp / "exporter.yaml").write_text("".join(exported.values()))
        assert key is not None
        env = {**os.environ, "LG_COORDINATOR": address, "HIL_ACCESS_KEY": key}
        exporter_env = slow_ser2net(env, tmp, SER2NET_DELAY_S)
        for name in ("LG_PLACE", "LG_TOKEN", "LG_ENV"):
            env.pop(name, None)
        coordinator = started([str(bin_dir / "labgrid-coordinator"), "-l", address], cwd=tmp,
                              env=env, log=tmp / "coordinator.log")
        stack.callback(stopped, coordinator)
        lg = LabgridClient(address)
        wait_for("the coordinator answers", lambda: _answers(lg))
        exporter = started([str(bin_dir / "labgrid-exporter"), "--hostname", "127.0.0.1",
                            "-n", EXPORTER, str(tmp / "exporter.yaml")], cwd=tmp,
                           env=exporter_env,
                           log=tmp / "exporter.log")
        stack.callback(stopped, exporter)
        wait_for("the exporter's resources", lambda: len(lg.snapshot().resources) == 4)
        for place in PLACES:
            lg.run("-p", place, "create")
            lg.run("-p", place, "add-match", f"{EXPORTER}/{place}/*")
            lg.run("-p", place, "set-tags", "board=nrf52832", "product_id=245528",
                   f"dev_id={dev_ids[place]}")
        yield Lab(address, lg, env, dev_ids, tmp)


def pytest_run(lab: Lab, *args: str, timeout: float = 600, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider",
                           "-q", "-rs", "--no-header"], cwd=ROOT, env=env or lab.env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_workers_each_hold_their_own_place_and_the_report_is_one(lab: Lab,
                                                                 tmp_path: Path) -> None:
    """``pytest testcases -n 2 --hil-place-tags board=nrf52832``: each worker reserves a place
    of its own at the coordinator, runs its tests there (its board's identity), and the
    report (one JUnit file here) names the place of each test."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    stop = threading.Event()

    def watch() -> None:      # the coordinator's record while the run goes on
        while not stop.is_set():
            snapshot = lab.client.snapshot()
            seen.add(tuple(sorted((name, snapshot.state(place))
                                  for name, place in snapshot.places.items())))
            stop.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    junit = tmp_path / "junit.xml"
    try:
        # --dist loadgroup (as the host-pinned CI examples run): one rig, yet its tests spread
        # over the workers, each on its place.
        done = pytest_run(lab, *CASES, "-n", "2", "--dist", "loadgroup", "--hil-place-tags",
                          "board=nrf52832", f"--junitxml={junit}",
                          f"--alluredir={tmp_path / 'allure'}")
    finally:
        stop.set()
        watcher.join(DEADLINE_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert re.search(r"^2 passed in ", done.stdout.strip().splitlines()[-1]), done.stdout
    # The report: every test names its place; both places were used.
    cases = ET.parse(junit).getroot().iter("testcase")
    places = [prop.get("value") for case in cases for prop in case.iter("property")
              if prop.get("name") == "hil_place"]
    assert sorted(places) == list(PLACES)
    labelled = [label["value"] for path in (tmp_path / "allure").glob("*-result.json")
                for label in json.loads(path.read_text())["labels"] if label["name"] == "place"]
    assert sorted(labelled) == list(PLACES)
    # Each worker said which place it holds and as whom: two workers, two places, one holder
    # each (the coordinator gave each place to one worker for the whole run).
    told = re.findall(r"hil: rig lab-nrf52832: place (\S+) \((\S+)\), device (\S+)",
                      done.stderr)
    assert sorted(place for place, _, _ in told) == list(PLACES), done.stderr
    assert len({holder for _, holder, _ in told}) == 2
    assert {place: dev for place, _, dev in told} == lab.dev_ids
    # The coordinator saw both places acquired at once, by two holders, and never one place by
    # two: its state names one holder per place.
    holders: dict[str, set[str]] = {}
    for moment in seen:
        for name, state in moment:
            if state.startswith("acquired by "):
                holders.setdefault(name, set()).add(state.removeprefix("acquired by "))
    assert {name: len(who) for name, who in holders.items()} == {p: 1 for p in PLACES}, seen
    assert holders[PLACES[0]] != holders[PLACES[1]]
    snapshot = lab.client.snapshot()
    assert all(snapshot.state(place) == "free" for place in snapshot.places.values())
    assert not snapshot.reservations


def test_a_place_by_name_makes_the_rig(lab: Lab, tmp_path: Path) -> None:
    """The coordinator named on the command line (no $LG_COORDINATOR), the place's parts
    checked before the first test."""
    env = {**lab.env}
    del env["LG_COORDINATOR"]
    done = pytest_run(lab, CASES[0], "--hil-place", PLACES[1], "--hil-coordinator",
                      lab.coordinator, "--hil-check-rigs", env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert re.search(r"^1 passed in ", done.stdout.strip().splitlines()[-1]), done.stdout
    assert f"place {PLACES[1]} (" in done.stderr
    assert f"device {lab.dev_ids[PLACES[1]]}" in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--hil-place-tags", "board=esp32"],
     "ERROR: --hil-place-tags board=esp32: no place at the coordinator {address} carries these "
     "tags (labgrid-client places)"),
    (["-o", "hil_place_tags=board=esp32"],        # the ini twin
     "ERROR: --hil-place-tags board=esp32: no place at the coordinator"),
    (["--hil-place-tags", "board"],
     "ERROR: --hil-place-tags: 'board' is not key=value (board=nrf52832,rack=b)"),
    (["--hil-place-tags", "Board=x"], "ERROR: --hil-place-tags Board=x: tags.Board"),
    (["--hil-place-tags", "board=nrf52832", "-n", "3"],
     "ERROR: --hil-place-tags board=nrf52832: -n 3, but 2 places match at {address}: a worker "
     "would wait for a place its own run holds (-n 2 at most)"),
    (["--hil-place", "bench-pa", "--hil-place-tags", "board=nrf52832"],
     "ERROR: --hil-place, --hil-place-tags: give one of them"),
    (["--hil-place", "bench-pa", "--hil-rig", "sim-nrf52832"],
     "ERROR: --hil-place bench-pa: the rig is built from the place; leave out --hil-rig"),
])
def test_a_run_on_places_that_cannot_be_is_one_line_naming_the_option(
        lab: Lab, args: list[str], message: str) -> None:
    done = pytest_run(lab, "testcases/test_detect.py", "--collect-only", *args, timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(message.format(address=lab.coordinator)), lines[0]


def test_a_place_without_its_identity_is_one_line(lab: Lab) -> None:
    lab.client.run("-p", "bench-bare", "create")
    try:
        lab.client.run("-p", "bench-bare", "add-match", f"{EXPORTER}/{PLACES[0]}/*")
        lab.client.run("-p", "bench-bare", "set-tags", "board=nrf52832")
        done = pytest_run(lab, "testcases/test_detect.py", "--collect-only",
                          "--hil-place", "bench-bare", timeout=120)
    finally:
        lab.client.run("-p", "bench-bare", "delete")
    assert done.returncode == 4
    assert done.stderr.strip() == (
        "ERROR: --hil-place bench-bare: place bench-bare has no product_id tag (its board: "
        "labgrid-client -p bench-bare set-tags board=... product_id=... dev_id=...)")


def test_a_coordinator_that_is_not_there_is_one_line_naming_the_option() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))      # bound, never listening: connections refused
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "testcases/test_detect.py", "--collect-only", "-q",
             "-p", "no:cacheprovider", "--hil-place-tags", "board=nrf52832",
             "--hil-coordinator", address], cwd=ROOT, capture_output=True, text=True,
            timeout=120, check=False)
    assert done.returncode == 4
    assert done.stderr.strip() == (
        f"ERROR: --hil-place-tags board=nrf52832: labgrid: reading the coordinator at {address}: "
        "labgrid.remote.client.ServerError: Error: Could not connect to coordinator")
