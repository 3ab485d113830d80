"""Every firmware defect of the simulated boards (``hil.sim.defects.Defect``) does what its name
says: one scenario per defect, run on a good board and on a board with that defect switched on,
and both outcomes asserted as a QA engineer sees them: the result codes the service accepted,
what it was sent, the task's state, the console's ``ota ...`` lines and the version the board
runs afterwards.

``DEFECT_SCENARIOS`` is the single table the test is parametrized from (one test id per defect);
``test_every_defect_has_a_scenario`` fails when a defect is added without one."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sim_board import Answer, Forwarded, SimBoard, SimSetup, wait_for

from hil.drivers.base import PowerProtocol
from hil.drivers.contract import Event
from hil.drivers.crash import Crash, SwdFaultWatch, check
from hil.errors import FirmwareCrash
from hil.onenet.messages import Endpoint
from hil.sim.defects import Defect
from hil.sim.firmware import install_request_at
from hil.sim.images import SLOT_SIZE, build_image, claim_span

PACKAGE_SIZE = 66192                   # a default nrf52832 1.1.0 image: 17 chunks of 4096
CHUNK = 4096


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimSetup]:
    with SimSetup(tmp_path, monkeypatch) as setup:
        yield setup


# ------------------------------------------------------------------------------ observations
@dataclass
class Outcome:
    """What one scenario left behind, on the service's side and on the board's console."""

    codes: list[int]            # result codes the service accepted, in order
    sent: list[int]             # every result code the board reported (accepted or not)
    state: str                  # the task's state on the service afterwards
    downloads: list[str]        # the Range of every download request the service answered
    events: list[str]           # the (last) attempt's `ota ...` lines, as printed
    console: list[str]          # everything the board printed
    ended: bool                 # the attempt printed `ota end`
    version: str | None         # what the board runs afterwards (None: left powered off)
    crash: Crash | None = None  # the board crashed (read through its probe)


def observe(setup: SimSetup, sim: SimBoard, events: list[str], *, ended: bool = True,
            version: bool = True) -> Outcome:
    timeline = setup.mock.service.timeline
    return Outcome(
        codes=setup.codes(sim),
        sent=[e.result for e in timeline.exchanges(sim.dev_id, Endpoint.REPORT)
              if e.result is not None],
        state=str(setup.mock.service.task(sim.dev_id).state),
        downloads=[e.range or "" for e in timeline.exchanges(sim.dev_id, Endpoint.DOWNLOAD)],
        events=events,
        console=[line.text for line in sim.board.console.lines() if not line.sent],
        ended=ended,
        version=sim.board.version() if version else None)


def as_text(events: list[Event]) -> list[str]:
    """Contract events as ``setup.update`` prints them."""
    return [f"{event.tag} " + " ".join(f"{k}={v}" for k, v in event.fields.items())
            for event in events]


def index_of(lines: list[str], prefix: str) -> int:
    """The index of the first line starting with ``prefix`` (-1: none)."""
    return next((i for i, line in enumerate(lines) if line.startswith(prefix)), -1)


def supply(sim: SimBoard) -> PowerProtocol:
    """The rig's bench supply: switching its output off cuts the board's power."""
    power = sim.parts.power()
    assert power is not None
    return power


def on_download(setup: SimSetup,
                hook: Callable[[int, str, Forwarded], Answer | None] | None) -> None:
    """Break this scenario's downloads: ``hook(n, range, answer)`` with n counted from 1 for the
    scenario (the proxy is shared by both boards of a test)."""
    base = setup.proxy.downloads
    setup.proxy.on_download = None if hook is None else \
        lambda n, rng, fwd: hook(n - base, rng, fwd)


# ------------------------------------------------------------------------------ scenarios
def plain_update(setup: SimSetup, sim: SimBoard) -> Outcome:
    """A good 1.1.0 package, nothing in the way."""
    on_download(setup, None)
    setup.task(sim, "1.1.0")
    return observe(setup, sim, setup.update(sim))


def low_battery(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The task wants more than 50 % battery; the bench supply shows 20 %."""
    on_download(setup, None)
    setup.task(sim, "1.1.0", power=50)
    sim.board.set_power(20)
    return observe(setup, sim, setup.update(sim))


