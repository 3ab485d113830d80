"""The bootloader: a new image is tested before it is kept (it confirms itself once its
self-test passed, or the bootloader reverts it), and the bootloader installs only what it
trusts: an image signed with its key, of a version not older than the one running.

On the simulated nRF52832 and GD32 (MCUboot, swap using scratch: ``hil.sim.mcuboot``) and the
simulated ESP32 (ESP-IDF's otadata with app rollback, Secure Boot V2, anti-rollback:
``hil.sim.otadata``). A host build has no bootloader: the faults skip there, naming what they
need. A power cut while the image is installed is ``test_flash``'s power-cut scenario."""

from __future__ import annotations

import pytest


@pytest.mark.phase("report")
def test_a_new_image_failing_its_self_test_is_reverted_and_reported_101_then_204(ota):
    # The package is a build of the target whose self-test fails: it boots, resets before it
    # confirms itself, and the bootloader swaps the old image back at the next boot. The old
    # image then reports that the target is not what runs. A board whose image confirms
    # before its self-test, or whose bootloader never reverts, boots the failing build again
    # and again: no report comes.
    ota.inject("fails-self-test")
    ota.update()
    ota.expect("self-test-reverted")
    booted = ota.booted_versions()
    if not ota.board.shell_less:
        # (A shell-less board's boots are the versions the service heard: the failing build
        # resets before it says anything.)
        assert ota.target in booted, \
            f"report phase: the board never booted the build under test; boots: {booted}"
    assert booted, "report phase: the board never booted again after the download"
    assert booted[-1] != ota.target, \
        f"report phase: the board runs the build that failed its self-test; boots: {booted}"


@pytest.mark.phase("flash")
def test_an_image_signed_with_another_key_is_refused_and_reported_101_then_204(ota):
    # The package is whole and its md5 right, but its signature (MCUboot's ED25519 TLV, ESP-IDF's
    # Secure Boot V2 block) is made with a key the bootloader does not trust: it must not be
    # installed; the old image runs and says so.
    ota.inject("wrong-key")
    ota.update()
    ota.expect("bad-signature")
    booted = ota.booted_versions()
    assert ota.target not in booted, \
        f"flash phase: the board booted an image signed with another key; boots: {booted}"


@pytest.mark.phase("flash")
def test_a_package_older_than_the_running_version_is_refused_and_reported_101_then_204(ota):
    # The task offers a validly signed build older than the base the board runs: downgrade
    # prevention refuses it (MCUboot's at the swap; ESP-IDF's anti-rollback by the build's lower
    # secure_version, at boot); the old image runs and reports the version mismatch.
    ota.inject("downgrade")
    attempt = ota.update()
    ota.expect("downgrade-refused")
    offered = attempt.offered
    assert offered is not None, "detect phase: the service offered no task"
    booted = ota.booted_versions()
    assert offered.target not in booted, \
        f"flash phase: the board installed the older build {offered.target}; boots: {booted}"
