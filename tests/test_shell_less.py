"""Boards without a test shell (``console.shell: none``): the rig keys, the simulated firmware's
shipped mode, and an attempt read at the service alone, on a simulated shipped nRF52832."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from hil.conformance.expectations import load_profile
from hil.conformance.scenario import OtaScenario
from hil.errors import ConfigError, ConformanceFailure, RigFault, Unsupported
from hil.gateway import Gateway
from hil.gateway.dns import DnsServer
from hil.onenet.codes import Errno
from hil.onenet.messages import Endpoint
from hil.onenet.tasks import Package
from hil.rig.board import Board
from hil.rig.model import load_rig
from hil.rig.parts import RigParts
from hil.service.server import MockOneNet, new_access_key
from hil.service.timeline import Timeline
from hil.sim.images import build_image
from tests.sim_board import KEY_ENV, rig_document

ROOT = Path(__file__).resolve().parent.parent
HOST = "ota.heclouds.com"


def shipped_document(state_dir: Path, name: str = "shipped", **changes: Any) -> dict[str, Any]:
    doc = rig_document(name, "nrf52832", state_dir, shipped=True, http_timeout=1.0)
    doc["console"]["shell"] = "none"
    doc["console"]["events"] = {"boot": r"^I: app: firmware version (?P<version>\S+)$"}
    doc["ota"] = {"service": "mock", "trigger": "reset", "host": HOST, "port": 0,
                  "dns": {"listen": "127.0.0.1:0"}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            doc.setdefault(section, {})[field] = value
        else:
            doc[section] = value
    return doc


def load(tmp_path: Path, doc: dict[str, Any]) -> Any:
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_rig(path)


# ------------------------------------------------------------------------------- rig keys
@pytest.mark.parametrize(("changes", "message"), [
    ({"ota__trigger": "power-cycle", "power": {"kind": "none"}},
     "ota.trigger: power-cycle needs power the rig can cut (power.kind: scpi, usb-hub or "
     "command), not power.kind: none"),
    ({"ota__trigger": "wait"},
     "ota.trigger: wait needs ota.check_period (the seconds between the firmware's own checks)"),
    ({"rf": {"kind": "console"}},
     "rf.kind: console is the firmware's test hook, and this board has no shell"),
    ({"sim__shipped": False},
     "console.shell: none on a simulated rig needs sim.shipped: true"),
    ({"console__shell": "contract", "console__events": {}},
     "ota.trigger: only a board without a test shell (console.shell: none) is triggered so"),
    ({"console__shell": "maybe"}, "console.shell"),
    ({"ota": {"service": "mock", "trigger": "reset"}},
     "sim.shipped: the firmware is built to reach ota.host; give it"),
    ({"ota": {"service": "mock", "host": HOST, "dns": False}},
     "ota.dns: false: a simulated network has no DNS but hil's"),
    ({"ota": {"service": "mock", "host": HOST, "port": 0}},
     "ota.dns.listen: give one on a simulated rig, '127.0.0.1:0'"),
])
def test_a_shell_less_rig_file_mistake_is_one_line_naming_file_and_key(tmp_path, changes,
                                                                        message):
    with pytest.raises(ConfigError) as error:
        load(tmp_path, shipped_document(tmp_path / "state", **changes))
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(str(tmp_path / "rig.yaml"))
    assert message in text


def test_a_reset_trigger_needs_a_flasher(tmp_path):
    doc = shipped_document(tmp_path / "state", flasher={"kind": "none"})
    del doc["sim"]          # a lab rig: no simulated board to need the probe
    with pytest.raises(ConfigError, match=r"ota\.trigger: reset needs a flasher"):
        load(tmp_path, doc)


def test_the_shipped_rig_files_load_and_lack_the_shell_hooks():
    for board in ("nrf52832", "esp32", "gd32"):
        rig = load_rig(ROOT / "rigs" / f"sim-{board}-shipped.yaml")
        assert rig.shell_less
        assert rig.sim is not None
        assert rig.sim.shipped
        assert "space" not in rig.capabilities       # `test space` is a shell's hook
        # The firmware's build target is the rig's ota.host; port 0: the gateway's free port.
        assert rig.ota.host == HOST
        assert rig.ota.gateway_port == 0
        dns = rig.ota.dns_config
        assert dns is not None
        assert dns.listen_address(rig.ota.gateway_host or "127.0.0.1") == ("127.0.0.1", 0)


# ------------------------------------------------------------------------------- the scenario
class Shipped:
    """A simulated shipped nRF52832, a mock service, a gateway and hil's DNS answering the
    firmware's host with the gateway's address, and a scenario over them."""

    def __init__(self, tmp_path: Path, **changes: Any) -> None:
        self.rig = load(tmp_path, shipped_document(tmp_path / "state", **changes))
        self.mock = MockOneNet(access_key=os.environ[KEY_ENV],
                               timeline_path=tmp_path / "mock.jsonl").start()
        self.gateway = Gateway(self.mock.url, timeline=Timeline(tmp_path / "gw.jsonl"),
                               keep_host=True).start()
        self.dns = DnsServer({HOST: "127.0.0.1"}, "127.0.0.1", 0).start()
        self.questions: list[str] = []       # every name the DNS was asked for
        answer = self.dns.resolver.resolve

        def counted(request: Any, handler: Any) -> Any:
            self.questions.append(str(request.q.qname).rstrip("."))
            return answer(request, handler)
        self.dns.resolver.resolve = counted  # type: ignore[method-assign]
        self.parts = RigParts(self.rig).__enter__()
        self.board = Board(self.parts)
        self.board.restore_base(None)
        self.package = Package(build_image("nrf52832", "1.1.0"), "app-1.1.0.bin")
        self.ota = OtaScenario(rig=self.rig, board=self.board, gateway=self.gateway,
                               mock=self.mock,
                               profile=load_profile(ROOT / "fixtures/expectations/onenet.yaml"),
                               package=self.package, target="1.1.0", dns=self.dns)

    def close(self) -> None:
        self.parts.close()
        self.dns.stop()
        self.gateway.stop()
        self.gateway.timeline.close()
        self.mock.stop()


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shipped]:
    monkeypatch.setenv(KEY_ENV, new_access_key())
    setup = Shipped(tmp_path)
    yield setup
    setup.close()


def nothing_typed(setup: Shipped) -> None:
    sent = [line.text for line in setup.board.console.lines() if line.sent]
    assert sent == [], f"a shell-less board was typed at: {sent}"


def test_an_attempt_ends_on_its_final_report_and_reads_the_booted_version_at_the_service(
        shipped):
    attempt = shipped.ota.update()
    assert attempt.ended
    assert not attempt.timed_out
    shipped.ota.expect("success")
    # The version the board booted is the one it reported at the service after its 201.
    assert shipped.ota.booted_versions() == ["1.1.0"]
    reports = [e for e in attempt.exchanges if e.phase is Endpoint.VERSION]
    assert [e.request_body for e in reports][-1].count("1.1.0") == 1
    # Hard-coded host: the firmware named it (and its build's port, not http's 80), whatever
    # address it reached, which it asked hil's DNS for: at the check at boot and at the report
    # after the reboot into the new image, at least.
    port = urlsplit(shipped.gateway.url).port
    assert {e.request_headers.get("host") for e in attempt.exchanges} == {f"{HOST}:{port}"}
    assert shipped.questions.count(HOST) >= 2
    assert shipped.board.version() == "1.1.0"       # its boot-log line, after a reset
    nothing_typed(shipped)


@pytest.mark.parametrize("dns", ["stopped", "refusing"])
def test_a_shipped_board_whose_dns_answers_nothing_never_reaches_the_gateway(shipped, dns):
    address = shipped.dns.address
    shipped.dns.stop()
    if dns == "refusing":      # up, but authoritative for no name the firmware asks
        shipped.dns = DnsServer({}, *address).start()
    shipped.board.point_at(shipped.gateway.url, address)
    since = shipped.board.console.mark()
    shipped.board.start_update()                    # a reset: the firmware checks at boot
    shipped.board.console.expect(rf"^E: ota: cannot resolve {HOST}; no update check$", 30,
                                 since=since)
    assert shipped.ota.exchanges() == []
    nothing_typed(shipped)


def test_an_attempt_ends_on_a_refused_detect(shipped):
    shipped.ota.inject("no-task")
    attempt = shipped.ota.update()
    assert attempt.ended
    assert not attempt.timed_out
    shipped.ota.expect_detect(attempt, Errno.NO_TASK)
    assert [e.phase for e in attempt.exchanges] == [Endpoint.VERSION, Endpoint.DETECT]
    nothing_typed(shipped)


def test_an_attempt_ends_on_a_token_check_that_ends_the_task(shipped):
    # A cancelled token: the board gives up without a report (ONENET.md): that is its last word.
    shipped.ota.inject("cancel")
    attempt = shipped.ota.update()
    assert attempt.ended
    assert not attempt.timed_out
    assert attempt.exchanges[-1].phase is Endpoint.TOKEN_CHECK
    assert attempt.exchanges[-1].errno == Errno.TASK_CANCELLED
    shipped.ota.expect("token-ended")
    nothing_typed(shipped)


def test_an_attempt_ends_on_silence(tmp_path, monkeypatch):
    # A board that never reports a failure: after the corrupt package's md5 check its last
    # request is the 101; only silence ends the attempt.
    monkeypatch.setenv(KEY_ENV, new_access_key())
    silent = Shipped(tmp_path, sim__defects=["silent-after-failure"])
    try:
        silent.ota.inject("corrupt")
        attempt = silent.ota.update()
        assert attempt.ended
        assert not attempt.timed_out
        assert [e.result for e in attempt.exchanges if e.phase is Endpoint.REPORT] == [101]
        nothing_typed(silent)
    finally:
        silent.close()


@pytest.mark.parametrize(("name", "params", "hook"), [
    ("no-space", {}, "`test space`"),
    ("power-cut", {"during": "flash"}, "`ota phase=flash bytes=N`"),
])
def test_a_fault_that_needs_a_firmware_hook_is_unsupported_naming_it(shipped, name, params,
                                                                     hook):
    with pytest.raises(Unsupported, match=f"rig shipped has no shell: fault {name}.*{hook}"):
        shipped.ota.inject(name, **params)


def test_a_reboot_is_a_reset_through_the_flasher_and_needs_sys_reboot_only_without_one():
    from hil.faults.catalog import needs_a_shell

    assert needs_a_shell("reboot", {}, power="scpi", rf="attenuator", flasher="swd") is None
    assert needs_a_shell("reboot", {}, power="scpi", rf="attenuator",
                         flasher="none") == "the firmware hook `sys reboot`"


def test_no_shell_command_is_ever_sent(shipped):
    with pytest.raises(RigFault, match="has no shell"):
        shipped.board.command("version")
    nothing_typed(shipped)


def test_a_201_sent_before_the_reboot_is_caught_at_the_service(tmp_path, monkeypatch):
    # The console says nothing a test can read; the 201 came on the download's connection,
    # which the reboot into the new image would have closed.
    monkeypatch.setenv(KEY_ENV, new_access_key())
    early = Shipped(tmp_path, sim__defects=["201-before-reboot"])
    try:
        early.ota.update()
        with pytest.raises(ConformanceFailure, match=r"expected 201 only after the board "
                           r"rebooted.*on the connection its download used"):
            early.ota.expect("success")
    finally:
        early.close()


def test_a_board_without_a_boot_line_is_read_at_the_service_before_any_update(tmp_path,
                                                                              monkeypatch):
    # What the report's labels ask first, before the scenario's first update: the board's
    # network must already take it to the gateway, or its version report never comes.
    monkeypatch.setenv(KEY_ENV, new_access_key())
    quiet = Shipped(tmp_path, console__events={})
    try:
        assert not quiet.board.boot_line
        assert quiet.board.version() == "1.0.0"
        assert [e.phase for e in quiet.ota.exchanges()][:1] == [Endpoint.VERSION]
        nothing_typed(quiet)
    finally:
        quiet.close()


def test_the_reports_label_never_resets_a_board_whose_log_names_no_boot_line(tmp_path):
    """With --alluredir each test's report is labelled with the firmware the board runs. A
    shell-less board whose log names no boot line (the shipped ESP32) can only be asked by a
    reset, and the check it makes at boot, on the network already, began an attempt of its own
    while the test was still creating its task and arming its faults: on a loaded host it used
    them up, and the test's own attempt found errno 11 at detect. The label is the version the
    restore flashed; the board's first attempt is the test's."""
    import subprocess
    import sys

    from private_rig import private_sim_rig

    rig = private_sim_rig(tmp_path, "sim-esp32-shipped")
    records = tmp_path / "timelines"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "testcases/test_detect.py", "-k", "happy_path",
         "--hil-rig", str(rig.path), f"--alluredir={tmp_path / 'results'}",
         "--hil-timeline-dir", str(records), "-p", "no:cacheprovider", "-q"],
        cwd=ROOT, env=rig.env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    [timeline] = records.glob("*happy_path*.timeline.jsonl")
    exchanges = [json.loads(line) for line in timeline.read_text().splitlines()]
    exchanges = [e for e in exchanges if "kind" not in e]          # not the fault hits
    first_download = next(i for i, e in enumerate(exchanges) if e["phase"] == "download")
    before = exchanges[:first_download]
    assert [e.get("errno") for e in before if e["phase"] == "detect"] == [0], \
        [(e["phase"], e.get("errno")) for e in before]
    [result] = [json.loads(path.read_text())
                for path in (tmp_path / "results").glob("*-result.json")]
    assert {"name": "firmware", "value": "'1.0.0'"} in [
        {"name": p["name"], "value": p["value"]} for p in result["parameters"]]
