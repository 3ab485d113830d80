"""The OneNET Authorization value (ONENET.md, "Authorization"): build, parse, verify.

The sign is recomputed in this file straight from the documented formula, so the tests do not
trust ``compute_sign`` to check itself.
"""

import base64
import contextlib
import dataclasses
import hashlib
import hmac
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hil.errors import AuthorizationError, ProtocolError
from hil.onenet.auth import (
    AUTH_VERSION,
    Authorization,
    SignMethod,
    decode_access_key,
    device_res,
    product_res,
)

# The platform's public test vector (security authentication chapter of the API book).
PUBLIC_KEY = "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw="
PUBLIC_RES = "products/123123"
PUBLIC_ET = 1537255523
PUBLIC_SIGN = "lsaPSiiGvEFFjXu5WU7a6IkScqE="
PUBLIC_HEADER = ("version=2018-10-31&res=products%2F123123&et=1537255523&method=sha1"
                 "&sign=lsaPSiiGvEFFjXu5WU7a6IkScqE%3D")

# Seed 000's token, and the API book's illustrative one (its sign is made up).
SEED_HEADER = ("version=2018-10-31&res=products%2F245528&et=7559008892&method=sha1"
               "&sign=TPllhakDDnUV90epLnOqpj6aWqI%3D")
BOOK_HEADER = ("version=2018-10-31&res=products%2F123123&et=1537255523&method=sha1"
               "&sign=ZjA1NzZlMmMxYzIOTg3MjBzNjYTI2MjA4Yw%3D")

_HASHES = {"md5": hashlib.md5, "sha1": hashlib.sha1, "sha256": hashlib.sha256}


def documented_sign(access_key, res, et, method):
    """sign = base64(HMAC_method(base64decode(key), et \\n method \\n res \\n version))."""
    message = f"{et}\n{method}\n{res}\n2018-10-31".encode()
    digest = hmac.new(base64.b64decode(access_key), message, _HASHES[method]).digest()
    return base64.b64encode(digest).decode()


def public_key_bytes():
    return base64.b64decode(PUBLIC_KEY)


# ---------------------------------------------------------------------------------------------
# Known vectors


def test_public_vector_sign_and_header():
    auth = Authorization.build(PUBLIC_KEY, PUBLIC_RES, PUBLIC_ET, SignMethod.SHA1)
    assert auth.sign == PUBLIC_SIGN
    assert auth.header() == PUBLIC_HEADER


def test_public_vector_parses_and_verifies_until_et():
    auth = Authorization.parse(PUBLIC_HEADER)
    assert (auth.version, auth.res, auth.et, auth.method, auth.sign) == (
        "2018-10-31", PUBLIC_RES, PUBLIC_ET, SignMethod.SHA1, PUBLIC_SIGN)
    assert auth.product_id == "123123"
    assert auth.device_name is None
    auth.verify(public_key_bytes(), now=PUBLIC_ET - 3600)
    auth.verify(public_key_bytes(), now=PUBLIC_ET)           # et == now is still valid


@pytest.mark.parametrize("now", [PUBLIC_ET + 1, PUBLIC_ET + 0.001, PUBLIC_ET + 86400 * 365])
def test_expired_et_is_rejected(now):
    auth = Authorization.parse(PUBLIC_HEADER)
    with pytest.raises(AuthorizationError, match="expired") as excinfo:
        auth.verify(public_key_bytes(), now=now)
    assert excinfo.value.errno == 1


def test_book_illustrative_sign_is_not_a_valid_signature():
    auth = Authorization.parse(BOOK_HEADER)
    with pytest.raises(AuthorizationError):
        auth.verify(public_key_bytes(), now=0)


