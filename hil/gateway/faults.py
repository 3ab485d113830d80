"""Faults the gateway injects: what they are, which requests they hit, and what they do, no I/O.

A ``Fault`` is a frozen description (kind, targeting, the parameters of its kind); ``Gateway.arm``
turns it into an ``Armed``, which counts the requests that match its targeting since arming and
decides, with a ``random.Random(seed)`` of its own, whether it fires on each. The faults that fire
on one request make one ``Plan``: what to do before forwarding, whether to forward at all, how to
change the answer and how to deliver it. The gateway (``hil.gateway.server``) carries the plan
out on the wire.

Combining faults: every armed fault that matches a request fires and counts a hit, and their
effects compose in this fixed order, whatever the arming order (which only orders faults of the
same step):

1. request side: each ``hook`` runs, then each ``auth`` alters the Authorization header in turn;
2. answering: the first of ``drop``/``error-byte``/``http-5xx`` answers in the service's place
   (the request is not forwarded; the later ones of these change nothing); else ``whole-file``
   forwards the download without its Range, or ``oversize`` with its Range asking ``bytes``
   more (the largest wins): the service's answer is then a true 206 longer than the range the
   device asked, as from a server or CDN that widens ranges to its own block size;
3. the answer: ``content-range``, ``corrupt`` and ``truncate`` change it, in arming order;
4. delivery: ``latency`` delays add up; a ``stall`` sends nothing (the longest stall holds, then
   closes); ``limit``/``reset`` cut the bytes sent (the smallest cut wins; a tie goes to reset);
   ``bandwidth``/``slicer`` pace the writes (the slowest pace wins); a ``drop`` closes after the
   delay with no byte sent.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from hil.onenet.codes import ErrorBodyForm
from hil.onenet.messages import Endpoint


class FaultKind(StrEnum):
    # transport (Toxiproxy's names): act on the answer's bytes
    LATENCY = "latency"
    BANDWIDTH = "bandwidth"
    STALL = "stall"
    RESET = "reset"
    LIMIT = "limit"
    SLICER = "slicer"
    # HTTP: change or replace the answer
    TRUNCATE = "truncate"
    CONTENT_RANGE = "content-range"
    WHOLE_FILE = "whole-file"
    OVERSIZE = "oversize"
    ERROR_BYTE = "error-byte"
    CORRUPT = "corrupt"
    HTTP_5XX = "http-5xx"
    DROP = "drop"
    # request side: before forwarding
    AUTH = "auth"
    HOOK = "hook"


AUTH_VARIANTS = ("missing", "expired", "bad-sign", "garbled")
_REQUIRED = object()   # a parameter with no default: the fault must set it

# The parameters each kind takes, with their defaults; any other parameter set is an error.
_PARAMETERS: dict[FaultKind, dict[str, object]] = {
    FaultKind.LATENCY: {"ms": _REQUIRED, "jitter_ms": 0.0},
    FaultKind.BANDWIDTH: {"rate": _REQUIRED},
    FaultKind.STALL: {"seconds": 30.0},
    FaultKind.RESET: {"bytes": 0},
    FaultKind.LIMIT: {"bytes": _REQUIRED},
    FaultKind.SLICER: {"size": _REQUIRED, "delay_ms": 0.0},
    FaultKind.TRUNCATE: {"bytes": _REQUIRED},
    FaultKind.CONTENT_RANGE: {"bytes": 1},
    FaultKind.WHOLE_FILE: {},
    FaultKind.OVERSIZE: {"bytes": 4096},
    FaultKind.ERROR_BYTE: {"code": _REQUIRED, "form": "raw"},
    FaultKind.CORRUPT: {"bytes": 1},
    FaultKind.HTTP_5XX: {"code": 503},
    FaultKind.DROP: {},
    FaultKind.AUTH: {"variant": _REQUIRED},
    FaultKind.HOOK: {"action": _REQUIRED},
}
_PARAMETER_NAMES = ("ms", "jitter_ms", "rate", "seconds", "bytes", "code", "size", "delay_ms",
                    "variant", "action", "form")


def _number(low: float, high: float | None = None, *, integer: bool = False,
            above: bool = False) -> Callable[[object], str | None]:
    """A check of a numeric parameter: the reason it is wrong, or None."""
    def check(value: object) -> str | None:
        numeric = isinstance(value, int) if integer else isinstance(value, int | float)
        if not numeric or isinstance(value, bool):
            return "must be an integer" if integer else "must be a number"
        assert isinstance(value, int | float)
        if (value <= low if above else value < low) or (high is not None and value > high):
            bound = f"above {low:g}" if above else f">= {low:g}"
            return f"must be {bound}" + (f" and <= {high:g}" if high is not None else "")
        return None
    return check


_CHECKS: dict[str, Callable[[object], str | None]] = {
    "ms": _number(0), "jitter_ms": _number(0), "rate": _number(0, above=True),
    "seconds": _number(0), "bytes": _number(0, integer=True), "size": _number(1, integer=True),
    "delay_ms": _number(0),
    "variant": lambda v: None if v in AUTH_VARIANTS else f"must be one of {AUTH_VARIANTS}",
    "action": lambda v: None if callable(v) else "must be callable",
    # OneNET's raw byte (b"\x03"), or the ASCII digit (b"3") other servers send
    "form": lambda v: None if v in tuple(ErrorBodyForm) else
    f"must be one of {', '.join(ErrorBodyForm)}",
}
_CODE_RANGE = {FaultKind.ERROR_BYTE: (1, 6), FaultKind.HTTP_5XX: (500, 599)}


@dataclass(frozen=True)
class Fault:
    """One fault to arm: its kind, which requests it targets, and its kind's parameters.

    Targeting: ``phase``/``dev_id`` (None: any), ``offset`` (downloads whose requested range holds
    that byte); among the requests so matched since arming, it fires on ``count`` in a row from
    the ``index``-th (1-based; ``count=None``: every one from there on), each with
    ``probability`` drawn from ``random.Random(seed)``.
    """

    kind: FaultKind
    phase: Endpoint | None = None
    dev_id: str | None = None
    offset: int | None = None
    index: int = 1
    count: int | None = 1
    probability: float = 1.0
    seed: int = 0
    ms: float | None = None
    jitter_ms: float | None = None
    rate: float | None = None
    seconds: float | None = None
    bytes: int | None = None
    code: int | None = None
    size: int | None = None
    delay_ms: float | None = None
    variant: str | None = None
    action: Callable[[], None] | None = field(default=None, compare=False)
    form: str | None = None
    # What the timeline calls it instead of ``label`` (a hook is "hook" by itself; the fault it
    # carries out is "power-cut during=download").
    name: str | None = None

    def __post_init__(self) -> None:
        try:
            kind = FaultKind(self.kind)
        except ValueError:
            raise ValueError(f"Fault.kind: {self.kind!r} is not one of "
                             f"{', '.join(k.value for k in FaultKind)}") from None
        object.__setattr__(self, "kind", kind)
        if self.phase is not None:
            try:
                object.__setattr__(self, "phase", Endpoint(self.phase))
            except ValueError:
                raise ValueError(f"Fault.phase: {self.phase!r} is not an OTA phase") from None
        self._check_targeting()
        allowed = _PARAMETERS[kind]
        for name in _PARAMETER_NAMES:
            value = getattr(self, name)
            if value is None:
                default = allowed.get(name)
                if default is _REQUIRED:
                    raise ValueError(f"Fault.{name}: a {kind} fault needs it")
                if default is not None:
                    object.__setattr__(self, name, default)
                continue
            if name not in allowed:
                raise ValueError(f"Fault.{name}: not a parameter of a {kind} fault "
                                 f"(it takes {', '.join(allowed) or 'none'})")
            reason = self._check(name, value)
            if reason is not None:
                raise ValueError(f"Fault.{name}: {reason}, not {value!r}")
        if kind is FaultKind.CORRUPT and self.bytes == 0:
            raise ValueError("Fault.bytes: a corrupt fault flips at least 1 byte")

    def _check_targeting(self) -> None:
        if self.dev_id is not None and not isinstance(self.dev_id, str):
            raise ValueError(f"Fault.dev_id: must be a string, not {self.dev_id!r}")
        if self.offset is not None:
            if _number(0, integer=True)(self.offset) is not None:
                raise ValueError(f"Fault.offset: must be an integer >= 0, not {self.offset!r}")
            if self.phase not in (None, Endpoint.DOWNLOAD):
                raise ValueError(f"Fault.offset: targets downloads, not {self.phase} requests")
        if _number(1, integer=True)(self.index) is not None:
            raise ValueError(f"Fault.index: must be an integer >= 1 (1-based), not {self.index!r}")
        if self.count is not None and _number(1, integer=True)(self.count) is not None:
            raise ValueError(f"Fault.count: must be an integer >= 1 or None, not {self.count!r}")
        if _number(0, 1)(self.probability) is not None:
            raise ValueError(f"Fault.probability: must be in 0..1, not {self.probability!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"Fault.seed: must be an integer, not {self.seed!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"Fault.name: must be a string, not {self.name!r}")

    def _check(self, name: str, value: object) -> str | None:
        if name == "code":
            low, high = _CODE_RANGE.get(self.kind, (0, 0))
            return _number(low, high, integer=True)(value)
        if name == "bytes" and self.kind is FaultKind.OVERSIZE:
            return _number(1, integer=True)(value)
        if name == "bytes" and self.kind is FaultKind.CONTENT_RANGE:   # a shift either way
            good = isinstance(value, int) and not isinstance(value, bool) and value != 0
            return None if good else "must be a non-zero integer"
        return _CHECKS[name](value)

    @property
    def label(self) -> str:
        """A short human label of what it does, for the timeline's ``fault`` field."""
        if self.name is not None:
            return self.name
        kind = self.kind
        if kind is FaultKind.LATENCY:
            jitter = f"±{self.jitter_ms:g}" if self.jitter_ms else ""
            return f"latency {self.ms:g}{jitter}ms"
        if kind is FaultKind.BANDWIDTH:
            return f"bandwidth {self.rate:g}B/s"
        if kind is FaultKind.STALL:
            return f"stall {self.seconds:g}s"
        if kind is FaultKind.SLICER:
            return f"slicer {self.size}B/{self.delay_ms:g}ms"
        if kind in (FaultKind.RESET, FaultKind.LIMIT, FaultKind.TRUNCATE):
            return f"{kind}@{self.bytes}"
        if kind is FaultKind.CONTENT_RANGE:
            return f"content-range {self.bytes:+d}"
        if kind is FaultKind.OVERSIZE:
            return f"oversize +{self.bytes}B"
        if kind is FaultKind.CORRUPT:
            return f"corrupt {self.bytes}B"
        if kind is FaultKind.ERROR_BYTE and self.form == ErrorBodyForm.ASCII:
            return f"{kind} {self.code} ascii"
        if kind in (FaultKind.ERROR_BYTE, FaultKind.HTTP_5XX):
            return f"{kind} {self.code}"
        if kind is FaultKind.AUTH:
            return f"auth {self.variant}"
        return str(kind)


