"""Detect: what a board does with the service's answer to its detect, before any download."""

from __future__ import annotations

import pytest

from hil.onenet.codes import Errno
from hil.onenet.messages import Endpoint

NOTHING_AFTER_DETECT = (Endpoint.TOKEN_CHECK, Endpoint.DOWNLOAD, Endpoint.REPORT)


def test_happy_path_updates_to_the_target_and_the_next_detect_finds_no_task(ota):
    attempt = ota.update()
    ota.expect("success")
    assert attempt.download_starts() == list(range(0, ota.package.size, 4096))

    again = ota.update()
    ota.expect_detect(again, Errno.NO_TASK)
    ota.expect("success")           # and nothing more: no download, no report


@pytest.mark.parametrize("variant", ["missing", "expired", "bad-sign", "garbled"])
def test_a_refused_authorization_ends_the_attempt_without_a_report(ota, variant):
    ota.inject("auth", variant=variant)
    attempt = ota.update()
    ota.expect_detect(attempt, Errno.AUTH_FAILED)
    ota.expect("refused-at-detect")
    ota.expect_nothing_requested(*NOTHING_AFTER_DETECT)


@pytest.mark.parametrize(("fault", "errno"), [
    ("no-task", Errno.NO_TASK),                      # nothing to do
    ("manuf-mismatch", Errno.MANUF_MODEL_MISMATCH),  # a task for another chip
    ("version-mismatch", Errno.VERSION_MISMATCH),    # a delta task from another version
])
def test_a_detect_refused_by_the_service_ends_the_attempt_without_a_report(ota, fault, errno):
    ota.inject(fault)
    attempt = ota.update()
    ota.expect_detect(attempt, errno)
    ota.expect("refused-at-detect")
    ota.expect_nothing_requested(*NOTHING_AFTER_DETECT)


def test_low_power_at_detect_is_reported_105_and_nothing_is_downloaded(ota):
    ota.inject("thresholds", power=50)
    ota.inject("low-power", level=20)
    ota.update()
    ota.expect("low-power")
    ota.expect_nothing_requested(Endpoint.TOKEN_CHECK, Endpoint.DOWNLOAD)


def test_power_at_the_threshold_is_too_low(ota):
    ota.inject("thresholds", power=50)
    ota.inject("low-power", level=50)
    ota.update()
    ota.expect("low-power")
    ota.expect_nothing_requested(Endpoint.TOKEN_CHECK, Endpoint.DOWNLOAD)


def test_bad_signal_at_detect_is_reported_106_and_nothing_is_downloaded(ota):
    ota.inject("thresholds", signal=10)
    ota.inject("bad-signal", level=5)
    ota.update()
    ota.expect("bad-signal")
    ota.expect_nothing_requested(Endpoint.TOKEN_CHECK, Endpoint.DOWNLOAD)


def test_a_package_larger_than_the_free_space_is_reported_102(ota):
    ota.inject("no-space", free=1000)
    ota.update()
    ota.expect("no-space")
    ota.expect_nothing_requested(Endpoint.TOKEN_CHECK, Endpoint.DOWNLOAD)