@pytest.mark.parametrize(("header", "res", "et", "sign", "product_id"), [
    (SEED_HEADER, "products/245528", 7559008892, "TPllhakDDnUV90epLnOqpj6aWqI=", "245528"),
    (BOOK_HEADER, "products/123123", 1537255523, "ZjA1NzZlMmMxYzIOTg3MjBzNjYTI2MjA4Yw=", "123123"),
    (PUBLIC_HEADER, PUBLIC_RES, PUBLIC_ET, PUBLIC_SIGN, "123123"),
])
def test_documented_tokens_parse_and_reserialise_identically(header, res, et, sign, product_id):
    auth = Authorization.parse(header)
    assert (auth.version, auth.res, auth.et, auth.method, auth.sign) == (
        AUTH_VERSION, res, et, SignMethod.SHA1, sign)
    assert auth.product_id == product_id
    assert auth.header() == header
    raw = auth.header(encoded=False)
    assert raw == (f"version=2018-10-31&res={res}&et={et}&method=sha1&sign={sign}")
    assert Authorization.parse(raw) == auth


@pytest.mark.parametrize("header", [
    # raw res, raw sign, and each mixed with the other encoded
    "version=2018-10-31&res=products/245528&et=7559008892&method=sha1&sign=TPllhakDDnUV90epLnOqpj6aWqI=",
    "version=2018-10-31&res=products/245528&et=7559008892&method=sha1&sign=TPllhakDDnUV90epLnOqpj6aWqI%3D",
    "version=2018-10-31&res=products%2F245528&et=7559008892&method=sha1&sign=TPllhakDDnUV90epLnOqpj6aWqI=",
    "version=2018-10-31&res=products%2f245528&et=7559008892&method=sha1&sign=TPllhakDDnUV90epLnOqpj6aWqI%3d",
])
def test_raw_and_encoded_seed_token_parse_to_the_same_values(header):
    assert Authorization.parse(header) == Authorization.parse(SEED_HEADER)


def _sign_with_plus_and_slash():
    """A real signature from the public key that contains '+', '/' and '=' (found by search)."""
    for et in range(PUBLIC_ET, PUBLIC_ET + 10_000):
        auth = Authorization.build(PUBLIC_KEY, PUBLIC_RES, et, SignMethod.SHA1)
        if "+" in auth.sign and "/" in auth.sign:
            return auth
    raise AssertionError("no signature with both '+' and '/' in 10000 tries")


def test_raw_sign_keeps_plus_slash_and_padding():
    auth = _sign_with_plus_and_slash()
    encoded, raw = auth.header(), auth.header(encoded=False)
    assert "%2B" in encoded
    assert "%2F" in encoded
    assert encoded.endswith("%3D")
    assert f"&sign={auth.sign}" in raw
    assert "%" not in raw
    for header in (encoded, raw):
        parsed = Authorization.parse(header)
        assert parsed.sign == auth.sign      # '+' is not a space in this header
        parsed.verify(public_key_bytes(), now=auth.et)


@pytest.mark.parametrize("method", ["md5", "sha1", "sha256"])
def test_every_method_signs_as_documented_and_verifies(method):
    auth = Authorization.build(PUBLIC_KEY, PUBLIC_RES, PUBLIC_ET, SignMethod(method))
    assert auth.sign == documented_sign(PUBLIC_KEY, PUBLIC_RES, PUBLIC_ET, method)
    assert f"&method={method}&" in auth.header()
    parsed = Authorization.parse(auth.header())
    assert parsed.method == method
    parsed.verify(public_key_bytes(), now=PUBLIC_ET)
    Authorization.parse(auth.header(encoded=False)).verify(public_key_bytes(), now=PUBLIC_ET)


def test_device_level_res():
    res = device_res("123123", "dev-527776559")
    assert res == "products/123123/devices/dev-527776559"
    assert product_res("123123") == "products/123123"
    auth = Authorization.build(PUBLIC_KEY, res, PUBLIC_ET, SignMethod.SHA256)
    assert "res=products%2F123123%2Fdevices%2Fdev-527776559&" in auth.header()
    parsed = Authorization.parse(auth.header())
    assert parsed.product_id == "123123"
    assert parsed.device_name == "dev-527776559"
    parsed.verify(public_key_bytes(), now=PUBLIC_ET)
    raw = Authorization.parse(auth.header(encoded=False))
    assert (raw.product_id, raw.device_name) == ("123123", "dev-527776559")


