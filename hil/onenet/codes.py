"""Every number of the OneNET OTA southbound API: errnos, result codes, error bytes, states.

The numbers and their meanings are those of ../shared/ONENET.md. One ``Errno`` enum serves every
endpoint because a number means the same thing wherever it appears (2 is "the request is wrong":
bad parameters at detect, an unknown result code at report).
"""

from __future__ import annotations

import re
from enum import IntEnum, StrEnum


class Errno(IntEnum):
    OK = 0
    AUTH_FAILED = 1             # authentication failed, device unknown, token not this device's
    BAD_REQUEST = 2             # bad parameters (detect, version); result code not recognised
    TOKEN_DEVICE_MISMATCH = 4   # token check: token and dev_id do not match (or unknown token)
    INTERNAL = 7
    MANUF_MODEL_MISMATCH = 8    # detect: the task fails
    VERSION_MISMATCH = 9        # detect, delta task: the task fails
    BELOW_THRESHOLD = 10        # detect: signal or power below the task's threshold
    NO_TASK = 11                # detect: no live task of that type
    TOKEN_EXPIRED = 12          # token check: the flow ends
    TASK_STATE_INVALID = 13     # detect: documented, never answered by the mock (see README)
    INVALID_STATE = 17          # token check / progress in a state that does not allow it
    TASK_SUSPENDED = 19         # detect: paused task
    TASK_FINISHED = 20          # succeeded or failed
    INVALID_OPERATION = 21      # e.g. a 1xx while upgrading, any report while paused
    TASK_CANCELLED = 22
    BAD_RESULT = 24             # report/progress body missing, not JSON, or ill-typed
    BAD_VERSION_FORMAT = 27
    NO_DELTA_PACKAGE = 32

    @property
    def text(self) -> str:
        """The ``error`` string of a JSON answer (short: strict clients read 512 bytes at most)."""
        return _ERROR_TEXT[self]


_ERROR_TEXT: dict[Errno, str] = {
    Errno.OK: "succ",
    Errno.AUTH_FAILED: "auth failed",
    Errno.BAD_REQUEST: "bad request",
    Errno.TOKEN_DEVICE_MISMATCH: "token mismatch",
    Errno.INTERNAL: "internal error",
    Errno.MANUF_MODEL_MISMATCH: "manuf or model mismatch",
    Errno.VERSION_MISMATCH: "version mismatch",
    Errno.BELOW_THRESHOLD: "signal or power too low",
    Errno.NO_TASK: "no task",
    Errno.TOKEN_EXPIRED: "token expired",
    Errno.TASK_STATE_INVALID: "task state invalid",
    Errno.INVALID_STATE: "invalid state",
    Errno.TASK_SUSPENDED: "task suspended",
    Errno.TASK_FINISHED: "task finished",
    Errno.INVALID_OPERATION: "invalid operation",
    Errno.TASK_CANCELLED: "task cancelled",
    Errno.BAD_RESULT: "bad result",
    Errno.BAD_VERSION_FORMAT: "bad version format",
    Errno.NO_DELTA_PACKAGE: "no delta package",
}


