"""Rig files: typed, frozen, validated at load; every mistake is one line naming file and key."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from hil.boards import BOARDS
from hil.drivers.contract import COMMANDS, EVENTS
from hil.errors import ConfigError
from hil.rig import model as rig_model
from hil.rig.model import Rig, find_rig, load_rig

RIGS_DIR = Path(__file__).resolve().parent.parent / "rigs"

# A valid rig of each board, as Python data; the mistakes below are edits of these.
NRF: dict[str, Any] = {
    "name": "bench-01",
    "board": "nrf52832",
    "chip": "nrf52832_xxaa",
    "identity": {"product_id": "245528", "dev_id": "527776559", "access_key_env": "HIL_KEY"},
    "console": {"port": "/dev/ttyACM0", "baudrate": 115200},
    "flasher": {"kind": "swd", "probe": "000683000000", "target": "nrf52832"},
    "power": {"kind": "scpi", "url": "socket://127.0.0.1:5025"},
    "rf": {"kind": "console"},
    "ota": {"service": "mock"},
}
ESP: dict[str, Any] = {
    "name": "bench-02",
    "board": "esp32",
    "identity": {"product_id": "245528", "dev_id": "527776560"},
    "console": {"serial_number": "0001"},
    "flasher": {"kind": "esp", "port": "/dev/ttyUSB0"},
}
MINIMAL: dict[str, Any] = {
    "name": "bench-03",
    "board": "gd32",
    "identity": {"product_id": "245528", "dev_id": "527776561"},
    "console": {"port": "/dev/ttyUSB1"},
}


DROP = object()


def edited(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``base`` with top-level keys replaced; ``key=DROP`` removes a key; ``a__b=...`` goes one
    level down (``console__port=DROP``)."""
    doc = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = doc
        for parent in parents:
            target = target[parent]
        if value is DROP:
            target.pop(key, None)
        else:
            target[key] = value
    return doc


