"""Named firmware defects for the simulated boards: ways real firmware gets an OTA update wrong.

Each is one switch in the firmware model (``hil.sim.firmware``), off by default, chosen per board
instance (a rig file's ``sim.defects``). They exist so that the conformance suite's power to catch
defects can be measured: a suite that passes on a defective board has a hole.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Defect(enum.StrEnum):
    """Ways real firmware gets OTA wrong, one switch each."""

    EARLY_101 = "early-101"                        # reports 101 after the first chunk
    IGNORES_POWER = "ignores-power"                # no 105 on a low battery
    IGNORES_SIGNAL = "ignores-signal"              # no 106 on a weak signal
    IGNORES_SPACE = "ignores-space"                # no 102, downloads what cannot fit
    RESTARTS_DOWNLOAD = "restarts-download"        # from byte 0 after a reboot or power cut
    REPORTS_201_BEFORE_REBOOT = "201-before-reboot"
    REPORTS_201_ON_OLD_IMAGE = "201-on-old-image"  # 201 whatever it booted
    RETRIES_FOREVER = "retries-forever"            # ignores the task's retry count
    SILENT_AFTER_FAILURE = "silent-after-failure"  # never reports a failure code
    SKIPS_MD5 = "skips-md5"                        # installs whatever arrived
    TRUSTS_ANY_2XX = "trusts-any-2xx"              # no Content-Range or length check
    FLASHES_ON_LOW_POWER = "flashes-on-low-power"  # no 202
    REPORTS_AFTER_TOKEN_END = "reports-after-token-end"  # reports 107 on token 12/20/22
    NO_BOOT_REPORT = "no-boot-report"              # never reports after the reboot
    RAW_ERROR_BYTES_ONLY = "raw-error-bytes-only"  # an ASCII error digit taken for a bad answer
    # The battery checked before the download only: one falling mid-download is written on
    # until the check before flashing (202 where a conforming board says 105 at once).
    DOWNLOADS_ON_LOW_POWER = "downloads-on-low-power"
    # The install keeps no record of its progress: a power cut mid-swap leaves half an image
    # in the primary slot, which MCUboot then boots (it fails the image check: a dead board);
    # the ESP32's agent does not record the install before its otadata switch, so a cut before
    # the switch took leaves the old image running and the task waiting for ever.
    NON_ATOMIC_INSTALL = "non-atomic-install"
    # A range answer longer than the range asked (more than the receive buffer holds) taken for
    # any bad answer: 107 where the user's table says 103 ("download failed: memory overflow").
    UNKNOWN_ON_OVERFLOW = "107-on-overflow"
    # No check of the image's header against its slot before the install is requested: an
    # image that says it is larger than the slot is left to the bootloader, which refuses it;
    # the old image boots and the board says 204 where 203 is due.
    INSTALLS_OVERSIZED = "installs-oversized"
    # The write that requests the install is not checked: a failed flash write goes unnoticed,
    # the board reboots into its old image and says 204 where 206 is due.
    IGNORES_FLASH_ERRORS = "ignores-flash-errors"
    # A NULL pointer write while storing the third chunk: a HardFault on the Cortex-M boards
    # (whose default handler spins, the board dead until reset), a StoreProhibited panic on the
    # ESP32 (printed on its console, then a reboot). hil must report a firmware crash.
    CRASHES_MID_DOWNLOAD = "crashes-mid-download"
    # The new image confirms itself (MCUboot's image_ok, ESP-IDF's VALID) as soon as it boots,
    # before its self-test: an image whose self-test fails is never reverted; it resets and
    # boots again, a boot loop where a conforming board runs its old image and reports the
    # failure.
    CONFIRMS_BEFORE_SELF_TEST = "confirms-before-self-test"
    # The bootloader never reverts (every upgrade taken as permanent, as an overwrite-only
    # build does): an image that resets before confirming boots again, a boot loop.
    NO_REVERT = "no-revert"
    # The bootloader skips the signature check: an image signed with a key it does not know
    # is installed (201 where a conforming board runs its old image and says so).
    ACCEPTS_UNSIGNED = "accepts-unsigned"
    # The bootloader built without downgrade prevention: a package older than the running
    # image is installed.
    ACCEPTS_DOWNGRADE = "accepts-downgrade"

    @classmethod
    def parse(cls, names: Iterable[str]) -> frozenset[Defect]:
        known = {defect.value: defect for defect in cls}
        chosen = set()
        for name in names:
            if name not in known:
                raise ValueError(f"unknown defect {name!r}; known: {', '.join(known)}")
            chosen.add(known[name])
        return frozenset(chosen)