class TaskState(StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    UPGRADING = "upgrading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"

    @property
    def is_live(self) -> bool:
        """A live task still belongs to the device: detect finds it (paused answers 19)."""
        return self in _LIVE


_LIVE = frozenset({TaskState.PENDING, TaskState.DOWNLOADING, TaskState.UPGRADING, TaskState.PAUSED})


class ResultCode(IntEnum):
    """The ``result`` of a report (or a progress ``step`` above 100)."""

    DOWNLOADED = 101
    DOWNLOAD_NO_SPACE = 102
    DOWNLOAD_MEMORY_OVERFLOW = 103
    DOWNLOAD_TIMEOUT = 104
    DOWNLOAD_LOW_BATTERY = 105
    DOWNLOAD_BAD_SIGNAL = 106
    DOWNLOAD_UNKNOWN = 107
    UPGRADED = 201
    UPGRADE_LOW_BATTERY = 202
    UPGRADE_MEMORY_OVERFLOW = 203
    UPGRADE_VERSION_MISMATCH = 204
    UPGRADE_MD5_MISMATCH = 205
    UPGRADE_UNKNOWN = 206
    MAX_RETRIES = 207
    UPGRADE_EXPIRED = 208

    @property
    def is_download_phase(self) -> bool:
        """1xx codes speak of the download; the service refuses them once the task is upgrading."""
        return self < 200

    @property
    def next_state(self) -> TaskState:
        if self is ResultCode.DOWNLOADED:
            return TaskState.UPGRADING
        if self is ResultCode.UPGRADED:
            return TaskState.SUCCEEDED
        return TaskState.FAILED


class ErrorBodyForm(StrEnum):
    """How a download error answer writes its code. OneNET sends the raw byte (``b"\\x03"``): the
    vendor's C client compares the byte's value with its constants, and on an ASCII digit waits
    for ``atoi(body)`` bytes and reports a timeout. Other servers send the digit (``b"3"``), so
    every reader accepts both (``decode_error_body``)."""

    RAW = "raw"
    ASCII = "ascii"


class DownloadError(IntEnum):
    """The one-byte body of a download answer that has no Content-Length."""

    NOT_FOUND = 1
    SIZE_MISMATCH = 2
    INVALID_TOKEN = 3
    FETCH_FAILED = 4
    BAD_PARAMETERS = 5
    NB_LIMIT = 6

    @property
    def body(self) -> bytes:
        """The body as OneNET sends it: one byte whose value is the code."""
        return self.body_in(ErrorBodyForm.RAW)

    def body_in(self, form: ErrorBodyForm) -> bytes:
        return bytes([self]) if form is ErrorBodyForm.RAW else str(int(self)).encode()


_ASCII_ZERO = ord("0")


def decode_error_body(body: bytes) -> DownloadError | None:
    """The code of a download error body in either form, the raw byte (``b"\\x03"``) or the ASCII
    digit (``b"3"``); None for any other body. The caller has already seen the answer's framing
    (200, no Content-Length): a one-byte package answered with its length is not an error."""
    if len(body) != 1:
        return None
    value = body[0]
    if value > _ASCII_ZERO:   # the digits 1..6 are 0x31..0x36, far from the raw codes 0x01..0x06
        value -= _ASCII_ZERO
    try:
        return DownloadError(value)
    except ValueError:
        return None


class TaskType(IntEnum):
    """``type`` in the detect query."""

    FOTA = 1   # the module's firmware
    SOTA = 2   # the MCU application


class PackageKind(IntEnum):
    """``type`` in the detect answer."""

    FULL = 1
    DELTA = 2


class Chip(StrEnum):
    ESP32 = "esp32"
    NRF52832 = "nrf52832"
    GD32 = "gd32"
    OTHER = "other"


# SOTA manuf / model codes of the chip table (seed 000, ONENET.md).
CHIP_CODES: dict[Chip, tuple[str, str]] = {
    Chip.ESP32: ("101", "10101"),
    Chip.NRF52832: ("102", "10201"),
    Chip.GD32: ("103", "10301"),
    Chip.OTHER: ("100", "10001"),
}

_VERSION_RE = re.compile(r"[A-Za-z0-9_\-.]{1,20}")


def is_valid_version(version: str) -> bool:
    """Version strings are 1..20 of ``[a-zA-Z0-9_-.]`` (detect errno 27 otherwise)."""
    return _VERSION_RE.fullmatch(version) is not None


def meets_threshold(value: int | None, threshold: int) -> bool:
    """A task runs only *above* its signal/power threshold (ONENET.md: "the task runs only above
    these"; seed 001: "a larger signal"), so a value equal to it is too low. A value the device
    did not report cannot fail. Device and service both decide with this one rule.
    """
    return value is None or value > threshold