def write(tmp_path: Path, doc: Any = None, *, text: str | None = None,
          name: str = "bench.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False) if text is None else text,
                    encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_rig(path)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, f"not one line: {message!r}"
    return message


# ------------------------------------------------------------------------- the example rigs
EXAMPLES = {
    "lab-esp32": ("esp32", "esp32-wroom-32", {"console", "space", "flasher", "power", "rf"}),
    "lab-gd32": ("gd32", "gd32f103c8", {"console", "space", "flasher"}),
    "lab-nrf52832": ("nrf52832", "nrf52832_xxaa",
                     {"console", "space", "flasher", "power", "power_cut", "rf"}),
    **{f"sim-{board}": (board, chip, {"console", "space", "flasher", "power", "power_cut", "rf"})
       for board, chip in [("esp32", "esp32-wroom-32"), ("gd32", "gd32f103c8"),
                           ("nrf52832", "nrf52832_xxaa")]},
    # Firmware as it ships: no shell, so no `test space` hook.
    **{f"sim-{board}-shipped": (board, chip, {"console", "flasher", "power", "power_cut", "rf"})
       for board, chip in [("esp32", "esp32-wroom-32"), ("gd32", "gd32f103c8"),
                           ("nrf52832", "nrf52832_xxaa")]},
    # The C agent run as a board (hil.rig.providers.process): SIGKILL is its power cut.
    # No shell (console.shell: none): no `test space` hook.
    "host-agent": ("nrf52832", "nrf52832_xxaa", {"console", "flasher", "power_cut"}),
}


def test_the_examples_are_the_ones_this_test_knows():
    assert {path.stem for path in RIGS_DIR.glob("*.yaml")} == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_rig_loads(name):
    board, part, capabilities = EXAMPLES[name]
    rig = load_rig(RIGS_DIR / f"{name}.yaml")
    assert isinstance(rig, Rig)
    assert rig.name == name
    assert rig.board == board
    assert rig.family is BOARDS[board]
    assert rig.part_number == part
    assert rig.capabilities == frozenset(capabilities)
    # Simulated rigs sign with their own variable, set to a fresh key when unset.
    assert rig.identity.access_key_env == (
        "HIL_SIM_ACCESS_KEY" if rig.sim else
        "HIL_HOST_ACCESS_KEY" if rig.console.command else "HIL_ACCESS_KEY")
    assert rig.ota.service == "mock"
    assert (rig.sim is not None) == name.startswith("sim-")


def test_the_examples_in_detail():
    esp = load_rig(RIGS_DIR / "lab-esp32.yaml")
    assert (esp.console.serial_number, esp.console.port, esp.console.address) == \
        ("0001", None, "serial number 0001")
    assert (esp.flasher.kind, esp.flasher.port, esp.flasher.baudrate) == \
        ("esp", "/dev/ttyUSB0", 460800)
    assert (esp.power.kind, esp.rf.kind, esp.rf.max_db, esp.rf.step_db) == \
        ("console", "attenuator", 95.0, 0.25)

    gd32 = load_rig(RIGS_DIR / "lab-gd32.yaml")
    assert (gd32.flasher.kind, gd32.flasher.probe, gd32.flasher.target, gd32.flasher.pack) == \
        ("swd", "066DFF000000", "gd32f103c8", None)
    assert (gd32.power.kind, gd32.rf.kind, gd32.console.address) == ("none", "none", "/dev/ttyUSB1")

    nrf = load_rig(RIGS_DIR / "lab-nrf52832.yaml")
    assert nrf.identity.dev_id == "527776559"
    assert (nrf.power.kind, nrf.power.url, nrf.power.channel) == \
        ("scpi", "socket://127.0.0.1:5025", 1)
    assert (nrf.power.empty_volts, nrf.power.full_volts) == (3.3, 4.2)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_find_rig_by_name_gives_the_file_in_the_rigs_dir(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # nothing of that name here: a name, not a path
    path = find_rig(name, RIGS_DIR)
    assert path == RIGS_DIR / f"{name}.yaml"
    assert load_rig(path).name == name


def test_find_rig_takes_a_path_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rig_file = write(elsewhere, NRF, name="bench-01.yaml")
    unsuffixed = write(tmp_path, NRF, name="bench-01")   # exists in the working dir

    assert find_rig(str(rig_file), RIGS_DIR) == rig_file
    assert find_rig("elsewhere/bench-01.yaml", RIGS_DIR) == Path("elsewhere/bench-01.yaml")
    assert find_rig("bench-01.yml", RIGS_DIR) == Path("bench-01.yml")
    assert find_rig("sub/dir/bench", RIGS_DIR) == Path("sub/dir/bench")
    assert find_rig("bench-01", RIGS_DIR) == Path("bench-01")
    assert load_rig(find_rig("elsewhere/bench-01.yaml", RIGS_DIR)).name == "bench-01"
    assert load_rig(find_rig("bench-01", RIGS_DIR)) == load_rig(unsuffixed)


def test_find_rig_of_an_unknown_name_fails_at_load_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = find_rig("no-such-bench", tmp_path / "rigs")
    assert path == tmp_path / "rigs" / "no-such-bench.yaml"
    assert config_error(path).startswith(f"{path}: cannot read")


# --------------------------------------------------------------------- defaults and types
def test_a_minimal_rig_gets_the_defaults(tmp_path):
    rig = load_rig(write(tmp_path, MINIMAL))
    assert rig.chip is None
    assert rig.part_number == BOARDS["gd32"].default_chip == "gd32f103c8"
    assert rig.identity.access_key_env == "HIL_ACCESS_KEY"
    assert rig.identity.device_name is None
    console = rig.console
    assert (console.port, console.url, console.serial_number) == ("/dev/ttyUSB1", None, None)
    assert console.baudrate == 115200
    assert (console.ok, console.err) == (r"^OK$", r"^ERR (?P<reason>.*)$")
    assert (console.commands, console.events) == ({}, {})
    assert (rig.flasher.kind, rig.power.kind, rig.rf.kind) == ("none", "none", "none")
    assert (rig.ota.service, rig.ota.gateway_host) == ("mock", None)
    assert rig.tags == ()
    assert rig.capabilities == frozenset({"console", "space"})


def test_the_default_console_patterns_match_the_contract_answers(tmp_path):
    console = load_rig(write(tmp_path, MINIMAL)).console
    assert re.match(console.ok, "OK")
    assert not re.match(console.ok, "OK then")
    found = re.match(console.err, "ERR no space left")
    assert found is not None
    assert found.group("reason") == "no space left"


def test_part_defaults(tmp_path):
    rig = load_rig(write(tmp_path, edited(
        MINIMAL, flasher={"kind": "swd", "probe": "P1"},
        power={"kind": "scpi", "url": "/dev/ttyUSB9"},
        rf={"kind": "attenuator", "url": "socket://10.0.0.2:5025"})))
    assert (rig.flasher.target, rig.flasher.pack, rig.flasher.frequency) == (None, None, 4_000_000)
    assert (rig.power.channel, rig.power.current_limit) == (1, 1.0)
    assert (rig.power.empty_volts, rig.power.full_volts) == (3.3, 4.2)
    assert (rig.rf.dialect, rig.rf.max_db, rig.rf.step_db) == ("scpi", 95.0, 0.25)
    assert (rig.rf.signal_at_0db, rig.rf.db_per_level) == (31, 2.0)

    esp = load_rig(write(tmp_path, edited(ESP, flasher={"kind": "esp"}), name="esp.yaml"))
    assert (esp.flasher.port, esp.flasher.baudrate) == (None, 460800)


def test_overridden_console_patterns_and_contract(tmp_path):
    rig = load_rig(write(tmp_path, edited(
        MINIMAL, console={"url": "socket://10.0.0.3:23", "ok": "^done$",
                          "err": "^fail: (?P<reason>.*)",
                          "commands": {"check": "fw ota", "space": "fill {bytes}"},
                          "events": {"end": r"^OTA finished$"}})))
    console = rig.console
    assert (console.ok, console.err) == ("^done$", "^fail: (?P<reason>.*)")
    assert console.commands == {"check": "fw ota", "space": "fill {bytes}"}
    assert console.events == {"end": r"^OTA finished$"}
    assert console.address == "socket://10.0.0.3:23"


def test_numbers_as_ids_become_strings(tmp_path):
    path = write(tmp_path, text="""\
name: bench-01
board: nrf52832
identity: {product_id: 245528, dev_id: 527776559}
console: {port: /dev/ttyACM0}
""")
    identity = load_rig(path).identity
    assert identity.product_id == "245528"
    assert identity.dev_id == "527776559"
    assert isinstance(identity.dev_id, str)


def test_a_url_ota_service_and_gateway(tmp_path):
    rig = load_rig(write(tmp_path, edited(
        MINIMAL, ota={"service": "https://ota.example.com/api", "gateway_host": "10.0.0.1"})))
    assert (rig.ota.service, rig.ota.gateway_host) == ("https://ota.example.com/api", "10.0.0.1")
    rig = load_rig(write(tmp_path, edited(MINIMAL, ota={"service": "http://127.0.0.1:8080"})))
    assert rig.ota.service == "http://127.0.0.1:8080"


@pytest.mark.parametrize(("board", "chip"), [
    (board, chip) for board, family in BOARDS.items() for chip in family.chips])
def test_every_part_of_a_board_is_accepted(tmp_path, board, chip):
    rig = load_rig(write(tmp_path, edited(MINIMAL, board=board, chip=chip)))
    assert rig.part_number == chip
    assert rig.family is BOARDS[board]


def test_the_issue_chips():
    assert "gd32f103c8" in BOARDS["gd32"].chips
    assert "nrf52832_xxaa" in BOARDS["nrf52832"].chips
    assert "esp32-wroom-32" in BOARDS["esp32"].chips


def test_a_gd32_swd_flasher_may_name_a_pack(tmp_path):
    rig = load_rig(write(tmp_path, edited(
        MINIMAL, flasher={"kind": "swd", "probe": "066D", "pack": "packs/GD32F10x.pack"})))
    assert rig.flasher.pack == Path("packs/GD32F10x.pack")


# ------------------------------------------------------------------------------- frozen
def test_the_rig_is_frozen(tmp_path):
    rig = load_rig(write(tmp_path, NRF))
    with pytest.raises(ValidationError):
        rig.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        rig.console.baudrate = 9600  # type: ignore[misc]
    with pytest.raises(ValidationError):
        rig.flasher.probe = "other"  # type: ignore[misc,union-attr]
    with pytest.raises(ValidationError):
        rig.identity.dev_id = "1"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        rig.power.kind = "none"  # type: ignore[misc,assignment]
    assert rig.name == "bench-01"
    assert rig.console.baudrate == 115200


# ------------------------------------------------------------------------- capabilities
FLASHERS = {"swd": {"kind": "swd", "probe": "P1"}, "none": {"kind": "none"}}
POWERS = {"scpi": {"kind": "scpi", "url": "socket://10.0.0.5:5025"},
          "console": {"kind": "console"}, "none": {"kind": "none"}}
RFS = {"attenuator": {"kind": "attenuator", "url": "socket://10.0.0.6:5025"},
       "console": {"kind": "console"}, "none": {"kind": "none"}}


@pytest.mark.parametrize("flasher", sorted(FLASHERS))
@pytest.mark.parametrize("power", sorted(POWERS))
@pytest.mark.parametrize("rf", sorted(RFS))
def test_capabilities_follow_the_parts(tmp_path, flasher, power, rf):
    rig = load_rig(write(tmp_path, edited(
        MINIMAL, flasher=FLASHERS[flasher], power=POWERS[power], rf=RFS[rf])))
    expected = {"console", "space"}
    if flasher != "none":
        expected.add("flasher")
    if power != "none":
        expected.add("power")
    if power == "scpi":
        expected.add("power_cut")
    if rf != "none":
        expected.add("rf")
    assert rig.capabilities == frozenset(expected)
    assert isinstance(rig.capabilities, frozenset)


@pytest.mark.parametrize("flasher", [{"kind": "esp"}, {"kind": "none"}])
def test_esp32_capabilities(tmp_path, flasher):
    rig = load_rig(write(tmp_path, edited(ESP, flasher=flasher)))
    assert ("flasher" in rig.capabilities) is (flasher["kind"] == "esp")
    assert {"console", "space"} <= rig.capabilities
    assert "power_cut" not in rig.capabilities


# ------------------------------------------------------------------------------ mistakes
# (the rig as data, the key the one-line message must name, and text the message must hold)
MISTAKES: dict[str, tuple[Any, str, str]] = {
    # unknown keys, anywhere
    "unknown top-level key": (edited(NRF, colour="blue"), "colour", "Extra inputs"),
    "unknown console key": (edited(NRF, console__speed=9600), "console.speed", "Extra inputs"),
    "unknown flasher key": (edited(NRF, flasher__speed=1), "flasher.speed", "Extra inputs"),
    "unknown esp flasher key": (edited(ESP, flasher__probe="P"), "flasher.probe", "Extra inputs"),
    "unknown power key": (edited(NRF, power__volts=3.3), "power.volts", "Extra inputs"),
    "key of another power kind": (edited(NRF, power={"kind": "none", "url": "x"}), "power.url",
                                  "Extra inputs"),
    "unknown rf key": (edited(NRF, rf__db=10), "rf.db", "Extra inputs"),
    "unknown identity key": (edited(NRF, identity__secret="x"), "identity.secret", "Extra inputs"),
    "unknown ota key": (edited(NRF, ota__url="http://x"), "ota.url", "Extra inputs"),
    # the key itself never lives in a rig file
    "access_key at top level": (edited(NRF, access_key="c2VjcmV0"), "access_key", "Extra inputs"),
    "access_key in identity": (edited(NRF, identity__access_key="c2VjcmV0"),
                               "identity.access_key", "Extra inputs"),
    # wrong types and values
    "baudrate a word": (edited(NRF, console__baudrate="fast"), "console.baudrate",
                        "valid integer"),
    "baudrate zero": (edited(NRF, console__baudrate=0), "console.baudrate", "greater than 0"),
    "frequency negative": (edited(NRF, flasher__frequency=-1), "flasher.frequency",
                           "greater than 0"),
    "channel zero": (edited(NRF, power__channel=0), "power.channel",
                     "greater than or equal to 1"),
    "channel a word": (edited(NRF, power__channel="one"), "power.channel", "valid integer"),
    "esp baudrate a float": (edited(ESP, flasher__baudrate=1.5), "flasher.baudrate",
                             "valid integer"),
    "volts negative": (edited(NRF, power__full_volts=-4.2), "power.full_volts", "greater than 0"),
    "attenuator max_db a word": (edited(NRF, rf={"kind": "attenuator", "url": "x", "max_db": "a"}),
                                 "rf.max_db", "valid number"),
    "attenuator dialect": (edited(NRF, rf={"kind": "attenuator", "url": "x", "dialect": "y"}),
                           "rf.dialect", "minicircuits"),
    "console a string": (edited(NRF, console="/dev/ttyACM0"), "console", "dictionary"),
    "identity a list": (edited(NRF, identity=["245528"]), "identity", "dictionary"),
    "dev_id null": (edited(NRF, identity__dev_id=None), "identity.dev_id", "valid string"),
    "dev_id empty": (edited(NRF, identity__dev_id=""), "identity.dev_id", "at least 1"),
    "access_key_env not a variable name": (edited(NRF, identity__access_key_env="MY-KEY"),
                                           "identity.access_key_env", "pattern"),
    "name with a space": (edited(NRF, name="bench 01"), "name", "pattern"),
    "tags a string": (edited(NRF, tags="fast"), "tags", "valid tuple"),
    # missing keys
    "missing name": (edited(NRF, name=DROP), "name", "Field required"),
    "missing board": (edited(NRF, board=DROP), "board", "Field required"),
    "missing identity": (edited(NRF, identity=DROP), "identity", "Field required"),
    "missing identity.dev_id": (edited(NRF, identity__dev_id=DROP), "identity.dev_id",
                                "Field required"),
    "missing identity.product_id": (edited(NRF, identity__product_id=DROP),
                                    "identity.product_id", "Field required"),
    "missing console": (edited(NRF, console=DROP), "console",
                        "give exactly one of port, url or serial_number"),
    "missing flasher.probe": (edited(NRF, flasher={"kind": "swd"}), "flasher.probe",
                              "Field required"),
    "missing power.url": (edited(NRF, power={"kind": "scpi"}), "power.url", "Field required"),
    "missing rf.url": (edited(NRF, rf={"kind": "attenuator"}), "rf.url", "Field required"),
    # the console port
    "console without a port": (edited(NRF, console={"baudrate": 115200}), "console",
                               "exactly one of port, url or serial_number"),
    "console with port and url": (edited(NRF, console__url="socket://10.0.0.3:23"), "console",
                                  "exactly one of port, url or serial_number (got port, url)"),
    "console with port and serial": (edited(NRF, console__serial_number="0001"), "console",
                                     "(got port, serial_number)"),
    "console with all three": (edited(NRF, console={"port": "a", "url": "b",
                                                    "serial_number": "c"}),
                               "console", "(got port, url, serial_number)"),
    # boards, chips and the flasher they take
    "unknown board": (edited(NRF, board="stm32"), "board",
                      "unknown board 'stm32'; known: esp32, nrf52832, gd32"),
    "board in capitals": (edited(NRF, board="NRF52832"), "board", "unknown board"),
    "chip of another board": (edited(NRF, chip="esp32-wroom-32"), "chip",
                              "'esp32-wroom-32' is not a nrf52832 part"),
    "chip of gd32 on esp32": (edited(ESP, chip="gd32f103c8"), "chip", "is not a esp32 part"),
    "swd on esp32": (edited(ESP, flasher={"kind": "swd", "probe": "P1"}), "flasher.kind",
                     "esp32 has no SWD"),
    "esp on nrf52832": (edited(NRF, flasher={"kind": "esp"}), "flasher.kind",
                        "a nrf52832 is flashed with kind: swd"),
    "esp on gd32": (edited(MINIMAL, flasher={"kind": "esp"}), "flasher.kind",
                    "a gd32 is flashed with kind: swd"),
    # unknown kinds
    "unknown flasher kind": (edited(NRF, flasher={"kind": "jtag"}), "flasher",
                             "kind must be one of swd, esp, process, none"),
    "unknown power kind": (edited(NRF, power={"kind": "relay"}), "power",
                           "kind must be one of scpi, usb-hub, command, console, process, "
                           "labgrid, none"),
    "unknown rf kind": (edited(NRF, rf={"kind": "shield"}), "rf",
                        "kind must be one of attenuator, console, none"),
    "rf without a kind": (edited(NRF, rf={}), "rf", "kind must be one of"),
    "flasher kind a number": (edited(NRF, flasher={"kind": 1}), "flasher", "kind must be one of"),
    "flasher a bare word": (edited(NRF, flasher="swd"), "flasher", "kind must be one of"),
    # the OTA service
    "ota service ftp": (edited(NRF, ota={"service": "ftp://ota.example.com"}), "ota.service",
                        "must be mock or an http(s):// base URL"),
    "ota service a host": (edited(NRF, ota={"service": "ota.example.com"}), "ota.service",
                           "must be mock or an http(s):// base URL"),
    "ota service Mock": (edited(NRF, ota={"service": "Mock"}), "ota.service", "must be mock"),
    # console patterns and the contract
    "console.ok not a regex": (edited(NRF, console__ok="(["), "console.ok",
                               "is not a regular expression"),
    "console.err not a regex": (edited(NRF, console__err="ERR (?P<reason"), "console.err",
                                "is not a regular expression"),
    "unknown console command": (edited(NRF, console__commands={"flash": "fw flash"}),
                                "console.commands", "unknown command 'flash'"),
    "unknown console event": (edited(NRF, console__events={"crash": "^panic"}),
                              "console.events", "unknown event 'crash'"),
    "console event not a regex": (edited(NRF, console__events={"boot": "(boot"}),
                                  "console.events", "is not a regular expression"),
    "console commands a list": (edited(NRF, console__commands=["check"]), "console.commands",
                                "dictionary"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_is_one_line_naming_file_and_key(tmp_path, case):
    doc, key, text = MISTAKES[case]
    path = write(tmp_path, doc)
    message = config_error(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert text in message, message


def test_the_error_carries_where_and_what(tmp_path):
    path = write(tmp_path, edited(NRF, console__baudrate="fast"))
    with pytest.raises(ConfigError) as caught:
        load_rig(path)
    assert caught.value.where == f"{path}: console.baudrate"
    assert caught.value.message == "Input should be a valid integer"


def test_two_mistakes_name_the_first_and_count_the_rest(tmp_path):
    path = write(tmp_path, edited(NRF, colour="blue", board=DROP))
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert message.endswith(" (and 1 more)")


def test_swd_on_esp32_says_esp32_has_no_swd(tmp_path):
    path = write(tmp_path, edited(ESP, flasher={"kind": "swd", "probe": "P1"}))
    assert config_error(path) == f"{path}: flasher.kind: esp32 has no SWD port; use kind: esp"


@pytest.mark.parametrize(("text", "line"), [
    ("name: bench-01\nboard: esp32\nidentity:\n  product_id: '1'\n  dev_id: 2: 3\n"
     "console: {port: x}\n", 5),
    ("name: bench-01\nboard: esp32\nidentity:\n\tproduct_id: 1\n", 4),
    ("name: bench-01\nboard: [esp32\n", 3),
    ("name: 'bench-01\n", 2),
])
def test_invalid_yaml_names_its_line(tmp_path, text, line):
    path = write(tmp_path, text=text)
    assert config_error(path) == f"{path}: line {line}: not valid YAML"


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n"])
def test_an_empty_file_is_one_line(tmp_path, text):
    path = write(tmp_path, text=text)
    assert config_error(path).startswith(f"{path}: (top level): ")


@pytest.mark.parametrize("text", ["- name: bench-01\n- board: esp32\n", "bench-01\n", "42\n",
                                  "[]\n"])
def test_a_file_that_is_not_a_mapping_is_one_line(tmp_path, text):
    path = write(tmp_path, text=text)
    message = config_error(path)
    assert message.startswith(f"{path}: (top level): "), message
    assert "dictionary" in message


def test_a_missing_file_and_a_directory_are_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert config_error(missing) == f"{missing}: cannot read: No such file or directory"
    assert config_error(tmp_path).startswith(f"{tmp_path}: cannot read: ")


@pytest.mark.parametrize("key", ["1", "~", "true", "1.5"])
def test_a_key_that_is_not_a_string_is_one_line(tmp_path, key):
    path = write(tmp_path, text=yaml.safe_dump(NRF) + f"{key}: 2\n")
    assert config_error(path).startswith(f"{path}: ")


@pytest.mark.parametrize("edit", [
    pytest.param(lambda doc: {**doc, "line\nbreak": 1}, id="top level"),
    pytest.param(lambda doc: edited(doc, console={**doc["console"], "line\nbreak": 1}),
                 id="console"),
])
def test_an_unknown_key_with_a_line_break_is_still_one_line(tmp_path, edit):
    # A quoted YAML key may hold a newline ("line\nbreak": 1); the message must stay one line.
    path = write(tmp_path, edit(NRF))
    message = config_error(path)   # asserts one line
    assert message.startswith(f"{path}: ")


@pytest.mark.parametrize("content", [
    pytest.param(("# bench in the caf\xe9 lab\n" + yaml.safe_dump(NRF)).encode("latin-1"),
                 id="latin-1 comment"),
    pytest.param(b"\xff\xfe\x00\x01\x89PNG", id="binary"),
    pytest.param(yaml.safe_dump(NRF).replace("115200", "1" * 5000).encode(),
                 id="integer too long to convert"),
])
def test_a_file_that_is_not_readable_yaml_text_is_one_line(tmp_path, content):
    path = tmp_path / "bench.yaml"
    path.write_bytes(content)
    assert config_error(path).startswith(f"{path}: ")


# ------------------------------------------------------------- property: only ConfigError
def _field_names(models: list[type[BaseModel]]) -> list[str]:
    return sorted({name for model in models for name in model.model_fields})


PART_MODELS = [obj for obj in vars(rig_model).values()
               if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not BaseModel]
KEYS = _field_names(PART_MODELS)
WORDS = sorted({*KEYS, *BOARDS, *(chip for family in BOARDS.values() for chip in family.chips),
                "swd", "esp", "none", "scpi", "console", "attenuator", "mock", "minicircuits",
                "access_key", *COMMANDS, *EVENTS, "http://127.0.0.1:8080", "(", "^OK$"})

_text = st.text(st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp")), max_size=12)
_keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(WORDS), _text)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(WORDS), _text)
_documents = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(_keys, children, max_size=6)),
    max_leaves=30)


def _graft(base: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    target = doc
    for key in path[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[path[-1]] = value
    return doc


_grafted = st.builds(_graft, st.sampled_from([NRF, ESP, MINIMAL]),
                     st.lists(_keys, min_size=1, max_size=3), _documents)


def _loads_or_is_one_line(path: Path) -> None:
    try:
        rig = load_rig(path)
    except ConfigError as error:
        message = str(error)
        assert len(message.splitlines()) == 1, message
        assert message.startswith(f"{path}: "), message
    else:
        assert isinstance(rig, Rig)
        assert rig.board in BOARDS


def _check_only_config_errors(doc: Any, directory: Path) -> None:
    path = directory / "bench.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    _loads_or_is_one_line(path)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rig-property")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_documents)
def test_any_document_loads_or_is_one_config_error_line(scratch, doc):
    _check_only_config_errors(doc, scratch)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_grafted)
def test_any_edit_of_a_valid_rig_loads_or_is_one_config_error_line(scratch, doc):
    _check_only_config_errors(doc, scratch)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=200))
def test_any_text_loads_or_is_one_config_error_line(scratch, text):
    path = scratch / "text.yaml"
    path.write_text(text, encoding="utf-8")
    _loads_or_is_one_line(path)
