"""The simulated boards' firmware, as a test sees it through the real drivers: the reference OTA
agent (ONENET.md) step by step, the console contract, persistence across power cuts and restarts."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from sim_board import Answer, SimBoard, SimSetup, wait_for

from hil.errors import CommandRefused
from hil.onenet.messages import Endpoint
from hil.service.timeline import Exchange
from hil.sim.firmware import CHUNK_SIZE
from hil.sim.images import build_image

BASE = "1.0.0"       # the factory image every simulated board starts on
TARGET = "1.1.0"


@pytest.fixture
def setup(tmp_path, monkeypatch) -> Iterator[SimSetup]:
    with SimSetup(tmp_path, monkeypatch) as setup:
        yield setup


def test_a_whole_update_through_the_proxy(setup):
    sim = setup.board()
    setup.task(sim, "1.1.0")
    events = setup.update(sim)
    assert events[0] == "ota phase=detect errno=0 target=1.1.0 size=66192"
    assert setup.codes(sim) == [101, 201]
    assert sim.board.version() == "1.1.0"


# ------------------------------------------------------------------------------------ helpers
def exchanges(setup: SimSetup, sim: SimBoard, phase: Endpoint) -> list[Exchange]:
    return setup.mock.service.timeline.exchanges(sim.dev_id, phase)


def state(setup: SimSetup, sim: SimBoard) -> str:
    return str(setup.mock.service.task(sim.dev_id).state)


def chunks(size: int) -> int:
    return -(-size // CHUNK_SIZE)


def download_offsets(events: list[str]) -> list[int]:
    return [int(m.group(1)) for event in events
            if (m := re.match(r"ota phase=download offset=(\d+)", event))]


def phases(events: list[str]) -> list[str]:
    """The attempt's events without the download lines (one per chunk)."""
    return [event for event in events if not event.startswith("ota phase=download ")]


def detect_line(size: int, target: str = TARGET) -> str:
    return f"ota phase=detect errno=0 target={target} size={size}"


def whole_update(size: int, target: str = TARGET) -> list[str]:
    """The events of an update that goes right, from the first chunk, download lines aside."""
    return [detect_line(size, target), "ota phase=token errno=0",
            "ota phase=report result=101 errno=0", "ota phase=verify md5=ok",
            f"ota phase=flash bytes={size}",
            "ota phase=report result=201 errno=0"]


def wait_end(sim: SimBoard, timeout: float = 30.0) -> list[str]:
    """The rest of an attempt already running, as ``SimSetup.update`` gives it."""
    return [f"{event.tag} " + " ".join(f"{k}={v}" for k, v in event.fields.items())
            for event in sim.board.wait_update_end(timeout)]


def last_chunk_range(size: int) -> str:
    start = (chunks(size) - 1) * CHUNK_SIZE
    return f"bytes={start}-{size - 1}"


# --------------------------------------------------------------------------- 1. thresholds
@pytest.mark.parametrize(("level", "codes"), [(50, [105]), (51, [101, 201])],
                         ids=["at-threshold", "above"])
def test_battery_must_be_strictly_above_the_power_threshold(setup, level, codes):
    sim = setup.board()
    task = setup.task(sim, power=50)
    sim.board.set_power(level)              # the bench supply's voltage is the battery level

    events = setup.update(sim)

    assert setup.codes(sim) == codes
    detect = exchanges(setup, sim, Endpoint.DETECT)
    assert f"power={level}" in detect[0].target        # what the device told the service
    if codes == [105]:
        assert events == [detect_line(task.package.size), "ota phase=report result=105 errno=0"]
        assert exchanges(setup, sim, Endpoint.TOKEN_CHECK) == []
        assert state(setup, sim) == "failed"
        assert sim.board.version() == BASE
    else:
        assert phases(events) == whole_update(task.package.size)
        assert state(setup, sim) == "succeeded"
        assert sim.board.version() == TARGET


