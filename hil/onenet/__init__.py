"""The OneNET OTA southbound protocol with no I/O: tokens, codes, Range rules, task states.

Bytes and messages in, decisions out: every other part of hil (the mock service, the gateway, the
simulated device, the conformance suite) asks these modules and never re-derives a rule.
"""

from hil.onenet.auth import AUTH_VERSION, Authorization, SignMethod, device_res, product_res
from hil.onenet.codes import (
    CHIP_CODES,
    Chip,
    DownloadError,
    Errno,
    ErrorBodyForm,
    PackageKind,
    ResultCode,
    TaskState,
    TaskType,
    decode_error_body,
)
from hil.onenet.ranges import ByteRange, resolve_range
from hil.onenet.tasks import Action, Package, Task

__all__ = [
    "AUTH_VERSION", "CHIP_CODES", "Action", "Authorization", "ByteRange", "Chip", "DownloadError",
    "Errno", "ErrorBodyForm", "Package", "PackageKind", "ResultCode", "SignMethod", "Task",
    "TaskState", "TaskType", "decode_error_body", "device_res", "product_res", "resolve_range",
]