@dataclass(frozen=True, slots=True)
class Seen:
    """What targeting looks at in a request: its phase, its device, the bytes it asks for."""

    phase: Endpoint
    dev_id: str | None
    span: tuple[int, int] | None = None   # downloads: the requested bytes, inclusive


class Armed:
    """A fault armed on a gateway: its matching count, its random draws, where it fired.

    ``hits`` counts firings as they are decided (a stall counts from its first held moment);
    ``seqs`` lists the ``Exchange.seq`` of each hit once that exchange is recorded.
    """

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.rng = random.Random(fault.seed)   # noqa: S311 (reproducible draws, not secrets)
        self.matched = 0
        self.hits = 0
        self._seqs: list[int] = []

    def __repr__(self) -> str:
        return f"Armed({self.fault.label}, hits={self.hits})"

    @property
    def seqs(self) -> list[int]:
        return list(self._seqs)

    def targets(self, seen: Seen) -> bool:
        """Whether ``seen`` is one of the requests this fault targets (before index and count)."""
        fault = self.fault
        if fault.phase is not None and seen.phase is not fault.phase:
            return False
        if fault.dev_id is not None and seen.dev_id != fault.dev_id:
            return False
        if fault.offset is not None:
            span = seen.span
            return span is not None and span[0] <= fault.offset <= span[1]
        return True

    def consider(self, seen: Seen) -> bool:
        """Count ``seen`` if targeted; True if the fault fires on it (then it counts a hit)."""
        if not self.targets(seen):
            return False
        self.matched += 1
        fault = self.fault
        if self.matched < fault.index or (fault.count is not None
                                          and self.matched >= fault.index + fault.count):
            return False
        if fault.probability < 1.0 and self.rng.random() >= fault.probability:
            return False
        self.hits += 1
        return True

    def recorded(self, seq: int) -> None:
        self._seqs.append(seq)