@pytest.mark.parametrize(("level", "codes"), [(20, [106]), (21, [101, 201])],
                         ids=["at-threshold", "above"])
def test_signal_must_be_strictly_above_the_signal_threshold(setup, level, codes):
    sim = setup.board()
    task = setup.task(sim, signal=20)
    sim.board.set_signal(level)             # the rig's attenuator

    events = setup.update(sim)

    assert setup.codes(sim) == codes
    assert f"signal={level}" in exchanges(setup, sim, Endpoint.DETECT)[0].target
    if codes == [106]:
        assert events == [detect_line(task.package.size), "ota phase=report result=106 errno=0"]
        assert state(setup, sim) == "failed"
        assert sim.board.version() == BASE
    else:
        assert phases(events) == whole_update(task.package.size)
        assert sim.board.version() == TARGET


def test_power_hook_overrides_the_supply_until_the_next_reset(setup):
    sim = setup.board()
    setup.task(sim, power=50)               # the supply is at full charge
    sim.board.command("power", percent=10)

    events = setup.update(sim)

    assert setup.codes(sim) == [105]
    assert events[-1] == "ota phase=report result=105 errno=0"
    assert "power=10" in exchanges(setup, sim, Endpoint.DETECT)[0].target
    # Hook values live in RAM: after a reboot the supply speaks again.
    assert sim.board.reboot() == BASE
    setup.task(sim, power=50)
    setup.update(sim)
    assert setup.codes(sim) == [105, 101, 201]
    assert "power=100" in exchanges(setup, sim, Endpoint.DETECT)[1].target


def test_power_hook_hides_a_low_supply(setup):
    sim = setup.board()
    setup.task(sim, power=50)
    sim.board.set_power(20)
    sim.board.command("power", percent=90)

    setup.update(sim)

    assert setup.codes(sim) == [101, 201]
    assert "power=90" in exchanges(setup, sim, Endpoint.DETECT)[0].target


def test_signal_hook_overrides_the_attenuator(setup):
    sim = setup.board()
    setup.task(sim, signal=20)              # the attenuator at 0 dB: signal 31
    sim.board.command("signal", value=5)

    events = setup.update(sim)

    assert setup.codes(sim) == [106]
    assert events[-1] == "ota phase=report result=106 errno=0"
    assert "signal=5" in exchanges(setup, sim, Endpoint.DETECT)[0].target


# --------------------------------------------------------------------------- 2. free space
@pytest.mark.parametrize(("short", "codes"), [(1, [102]), (0, [101, 201])],
                         ids=["one-byte-short", "exactly-enough"])
def test_free_space_must_hold_the_package(setup, short, codes):
    sim = setup.board()
    task = setup.task(sim)
    sim.board.set_free_space(task.package.size - short)

    events = setup.update(sim)

    assert setup.codes(sim) == codes
    if codes == [102]:
        assert events == [detect_line(task.package.size), "ota phase=report result=102 errno=0"]
        assert exchanges(setup, sim, Endpoint.DOWNLOAD) == []
        assert state(setup, sim) == "failed"
    else:
        assert state(setup, sim) == "succeeded"


# --------------------------------------------------------------------- 3, 4. ends, no report
def test_expired_token_ends_the_attempt_without_a_report(setup):
    sim = setup.board()
    task = setup.task(sim)
    setup.mock.service.expire_token(sim.dev_id)

    events = setup.update(sim)       # returns at `ota end`

    assert events == [detect_line(task.package.size), "ota phase=token errno=12"]
    assert setup.codes(sim) == []
    assert exchanges(setup, sim, Endpoint.REPORT) == []
    assert exchanges(setup, sim, Endpoint.DOWNLOAD) == []
    assert state(setup, sim) == "pending"
    assert sim.board.version() == BASE


@pytest.mark.parametrize(("situation", "errno"),
                         [("unknown-device", 1), ("no-task", 11), ("paused", 19)])
