"""Bench instrument drivers against emulated instruments on real ptys and TCP sockets, and the
console-hook drivers against a recording fake console.

The instruments (tests/scpi_instrument.py) are served on the same transports the drivers meet in a
lab: a serial device path and a raw SCPI socket. Faults a lab shows (a silent instrument, garbage
on the line, a rejected setting, an unplugged cable) must each end in a RigFault naming the part,
within the driver's timeout.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from scpi_instrument import (
    EmulatedAttenuator,
    EmulatedSupply,
    Server,
    TcpServer,
    free_tcp_port,
    serve,
)
from serial.urlhandler import protocol_socket

from hil.drivers.base import ConsoleProtocol, LogLine, PowerProtocol, RfProtocol
from hil.drivers.hooks import ConsoleHookPower, ConsoleHookRf, ConsoleHookSpace
from hil.drivers.power import ChannelScpiPower, ScpiPower
from hil.drivers.rf import Attenuator, MiniCircuitsAttenuator
from hil.errors import CommandRefused, FirmwareFault, RigFault

FAST = 0.3   # driver timeout for tests that wait for silence


@pytest.fixture(autouse=True)
def _no_reconnect_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyserial's ``socket://`` close sleeps 0.3 s, so that a LAN instrument serving a single
    connection has freed it before a quick reconnect. The emulator serves any number; without this
    the TCP half of this file would spend most of its time asleep."""
    monkeypatch.setattr(protocol_socket, "time", SimpleNamespace(sleep=lambda seconds: None))


