"""OneNET's Authorization value: build, parse and verify, with no I/O and an injected clock.

``version=2018-10-31&res=<res>&et=<et>&method=<method>&sign=<sign>`` where
``sign = base64(HMAC_<method>(base64decode(access_key), et\\nmethod\\nres\\nversion))``.
Values travel URL-encoded, but real devices also send ``res`` and ``sign`` raw; both parse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from urllib.parse import quote, unquote

from hil.errors import AuthorizationError

AUTH_VERSION = "2018-10-31"
_FIELDS = ("version", "res", "et", "method", "sign")
_ET_RE = re.compile(r"[0-9]{1,12}")   # ASCII digits: str.isdigit() also admits '²' and friends


class SignMethod(StrEnum):
    MD5 = "md5"
    SHA1 = "sha1"
    SHA256 = "sha256"


_DIGESTS = {SignMethod.MD5: hashlib.md5, SignMethod.SHA1: hashlib.sha1,
            SignMethod.SHA256: hashlib.sha256}


def decode_access_key(access_key: str) -> bytes:
    """The key is base64 text; a key that is not is a user mistake, reported without echoing it."""
    try:
        return base64.b64decode(access_key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the access key is not valid base64") from None


def product_res(product_id: str) -> str:
    return f"products/{product_id}"


def device_res(product_id: str, device_name: str) -> str:
    return f"products/{product_id}/devices/{device_name}"


@lru_cache(maxsize=1024)   # devices resend one value for its whole life: sign it once
def compute_sign(key: bytes, res: str, et: int, method: SignMethod,
                 version: str = AUTH_VERSION) -> str:
    message = f"{et}\n{method.value}\n{res}\n{version}".encode()
    return base64.b64encode(hmac.new(key, message, _DIGESTS[method]).digest()).decode()


@dataclass(frozen=True, slots=True)
class Authorization:
    res: str
    et: int
    method: SignMethod
    sign: str
    version: str = AUTH_VERSION

    @classmethod
    def build(cls, access_key: str, res: str, et: int,
              method: SignMethod = SignMethod.SHA1) -> Authorization:
        return cls(res, et, method, compute_sign(decode_access_key(access_key), res, et, method))

    def header(self, *, encoded: bool = True) -> str:
        """The header value; ``encoded=False`` writes it the way some devices do (raw ``/ + =``)."""
        def value(text: str) -> str:
            return quote(text, safe="") if encoded else text
        return (f"version={value(self.version)}&res={value(self.res)}&et={self.et}"
                f"&method={self.method.value}&sign={value(self.sign)}")

    def redacted(self) -> str:
        """The header as it may appear in logs and timelines: everything but the signature."""
        return self.header().rsplit("&sign=", 1)[0] + "&sign=<redacted>"

    @property
    def product_id(self) -> str:
        return _res_parts(self.res)[0]

    @property
    def device_name(self) -> str | None:
        """The device of a device-level ``res``; None for a product-level one."""
        return _res_parts(self.res)[1]

    @classmethod
    def parse(cls, value: str | None) -> Authorization:
        """Parse a header value, URL-encoded or raw. Every defect raises AuthorizationError."""
        if not value:
            raise AuthorizationError("no Authorization header")
        return _parse(value)

    @classmethod
    def _parse_uncached(cls, value: str) -> Authorization:
        fields: dict[str, str] = {}
        for pair in value.strip().split("&"):
            # Split at the first '=' only: a raw base64 sign ends in '=' padding.
            name, sep, raw = pair.partition("=")
            if not sep or name not in _FIELDS:
                raise AuthorizationError(f"unexpected Authorization field {name[:20]!r}")
            if name in fields:
                raise AuthorizationError(f"Authorization field {name!r} given twice")
            # unquote, not unquote_plus: a raw sign keeps its '+' characters.
            fields[name] = unquote(raw)
        missing = [name for name in _FIELDS if name not in fields]
        if missing:
            raise AuthorizationError(f"Authorization lacks {', '.join(missing)}")
        if fields["version"] != AUTH_VERSION:
            raise AuthorizationError(f"Authorization version is not {AUTH_VERSION}")
        try:
            method = SignMethod(fields["method"])
        except ValueError:
            raise AuthorizationError("Authorization method is not md5, sha1 or sha256") from None
        if _ET_RE.fullmatch(fields["et"]) is None:
            raise AuthorizationError("Authorization et is not a Unix time in seconds")
        auth = cls(fields["res"], int(fields["et"]), method, fields["sign"], fields["version"])
        _res_parts(auth.res)   # validates the shape of res
        return auth

    def verify(self, key: bytes, now: float) -> None:
        """Raise AuthorizationError unless the signature is right for ``key`` and et is not past."""
        if self.et < now:
            raise AuthorizationError("Authorization expired (et is in the past)")
        expected = compute_sign(key, self.res, self.et, self.method, self.version)
        # Constant-time: a forger learns nothing from how long the comparison took.
        if not hmac.compare_digest(expected.encode(), self.sign.encode()):
            raise AuthorizationError("Authorization signature does not match")


@lru_cache(maxsize=1024)   # asked twice per request (product, device); a bad res raises
def _res_parts(res: str) -> tuple[str, str | None]:
    parts = res.split("/")
    if len(parts) == 2 and parts[0] == "products" and parts[1]:
        return parts[1], None
    if len(parts) == 4 and parts[0] == "products" and parts[2] == "devices" \
            and parts[1] and parts[3]:
        return parts[1], parts[3]
    raise AuthorizationError(f"res {res[:60]!r} is neither products/<pid> nor "
                             "products/<pid>/devices/<name>")


@lru_cache(maxsize=1024)   # a failed parse raises, and is not cached
def _parse(value: str) -> Authorization:
    return Authorization._parse_uncached(value)


@lru_cache(maxsize=1024)
def redact_authorization(value: str) -> str:
    """An Authorization value as logs and timelines may show it: never its signature."""
    try:
        return Authorization.parse(value).redacted()
    except AuthorizationError:
        return "<malformed, redacted>"