def test_detect_errors_end_the_attempt_without_a_report(setup, situation, errno):
    sim = setup.board()
    if situation == "no-task":
        setup.mock.service.add_device(sim.dev_id)
    elif situation == "paused":
        setup.task(sim)
        setup.mock.service.pause(sim.dev_id)

    events = setup.update(sim)

    assert events == [f"ota phase=detect errno={errno}"]
    assert setup.codes(sim) == []
    timeline = setup.mock.service.timeline
    assert [e.phase for e in timeline.exchanges()] == [Endpoint.VERSION, Endpoint.DETECT]
    assert timeline.exchanges()[-1].errno == errno
    if situation == "paused":
        assert state(setup, sim) == "paused"


def _after_detect(setup: SimSetup, sim: SimBoard, operator_action) -> None:
    """Have the operator act once the service has answered the board's detect (before the
    board's token check)."""
    done = []

    def listener(exchange: Exchange) -> None:
        if exchange.phase is Endpoint.DETECT and exchange.dev_id == sim.dev_id and not done:
            done.append(exchange)
            operator_action(sim.dev_id)

    setup.mock.service.timeline.subscribe(listener)


def test_a_task_cancelled_before_the_token_check_ends_without_a_report(setup):
    sim = setup.board()
    task = setup.task(sim)
    _after_detect(setup, sim, setup.mock.service.cancel)

    events = setup.update(sim)

    assert events == [detect_line(task.package.size), "ota phase=token errno=22"]
    assert exchanges(setup, sim, Endpoint.REPORT) == []
    assert exchanges(setup, sim, Endpoint.DOWNLOAD) == []
    assert state(setup, sim) == "cancelled"


def test_another_token_check_errno_is_reported_107(setup):
    sim = setup.board()
    task = setup.task(sim)
    _after_detect(setup, sim, setup.mock.service.pause)   # token check: 17 (invalid state)

    events = setup.update(sim)

    # The board reports 107 as it must; a paused task refuses every report (21).
    assert events == [detect_line(task.package.size), "ota phase=token errno=17",
                      "ota phase=report result=107 errno=21"]
    assert [e.result for e in exchanges(setup, sim, Endpoint.REPORT)] == [107]
    assert setup.codes(sim) == []
    assert exchanges(setup, sim, Endpoint.DOWNLOAD) == []
    assert state(setup, sim) == "paused"


# ------------------------------------------------------------------------------ 5. retries
def test_failed_chunks_are_retried_within_the_task_retry_budget(setup):
    sim = setup.board()
    task = setup.task(sim, retry=2)
    setup.proxy.on_download = lambda n, rng, fwd: Answer(200, b"x" * 10) if n <= 2 else None

    events = setup.update(sim)

    assert setup.codes(sim) == [101, 201]
    assert events[2:5] == ["ota phase=download offset=0 status=200"] * 2 \
        + ["ota phase=download offset=0 status=206"]
    assert setup.proxy.downloads == chunks(task.package.size) + 2
    assert sim.board.version() == TARGET


def test_retries_are_the_task_interval_apart(setup):
    sim = setup.board()
    setup.task(sim, retry=1, interval=1)
    setup.proxy.on_download = lambda n, rng, fwd: Answer(200, b"x" * 10) if n == 1 else None

    setup.update(sim)

    assert setup.codes(sim) == [101, 201]
    first, second = exchanges(setup, sim, Endpoint.DOWNLOAD)[:2]
    assert second.at - first.at >= 1.0


def _drop_connection(fwd):
    raise ConnectionResetError("the proxy drops the connection (test)")


