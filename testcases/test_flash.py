"""Verify and flash: the package's md5, an image larger than its slot, the battery before
flashing, a flash write that fails, a power cut while the board flashes, and the version the new
image really boots as."""

from __future__ import annotations

import pytest

from hil.onenet.messages import Endpoint


@pytest.mark.phase("verify")
def test_a_corrupted_package_is_reported_101_then_205(ota):
    ota.inject("corrupt")
    attempt = ota.update()
    ota.expect("md5-mismatch")
    assert ota.booted_versions() == [], \
        "flash phase: the board rebooted into a package whose md5 did not match"
    assert len(attempt.requests(Endpoint.DOWNLOAD)) == -(-ota.package.size // 4096)


@pytest.mark.phase("verify")
def test_an_image_larger_than_its_slot_is_reported_101_then_203(ota):
    # The package arrives whole and its md5 is right, but its image's header says it fills
    # twice the slot it would run from: a board must refuse it before asking for the install
    # ("upgrade failed: memory overflow"), not reboot into a bootloader that refuses it (204).
    ota.inject("oversized-image")
    ota.update()
    ota.expect("image-too-large")
    assert ota.booted_versions() == [], \
        "flash phase: the board rebooted to install an image larger than its slot"


def test_a_flash_write_failing_is_reported_101_then_206(ota):
    # The sector the board writes its install request to is bad: the write fails, the board
    # says so ("upgrade failed: unknown") and goes on running its old image.
    ota.inject("bad-sector")
    ota.update()
    ota.expect("flash-write-failed")
    assert ota.booted_versions() == [], \
        "flash phase: the board rebooted though its install request was not written"


def test_low_power_before_the_flash_is_reported_101_then_202(ota):
    ota.inject("thresholds", power=50)
    ota.inject("low-power", level=20, during="flash")
    ota.update()
    ota.expect("low-power-flash")
    assert ota.booted_versions() == [], "flash phase: the board flashed on a low battery"


def test_a_power_cut_while_flashing_still_ends_in_201(ota):
    # The cut comes once the board has announced its write (ota phase=flash bytes=N) and
    # before it booted again: the plugin makes the test an ERROR otherwise. A board must then
    # finish the install from its intact copy (MCUboot resumes its swap, an ESP32 makes its
    # otadata switch again) and boot the target, or boot the old image and say so; a
    # half-written image is neither.
    ota.inject("power-cut", during="flash")
    ota.update()
    ota.expect("success", repeats_allowed=True)


def test_an_image_booting_as_another_version_is_reported_204(ota):
    ota.inject("wrong-version")
    ota.update()
    ota.expect("wrong-version")
    booted = ota.booted_versions()
    assert booted, "report phase: the board never booted the package it installed"
    assert booted[-1] != ota.target, \
        f"report phase: the board booted {booted}, the target {ota.target}"
