"""Download: every transport and HTTP fault at the gateway, once (the board must recover and
finish) and persistently (it must give up with the right code after the first request and
`retry` retries of the failing range, each at least `interval` after the failure); the final
error bytes; the operator and the bench acting mid-download (a cancel, a pause, an expired
token, a power cut, a reboot, the battery falling)."""

from __future__ import annotations

import pytest

from hil.faults.catalog import DEFAULT_AT
from hil.onenet.messages import Endpoint

# Faults that fail the request they hit: once, the board retries that range and finishes.
FAILING = [
    ("stall", {}), ("reset", {}), ("limit", {}), ("truncate", {}), ("content-range", {}),
    ("whole-file", {}), ("error-byte", {"code": 4}), ("error-byte", {"code": 6}),
    ("http-5xx", {}), ("drop", {}), ("oversize", {}),
]
# Faults that only slow an answer down: the board takes it as it comes.
SLOWING = [("latency", {}), ("bandwidth", {}), ("slicer", {})]
# The outcome when a failing fault hits every try of a range: a stall is a timeout (104), an
# answer longer than the range asked (than the board's receive buffer) a memory overflow (103).
GIVES_UP = {"stall": "retries-timeout", "oversize": "retries-overflow"}


def _id(fault: tuple[str, dict[str, int]]) -> str:
    name, params = fault
    return "-".join([name, *(str(value) for value in params.values())])


@pytest.mark.parametrize("fault", FAILING, ids=_id)
def test_a_failing_request_once_is_retried_and_the_update_finishes(ota, fault):
    name, params = fault
    ota.inject(name, **params)
    attempt = ota.update()
    ota.expect("success")
    ota.expect_retries(attempt, at=DEFAULT_AT, persistent=False)


@pytest.mark.parametrize("fault", FAILING, ids=_id)
def test_a_range_failing_persistently_is_given_up_after_its_retries(ota, fault):
    name, params = fault
    ota.inject(name, persistent=True, **params)
    attempt = ota.update()
    ota.expect(GIVES_UP.get(name, "retries-failed"))
    ota.expect_retries(attempt, at=DEFAULT_AT)
    assert max(attempt.download_starts()) == DEFAULT_AT, \
        "download phase: the board asked for ranges past the one it could not get"


@pytest.mark.parametrize("fault", SLOWING, ids=_id)
def test_a_slow_answer_once_is_taken(ota, fault):
    name, params = fault
    ota.inject(name, **params)
    attempt = ota.update()
    ota.expect("success")
    assert len(attempt.requests(Endpoint.DOWNLOAD)) == -(-ota.package.size // 4096), \
        "download phase: a slow but whole answer was asked for again"


@pytest.mark.parametrize(("name", "params"), [
    ("latency", {"ms": 20.0, "jitter_ms": 10.0}), ("bandwidth", {"rate": 512 * 1024}),
    ("slicer", {"size": 256, "delay_ms": 0.1}),
], ids=["latency", "bandwidth", "slicer"])
def test_every_answer_slowed_down_still_updates(ota, name, params):
    ota.inject(name, at=None, persistent=True, **params)
    ota.update()
    ota.expect("success")


# OneNET sends the raw byte; other servers the ASCII digit, which a board must read the same.
@pytest.mark.parametrize(("code", "form"), [(1, "raw"), (2, "raw"), (3, "raw"), (3, "ascii")],
                         ids=["1", "2", "3", "3-ascii"])
def test_a_final_error_byte_is_reported_107_at_once(ota, code, form):
    ota.inject("error-byte", code=code, form=form)
    attempt = ota.update()
    ota.expect("download-error")
    starts = attempt.download_starts()
    assert starts.count(DEFAULT_AT) == 1, \
        f"download phase: error byte {code} is final, yet the board asked again: {starts}"
    assert max(starts) == DEFAULT_AT, \
        f"download phase: error byte {code} is final, yet the board went on: {starts}"


def test_a_task_cancelled_mid_download_stops_the_download(ota):
    ota.inject("cancel", during="download")
    attempt = ota.update()
    ota.expect("cancelled")
    assert max(attempt.download_starts()) == DEFAULT_AT


def test_a_task_paused_mid_download_stops_it_and_finishes_once_resumed(ota):
    ota.inject("pause", during="download")
    ota.update()
    ota.expect("paused")
    ota.mock.service.resume(ota.dev_id)
    ota.update()
    assert ota.accepted_codes() == [101, 201], \
        f"report phase: expected [101, 201] after the resume, received {ota.accepted_codes()}"


def test_a_token_expiring_mid_download_ends_in_107(ota):
    ota.inject("token-expired", during="download")
    attempt = ota.update()
    ota.expect("download-error")
    assert max(attempt.download_starts()) == DEFAULT_AT


def test_low_power_mid_download_stops_the_download_with_105(ota):
    # The battery is fine at detect and falls while the download's third chunk is in flight:
    # the board must stop writing its flash before the next chunk and report 105 ("download
    # failed: low battery"), not download on and fail only before flashing (202).
    ota.inject("thresholds", power=50)
    ota.inject("low-power", level=20, during="download")
    attempt = ota.update()
    ota.expect("low-power-download")
    assert max(attempt.download_starts()) == DEFAULT_AT, \
        f"download phase: the board went on downloading on a low battery: " \
        f"{attempt.download_starts()}"
    assert ota.booted_versions() == [], "flash phase: the board flashed on a low battery"


@pytest.mark.parametrize("fault", ["power-cut", "reboot"])
def test_an_interrupted_download_resumes_at_the_stored_offset(ota, fault):
    ota.inject(fault)                       # at the download's third chunk
    interrupted = ota.update(until_boot=True)
    assert not interrupted.ended, "download phase: the attempt ended though the board was cut"
    resumed = ota.update()
    ota.expect("success")
    ota.expect_resumed(interrupted, resumed)