@pytest.mark.parametrize(("hook", "retry", "board", "codes", "asked", "line"), [
    (lambda n, rng, fwd: Answer(200, b"x" * 10), 1, {}, [107], 2, "status=200"),
    (lambda n, rng, fwd: Answer(200, b"x" * 10), 0, {}, [107], 1, "status=200"),
    (lambda n, rng, fwd: time.sleep(1.0), 0, {"http_timeout": 0.5}, [104], 1, "error=timeout"),
    (lambda n, rng, fwd: time.sleep(1.0), 1, {"http_timeout": 0.5}, [104], 2, "error=timeout"),
    (lambda n, rng, fwd: Answer(200, b"3", length=False), 3, {}, [107], 1, "status=200"),
    (lambda n, rng, fwd: Answer(200, b"1", length=False), 3, {}, [107], 1, "status=200"),
    (lambda n, rng, fwd: Answer(200, b"4", length=False), 1, {}, [107], 2, "status=200"),
    (lambda n, rng, fwd: Answer(200, b"6", length=False), 0, {}, [107], 1, "status=200"),
    # OneNET's own form, the raw byte, is read as the ASCII digit is: 3 final, 4 retried.
    (lambda n, rng, fwd: Answer(200, b"\x03", length=False), 3, {}, [107], 1, "status=200"),
    (lambda n, rng, fwd: Answer(200, b"\x04", length=False), 1, {}, [107], 2, "status=200"),
    (lambda n, rng, fwd: _drop_connection(fwd), 0, {}, [107], 1, "error=ConnectionError"),
], ids=["bad-answer-retry-1", "bad-answer-no-retry", "timeout-no-retry", "timeout-retry-1",
        "error-3-final", "error-1-final", "error-4-retried", "error-6-no-retry",
        "raw-error-3-final", "raw-error-4-retried", "connection-dropped"])
def test_download_failures_end_in_the_right_code(setup, hook, retry, board, codes, asked,
                                                 line):
    sim = setup.board(**board)
    task = setup.task(sim, retry=retry)
    setup.proxy.on_download = hook

    events = setup.update(sim)

    assert setup.codes(sim) == codes
    assert setup.proxy.downloads == asked
    assert events == [detect_line(task.package.size), "ota phase=token errno=0",
                      *[f"ota phase=download offset=0 {line}"] * asked,
                      f"ota phase=report result={codes[0]} errno=0"]
    assert state(setup, sim) == "failed"
    assert sim.board.version() == BASE


def _first_answer(change):
    """A download hook that breaks the first answer with ``change(forwarded)``."""
    def hook(n, rng, fwd):
        answer = change(fwd) if n == 1 else None
        return answer if isinstance(answer, Answer) else None
    return hook


def _set(fwd, **values):
    for name, value in values.items():
        setattr(fwd, name, value)


@pytest.mark.parametrize(("change", "line"), [
    (lambda fwd: fwd.headers.update({"Content-Range": fwd.headers["Content-Range"].replace(
        "bytes 0-", "bytes 1-")}), "status=206"),
    (lambda fwd: fwd.headers.pop("Content-Range"), "status=206"),
    (lambda fwd: _set(fwd, body=fwd.body[:-1]), "status=206"),
    (lambda fwd: _set(fwd, status=200), "status=200"),
    (lambda fwd: Answer(206, fwd.body, length=False, headers=fwd.headers), "status=206"),
    (_drop_connection, "error=ConnectionError"),
], ids=["wrong-content-range", "no-content-range", "short-body", "status-200",
        "no-content-length", "connection-dropped"])
def test_a_wrong_answer_is_retried(setup, change, line):
    sim = setup.board()
    task = setup.task(sim, retry=1)
    setup.proxy.on_download = _first_answer(change)

    events = setup.update(sim)

    assert setup.codes(sim) == [101, 201]
    assert events[2] == f"ota phase=download offset=0 {line}"
    assert download_offsets(events) == [0, *range(0, task.package.size, CHUNK_SIZE)]
    assert setup.proxy.downloads == chunks(task.package.size) + 1
    assert sim.board.version() == TARGET


@pytest.mark.parametrize(("action", "errno", "codes", "final"), [
    ("cancel", 22, [], "cancelled"), ("pause", 21, [], "paused"),
    ("expire_token", 0, [107], "failed")])