# ---------------------------------------------------------------------------------------------
# Forgeries


def _public_auth():
    return Authorization.parse(PUBLIC_HEADER)


@pytest.mark.parametrize("forged", [
    dataclasses.replace(_public_auth(), sign="lsaPSiiGvEFFjXu5WU7a6IkScqF="),
    dataclasses.replace(_public_auth(), sign="lsaPSiiGvEFFjXu5WU7a6IkScqE"),    # padding dropped
    dataclasses.replace(_public_auth(), sign=""),
    dataclasses.replace(_public_auth(), sign=PUBLIC_SIGN + "="),
    dataclasses.replace(_public_auth(), sign=" " + PUBLIC_SIGN),
    dataclasses.replace(_public_auth(), res="products/123124"),
    dataclasses.replace(_public_auth(), res="products/123123/devices/x"),
    dataclasses.replace(_public_auth(), et=PUBLIC_ET + 1),
    dataclasses.replace(_public_auth(), method=SignMethod.SHA256),
    dataclasses.replace(_public_auth(), method=SignMethod.MD5),
], ids=["sign", "unpadded", "empty-sign", "extra-pad", "space", "res", "res-device", "et",
        "method-sha256", "method-md5"])
def test_forged_or_tampered_authorization_is_rejected(forged):
    with pytest.raises(AuthorizationError, match="signature") as excinfo:
        forged.verify(public_key_bytes(), now=0)
    assert excinfo.value.errno == 1


def test_tampered_header_text_is_rejected():
    for tampered in (PUBLIC_HEADER.replace("123123", "123124"),
                     PUBLIC_HEADER.replace("1537255523", "1537255524"),
                     PUBLIC_HEADER.replace("method=sha1", "method=md5")):
        with pytest.raises(AuthorizationError):
            Authorization.parse(tampered).verify(public_key_bytes(), now=0)


@pytest.mark.parametrize("key", [
    b"",
    b"\x00" * 32,
    public_key_bytes()[:-1],
    public_key_bytes()[:-1] + bytes([public_key_bytes()[-1] ^ 1]),   # one bit off
    base64.b64encode(public_key_bytes()),     # the key's text instead of its bytes
    b"another key",
], ids=["empty", "zeros", "truncated", "bit-flip", "undecoded", "other"])
def test_wrong_key_is_rejected(key):
    with pytest.raises(AuthorizationError):
        _public_auth().verify(key, now=0)


# ---------------------------------------------------------------------------------------------
# Malformed headers: always AuthorizationError (errno 1), never another exception

V, R, E, M, S = ("version=2018-10-31", "res=products%2F123123", "et=1537255523", "method=sha1",
                 "sign=lsaPSiiGvEFFjXu5WU7a6IkScqE%3D")


def _join(*fields):
    return "&".join(fields)