# ---------------------------------------------------------------------------- request side
_ET = re.compile(r"(^|&)et=[0-9]*")
_SIGN = re.compile(r"(^|&)sign=([^&]*)")


def alter_authorization(value: str | None, variant: str, now: float | None = None) -> str | None:
    """The Authorization value a device would send with that defect (None: no header)."""
    if variant == "missing":
        return None
    if variant == "garbled":   # not key=value pairs at all
        return "garbled " + (value or "token").replace("&", " ").replace("=", ":")
    if value is None:
        return None
    if variant == "expired":
        past = int(time.time() if now is None else now) - 3600
        return _ET.sub(lambda m: f"{m.group(1)}et={past}", value, count=1)
    match = _SIGN.search(value)   # bad-sign: one signature character changed, the form kept
    if match is None:
        return value + "&sign=AAAA"
    sign = match.group(2)
    at = _sign_character(sign)
    if at is None:
        return value[:match.start(2)] + "AAAA" + value[match.end(2):]
    changed = "B" if sign[at] == "A" else "A"
    start = match.start(2) + at
    return value[:start] + changed + value[start + 1:]


def _sign_character(sign: str) -> int | None:
    """The first base64 letter or digit of a sign that is not inside a ``%XX`` escape."""
    at = 0
    while at < len(sign):
        if sign[at] == "%":
            at += 3
            continue
        if sign[at].isascii() and sign[at].isalnum():
            return at
        at += 1
    return None


