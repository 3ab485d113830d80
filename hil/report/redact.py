"""Secrets out of everything ``hil report`` writes: one redaction, in every form a secret takes.

    redact = Redactor.from_environment(names=["BENCH_KEY"])   # + the rigs' key variables
    redact("key=c2VjcmV0...")          -> "key=***"
    redact.data(attachment_bytes)     -> the bytes, every form masked
    redact.copy(source, target)       -> a masked copy, streamed (any size, any content)

The secrets are the values of the environment variables named in ``names`` (a rig's
``identity.access_key_env``) and of every variable whose name says it holds one (``ACCESS_KEY``,
``SECRET``, ``TOKEN``, ``PASSWORD``, ``API_KEY``); values shorter than 8 characters are flags,
not secrets. Each secret is masked as it is and as it is written where it travels:

- URL-encoded, by ``quote`` or ``quote_plus`` (``+`` ``/`` ``=`` as ``%2B`` ``%2F`` ``%3D``, hex
  digits in either case), or with JSON's escaped slash (``\\/``), or any mix of these;
- a base64 secret (a OneNET access key is one): its decoded bytes as hex, lower or upper case,
  bytes together or each apart by a space, a colon or a dash (hex dumps), and, in binary data,
  the decoded bytes themselves.

The signature of a OneNET Authorization value (``...&sign=<base64>``, URL-encoded or not), which
is the key's HMAC and a replayable token until it expires, is masked whatever the key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

_SECRET_NAME = re.compile(r"ACCESS_KEY|SECRET|TOKEN|PASSWORD|PASSWD|API_KEY", re.IGNORECASE)
MASK = "***"
MIN_SECRET = 8            # shorter values are flags ("1", "on"): masking them garbles text
MIN_DECODED = 8           # decoded bytes shorter than this are no key's
_SIGNATURE_MAX = 512      # a signature is a base64 HMAC (<= 88 characters URL-encoded)
# The signature of a OneNET Authorization value, URL-encoded or not; group 1 is kept.
_SIGNATURE = rb"(?i:(sign(?:=|%3D))[^&\s\"'\\]{1," + str(_SIGNATURE_MAX).encode() + rb"})"
# Characters quote() leaves as they are: everything else may travel as %XX.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_CHUNK = 1024 * 1024


def _char(byte: int) -> bytes:
    """A regular expression for one character of a secret in any of its encoded forms."""
    if byte in _UNRESERVED:
        return re.escape(bytes([byte]))
    forms = [re.escape(bytes([byte])), b"%(?i:" + f"{byte:02x}".encode() + b")"]
    if byte == ord("/"):
        forms.append(rb"\\/")                       # JSON's escaped slash
    if byte == ord(" "):
        forms.append(rb"\+")                        # quote_plus
    return b"(?:" + b"|".join(forms) + b")"


_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}|[A-Za-z0-9_-]+={0,2}")


def _decoded(secret: str) -> bytes | None:
    """The bytes a base64 secret stands for (either alphabet), or None when it is no base64."""
    if not _BASE64.fullmatch(secret) or len(secret) % 4:
        return None
    try:
        raw = base64.b64decode(secret.translate(str.maketrans("-_", "+/")), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) >= MIN_DECODED else None


def _forms(secret: str) -> tuple[list[bytes], int]:
    """The alternatives masking ``secret`` and the longest text they can match."""
    encoded = secret.encode("utf-8")
    forms = [b"".join(_char(byte) for byte in encoded)]
    longest = 3 * len(encoded)
    raw = _decoded(secret)
    if raw is not None:
        # Hex: together, or bytes apart by a space, colon or dash (hex dumps); either case.
        forms += [b"(?i:" + re.escape(_hex(raw, separator)) + b")"
                  for separator in _HEX_SEPARATORS]
        forms.append(re.escape(raw))
        longest = max(longest, 3 * len(raw))
    return forms, longest


_HEX_SEPARATORS = ("", " ", ":", "-")


def _hex(data: bytes, separator: str) -> bytes:
    return separator.join(f"{byte:02x}" for byte in data).encode()
_ANCHOR = 4       # the shortest literal run of a secret worth searching for first


def _anchors(secrets: Iterable[str]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
    """Literal bytes every match contains one of: (as they are, lower-cased). Data holding none
    has nothing to mask, and a bytes search is some fifty times faster than the expression.
    None when a secret has no such run (every chunk then gets the full search)."""
    exact: list[bytes] = []
    folded = [b"sign=", b"sign%3d"]
    for secret in secrets:
        # Unreserved characters never travel encoded: the longest run of them is in any form.
        runs = re.findall(rb"[A-Za-z0-9_.~-]+", secret.encode("utf-8"))
        longest = max(runs, key=len, default=b"")
        if len(longest) < _ANCHOR:
            return None
        exact.append(longest)
        raw = _decoded(secret)
        if raw is not None:
            exact.append(raw[:_ANCHOR * 2])
            folded += [_hex(raw[:_ANCHOR], separator) for separator in _HEX_SEPARATORS]
    return tuple(exact), tuple(folded)


@dataclass(frozen=True)
class Redactor:
    """Masks secrets (module docstring) in text, bytes and files."""

    secrets: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None,
                         names: Iterable[str] = ()) -> Redactor:
        """The values of the variables ``names`` (the rigs' key variables) and of every
        variable whose name says it is a secret."""
        environ = os.environ if environ is None else environ
        named = set(names)
        found = {value for name, value in environ.items()
                 if (name in named or _SECRET_NAME.search(name)) and len(value) >= MIN_SECRET}
        return cls(tuple(sorted(found, key=len, reverse=True)))

    @cached_property
    def _pattern(self) -> re.Pattern[bytes]:
        forms: list[bytes] = []
        for secret in self.secrets:          # longest first: no secret masks half of another
            forms += _forms(secret)[0]
        return re.compile(b"|".join([*forms, _SIGNATURE]))

    @cached_property
    def window(self) -> int:
        """The longest text one match can cover: what a streamed copy keeps back per chunk."""
        longest = max((_forms(secret)[1] for secret in self.secrets), default=0)
        return max(longest, _SIGNATURE_MAX + 8) + 1

    @cached_property
    def _anchors(self) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
        return _anchors(self.secrets)

    def _may_hold(self, data: bytes) -> bool:
        """False when ``data`` surely holds nothing to mask (no anchor in it)."""
        if self._anchors is None:
            return True
        exact, folded = self._anchors
        if any(anchor in data for anchor in exact):
            return True
        lowered = data.lower()
        return any(anchor in lowered for anchor in folded)

    def _mask(self, found: re.Match[bytes]) -> bytes:
        return (found.group(1) or b"") + MASK.encode()

    def data(self, data: bytes) -> bytes:
        """``data`` with every form of every secret masked."""
        return self._pattern.sub(self._mask, data) if self._may_hold(data) else data

    def __call__(self, text: str) -> str:
        return self.data(text.encode("utf-8")).decode("utf-8", errors="replace")

    def copy(self, source: Path, target: Path) -> bool:
        """``source`` copied to ``target`` (a new file) with every secret masked, in chunks (an
        attachment may be larger than memory); True when something was masked."""
        with source.open("rb") as reading, target.open("xb") as writing:
            return self._stream(reading, writing)

    def _stream(self, reading: BinaryIO, writing: BinaryIO) -> bool:
        masked = False
        held = b""
        while True:
            chunk = reading.read(_CHUNK)
            text = held + chunk
            # A match starting before ``safe`` ends inside ``text``: any match is at most
            # ``window`` long. What starts after it waits for the next chunk.
            safe = len(text) - self.window if chunk else len(text)
            done = 0
            out = []
            for found in self._pattern.finditer(text) if self._may_hold(text) else ():
                if found.start() >= safe:
                    break
                out += [text[done:found.start()], self._mask(found)]
                done = found.end()
                masked = True
            keep_from = max(safe, done)
            out.append(text[done:keep_from])
            writing.write(b"".join(out))
            held = text[keep_from:]
            if not chunk:
                return masked

    def file_in_place(self, path: Path) -> bool:
        """Mask the secrets in ``path`` (a file hil wrote itself); True when it changed."""
        scratch = path.with_name(path.name + ".hil-redacting")
        if not self.copy(path, scratch):
            scratch.unlink()
            return False
        os.replace(scratch, path)
        return True