MALFORMED = {
    "none": None,
    "empty": "",
    "blank": "   ",
    "missing-version": _join(R, E, M, S),
    "missing-res": _join(V, E, M, S),
    "missing-et": _join(V, R, M, S),
    "missing-method": _join(V, R, E, S),
    "missing-sign": _join(V, R, E, M),
    "duplicate-version": _join(V, V, R, E, M, S),
    "duplicate-res": _join(V, R, R, E, M, S),
    "duplicate-et": _join(V, R, E, E, M, S),
    "duplicate-method": _join(V, R, E, M, M, S),
    "duplicate-sign": _join(V, R, E, M, S, S),
    "duplicate-res-different": _join(V, R, "res=products%2F1", E, M, S),
    "unknown-field": _join(V, R, E, M, S, "foo=bar"),
    "unknown-field-first": _join("nonce=1", V, R, E, M, S),
    "uppercase-name": _join("Version=2018-10-31", R, E, M, S),
    "field-without-equals": _join(V, R, E, M, S, "sign"),
    "trailing-ampersand": _join(V, R, E, M, S) + "&",
    "double-ampersand": _join(V, R, E, M) + "&&" + S,
    "semicolon-separated": ";".join((V, R, E, M, S)),
    "version-old": _join("version=2018-10-30", R, E, M, S),
    "version-empty": _join("version=", R, E, M, S),
    "version-padded": _join("version=2018-10-31%20", R, E, M, S),
    "method-upper": _join(V, R, E, "method=SHA1", S),
    "method-sha512": _join(V, R, E, "method=sha512", S),
    "method-empty": _join(V, R, E, "method=", S),
    "method-hmacsha1": _join(V, R, E, "method=hmacsha1", S),
    "et-empty": _join(V, R, "et=", M, S),
    "et-letters": _join(V, R, "et=soon", M, S),
    "et-negative": _join(V, R, "et=-1537255523", M, S),
    "et-plus": _join(V, R, "et=+1537255523", M, S),
    "et-float": _join(V, R, "et=1537255523.0", M, S),
    "et-exponent": _join(V, R, "et=1e9", M, S),
    "et-space": _join(V, R, "et=%201537255523", M, S),
    "et-fullwidth": _join(V, R, "et=\uff11\uff15\uff13\uff17", M, S),
    "et-arabic-indic": _join(V, R, "et=١٥٣٧٢٥٥٥٢٣", M, S),
    "et-superscript": _join(V, R, "et=²", M, S),
    "et-underscore": _join(V, R, "et=1_537_255_523", M, S),
    "res-empty": _join(V, "res=", E, M, S),
    "res-no-pid": _join(V, "res=products%2F", E, M, S),
    "res-bare": _join(V, "res=products", E, M, S),
    "res-singular": _join(V, "res=product%2F123123", E, M, S),
    "res-leading-slash": _join(V, "res=%2Fproducts%2F123123", E, M, S),
    "res-trailing-slash": _join(V, "res=products%2F123123%2F", E, M, S),
    "res-devices-no-name": _join(V, "res=products%2F1%2Fdevices%2F", E, M, S),
    "res-devices-missing": _join(V, "res=products%2F1%2Fdevices", E, M, S),
    "res-device-singular": _join(V, "res=products%2F1%2Fdevice%2Fd", E, M, S),
    "res-no-pid-device": _join(V, "res=products%2F%2Fdevices%2Fd", E, M, S),
    "res-too-deep": _join(V, "res=products%2F1%2Fdevices%2Fd%2Fx", E, M, S),
    "res-devices-only": _join(V, "res=devices%2Fd", E, M, S),
    "res-raw-too-deep": _join(V, "res=products/1/devices/d/x", E, M, S),
    "not-a-header": "Bearer abc.def.ghi",
    "json": '{"version": "2018-10-31"}',
}


