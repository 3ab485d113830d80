"""Typed OneNET requests and answers: routing a path, parsing a query or body, encoding an answer.

Parsing raises ``ProtocolError`` carrying the errno the service must answer, so the service's
handlers read as the checks in their documented order and nothing else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hil.errors import ProtocolError
from hil.onenet.codes import Errno, PackageKind, ResultCode, TaskType, is_valid_version


class Endpoint(StrEnum):
    """The OTA phase a request belongs to; also the ``phase`` of a timeline exchange."""

    VERSION = "version"
    DETECT = "detect"
    TOKEN_CHECK = "token"
    DOWNLOAD = "download"
    PROGRESS = "progress"
    REPORT = "report"
    UNKNOWN = "unknown"


_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-.]{1,64}")
_TOKEN = f"({_TOKEN_RE.pattern})"


def is_valid_token(token: str) -> bool:
    """A task token the routes below can match in a request path (1..64 of ``[A-Za-z0-9_-.]``):
    a task with any other token could be offered but never downloaded."""
    return _TOKEN_RE.fullmatch(token) is not None


# (path pattern, endpoint, HTTP method). /ota/check is the oldest detect path (seed 001), and
# /ota/download/{token} the download address seed 001 gives for the token.
# Downloads first: they are most of the requests a device makes.
_ROUTES: tuple[tuple[re.Pattern[str], Endpoint, str], ...] = (
    (re.compile(rf"/ota/south/download/{_TOKEN}"), Endpoint.DOWNLOAD, "GET"),
    (re.compile(rf"/ota/south/download/{_TOKEN}/check"), Endpoint.TOKEN_CHECK, "GET"),
    (re.compile(r"/ota/south/check"), Endpoint.DETECT, "GET"),
    (re.compile(r"/ota/check"), Endpoint.DETECT, "GET"),
    (re.compile(rf"/ota/download/{_TOKEN}"), Endpoint.DOWNLOAD, "GET"),
    (re.compile(rf"/ota/south/device/download/{_TOKEN}/progress"), Endpoint.PROGRESS, "POST"),
    (re.compile(r"/ota/south/report"), Endpoint.REPORT, "POST"),
    (re.compile(r"/ota/device/version"), Endpoint.VERSION, "POST"),
)


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: Endpoint
    method: str               # the HTTP method the endpoint takes
    token: str | None = None  # the task token in the path, where there is one


def route(path: str) -> Route:
    for pattern, endpoint, method in _ROUTES:
        match = pattern.fullmatch(path)
        if match:
            return Route(endpoint, method, match.group(1) if match.groups() else None)
    return Route(Endpoint.UNKNOWN, "")


def _bad(errno: Errno, reason: str) -> ProtocolError:
    return ProtocolError(errno, reason)


def _required(query: dict[str, str], name: str) -> str:
    value = query.get(name)
    if not value:
        raise _bad(Errno.BAD_REQUEST, f"query parameter {name} is missing")
    return value


_INT_RE = re.compile(r"-?[0-9]{1,18}")   # ASCII: int() also takes fullwidth digits and '1_000'


def _query_int(query: dict[str, str], name: str) -> int:
    value = query[name]
    if _INT_RE.fullmatch(value) is None:
        raise _bad(Errno.BAD_REQUEST, f"query parameter {name} is not an integer")
    return int(value)


def _optional_int(query: dict[str, str], *names: str) -> int | None:
    for name in names:
        if name in query:
            return _query_int(query, name)
    return None


@dataclass(frozen=True, slots=True)
class DetectQuery:
    dev_id: str
    type: TaskType
    version: str
    manuf: str | None
    model: str | None
    cdn: bool
    signal: int | None
    power: int | None

    @classmethod
    def parse(cls, query: dict[str, str]) -> DetectQuery:
        """Parameters first (errno 2), then the version format (27), as the service checks them."""
        dev_id = _required(query, "dev_id")
        _required(query, "type")
        try:
            task_type = TaskType(_query_int(query, "type"))
        except ValueError:
            raise _bad(Errno.BAD_REQUEST, "query parameter type is not 1 or 2") from None
        if "version" not in query:
            raise _bad(Errno.BAD_REQUEST, "query parameter version is missing")
        cdn_text = _required(query, "cdn").lower()
        if cdn_text not in ("true", "false", "1", "0"):
            raise _bad(Errno.BAD_REQUEST, "query parameter cdn is not true or false")
        # Both spellings: signal/power (API book) and signals/powers (the older reference).
        signal = _optional_int(query, "signal", "signals")
        power = _optional_int(query, "power", "powers")
        version = query["version"]
        if not is_valid_version(version):
            raise _bad(Errno.BAD_VERSION_FORMAT, "version is not 1..20 of [a-zA-Z0-9_-.]")
        return cls(dev_id, task_type, version, query.get("manuf") or None,
                   query.get("model") or None, cdn_text in ("true", "1"), signal, power)


def _json_object(body: bytes, errno: Errno) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: "[[[[..." nested deeper than the parser's stack, a hostile body.
        raise _bad(errno, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise _bad(errno, "the body is not a JSON object")
    return value


def _strict_int(value: object) -> int | None:
    """JSON integers only: true/false and 201.0 are ill-typed, not codes."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_result(body: bytes) -> ResultCode:
    """A report body ``{"result": code}``: 24 if missing or ill-typed, 2 if the code is unknown."""
    result = _strict_int(_json_object(body, Errno.BAD_RESULT).get("result"))
    if result is None:
        raise _bad(Errno.BAD_RESULT, "result is missing or not an integer")
    return result_code(result)


