"""The emulated instruments of hil.sim.instruments as a simulated rig uses them: ``on_change``
after each command line that changes the state, and ``LineSplitter``.

The instruments are driven line by line through ``respond()``, in the spellings the drivers send
(tests/test_instruments.py); one test goes through a served instrument, where the callback runs on
the server's thread.
"""

from __future__ import annotations

import socket

import pytest
from scpi_instrument import TcpServer

from hil.sim.instruments import (
    NO_ERROR,
    EmulatedAttenuator,
    EmulatedInstrument,
    EmulatedSupply,
    LineSplitter,
)


class Recorder:
    """An ``on_change`` that notes what the instrument shows when it is called."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []

    def __call__(self, instrument: EmulatedInstrument) -> None:
        # Reading the lock proves on_change runs with it released (acquire would fail otherwise).
        assert instrument.lock.acquire(timeout=1), "on_change called with the lock held"
        instrument.lock.release()
        if isinstance(instrument, EmulatedSupply):
            self.seen.append((instrument.volts, instrument.current_limit, instrument.output,
                              instrument.channels[2].volts, instrument.channels[2].output))
        else:
            assert isinstance(instrument, EmulatedAttenuator)
            self.seen.append((instrument.attenuation,))


@pytest.fixture
def supply() -> EmulatedSupply:
    return EmulatedSupply()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def _send(instrument: EmulatedInstrument, *lines: str) -> list[bytes | None]:
    return [instrument.respond(line) for line in lines]


# ------------------------------------------------------------------------------ supply
def test_on_change_defaults_to_none_and_nothing_is_called(supply: EmulatedSupply) -> None:
    assert supply.on_change is None
    assert _send(supply, "VOLT 3.7", "OUTP ON", "MEAS:VOLT?") == [None, None, b"+3.70000000E+00\n"]


def test_supply_settings_call_on_change_once_each_with_the_new_state(
    supply: EmulatedSupply, recorder: Recorder
) -> None:
    supply.on_change = recorder
    _send(supply, "VOLT 3.7")
    assert recorder.seen == [(3.7, 3.0, False, 0.0, False)]
    _send(supply, "CURR 1.000")
    assert recorder.seen[-1] == (3.7, 1.0, False, 0.0, False)
    _send(supply, "OUTP ON")
    assert recorder.seen[-1] == (3.7, 1.0, True, 0.0, False)
    _send(supply, "OUTP OFF")
    assert recorder.seen[-1] == (3.7, 1.0, False, 0.0, False)
    assert len(recorder.seen) == 4


def test_rigol_channel_forms_call_on_change(supply: EmulatedSupply, recorder: Recorder) -> None:
    supply.on_change = recorder
    _send(supply, ":SOUR2:VOLT 5", ":OUTP CH2,ON", ":SOUR1:VOLT 3.3", ":OUTP CH1,1")
    assert recorder.seen == [
        (0.0, 3.0, False, 5.0, False),
        (0.0, 3.0, False, 5.0, True),
        (3.3, 3.0, False, 5.0, True),
        (3.3, 3.0, True, 5.0, True),
    ]


def test_queries_do_not_call_on_change(supply: EmulatedSupply, recorder: Recorder) -> None:
    _send(supply, "VOLT 3.7", "OUTP ON")   # before on_change is set
    supply.on_change = recorder
    answers = _send(supply, "*IDN?", "MEAS:VOLT?", "MEAS:CURR?", ":MEAS:VOLT? CH2", "SYST:ERR?",
                    "*CLS")
    assert answers == [b"EMU,SUPPLY-3,0001,1.0\n", b"+3.70000000E+00\n", b"+1.85000000E-01\n",
                       b"+0.00000000E+00\n", NO_ERROR.encode() + b"\n", None]
    assert recorder.seen == []


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("VOLT 40", '-222,"Data out of range"'),      # above max_volts
        ("VOLT -1", '-222,"Data out of range"'),
        ("CURR 5", '-222,"Data out of range"'),       # above max_amps
        ("VOLT abc", '-104,"Data type error"'),
        ("VOLT nan", '-104,"Data type error"'),
        (":SOUR9:VOLT 3", '-224,"Illegal parameter value"'),   # no such channel
        (":OUTP CH9,ON", '-224,"Illegal parameter value"'),
        ("VOLTAGE:TRIGGERED 3", '-113,"Undefined header"'),
    ],
)
def test_rejected_commands_do_not_call_on_change(
    supply: EmulatedSupply, recorder: Recorder, line: str, error: str
) -> None:
    supply.on_change = recorder
    assert _send(supply, line) == [None]
    assert recorder.seen == []
    assert list(supply.errors) == [error]


def test_a_setting_to_the_present_value_is_no_change(
    supply: EmulatedSupply, recorder: Recorder
) -> None:
    supply.on_change = recorder
    _send(supply, "VOLT 3.7", "VOLT 3.7", "OUTP OFF")   # the output is already off
    assert len(recorder.seen) == 1


def test_a_silent_supply_changes_nothing(supply: EmulatedSupply, recorder: Recorder) -> None:
    supply.on_change, supply.silent = recorder, True
    _send(supply, "VOLT 3.7")
    assert (supply.volts, recorder.seen, supply.log) == (0.0, [], ["VOLT 3.7"])


def test_on_change_may_use_the_instrument(supply: EmulatedSupply) -> None:
    # A callback that reads properties, takes the lock (queue_error) and even sends a line: no
    # deadlock, and the nested line's own change is reported too.
    seen: list[float] = []

    def follow(instrument: EmulatedInstrument) -> None:
        assert isinstance(instrument, EmulatedSupply)
        seen.append(instrument.volts)
        instrument.queue_error('-100,"Command error"')
        if not instrument.output:   # the first call; the nested OUTP ON makes a second
            assert instrument.respond("MEAS:VOLT?") == b"+0.00000000E+00\n"
            instrument.respond("OUTP ON")

    supply.on_change = follow
    _send(supply, "VOLT 3.7")
    assert seen == [3.7, 3.7]
    assert supply.output
    assert len(supply.errors) == 2


def test_on_change_runs_on_the_server_thread_without_deadlock(
    supply: EmulatedSupply, recorder: Recorder
) -> None:
    supply.on_change = recorder
    with TcpServer(supply) as server, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"VOLT 3.7\r\nOUTP ON\nMEAS:VOLT?\n")
        assert sock.recv(100) == b"+3.70000000E+00\n"
    assert recorder.seen == [(3.7, 3.0, False, 0.0, False), (3.7, 3.0, True, 0.0, False)]


# ------------------------------------------------------------------------------ attenuator
SET = {"scpi": "ATT {}", "minicircuits": ":SETATT={}"}
QUERIES = {"scpi": ["*IDN?", "ATT?"], "minicircuits": [":MN?", ":ATT?"]}


@pytest.fixture(params=["scpi", "minicircuits"])
def attenuator(request: pytest.FixtureRequest) -> EmulatedAttenuator:
    return EmulatedAttenuator(request.param)


def test_attenuator_setting_calls_on_change_with_the_new_attenuation(
    attenuator: EmulatedAttenuator, recorder: Recorder
) -> None:
    attenuator.on_change = recorder
    _send(attenuator, SET[attenuator.dialect].format(12.25))
    assert recorder.seen == [(12.25,)]
    _send(attenuator, SET[attenuator.dialect].format(30))
    assert recorder.seen == [(12.25,), (30.0,)]


def test_attenuator_queries_do_not_call_on_change(
    attenuator: EmulatedAttenuator, recorder: Recorder
) -> None:
    attenuator.on_change = recorder
    answers = _send(attenuator, *QUERIES[attenuator.dialect])
    assert answers[1] == b"0.00\n"
    assert recorder.seen == []


@pytest.mark.parametrize("value", ["-1", "abc", "inf"])
def test_attenuator_rejected_settings_do_not_call_on_change(
    attenuator: EmulatedAttenuator, recorder: Recorder, value: str
) -> None:
    attenuator.on_change = recorder
    _send(attenuator, SET[attenuator.dialect].format(value))
    assert attenuator.attenuation == 0.0
    assert recorder.seen == []


def test_scpi_attenuator_above_its_maximum_is_rejected(recorder: Recorder) -> None:
    attenuator = EmulatedAttenuator("scpi")
    attenuator.on_change = recorder
    assert _send(attenuator, "ATT 95.25", "SYST:ERR?") == [None, None]
    assert list(attenuator.errors) == ['-222,"Data out of range"', '-113,"Undefined header"']
    assert recorder.seen == []


def test_minicircuits_above_its_maximum_sets_the_maximum_and_says_so(recorder: Recorder) -> None:
    # The RCDAT answers 2 but does set its maximum: the state changed, so on_change is called.
    attenuator = EmulatedAttenuator("minicircuits")
    attenuator.on_change = recorder
    assert _send(attenuator, ":SETATT=120") == [b"2\n"]
    assert recorder.seen == [(95.0,)]


def test_a_stuck_attenuator_changes_nothing(
    attenuator: EmulatedAttenuator, recorder: Recorder
) -> None:
    attenuator.on_change, attenuator.stuck = recorder, True
    _send(attenuator, SET[attenuator.dialect].format(30))
    assert recorder.seen == []


# ------------------------------------------------------------------------------ LineSplitter
def test_line_splitter_joins_lines_split_across_feeds() -> None:
    lines = LineSplitter(b"\n")
    assert lines.feed(b"VOL") == []
    assert lines.feed(b"T 3.7") == []
    assert lines.feed(b"\nOUTP ON\nMEAS") == ["VOLT 3.7", "OUTP ON"]
    assert lines.pending == b"MEAS"
    assert lines.feed(b":VOLT?\n") == ["MEAS:VOLT?"]
    assert lines.pending == b""


def test_line_splitter_drops_the_cr_of_crlf() -> None:
    lines = LineSplitter(b"\n")
    assert lines.feed(b"*IDN?\r\nATT?\r") == ["*IDN?"]
    assert lines.feed(b"\n\r\n") == ["ATT?", ""]   # the CR split from its LF, then an empty line


def test_line_splitter_other_terminator() -> None:
    lines = LineSplitter(b"\r")
    assert lines.feed(b"ATT 3\rATT?\r") == ["ATT 3", "ATT?"]
    with pytest.raises(ValueError, match="empty"):
        LineSplitter(b"")