@pytest.mark.parametrize("header", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_header_raises_authorization_error(header):
    with pytest.raises(AuthorizationError) as excinfo:
        Authorization.parse(header)
    assert isinstance(excinfo.value, ProtocolError)
    assert excinfo.value.errno == 1


def test_whitespace_around_the_value_is_tolerated():
    assert Authorization.parse(f"  {PUBLIC_HEADER}\t") == _public_auth()


# ---------------------------------------------------------------------------------------------
# Secrets stay secret


def test_redacted_hides_the_sign_but_keeps_the_rest():
    auth = _sign_with_plus_and_slash()
    text = auth.redacted()
    assert auth.sign not in text
    assert quote(auth.sign, safe="") not in text
    assert "res=products%2F123123" in text
    assert f"et={auth.et}" in text
    assert "method=sha1" in text


@pytest.mark.parametrize("bad_key", [
    "not base64 at all!",
    "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw",      # padding lost
    "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=\n",   # stray newline
    "KuF3NT-jUBJ62LNBB_A8XZA9CqS3Cu79B_ABmfA1UCw=",     # urlsafe alphabet
    "ключ-доступа",
    "abc",
])
def test_invalid_access_key_is_a_value_error_that_does_not_echo_the_key(bad_key):
    for call in (lambda: decode_access_key(bad_key),
                 lambda: Authorization.build(bad_key, PUBLIC_RES, PUBLIC_ET)):
        with pytest.raises(ValueError) as excinfo:   # noqa: PT011 - the message is checked below
            call()
        assert not isinstance(excinfo.value, AuthorizationError)
        assert bad_key.strip() not in str(excinfo.value)
        assert bad_key.strip() not in repr(excinfo.value)
        assert excinfo.value.__cause__ is None


# ---------------------------------------------------------------------------------------------
# Properties

keys = st.binary(min_size=1, max_size=64).map(lambda b: base64.b64encode(b).decode())
ets = st.integers(min_value=0, max_value=999_999_999_999)
methods = st.sampled_from(list(SignMethod))

any_segment = st.text(min_size=1, max_size=20).filter(lambda s: "/" not in s)
raw_segment = st.text(alphabet="abcXYZ0123456789_-.~:+=", min_size=1, max_size=20)


def res_of(segment):
    return st.one_of(
        st.builds(product_res, segment),
        st.builds(device_res, segment, segment),
    )


def _check_round_trip(access_key, res, et, method, encoded):
    auth = Authorization.build(access_key, res, et, method)
    assert auth.sign == documented_sign(access_key, res, et, method.value)
    parsed = Authorization.parse(auth.header(encoded=encoded))
    assert parsed == auth
    parts = res.split("/")
    assert parsed.product_id == parts[1]
    assert parsed.device_name == (parts[3] if len(parts) == 4 else None)
    parsed.verify(decode_access_key(access_key), now=et)
    parsed.verify(decode_access_key(access_key), now=et - 0.5)


@given(keys, res_of(any_segment), ets, methods)
def test_round_trip_encoded(access_key, res, et, method):
    _check_round_trip(access_key, res, et, method, encoded=True)


@given(keys, res_of(raw_segment), ets, methods)
def test_round_trip_raw(access_key, res, et, method):
    _check_round_trip(access_key, res, et, method, encoded=False)


@given(keys, res_of(raw_segment), ets, methods)
def test_redacted_never_contains_the_sign(access_key, res, et, method):
    auth = Authorization.build(access_key, res, et, method)
    assert auth.sign not in auth.redacted()
    assert quote(auth.sign, safe="") not in auth.redacted()


@given(keys, res_of(raw_segment), ets, methods, st.data())
def test_any_single_character_change_of_the_sign_fails(access_key, res, et, method, data):
    auth = Authorization.build(access_key, res, et, method)
    index = data.draw(st.integers(min_value=0, max_value=len(auth.sign) - 1))
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: c != auth.sign[index]))
    forged = dataclasses.replace(
        auth, sign=auth.sign[:index] + replacement + auth.sign[index + 1:])
    with pytest.raises(AuthorizationError):
        forged.verify(decode_access_key(access_key), now=et)


@given(st.one_of(st.none(), st.text(),
                 st.lists(st.sampled_from([V, R, E, M, S, "sign=", "et=%E2%91%A0", "x=y", "=",
                                           "res=products/1/devices/", "%", "&"]),
                          max_size=8).map("&".join)))
def test_arbitrary_text_raises_only_authorization_error(text):
    try:
        auth = Authorization.parse(text)
    except AuthorizationError as error:
        errno = error.errno
    else:
        errno = None
        # Whatever parses is fully formed, and verifying it raises only AuthorizationError.
        assert auth.version == AUTH_VERSION
        assert auth.product_id
        with contextlib.suppress(AuthorizationError):
            auth.verify(public_key_bytes(), now=0)
    assert errno in (None, 1)