def result_code(value: int) -> ResultCode:
    try:
        return ResultCode(value)
    except ValueError:
        raise _bad(Errno.BAD_REQUEST, f"result code {value} is not recognised") from None


def parse_step(body: bytes) -> int:
    """A progress body ``{"step": n}``: 0..100 is progress, above 100 a result code."""
    step = _strict_int(_json_object(body, Errno.BAD_RESULT).get("step"))
    if step is None or step < 0:
        raise _bad(Errno.BAD_RESULT, "step is missing or not a non-negative integer")
    return step


@dataclass(frozen=True, slots=True)
class VersionReport:
    f_version: str | None   # the module (FOTA) version
    s_version: str | None   # the application (SOTA) version

    @classmethod
    def parse(cls, body: bytes) -> VersionReport:
        fields = _json_object(body, Errno.BAD_REQUEST)
        versions: list[str | None] = []
        for name in ("f_version", "s_version"):
            value = fields.get(name)
            if value is not None and not isinstance(value, str):
                raise _bad(Errno.BAD_REQUEST, f"{name} is not a string")
            if value is not None and not is_valid_version(value):
                raise _bad(Errno.BAD_VERSION_FORMAT, f"{name} is not 1..20 of [a-zA-Z0-9_-.]")
            versions.append(value)
        if versions == [None, None]:
            raise _bad(Errno.BAD_REQUEST, "neither f_version nor s_version is given")
        return cls(*versions)

    def of(self, task_type: TaskType) -> str | None:
        return self.f_version if task_type is TaskType.FOTA else self.s_version


@dataclass(frozen=True, slots=True)
class DetectAnswer:
    """The ``data`` of a detect answer with errno 0: the task a device is to run."""

    target: str
    token: str
    size: int
    md5: str
    signal: int
    power: int
    retry: int
    interval: int
    kind: PackageKind = PackageKind.FULL
    ip: str | None = None          # the download address, for devices that sent cdn=false
    ip_port: int | None = None     # on the wire a string, as ``ip`` (the platform's API types)

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "target": self.target, "token": self.token, "size": self.size, "md5": self.md5,
            "signal": self.signal, "power": self.power, "retry": self.retry,
            "interval": self.interval, "type": int(self.kind)}
        if self.ip is not None:
            # Strings: the vendor's C client copies ipPort with a string copy, and an integer
            # crashes it after a detect with cdn=false.
            data["ip"], data["ipPort"] = self.ip, _port_text(self.ip_port)
        return data

    @classmethod
    def from_data(cls, data: object) -> DetectAnswer:
        """Read an answer's ``data`` on the device side; a malformed one raises ProtocolError."""
        if not isinstance(data, dict):
            raise _bad(Errno.BAD_REQUEST, "the detect answer has no data object")

        def number(name: str) -> int:
            value = _strict_int(data.get(name))
            if value is None:
                raise _bad(Errno.BAD_REQUEST, f"detect answer: {name} is not an integer")
            return value

        def text(name: str) -> str:
            value = data.get(name)
            if not isinstance(value, str):
                raise _bad(Errno.BAD_REQUEST, f"detect answer: {name} is not a string")
            return value

        try:
            kind = PackageKind(number("type"))
        except ValueError:
            raise _bad(Errno.BAD_REQUEST, "detect answer: type is not 1 or 2") from None
        ip = data.get("ip")
        return cls(text("target"), text("token"), number("size"), text("md5"), number("signal"),
                   number("power"), number("retry"), number("interval"), kind,
                   ip if isinstance(ip, str) else None, _port(data.get("ipPort")))


def _port_text(port: int | None) -> str | None:
    return None if port is None else str(port)


_PORT_RE = re.compile(r"[0-9]{1,5}")


def _port(value: object) -> int | None:
    """``ipPort`` as a device reads it: the platform's decimal string, or an integer as a lenient
    client takes it from a service that sends one; None when absent or not a TCP port (like
    ``ip``, the address matters only to cdn=false devices, so it does not fail the answer)."""
    if isinstance(value, str) and _PORT_RE.fullmatch(value):
        value = int(value)
    port = _strict_int(value)
    return port if port is not None and 0 < port < 65536 else None


def encode_answer(errno: Errno, data: dict[str, Any] | None = None) -> bytes:
    """A JSON answer, compact: strict device parsers give up past 512 bytes of headers and body."""
    answer: dict[str, Any] = {"errno": int(errno), "error": errno.text}
    if data is not None:
        answer["data"] = data
    return json.dumps(answer, separators=(",", ":")).encode()