def test_an_operator_action_mid_download_stops_the_board(setup, action, errno, codes, final):
    sim = setup.board()
    task = setup.task(sim, retry=3)
    operate = getattr(setup.mock.service, action)

    def act_at_third(n, rng, fwd):
        if n == 3:
            operate(sim.dev_id)

    setup.proxy.on_download = act_at_third

    events = setup.update(sim)

    # The 4th chunk gets the error byte 3 (final: not retried); the board reports 107, which
    # only a task that is still running accepts.
    assert task.package.size > 4 * CHUNK_SIZE
    assert setup.proxy.downloads == 4
    assert exchanges(setup, sim, Endpoint.DOWNLOAD)[-1].error_byte == 3
    assert download_offsets(events) == [0, 4096, 8192, 12288]
    assert events[-1] == f"ota phase=report result=107 errno={errno}"
    assert setup.codes(sim) == codes
    assert state(setup, sim) == final
    assert sim.board.version() == BASE


# ------------------------------------------------------------------- 6, 7. bad packages
def test_a_corrupted_chunk_fails_the_md5_check(setup):
    sim = setup.board()
    task = setup.task(sim)

    def flip_a_byte(n, rng, fwd):
        if n == 3:
            fwd.body = fwd.body[:100] + bytes([fwd.body[100] ^ 0x01]) + fwd.body[101:]

    setup.proxy.on_download = flip_a_byte

    events = setup.update(sim)

    assert setup.codes(sim) == [101, 205]     # the transfer completed; then the md5
    assert phases(events) == [detect_line(task.package.size), "ota phase=token errno=0",
                              "ota phase=report result=101 errno=0",
                              "ota phase=verify md5=bad", "ota phase=report result=205 errno=0"]
    assert state(setup, sim) == "failed"
    assert sim.board.version() == BASE


def test_an_image_of_another_version_is_installed_and_reported_204(setup):
    sim = setup.board()
    task = setup.task(sim, TARGET, image=build_image("nrf52832", "1.2.0"))

    events = setup.update(sim)

    assert setup.codes(sim) == [101, 204]
    assert phases(events)[-1] == "ota phase=report result=204 errno=0"
    assert f"ota phase=flash bytes={task.package.size}" in events
    assert state(setup, sim) == "failed"
    assert sim.board.version() == "1.2.0"


def test_a_package_that_is_no_image_is_refused_by_the_bootloader(setup):
    sim = setup.board()
    package = os.urandom(8192)              # md5 right (it is the package), no image header
    setup.task(sim, TARGET, image=package)
    mark = sim.board.console.mark()

    events = setup.update(sim)

    assert setup.codes(sim) == [101, 204]
    # It rebooted to install it; the bootloader refused it before writing a byte (the write,
    # and its announcement ota phase=flash, never started).
    assert not any(event.startswith("ota phase=flash") for event in events)
    assert events[-1] == "ota phase=report result=204 errno=0"
    assert sim.board.version() == BASE
    log = [line.text for line in sim.board.console.lines()[mark:]]
    assert "I: ota: rebooting to install the image" in log
    assert any(text.startswith("E: bootloader: secondary slot image rejected") for text in log)
    assert "boot version=1.0.0" in log


# ------------------------------------------------------------- 8, 10. power cuts, reflash
def _cut_mid_download(setup: SimSetup, sim: SimBoard, cut) -> int:
    """Start an update, let a few chunks in, then ``cut()`` (the board must boot again after
    it). Returns the chunks requested before the cut."""
    setup.proxy.on_download = lambda n, rng, fwd: time.sleep(0.02)
    sim.board.start_update()
    wait_for(lambda: setup.proxy.downloads >= 6)
    cut()
    before = setup.proxy.downloads
    setup.proxy.on_download = None
    return before


def _power_cycle(sim: SimBoard) -> None:
    supply = sim.parts.power()
    supply.output(False)
    supply.output(True)
    assert sim.board.wait_boot() == BASE


def _brown_out(sim: SimBoard) -> None:
    supply = sim.parts.power()
    supply.set_voltage(1.0)                 # below the board regulator's drop-out
    supply.set_level(100)
    assert sim.board.wait_boot() == BASE