_RANGE = re.compile(rb"^([ \t]*(?:bytes[ \t]*=[ \t]*)?[0-9]+[ \t]*-[ \t]*)([0-9]+)([ \t]*)$",
                    re.IGNORECASE)


def widen_range(value: bytes, extra: int) -> bytes:
    """A ``Range`` value (``bytes=a-b`` or ``a-b``) asking ``extra`` bytes past its end; any
    other form (``a-``, ``-n``, several ranges) as it is: it asks to the end already, or is not
    what a device sends."""
    match = _RANGE.match(value)
    if match is None:
        return value
    return match.group(1) + str(int(match.group(2)) + extra).encode() + match.group(3)


# ---------------------------------------------------------------------------- the answer
_CONTENT_RANGE = re.compile(rb"(?im)^(content-range:[ \t]*bytes[ \t]+)([0-9]+)-([0-9]+)")


def shift_content_range(head: bytes, shift: int) -> bytes:
    """The head with Content-Range's start and end moved by ``shift`` (same length, not < 0)."""
    def moved(match: re.Match[bytes]) -> bytes:
        start, end = int(match.group(2)), int(match.group(3))
        delta = max(shift, -start)
        return match.group(1) + f"{start + delta}-{end + delta}".encode()
    return _CONTENT_RANGE.sub(moved, head, count=1)