def weak_signal(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The task wants a signal above 10; the attenuator leaves 5."""
    on_download(setup, None)
    setup.task(sim, "1.1.0", signal=10)
    sim.board.set_signal(5)
    return observe(setup, sim, setup.update(sim))


def no_space(setup: SimSetup, sim: SimBoard) -> Outcome:
    """1000 bytes of package storage for a 66 KB package."""
    on_download(setup, None)
    setup.task(sim, "1.1.0")
    sim.board.set_free_space(1000)
    return observe(setup, sim, setup.update(sim))


def corrupted_package(setup: SimSetup, sim: SimBoard) -> Outcome:
    """One byte of the 5th chunk flipped on the way: the package's md5 no longer matches."""
    def corrupt(n: int, _: str, answer: Forwarded) -> None:
        if n == 5:
            answer.body = bytes([answer.body[0] ^ 0xFF]) + answer.body[1:]

    on_download(setup, corrupt)
    setup.task(sim, "1.1.0")
    return observe(setup, sim, setup.update(sim))


def garbage_answer(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The 3rd download is answered ``200 garbage`` (no Content-Range, the wrong length); the
    task allows one retry."""
    on_download(setup, lambda n, _, __: Answer(200, b"garbage") if n == 3 else None)
    setup.task(sim, "1.1.0", retry=1, interval=0)
    return observe(setup, sim, setup.update(sim))


def ascii_error_digit(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The 3rd download is answered OneNET's error 3 (not found: final) as the ASCII digit
    some servers send instead of the raw byte; the task allows two retries."""
    on_download(setup, lambda n, _, __: Answer(200, b"3", length=False) if n >= 3 else None)
    setup.task(sim, "1.1.0", retry=2, interval=0)
    return observe(setup, sim, setup.update(sim))


def unbootable_package(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The package's md5 matches, but it is no image: the bootloader refuses it."""
    on_download(setup, None)
    setup.task(sim, "1.1.0", image=os.urandom(8192))
    return observe(setup, sim, setup.update(sim))


def expired_token(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The operator's task token expired before the device came (token check: errno 12)."""
    on_download(setup, None)
    setup.task(sim, "1.1.0")
    setup.mock.service.expire_token(sim.dev_id)
    return observe(setup, sim, setup.update(sim))


def power_cut_mid_download(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The power goes while the 5th chunk is in flight (4 chunks are in flash); back on, the
    board is asked to update again. The outcome's events are the second attempt's."""
    in_flight = threading.Event()
    release = threading.Event()

    def hold_fifth(n: int, _: str, __: Forwarded) -> None:
        if n == 5:
            in_flight.set()
            release.wait(10)

    on_download(setup, hold_fifth)
    setup.task(sim, "1.1.0")
    sim.board.start_update()
    assert in_flight.wait(10), "the 5th download request never came"
    supply(sim).output(False)
    supply(sim).output(True)
    release.set()
    assert sim.board.wait_boot() == "1.0.0"
    return observe(setup, sim, setup.update(sim))


def watched_update(setup: SimSetup, sim: SimBoard) -> Outcome:
    """A plain update, its wait watching the board for a crash through the SWD probe, as the
    suite's does."""
    on_download(setup, None)
    setup.task(sim, "1.1.0")
    watch = SwdFaultWatch(sim.parts.flasher)
    watch.start()
    sim.board.start_update()
    try:
        events = sim.board.wait_update_end(30, watch=lambda: check(watch))
    except FirmwareCrash as crashed:
        outcome = observe(setup, sim, [], ended=False, version=False)
        outcome.crash = crashed.crash
        return outcome
    return observe(setup, sim, as_text(events))


def _battery_drops_at_chunk(setup: SimSetup, sim: SimBoard, chunk: int) -> Outcome:
    """The task wants more than 50 % battery; there is 100 % at the start, but while the
    ``chunk``-th chunk is in flight the supply drops to 20 %."""
    in_flight = threading.Event()
    release = threading.Event()

    def hold(n: int, _: str, __: Forwarded) -> None:
        if n == chunk:
            in_flight.set()
            release.wait(10)

    on_download(setup, hold)
    setup.task(sim, "1.1.0", power=50)
    sim.board.start_update()
    assert in_flight.wait(10), f"download request {chunk} never came"
    sim.board.set_power(20)
    release.set()
    return observe(setup, sim, as_text(sim.board.wait_update_end(30)))


def battery_drops_at_the_last_chunk(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The battery drops while the last chunk is in flight: the download is whole when the
    board reads the battery again, before flashing."""
    return _battery_drops_at_chunk(setup, sim, PACKAGE_SIZE // CHUNK + 1)


def battery_drops_mid_download(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The battery drops while the 10th chunk is in flight: seven are still to come."""
    return _battery_drops_at_chunk(setup, sim, 10)


def power_cut_mid_install(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The power goes while the bootloader copies the new image over the primary slot (right
    after it announced the write); the board is let run on for up to 10 s."""
    setup.task(sim, "1.1.0")
    on_download(setup, None)
    console = sim.board.console
    start = len(console.lines())
    sim.board.start_update()
    sim.board.console.expect(r"ota phase=flash bytes=\d+", 30)
    supply(sim).output(False)
    supply(sim).output(True)

    def printed() -> list[str]:
        return [line.text for line in console.lines()[start:] if not line.sent]

    with contextlib.suppress(AssertionError):   # a board left with no bootable image is silent
        wait_for(lambda: "ota end" in printed())
    ended = "ota end" in printed()
    events = [line for line in printed() if line.startswith("ota phase=")]
    return observe(setup, sim, events, ended=ended, version=ended)


def download_always_fails(setup: SimSetup, sim: SimBoard) -> Outcome:
    """Every download is answered 500; the task allows one retry. A board still downloading
    after 6 requests is stopped by cutting its power."""
    on_download(setup, lambda n, _, __: Answer(500, b"busy"))
    setup.task(sim, "1.1.0", retry=1, interval=0)
    console = sim.board.console
    start = len(console.lines())
    sim.board.start_update()

    def printed() -> list[str]:
        return [line.text for line in console.lines()[start:] if not line.sent]

    downloads = setup.mock.service.timeline.exchanges
    wait_for(lambda: "ota end" in printed()
             or len(downloads(sim.dev_id, Endpoint.DOWNLOAD)) >= 6)
    ended = "ota end" in printed()
    if not ended:
        supply(sim).output(False)
    events = [line for line in printed() if line.startswith("ota phase=")]
    return observe(setup, sim, events, ended=ended, version=ended)


def oversized_answer(setup: SimSetup, sim: SimBoard) -> Outcome:
    """From the 3rd download on, every answer is a 206 twice as long as the range asked (more
    than the board's 4 KiB buffer); the task allows one retry."""
    def doubled(n: int, _: str, answer: Forwarded) -> Answer | None:
        if n < 3:
            return None
        start = int(answer.headers["Content-Range"].split()[1].split("-")[0])
        return Answer(206, answer.body * 2, headers={
            "Content-Range": f"bytes {start}-{start + 2 * CHUNK - 1}/{PACKAGE_SIZE}"})

    on_download(setup, doubled)
    setup.task(sim, "1.1.0", retry=1, interval=0)
    return observe(setup, sim, setup.update(sim))


def oversized_image(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The package's md5 matches, but its image's header says it fills twice the slot."""
    on_download(setup, None)
    image = build_image(sim.rig.board, "1.1.0")
    setup.task(sim, "1.1.0", image=claim_span(sim.rig.board, image, 2 * SLOT_SIZE["nrf52832"]))
    return observe(setup, sim, setup.update(sim))


def bad_install_sector(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The sector the install request is written to (the secondary slot's last) is bad."""
    on_download(setup, None)
    setup.task(sim, "1.1.0")
    flash = sim.bench.flash(sim.bench.layout.secondary.chip)
    at = install_request_at(sim.bench.layout, flash)
    flash.mark_bad(at)
    try:
        return observe(setup, sim, setup.update(sim))
    finally:
        flash.mark_good(at)


def self_test_fails(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The package is a 1.1.0 build whose self-test fails. A board left booting it over and
    over (never reverted) is stopped by cutting its power once it booted it three times."""
    on_download(setup, None)
    setup.task(sim, "1.1.0", image=build_image(sim.rig.board, "1.1.0", fails_self_test=True))
    console = sim.board.console
    start = len(console.lines())
    sim.board.start_update()

    def printed() -> list[str]:
        return [line.text for line in console.lines()[start:] if not line.sent]

    wait_for(lambda: "ota end" in printed() or printed().count("boot version=1.1.0") >= 3, 60)
    ended = "ota end" in printed()
    if not ended:
        supply(sim).output(False)
    events = [line for line in printed() if line.startswith(("ota phase=", "boot "))]
    return observe(setup, sim, events, ended=ended, version=ended)


def signed_with_another_key(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The package is a 1.1.0 build signed with an imgtool key the bootloader does not trust."""
    on_download(setup, None)
    setup.task(sim, "1.1.0", image=build_image(sim.rig.board, "1.1.0", key="other"))
    return observe(setup, sim, setup.update(sim))


def older_package(setup: SimSetup, sim: SimBoard) -> Outcome:
    """The task offers 0.9.0, a validly signed build older than the running 1.0.0."""
    on_download(setup, None)
    setup.task(sim, "0.9.0")
    return observe(setup, sim, setup.update(sim))


# ------------------------------------------------------------------------------ expectations
@dataclass(frozen=True)
class Expect:
    """What the service and the board must show after a scenario (None: not checked)."""

    codes: list[int]
    version: str | None = "1.0.0"
    state: str | None = None
    ended: bool = True

    def check(self, outcome: Outcome) -> None:
        assert outcome.codes == self.codes, outcome.events
        assert outcome.ended == self.ended, outcome.events
        if self.version is not None:
            assert outcome.version == self.version
        if self.state is not None:
            assert outcome.state == self.state


@dataclass(frozen=True)
class Case:
    scenario: Callable[[SimSetup, SimBoard], Outcome]
    good: Expect
    defective: Expect
    # The defect's own evidence, beyond the codes: asserts on (good outcome, defective outcome).
    evidence: Callable[[Outcome, Outcome], None]


def early_101(good: Outcome, bad: Outcome) -> None:
    # A good board reports 101 once the whole package is in flash; this one after the first
    # chunk, while most of the package is still to come.
    last_download = max(i for i, event in enumerate(good.events)
                        if event.startswith("ota phase=download"))
    assert index_of(good.events, "ota phase=report result=101") == last_download + 1
    assert bad.events[1:4] == ["ota phase=token errno=0",
                               "ota phase=download offset=0 status=206",
                               "ota phase=report result=101 errno=0"]


def no_download(good: Outcome, bad: Outcome) -> None:
    # The good board gives up before the token check; the defective one downloads it all.
    assert index_of(good.events, "ota phase=token") == -1
    assert good.downloads == []
    assert len(bad.downloads) == PACKAGE_SIZE // CHUNK + 1


def resumes_or_restarts(good: Outcome, bad: Outcome) -> None:
    # Four chunks were in flash when the power went: a good board asks for the fifth next.
    assert index_of(good.events, "ota phase=download") \
        == index_of(good.events, f"ota phase=download offset={4 * CHUNK} status=206")
    assert index_of(bad.events, "ota phase=download") \
        == index_of(bad.events, "ota phase=download offset=0 status=206")
    chunks = PACKAGE_SIZE // CHUNK + 1
    assert len(good.downloads) == chunks + 1           # the one lost in the power cut
    assert len(bad.downloads) == chunks + 5            # the first four, fetched again


def upgraded_after_boot(good: Outcome, bad: Outcome) -> None:
    # 201 is what the new image says once it runs: after the boot line of 1.1.0, not before.
    for outcome, before in ((good, False), (bad, True)):
        boot = index_of(outcome.console, "boot version=1.1.0")
        report = index_of(outcome.console, "ota phase=report result=201")
        assert boot >= 0, outcome.console
        assert report >= 0, outcome.console
        assert (report < boot) is before, outcome.console


def flashes_refused_image(good: Outcome, bad: Outcome) -> None:
    # Both boards flash it and the bootloader refuses it; only the good one tells the service.
    for outcome in (good, bad):
        assert any(line.startswith("E: bootloader: secondary slot image rejected")
                   for line in outcome.console)


def keeps_retrying(good: Outcome, bad: Outcome) -> None:
    assert len(good.downloads) == 2                    # the try and its one retry
    assert good.events[-1] == "ota phase=report result=107 errno=0"
    assert len(bad.downloads) >= 6
    assert bad.sent == []


def silent(good: Outcome, bad: Outcome) -> None:
    assert good.sent == [105]
    assert good.events[-1] == "ota phase=report result=105 errno=0"
    assert bad.sent == []
    assert index_of(bad.events, "ota phase=report") == -1


def installs_bad_md5(good: Outcome, bad: Outcome) -> None:
    # Both see the bad md5; the good board stops there, the defective one reboots to install
    # the package, which its bootloader refuses.
    assert "ota phase=verify md5=bad" in good.events
    assert "ota phase=verify md5=bad" in bad.events
    assert index_of(good.console, "I: ota: rebooting to install") == -1
    assert index_of(bad.console, "I: ota: rebooting to install") >= 0
    assert index_of(bad.console, "E: bootloader: secondary slot image rejected") >= 0


def trusts_2xx(good: Outcome, bad: Outcome) -> None:
    # The garbage answer to the 3rd request: the good board asks for the same chunk again; the
    # defective one takes the 7 bytes as the chunk and goes on from the wrong offset.
    garbage = f"ota phase=download offset={2 * CHUNK} status=200"
    for outcome, after in ((good, 2 * CHUNK), (bad, 2 * CHUNK + len(b"garbage"))):
        at = outcome.events.index(garbage)
        assert outcome.events[at + 1] == f"ota phase=download offset={after} status=206"
    assert "ota phase=verify md5=ok" in good.events
    assert "ota phase=verify md5=bad" in bad.events


def flashes_on_low_battery(good: Outcome, bad: Outcome) -> None:
    assert good.events[-1] == "ota phase=report result=202 errno=0"
    assert index_of(good.events, "ota phase=flash") == -1
    assert f"ota phase=flash bytes={PACKAGE_SIZE}" in bad.events


def downloads_on_low_battery(good: Outcome, bad: Outcome) -> None:
    # The good board stops before the chunk after the drop; the defective one downloads the
    # rest and is only stopped before flashing.
    assert len(good.downloads) == 10
    assert good.events[-2:] == [f"ota phase=download offset={10 * CHUNK} error=low-power",
                                "ota phase=report result=105 errno=0"]
    assert len(bad.downloads) == PACKAGE_SIZE // CHUNK + 1
    assert index_of(bad.events, "ota phase=flash") == -1


def installs_atomically(good: Outcome, bad: Outcome) -> None:
    # Both were cut while swapping; the good bootloader resumes the swap where its trailer's
    # status says it stopped, the defective one (no record) starts a swap of the half-swapped
    # slots, refuses the secondary image it finds there and boots half an image, which fails
    # its image check.
    assert "I: bootloader: resuming the interrupted test swap" in good.console
    assert good.events.count(f"ota phase=flash bytes={PACKAGE_SIZE}") == 2
    assert bad.events.count(f"ota phase=flash bytes={PACKAGE_SIZE}") == 1
    assert any(line.startswith("E: no bootable image in the primary slot")
               for line in bad.console), bad.console


def reports_after_token_end(good: Outcome, bad: Outcome) -> None:
    # Errno 12 ends the attempt: no report is due (ONENET.md); the defective board sends 107.
    for outcome in (good, bad):
        assert outcome.events[:2] == ["ota phase=detect errno=0 target=1.1.0 "
                                      f"size={PACKAGE_SIZE}", "ota phase=token errno=12"]
        assert outcome.downloads == []
    assert good.sent == []
    assert len(good.events) == 2
    assert bad.sent == [107]


def reads_the_ascii_digit(good: Outcome, bad: Outcome) -> None:
    # Error 3 is final: the good board asks for the range once; the defective one takes the
    # digit for a bad answer and asks again, retry times, before it gives up.
    assert good.downloads.count(good.downloads[2]) == 1, good.downloads
    assert bad.downloads.count(bad.downloads[2]) == 3, bad.downloads


def no_boot_report(good: Outcome, bad: Outcome) -> None:
    # Both boot the new image; only the good board says so.
    for outcome in (good, bad):
        assert "boot version=1.1.0" in outcome.console
    assert index_of(bad.console, "ota phase=report result=201") == -1


def reports_overflow(good: Outcome, bad: Outcome) -> None:
    # Both refuse the long answers alike (the range asked twice, then no more); only the good
    # board says why.
    for outcome in (good, bad):
        assert outcome.downloads.count(outcome.downloads[2]) == 2, outcome.downloads
        assert len(outcome.downloads) == 4, outcome.downloads
    assert f"ota phase=download offset={2 * CHUNK} error=overflow length={2 * CHUNK}" \
        in good.events
    assert not any("error=overflow" in event for event in bad.events), bad.events


def checks_the_header(good: Outcome, bad: Outcome) -> None:
    # The good board refuses the image before it reboots; the defective one reboots into a
    # bootloader that refuses it.
    assert any(event.startswith("ota phase=verify image=too-large") for event in good.events)
    assert index_of(good.console, "I: ota: rebooting to install") == -1
    assert index_of(bad.console, "I: ota: rebooting to install") >= 0
    assert index_of(bad.console, "E: bootloader: secondary slot image rejected") >= 0


def checks_the_write(good: Outcome, bad: Outcome) -> None:
    # Both fail to write the install request; the good board stops and says so, the defective
    # one reboots, and its bootloader finds no request (MCUboot: swap type none) and boots the
    # old image.
    assert index_of(good.console, "E: ota: the install request was not written") >= 0
    assert index_of(good.console, "I: ota: rebooting to install") == -1
    reboot = index_of(bad.console, "I: ota: rebooting to install")
    assert reboot >= 0
    assert index_of(bad.console[reboot:], "I: bootloader: swap type: none") >= 0


def crashes(good: Outcome, bad: Outcome) -> None:
    # The defective board took two chunks, crashed storing the third and stays in its fault
    # handler: hil reads the HardFault through the probe, the precise bus fault at address 0.
    assert good.crash is None
    assert len(bad.downloads) == 3, bad.downloads
    assert bad.crash is not None
    assert bad.crash.cause == "HardFault"
    assert bad.crash.fault_address == 0
    assert [word.partition(":")[0] for word in bad.crash.words] == \
        ["FORCED", "PRECISERR", "BFARVALID"]


def reverts(good: Outcome, bad: Outcome) -> None:
    # Both boot the failing build; the good one is reverted (its bootloader swaps the old image
    # back) and reports; the defective one boots the failing build again and again.
    assert good.events.count("boot version=1.1.0") == 1, good.events
    assert index_of(good.console, "I: bootloader: swap type: revert") >= 0
    assert good.events[-1] == "ota phase=report result=204 errno=0"
    assert bad.events.count("boot version=1.1.0") >= 3, bad.events
    assert index_of(bad.console, "I: bootloader: swap type: revert") == -1


def checks_the_signature(good: Outcome, bad: Outcome) -> None:
    assert index_of(good.console, "E: bootloader: secondary slot image rejected: the image is "
                    "signed with a key this bootloader does not know") >= 0
    assert "boot version=1.1.0" in bad.console


def prevents_downgrades(good: Outcome, bad: Outcome) -> None:
    assert any("(downgrade prevention)" in line for line in good.console), good.console
    assert "boot version=0.9.0" in bad.console


UPGRADED = Expect([101, 201], version="1.1.0", state="succeeded")

DEFECT_SCENARIOS: dict[Defect, Case] = {
    Defect.EARLY_101: Case(
        plain_update, good=UPGRADED, defective=UPGRADED, evidence=early_101),
    Defect.IGNORES_POWER: Case(
        low_battery, good=Expect([105], state="failed"),
        # It downloads on 20 % and is only stopped by the second check, before flashing.
        defective=Expect([101, 202], state="failed"), evidence=no_download),
    Defect.IGNORES_SIGNAL: Case(
        weak_signal, good=Expect([106], state="failed"), defective=UPGRADED,
        evidence=no_download),
    Defect.IGNORES_SPACE: Case(
        no_space, good=Expect([102], state="failed"), defective=UPGRADED,
        evidence=no_download),
    Defect.RESTARTS_DOWNLOAD: Case(
        power_cut_mid_download, good=UPGRADED, defective=UPGRADED,
        evidence=resumes_or_restarts),
    Defect.REPORTS_201_BEFORE_REBOOT: Case(
        plain_update, good=UPGRADED, defective=UPGRADED, evidence=upgraded_after_boot),
    Defect.REPORTS_201_ON_OLD_IMAGE: Case(
        # The service is told 1.1.0 runs while the board runs 1.0.0.
        unbootable_package, good=Expect([101, 204], state="failed"),
        defective=Expect([101, 201], state="succeeded"), evidence=flashes_refused_image),
    Defect.RETRIES_FOREVER: Case(
        download_always_fails, good=Expect([107], state="failed"),
        defective=Expect([], version=None, state="downloading", ended=False),
        evidence=keeps_retrying),
    Defect.SILENT_AFTER_FAILURE: Case(
        # The task is left pending on the service, for ever.
        low_battery, good=Expect([105], state="failed"),
        defective=Expect([], state="pending"), evidence=silent),
    Defect.SKIPS_MD5: Case(
        # The corrupt image is flashed; the bootloader refuses it and the board reports 204.
        corrupted_package, good=Expect([101, 205], state="failed"),
        defective=Expect([101, 204], state="failed"), evidence=installs_bad_md5),
    Defect.TRUSTS_ANY_2XX: Case(
        garbage_answer, good=UPGRADED, defective=Expect([101, 205], state="failed"),
        evidence=trusts_2xx),
    Defect.FLASHES_ON_LOW_POWER: Case(
        battery_drops_at_the_last_chunk, good=Expect([101, 202], state="failed"),
        defective=UPGRADED, evidence=flashes_on_low_battery),
    Defect.DOWNLOADS_ON_LOW_POWER: Case(
        battery_drops_mid_download, good=Expect([105], state="failed"),
        defective=Expect([101, 202], state="failed"), evidence=downloads_on_low_battery),
    Defect.NON_ATOMIC_INSTALL: Case(
        # The good board ends up running 1.1.0; the defective one runs nothing, its task
        # waits in "upgrading" for ever.
        power_cut_mid_install, good=UPGRADED,
        defective=Expect([101], version=None, state="upgrading", ended=False),
        evidence=installs_atomically),
    Defect.REPORTS_AFTER_TOKEN_END: Case(
        expired_token, good=Expect([], state="pending"),
        defective=Expect([107], state="failed"), evidence=reports_after_token_end),
    Defect.RAW_ERROR_BYTES_ONLY: Case(
        ascii_error_digit, good=Expect([107], state="failed"),
        defective=Expect([107], state="failed"), evidence=reads_the_ascii_digit),
    Defect.CRASHES_MID_DOWNLOAD: Case(
        # The task waits in "downloading" for ever; the board, halted in its fault, says nothing.
        watched_update, good=UPGRADED,
        defective=Expect([], version=None, state="downloading", ended=False), evidence=crashes),
    Defect.NO_BOOT_REPORT: Case(
        # The board runs 1.1.0; the service waits for ever in "upgrading".
        plain_update, good=UPGRADED,
        defective=Expect([101], version="1.1.0", state="upgrading"), evidence=no_boot_report),
    Defect.UNKNOWN_ON_OVERFLOW: Case(
        oversized_answer, good=Expect([103], state="failed"),
        defective=Expect([107], state="failed"), evidence=reports_overflow),
    Defect.INSTALLS_OVERSIZED: Case(
        oversized_image, good=Expect([101, 203], state="failed"),
        defective=Expect([101, 204], state="failed"), evidence=checks_the_header),
    Defect.IGNORES_FLASH_ERRORS: Case(
        bad_install_sector, good=Expect([101, 206], state="failed"),
        defective=Expect([101, 204], state="failed"), evidence=checks_the_write),
    Defect.CONFIRMS_BEFORE_SELF_TEST: Case(
        # The defective board never reports: the task waits in "upgrading" for ever.
        self_test_fails, good=Expect([101, 204], state="failed"),
        defective=Expect([101], version=None, state="upgrading", ended=False), evidence=reverts),
    Defect.NO_REVERT: Case(
        self_test_fails, good=Expect([101, 204], state="failed"),
        defective=Expect([101], version=None, state="upgrading", ended=False), evidence=reverts),
    Defect.ACCEPTS_UNSIGNED: Case(
        signed_with_another_key, good=Expect([101, 204], state="failed"),
        defective=UPGRADED, evidence=checks_the_signature),
    Defect.ACCEPTS_DOWNGRADE: Case(
        older_package, good=Expect([101, 204], state="failed"),
        defective=Expect([101, 201], version="0.9.0", state="succeeded"),
        evidence=prevents_downgrades),
}


def test_every_defect_has_a_scenario() -> None:
    assert set(DEFECT_SCENARIOS) == set(Defect)


@pytest.mark.parametrize("defect", list(DEFECT_SCENARIOS), ids=str)
def test_defect_changes_the_boards_behaviour(setup: SimSetup, defect: Defect) -> None:
    case = DEFECT_SCENARIOS[defect]
    good = case.scenario(setup, setup.board())
    bad = case.scenario(setup, setup.board(defects=(defect.value,)))
    case.good.check(good)
    case.defective.check(bad)
    case.evidence(good, bad)