@pytest.fixture(params=["pty", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    transport: str = request.param
    return transport


@pytest.fixture
def supply() -> EmulatedSupply:
    return EmulatedSupply()


@pytest.fixture
def supply_server(supply: EmulatedSupply, transport: str) -> Iterator[Server]:
    with serve(supply, "pty" if transport == "pty" else "tcp") as server:
        yield server


@pytest.fixture
def power(supply_server: Server) -> Iterator[ScpiPower]:
    with ScpiPower(supply_server.url) as power:
        yield power


def _elapsed(since: float) -> float:
    return time.monotonic() - since


# ------------------------------------------------------------------------------ ScpiPower
def test_open_identifies_and_sets_the_current_limit_first(
    power: ScpiPower, supply: EmulatedSupply
) -> None:
    assert power.identify() == "EMU,SUPPLY-3,0001,1.0"
    assert supply.current_limit == 1.0   # the emulator starts at 3 A
    assert supply.log == ["*IDN?", "*CLS", "CURR 1.000", "SYST:ERR?"]
    assert isinstance(power, PowerProtocol)
    assert power.can_cut


def test_set_and_measure_voltage_and_current(power: ScpiPower, supply: EmulatedSupply) -> None:
    power.set_voltage(3.7)
    power.output(True)
    assert supply.output
    assert power.measure_voltage() == pytest.approx(3.7)
    assert power.measure_current() == pytest.approx(3.7 / 20)   # the emulated 20 ohm board

    power.set_current_limit(0.1)
    assert supply.current_limit == 0.1
    assert power.measure_current() == pytest.approx(0.1)        # limited

    power.output(False)
    assert not supply.output
    assert power.measure_voltage() == 0.0
    assert power.measure_current() == 0.0
    assert "OUTP ON" in supply.log
    assert "OUTP OFF" in supply.log


@pytest.mark.parametrize(("percent", "volts"), [(0, 3.3), (50, 3.75), (100, 4.2)])
def test_set_level_maps_a_li_ion_cell_linearly(
    power: ScpiPower, supply: EmulatedSupply, percent: int, volts: float
) -> None:
    power.set_level(percent)
    assert supply.volts == pytest.approx(volts, abs=0.0005)


@pytest.mark.parametrize("transport", ["pty"])
def test_set_level_follows_the_configured_cell(
    supply_server: Server, supply: EmulatedSupply
) -> None:
    with ScpiPower(supply_server.url, empty_volts=2.0, full_volts=3.0) as power:
        power.set_level(25)
    assert supply.volts == pytest.approx(2.25)


@pytest.mark.parametrize("percent", [-1, 101])
def test_set_level_outside_0_100_is_a_test_mistake(
    power: ScpiPower, supply: EmulatedSupply, percent: int
) -> None:
    sent = len(supply.log)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        power.set_level(percent)
    assert len(supply.log) == sent


def test_a_rejected_setting_names_the_command_and_the_error(
    power: ScpiPower, supply: EmulatedSupply
) -> None:
    with pytest.raises(RigFault) as caught:
        power.set_voltage(40)   # the emulated supply goes to 32 V
    assert caught.value.part == "power"
    assert 'VOLT 40.000 failed: -222,"Data out of range"' in str(caught.value)
    assert supply.volts == 0.0

    # An error the instrument queued for its own reasons, reported after the next command; the
    # whole queue is read, so the command after that starts clean.
    supply.queue_error('-310,"System error"')
    supply.queue_error('-350,"Queue overflow"')
    with pytest.raises(RigFault) as caught:
        power.output(True)
    assert 'OUTP ON failed: -310,"System error"; -350,"Queue overflow"' in str(caught.value)
    power.set_voltage(3.3)
    assert supply.volts == 3.3


def test_silent_instrument_fails_open_within_the_timeout(
    supply_server: Server, supply: EmulatedSupply
) -> None:
    supply.silent = True
    power = ScpiPower(supply_server.url, timeout=FAST)
    started = time.monotonic()
    with pytest.raises(RigFault) as caught:
        power.open()
    assert _elapsed(started) < 2
    assert caught.value.part == "power"
    assert caught.value.message == f"{supply_server.url}: no answer to *IDN? within 0.3 s"
    assert not power.link.is_open   # a failed open gives the port back
    power.close()


@pytest.mark.parametrize("answer", ["HTTP/1.1 400 Bad Request", "OK", "RIGOL DP832"])
def test_something_else_at_the_address_is_not_taken_for_the_instrument(answer: str) -> None:
    # Seen on a lab network: a web server answering the supply's address passed as *IDN?.
    with TcpServer(EmulatedSupply(idn=answer)) as server:
        power = ScpiPower(server.url, timeout=FAST)
        with pytest.raises(RigFault) as caught:
            power.open()
    assert caught.value.message == (f"{server.url}: *IDN? answered {answer!r}: not a power "
                                    "instrument's identity")
    assert not power.link.is_open


@pytest.mark.parametrize("transport", ["pty"])
def test_silent_instrument_message_with_the_default_timeout(
    supply_server: Server, supply: EmulatedSupply
) -> None:
    supply.silent = True
    started = time.monotonic()
    with pytest.raises(RigFault) as caught:
        ScpiPower(supply_server.url).open()
    assert 1.9 < _elapsed(started) < 4.5
    assert str(caught.value) == f"power: {supply_server.url}: no answer to *IDN? within 2 s"


@pytest.mark.parametrize(
    ("garbage", "complaint"),
    [
        (b"\xff\xfe#!\n", r"MEAS:VOLT? answered '\\xff\\xfe#!', not a number"),
        (b"9.91E37\n", "MEAS:VOLT? answered '9.91E37', not a number"),   # SCPI's NaN
        (b"\n", "MEAS:VOLT? answered '', not a number"),
        (b"3.70", "incomplete answer to MEAS:VOLT? within 0.3 s: b'3.70'"),
    ],
)
def test_garbled_measurement_is_a_rig_fault(
    supply_server: Server, supply: EmulatedSupply, garbage: bytes, complaint: str
) -> None:
    with ScpiPower(supply_server.url, timeout=FAST) as power:
        supply.garbage = garbage
        with pytest.raises(RigFault) as caught:
            power.measure_voltage()
    assert caught.value.part == "power"
    assert complaint in caught.value.message


def test_a_late_answer_is_not_taken_for_the_next_one(
    supply_server: Server, supply: EmulatedSupply
) -> None:
    with ScpiPower(supply_server.url, timeout=FAST) as power:
        power.set_voltage(3.7)
        power.output(True)
        supply.delay = 2 * FAST
        with pytest.raises(RigFault, match=r"no answer to MEAS:VOLT\?"):
            power.measure_voltage()
        supply.delay = 0.0
        time.sleep(2 * FAST)   # the late voltage is now waiting in the driver's input
        assert power.measure_current() == pytest.approx(3.7 / 20)


def test_unreachable_tcp_port_is_a_rig_fault() -> None:
    url = f"socket://127.0.0.1:{free_tcp_port()}"
    started = time.monotonic()
    with pytest.raises(RigFault, match=rf"^power: {re.escape(url)}: cannot open: ") as caught:
        ScpiPower(url).open()
    assert caught.value.part == "power"
    assert _elapsed(started) < 2


def test_missing_serial_device_is_a_rig_fault() -> None:
    with pytest.raises(RigFault, match=r"/dev/ttyHIL-absent: cannot open: "):
        ScpiPower("/dev/ttyHIL-absent").open()


def test_instrument_gone_mid_session_is_a_rig_fault(
    supply_server: Server, supply: EmulatedSupply
) -> None:
    with ScpiPower(supply_server.url, timeout=FAST) as power:
        supply_server.stop()
        started = time.monotonic()
        with pytest.raises(RigFault) as caught:
            power.measure_voltage()
        assert caught.value.part == "power"
        assert _elapsed(started) < 2


@pytest.mark.parametrize("transport", ["tcp"])
def test_not_open_is_a_rig_fault_and_close_is_idempotent(supply_server: Server) -> None:
    power = ScpiPower(supply_server.url)
    with pytest.raises(RigFault, match="not open"):
        power.identify()
    with pytest.raises(RigFault, match="not open"):
        power.measure_voltage()
    power.open()
    power.open()   # a second open is a no-op, not a second connection
    power.close()
    power.close()
    with pytest.raises(RigFault, match="not open"):
        power.identify()


def test_channel_dialect_addresses_its_output_in_every_command(
    supply_server: Server, supply: EmulatedSupply
) -> None:
    with ChannelScpiPower(supply_server.url, channel=2, current_limit=0.5) as power:
        power.set_level(100)
        power.output(True)
        assert power.measure_voltage() == pytest.approx(4.2)
        assert power.measure_current() == pytest.approx(4.2 / 20)
    assert supply.channels[2].volts == 4.2
    assert supply.channels[2].current_limit == 0.5
    assert supply.channels[2].output
    assert supply.channels[1] == type(supply.channels[1])()   # untouched
    assert supply.log[2:] == [
        ":SOUR2:CURR 0.500", "SYST:ERR?",
        ":SOUR2:VOLT 4.200", "SYST:ERR?",
        ":OUTP CH2,ON", "SYST:ERR?",
        ":MEAS:VOLT? CH2", ":MEAS:CURR? CH2",
    ]


def test_constructor_checks_without_io() -> None:
    # No instrument behind any of these URLs: construction does no I/O.
    with pytest.raises(ValueError, match="ChannelScpiPower"):
        ScpiPower("socket://127.0.0.1:1", channel=2)
    with pytest.raises(ValueError, match="empty < full"):
        ScpiPower("socket://127.0.0.1:1", empty_volts=4.2, full_volts=3.3)
    with pytest.raises(ValueError, match="current limit"):
        ScpiPower("socket://127.0.0.1:1", current_limit=0)
    with pytest.raises(ValueError, match="step_db"):
        Attenuator("socket://127.0.0.1:1", max_db=30, step_db=0)
    assert ChannelScpiPower("socket://127.0.0.1:1", channel=3).channel == 3


# ------------------------------------------------------------------------------ Attenuator
ATTENUATORS: dict[str, type[Attenuator]] = {
    "scpi": Attenuator, "minicircuits": MiniCircuitsAttenuator,
}


@pytest.fixture(params=["scpi", "minicircuits"])
def attenuator(request: pytest.FixtureRequest) -> EmulatedAttenuator:
    """The emulated attenuator in each dialect (``indirect=True`` parametrization picks one)."""
    return EmulatedAttenuator(request.param)


@pytest.fixture
def attenuator_server(attenuator: EmulatedAttenuator, transport: str) -> Iterator[Server]:
    with serve(attenuator, "pty" if transport == "pty" else "tcp") as server:
        yield server


@pytest.fixture
def rf(attenuator: EmulatedAttenuator, attenuator_server: Server) -> Iterator[Attenuator]:
    driver = ATTENUATORS[attenuator.dialect](attenuator_server.url, max_db=95, step_db=0.25)
    with driver:
        yield driver


def test_attenuator_identifies(rf: Attenuator, attenuator: EmulatedAttenuator) -> None:
    expected = {"scpi": "EMU,ATTENUATOR,0002,1.0", "minicircuits": "RCDAT-6000-95"}
    assert rf.identify() == expected[attenuator.dialect]
    assert isinstance(rf, RfProtocol)


def test_attenuator_sets_and_reads_back(rf: Attenuator, attenuator: EmulatedAttenuator) -> None:
    assert rf.set_attenuation(12.25) == 12.25
    assert attenuator.attenuation == 12.25
    assert rf.attenuation() == 12.25
    spelled = {"scpi": ["ATT 12.25", "ATT?"], "minicircuits": [":SETATT=12.25", ":ATT?"]}
    assert attenuator.log[1:3] == spelled[attenuator.dialect]


@pytest.mark.parametrize(
    ("asked", "set_to"),
    [(0, 0), (0.1, 0), (12.3, 12.25), (12.4, 12.5), (12.375, 12.5), (94.9, 95), (95, 95)],
)
def test_attenuation_rounds_to_the_step(
    rf: Attenuator, attenuator: EmulatedAttenuator, asked: float, set_to: float
) -> None:
    assert rf.set_attenuation(asked) == set_to
    assert attenuator.attenuation == set_to


@pytest.mark.parametrize("transport", ["pty"])
def test_rounding_stays_below_a_maximum_off_the_step_grid(
    attenuator_server: Server, attenuator: EmulatedAttenuator
) -> None:
    driver_class = ATTENUATORS[attenuator.dialect]
    with driver_class(attenuator_server.url, max_db=31.75, step_db=0.5) as rf:
        assert rf.set_attenuation(31.75) == 31.5
        assert rf.set_attenuation(0.3) == 0.5


@pytest.mark.parametrize("db", [-0.25, 95.25, float("nan")])
def test_attenuation_out_of_range_is_a_value_error(
    rf: Attenuator, attenuator: EmulatedAttenuator, db: float
) -> None:
    sent = len(attenuator.log)
    with pytest.raises(ValueError, match=r"outside 0\.\.95 dB"):
        rf.set_attenuation(db)
    assert len(attenuator.log) == sent


@pytest.mark.parametrize(
    ("level", "db"),
    [
        (31, 0),      # signal_at_0db: no attenuation
        (30, 2),
        (10, 42),
        (0, 62),
        (40, 0),      # stronger than the rig can give: clamped at 0 dB
        (-17, 95),    # 96 dB needed: clamped at the attenuator's maximum
    ],
)
def test_set_signal_follows_the_calibration(
    rf: Attenuator, attenuator: EmulatedAttenuator, level: int, db: float,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="hil.drivers.rf"):
        rf.set_signal(level)
    assert attenuator.attenuation == db
    clamped = level in (40, -17)
    assert bool(caplog.records) == clamped


@pytest.mark.parametrize("transport", ["tcp"])
def test_set_signal_with_another_calibration(
    attenuator_server: Server, attenuator: EmulatedAttenuator
) -> None:
    driver_class = ATTENUATORS[attenuator.dialect]
    with driver_class(attenuator_server.url, max_db=95, step_db=0.5, signal_at_0db=25,
                      db_per_level=1.5) as rf:
        rf.set_signal(20)   # 7.5 dB
        assert attenuator.attenuation == 7.5
        rf.set_signal(24)   # 1.5 dB
        assert attenuator.attenuation == 1.5


def test_a_setting_that_does_not_take_is_a_rig_fault(
    rf: Attenuator, attenuator: EmulatedAttenuator
) -> None:
    attenuator.stuck = True
    with pytest.raises(RigFault, match="did not take: the attenuator reads 0 dB") as caught:
        rf.set_attenuation(30)
    assert caught.value.part == "rf"


@pytest.mark.parametrize("attenuator", ["minicircuits"], indirect=True)
@pytest.mark.parametrize("transport", ["tcp"])
def test_minicircuits_refusal_is_a_rig_fault(attenuator_server: Server) -> None:
    # The rig file says 120 dB, the instrument only has 95: it sets 95 and answers 2.
    with (
        MiniCircuitsAttenuator(attenuator_server.url, max_db=120, step_db=0.25) as rf,
        pytest.raises(RigFault, match=r":SETATT=100 answered '2', not '1'"),
    ):
        rf.set_attenuation(100)


def test_silent_attenuator_fails_open(
    attenuator_server: Server, attenuator: EmulatedAttenuator
) -> None:
    attenuator.silent = True
    driver = ATTENUATORS[attenuator.dialect](attenuator_server.url, max_db=95, step_db=0.25,
                                             timeout=FAST)
    started = time.monotonic()
    with pytest.raises(RigFault, match="no answer to") as caught:
        driver.open()
    assert caught.value.part == "rf"
    assert _elapsed(started) < 2


def test_garbled_attenuation_is_a_rig_fault(rf: Attenuator, attenuator: EmulatedAttenuator) -> None:
    attenuator.garbage = b"ATT=twelve\n"
    with pytest.raises(RigFault, match=r"ATT\? answered 'ATT=twelve', not a number"):
        rf.attenuation()


# ------------------------------------------------------------------------------ console hooks
class FakeConsole:
    """Records contract commands; answers OK, or ERR <refuse> when ``refuse`` is set."""

    def __init__(self, refuse: str | None = None) -> None:
        self.name = "/dev/ttyFAKE0"
        self.refuse = refuse
        self.commands: list[str] = []
        self.opened = self.closed = 0

    def open(self) -> None:
        self.opened += 1

    def close(self) -> None:
        self.closed += 1

    def send(self, line: str) -> None:
        self.commands.append(line)

    def mark(self) -> int:
        return len(self.commands)

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 10.0, *,
               since: int | None = None) -> re.Match[str]:
        raise AssertionError("the hooks only use command()")

    def command(self, line: str, timeout: float = 10.0, *,
                keep_cursor: bool = False) -> list[str]:
        self.commands.append(line)
        if self.refuse is not None:
            raise CommandRefused(line, self.refuse)
        return []

    def lines(self) -> list[LogLine]:
        return []

    def log_text(self) -> str:
        return ""


def test_fake_console_is_a_console() -> None:
    assert isinstance(FakeConsole(), ConsoleProtocol)


def test_power_hook_sets_the_level_and_borrows_the_console() -> None:
    console = FakeConsole()
    with ConsoleHookPower(console) as power:
        assert isinstance(power, PowerProtocol)
        assert not power.can_cut
        assert power.identify() == "console hook (/dev/ttyFAKE0)"
        power.set_level(0)
        power.set_level(15)
        power.set_level(100)
        with pytest.raises(ValueError, match=r"0\.\.100"):
            power.set_level(101)
    assert console.commands == ["test power 0", "test power 15", "test power 100"]
    assert (console.opened, console.closed) == (0, 0)   # the rig owns the console


@pytest.mark.parametrize("on", [False, True])
def test_power_cut_through_a_hook_is_a_rig_fault(on: bool) -> None:
    console = FakeConsole()
    with pytest.raises(RigFault) as caught:
        ConsoleHookPower(console).output(on)
    assert caught.value.part == "power"
    assert caught.value.message == (
        "the console hook cannot switch power; give the rig a bench supply, a USB hub port "
        "or a relay command for power cuts (power.kind: scpi, usb-hub, command)")
    assert console.commands == []


def test_signal_and_space_hooks() -> None:
    console = FakeConsole()
    with ConsoleHookRf(console) as rf, ConsoleHookSpace(console) as space:
        assert isinstance(rf, RfProtocol)
        assert rf.identify() == space.identify() == "console hook (/dev/ttyFAKE0)"
        rf.set_signal(12)
        rf.set_signal(0)
        space.set_free_space(4096)
        space.set_free_space(0)
        with pytest.raises(ValueError, match="0 bytes or more"):
            space.set_free_space(-1)
    assert console.commands == [
        "test signal 12", "test signal 0", "test space 4096", "test space 0",
    ]


def test_hooks_use_the_rig_files_command_spelling() -> None:
    console = FakeConsole()
    ConsoleHookPower(console, command="bat set {percent}").set_level(5)
    ConsoleHookRf(console, command="rssi {value}").set_signal(-3)
    ConsoleHookSpace(console, command="fs free {bytes}").set_free_space(10)
    assert console.commands == ["bat set 5", "rssi -3", "fs free 10"]


@pytest.mark.parametrize(
    "call",
    [
        lambda console: ConsoleHookPower(console).set_level(20),
        lambda console: ConsoleHookRf(console).set_signal(5),
        lambda console: ConsoleHookSpace(console).set_free_space(1),
    ],
)
def test_a_refused_hook_is_a_firmware_fault(call: Callable[[FakeConsole], None]) -> None:
    with pytest.raises(CommandRefused) as caught:
        call(FakeConsole(refuse="unknown command"))
    assert isinstance(caught.value, FirmwareFault)
    assert caught.value.reason == "unknown command"