CUTS = {"supply-off": _power_cycle, "brown-out": _brown_out,
        "restart": SimBoard.restart}        # the whole simulation stopped and started again


@pytest.mark.parametrize("how", list(CUTS))
def test_a_download_cut_by_power_loss_resumes(setup, how):
    sim = setup.board()
    task = setup.task(sim)
    before = _cut_mid_download(setup, sim, lambda: CUTS[how](sim))
    assert setup.codes(sim) == []
    assert state(setup, sim) == "downloading"

    events = setup.update(sim)

    offsets = download_offsets(events)
    assert offsets[0] > 0
    assert offsets[0] % CHUNK_SIZE == 0
    assert offsets == list(range(offsets[0], task.package.size, CHUNK_SIZE))
    assert setup.codes(sim) == [101, 201]
    assert setup.proxy.downloads < 2 * chunks(task.package.size)
    assert before + len(offsets) <= chunks(task.package.size) + 1   # at most one chunk twice
    assert sim.board.version() == TARGET


def test_a_board_reflashed_with_another_image_forgets_an_interrupted_download(setup, tmp_path):
    sim = setup.board()
    task = setup.task(sim)
    base = tmp_path / "base.bin"
    base.write_bytes(build_image("nrf52832", BASE, seed="another build"))
    _cut_mid_download(setup, sim, lambda: _power_cycle(sim))

    assert sim.board.restore_base(base) == BASE          # the rig's SWD flasher
    events = setup.update(sim)

    assert download_offsets(events) == list(range(0, task.package.size, CHUNK_SIZE))
    assert setup.codes(sim) == [101, 201]
    assert sim.board.version() == TARGET


def test_a_board_reflashed_with_the_same_image_resumes_like_real_settings_do(setup, tmp_path):
    """Settings partitions survive a reflash of the application on real boards; so do the
    simulated firmware's. The same task resumes where it stopped."""
    sim = setup.board()
    task = setup.task(sim)
    base = tmp_path / "base.bin"
    base.write_bytes(build_image("nrf52832", BASE))
    _cut_mid_download(setup, sim, lambda: _power_cycle(sim))

    assert sim.board.restore_base(base) == BASE
    events = setup.update(sim)

    offsets = download_offsets(events)
    assert offsets[0] > 0
    assert offsets == list(range(offsets[0], task.package.size, CHUNK_SIZE))
    assert setup.codes(sim) == [101, 201]


def test_a_new_task_does_not_resume_an_old_tasks_download(setup):
    sim = setup.board()
    old = setup.task(sim)
    _cut_mid_download(setup, sim, lambda: _power_cycle(sim))
    setup.mock.service.cancel(sim.dev_id)
    new = setup.task(sim)                   # the same package, another token
    assert new.package.md5 == old.package.md5
    assert new.token != old.token

    events = setup.update(sim)

    assert download_offsets(events) == list(range(0, new.package.size, CHUNK_SIZE))
    assert setup.codes(sim) == [101, 201]
    assert {e.target.split("?")[0].rsplit("/", 1)[-1]
            for e in exchanges(setup, sim, Endpoint.DOWNLOAD)[-chunks(new.package.size):]} \
        == {new.token}


def test_the_upgrade_report_survives_a_power_cut_after_the_install(setup):
    sim = setup.board()
    setup.task(sim)
    forward = setup.proxy.forward
    reports: list[str] = []
    held, release = threading.Event(), threading.Event()

    def lose_the_first_201(handler):
        if handler.path.startswith("/ota/south/report"):
            reports.append(handler.path)
            if len(reports) == 2:           # the post-boot report: held, then dropped
                held.set()
                release.wait(10)
                handler.close_connection = True
                return
        forward(handler)

    setup.proxy.forward = lose_the_first_201
    sim.board.start_update()
    assert sim.board.wait_boot() == TARGET      # installed; its 201 is on the way
    assert held.wait(20)
    supply = sim.parts.power()
    supply.output(False)
    supply.output(True)
    assert sim.board.wait_boot() == TARGET
    release.set()

    events = wait_end(sim)

    assert events == ["ota phase=report result=201 errno=0"]
    assert len(reports) == 3
    assert setup.codes(sim) == [101, 201]
    assert state(setup, sim) == "succeeded"
    assert sim.board.version() == TARGET