def corrupt(body: bytes, count: int, rng: random.Random) -> bytes:
    """``body`` with ``count`` bytes (at ``rng``'s positions) XOR 0xFF; same length."""
    if not body:
        return body
    flipped = bytearray(body)
    for at in rng.sample(range(len(body)), min(count, len(body))):
        flipped[at] ^= 0xFF
    return bytes(flipped)


# ---------------------------------------------------------------------------- the plan
_ANSWERING = (FaultKind.DROP, FaultKind.ERROR_BYTE, FaultKind.HTTP_5XX)
_TRANSFORMS = (FaultKind.CONTENT_RANGE, FaultKind.CORRUPT, FaultKind.TRUNCATE)


@dataclass
class Pace:
    """Writes of ``size`` bytes, ``gap`` seconds apart."""

    size: int
    gap: float


@dataclass
class Plan:
    """What the faults that fired on one request make the gateway do (module docstring)."""

    hooks: list[Callable[[], None]] = field(default_factory=list)
    auth_variants: list[str] = field(default_factory=list)
    answer: Fault | None = None            # drop / error-byte / http-5xx: not forwarded
    whole_file: bool = False
    widen: int = 0                         # oversize: the bytes a download's Range asks more
    transforms: list[Armed] = field(default_factory=list)
    delay: float = 0.0                     # seconds before the first byte
    stall: float | None = None             # seconds holding every byte, then a close
    cut: int | None = None                 # answer bytes sent at most
    reset: bool = False                    # end with a TCP RST instead of a close
    pace: Pace | None = None
    labels: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, fired: Sequence[Armed]) -> Plan:
        plan = cls()
        rate: float | None = None
        slicer: Pace | None = None
        for armed in fired:
            fault = armed.fault
            kind = fault.kind
            plan.labels.append(fault.label)
            if kind is FaultKind.HOOK:
                assert fault.action is not None
                plan.hooks.append(fault.action)
            elif kind is FaultKind.AUTH:
                assert fault.variant is not None
                plan.auth_variants.append(fault.variant)
            elif kind in _ANSWERING:
                plan.answer = plan.answer or fault
            elif kind is FaultKind.WHOLE_FILE:
                plan.whole_file = True
            elif kind is FaultKind.OVERSIZE:
                assert fault.bytes is not None
                plan.widen = max(plan.widen, fault.bytes)
            elif kind in _TRANSFORMS:
                plan.transforms.append(armed)
            elif kind is FaultKind.LATENCY:
                assert fault.ms is not None
                assert fault.jitter_ms is not None
                jitter = armed.rng.uniform(-fault.jitter_ms, fault.jitter_ms) \
                    if fault.jitter_ms else 0.0
                plan.delay += max(fault.ms + jitter, 0.0) / 1000
            elif kind is FaultKind.STALL:
                assert fault.seconds is not None
                plan.stall = max(plan.stall or 0.0, fault.seconds)
            elif kind in (FaultKind.LIMIT, FaultKind.RESET):
                assert fault.bytes is not None
                if plan.cut is None or fault.bytes < plan.cut or (
                        fault.bytes == plan.cut and kind is FaultKind.RESET):
                    plan.cut, plan.reset = fault.bytes, kind is FaultKind.RESET
            elif kind is FaultKind.BANDWIDTH:
                assert fault.rate is not None
                rate = min(rate or fault.rate, fault.rate)
            elif kind is FaultKind.SLICER:
                assert fault.size is not None
                assert fault.delay_ms is not None
                gap = fault.delay_ms / 1000
                slicer = Pace(min(slicer.size, fault.size), max(slicer.gap, gap)) \
                    if slicer else Pace(fault.size, gap)
        plan.pace = _pace(rate, slicer)
        return plan


def _pace(rate: float | None, slicer: Pace | None) -> Pace | None:
    """Bandwidth alone: about 100 writes a second; with a slicer: its writes, at most ``rate``."""
    if rate is None:
        return slicer
    if slicer is None:
        size = max(1, int(rate / 100))
        return Pace(size, size / rate)
    return Pace(slicer.size, max(slicer.gap, slicer.size / rate))
