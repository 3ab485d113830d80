"""The download Range rules of OneNET, exactly as documented, odd parts included.

With ``len`` the package size (ONENET.md, "download: Range semantics"):

1. ``start-``     bytes start..len-1; if start >= len, start = 0.
2. ``start-end``  if end >= len, end = len-1; then if start > end, start = 0.
3. ``-n``         the last n bytes; if n > len, the whole file.
4. anything else (no Range, other units, several ranges, ``-0``, garbage): the whole file.
5. leading zeros are allowed; ``bytes=`` may be left out (the vendor C SDK sends ``a-b``).

A Range of forms 1-3 is answered 206 with Content-Range even when it covers the whole file;
the rest 200.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE_RE = re.compile(r"(?:bytes=)?([0-9]*)-([0-9]*)")  # ASCII digits only


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive byte range of a package of ``length`` bytes."""

    start: int
    end: int
    length: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.length}"

    def slice(self, data: bytes) -> bytes:
        return data[self.start:self.end + 1]


_HUGE = 10**20   # more than any package: every rule treats a bigger number the same way


def _number(digits: str) -> int:
    """The value of a digit string, capped: int() refuses strings over 4300 digits."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 20 else _HUGE


def resolve_range(header: str | None, length: int) -> ByteRange | None:
    """The range to send for ``header``, or None to send the whole file with status 200."""
    if header is None or length <= 0:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first and last:
        start, end = _number(first), min(_number(last), length - 1)
        return ByteRange(0 if start > end else start, end, length)
    if first:
        start = _number(first)
        return ByteRange(0 if start >= length else start, length - 1, length)
    if last:
        count = _number(last)
        if count == 0:
            return None   # "-0" asks for nothing: malformed, so the whole file
        return ByteRange(max(length - count, 0), length - 1, length)
    return None   # "-" alone