def test_a_lost_201_is_healed_by_the_next_attempts_version_report(setup):
    sim = setup.board()
    setup.task(sim)
    forward = setup.proxy.forward
    reports: list[str] = []

    def drop_the_201(handler):
        if handler.path.startswith("/ota/south/report"):
            reports.append(handler.path)
            if len(reports) == 2:
                handler.close_connection = True     # no answer: the board cannot know
                return
        forward(handler)

    setup.proxy.forward = drop_the_201
    events = setup.update(sim)
    assert events[-1] == "ota phase=report result=201 errno=None"
    assert setup.codes(sim) == [101]
    assert state(setup, sim) == "upgrading"
    assert sim.board.version() == TARGET

    events = setup.update(sim)              # POST /ota/device/version s_version=1.1.0 first

    assert events == ["ota phase=detect errno=11"]
    assert state(setup, sim) == "succeeded"
    assert setup.mock.service.device_version(sim.dev_id) == TARGET


@pytest.mark.parametrize("accepted", [False, True],
                         ids=["101-lost-on-the-way", "101-accepted-answer-lost"])
def test_a_power_cut_while_the_101_is_in_flight(setup, accepted):
    sim = setup.board()
    task = setup.task(sim)
    forward = setup.proxy.forward
    held, release = threading.Event(), threading.Event()

    def hold_the_first_report(handler):
        if handler.path.startswith("/ota/south/report") and not held.is_set():
            body = handler.rfile.read(int(handler.headers["Content-Length"]))
            if accepted:                    # the service takes it; the board never hears so
                requests.post(setup.mock.url + handler.path, data=body, timeout=10, headers={
                    "Authorization": handler.headers["Authorization"],
                    "Content-Type": "application/json"})
            held.set()
            release.wait(10)
            handler.close_connection = True
            return
        forward(handler)

    setup.proxy.forward = hold_the_first_report
    sim.board.start_update()
    assert held.wait(20)
    _power_cycle(sim)
    release.set()
    assert setup.codes(sim) == ([101] if accepted else [])

    events = setup.update(sim)

    # The package was whole and verified: no token check, no download, the 101 sent again; a
    # 21 for it is checked by a second detect (the same token: upgrading, the first one got
    # through), then the install.
    again = [detect_line(task.package.size)] if accepted else []
    assert events == [detect_line(task.package.size),
                      f"ota phase=report result=101 errno={21 if accepted else 0}", *again,
                      "ota phase=verify md5=ok", f"ota phase=flash bytes={task.package.size}",
                      "ota phase=report result=201 errno=0"]
    assert setup.codes(sim) == [101, 201]
    assert state(setup, sim) == "succeeded"
    assert sim.board.version() == TARGET


@pytest.mark.parametrize(("action", "answers"), [
    # Cancelled: the 101 is refused 22, nothing to install.
    ("cancel", ["ota phase=report result=101 errno=22"]),
    # Paused: refused 21, which an upgrading task also answers (an earlier 101 got through
    # before a power cut took its answer); detect tells them apart: a paused task is errno 19.
    ("pause", ["ota phase=report result=101 errno=21", "ota phase=detect errno=19"]),
])
def test_a_101_refused_after_the_download_installs_nothing(setup, action, answers):
    sim = setup.board()
    task = setup.task(sim)
    operate = getattr(setup.mock.service, action)
    last = last_chunk_range(task.package.size)

    def act_on_the_last_chunk(n, rng, fwd):
        if rng == last:                     # this answer is the package's tail all the same
            operate(sim.dev_id)

    setup.proxy.on_download = act_on_the_last_chunk

    events = setup.update(sim)

    assert phases(events) == [detect_line(task.package.size), "ota phase=token errno=0",
                              *answers]
    assert setup.codes(sim) == []
    assert sim.board.version() == BASE


# ------------------------------------------------------------------------ 9. flash battery
def test_a_battery_drop_before_the_flash_is_reported_202(setup):
    sim = setup.board()
    task = setup.task(sim, power=30)
    channel = sim.bench.supply.channels[1]
    last = last_chunk_range(task.package.size)

    def drop_battery_on_last_chunk(n, rng, fwd):
        if rng == last:
            channel.volts = 3.4             # ~11 %: the board still runs, the battery is low

    setup.proxy.on_download = drop_battery_on_last_chunk

    events = setup.update(sim)

    assert setup.codes(sim) == [101, 202]
    assert phases(events) == [detect_line(task.package.size), "ota phase=token errno=0",
                              "ota phase=report result=101 errno=0", "ota phase=verify md5=ok",
                              "ota phase=report result=202 errno=0"]
    assert state(setup, sim) == "failed"
    assert sim.board.version() == BASE


# ------------------------------------------------------------------- 11. console contract
def test_reboot_prints_the_boot_line_with_the_version(setup):
    sim = setup.board()
    assert sim.board.reboot() == BASE
    setup.task(sim)
    setup.update(sim)
    assert sim.board.reboot() == TARGET


def test_the_shell_refuses_what_it_cannot_do(setup):
    sim = setup.board()
    with pytest.raises(CommandRefused, match="unknown command"):
        sim.board.console.command("sys frobnicate")
    with pytest.raises(CommandRefused, match=r"outside 0\.\.100"):
        sim.board.command("power", percent=101)
    with pytest.raises(CommandRefused, match="not an integer"):
        sim.board.command("signal", value="strong")
    with pytest.raises(CommandRefused, match="negative"):
        sim.board.command("space", bytes=-1)
    with pytest.raises(CommandRefused, match="http"):
        sim.board.command("server", url="ftp://example.com")
    assert sim.board.version() == BASE          # the shell still answers


def test_ota_check_is_refused_while_an_attempt_runs(setup):
    sim = setup.board()
    setup.task(sim)
    release = threading.Event()
    setup.proxy.on_download = lambda n, rng, fwd: release.wait(10) and None
    sim.board.start_update()
    wait_for(lambda: setup.proxy.downloads >= 1)

    with pytest.raises(CommandRefused, match="busy"):
        sim.board.start_update()
    with pytest.raises(CommandRefused, match="busy"):
        sim.board.command("factory")
    release.set()

    events = wait_end(sim)
    assert events[-1] == "ota phase=report result=201 errno=0"
    assert setup.codes(sim) == [101, 201]
    assert len(exchanges(setup, sim, Endpoint.DETECT)) == 1


def test_ota_check_needs_a_server_first(setup):
    sim = setup.board()
    assert sim.board.restore_base(None) == BASE     # test factory: settings erased
    with pytest.raises(CommandRefused, match="no OTA server"):
        sim.board.start_update()
    assert len(setup.mock.service.timeline) == 0
    sim.board.point_at(setup.proxy.url)
    setup.task(sim)
    setup.update(sim)
    assert setup.codes(sim) == [101, 201]


# ------------------------------------------------------------------------- 12. every board
@pytest.mark.parametrize("board", ["gd32", "esp32"])
def test_a_whole_update_on_every_board(setup, board):
    sim = setup.board(board)
    task = setup.task(sim)

    events = setup.update(sim, timeout=60)

    assert phases(events) == whole_update(task.package.size)
    assert download_offsets(events) == list(range(0, task.package.size, CHUNK_SIZE))
    assert setup.codes(sim) == [101, 201]
    assert state(setup, sim) == "succeeded"
    assert setup.mock.service.device_version(sim.dev_id) == TARGET
    assert sim.board.version() == TARGET
