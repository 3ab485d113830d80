"""Routing and parsing OneNET requests, encoding answers (ONENET.md, "Endpoints" and decisions)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hil.errors import ProtocolError
from hil.onenet.codes import (
    DownloadError,
    Errno,
    ErrorBodyForm,
    ResultCode,
    TaskType,
    decode_error_body,
)
from hil.onenet.messages import (
    DetectAnswer,
    DetectQuery,
    Endpoint,
    Route,
    VersionReport,
    encode_answer,
    parse_result,
    parse_step,
    result_code,
    route,
)

TOKEN = "ota_iF0hnXrq2CxLrP8vZ39l"   # seed 000


# ---------------------------------------------------------------------------------------------
# route


@pytest.mark.parametrize(("path", "expected"), [
    ("/ota/device/version", Route(Endpoint.VERSION, "POST")),
    ("/ota/south/check", Route(Endpoint.DETECT, "GET")),
    ("/ota/check", Route(Endpoint.DETECT, "GET")),                   # the oldest detect path
    (f"/ota/south/download/{TOKEN}/check", Route(Endpoint.TOKEN_CHECK, "GET", TOKEN)),
    (f"/ota/south/download/{TOKEN}", Route(Endpoint.DOWNLOAD, "GET", TOKEN)),
    (f"/ota/download/{TOKEN}", Route(Endpoint.DOWNLOAD, "GET", TOKEN)),   # seed 001's address
    (f"/ota/south/device/download/{TOKEN}/progress", Route(Endpoint.PROGRESS, "POST", TOKEN)),
    ("/ota/south/report", Route(Endpoint.REPORT, "POST")),
    ("/ota/south/download/dafddad", Route(Endpoint.DOWNLOAD, "GET", "dafddad")),   # seed 001
    ("/ota/south/download/a.b-c_d/check", Route(Endpoint.TOKEN_CHECK, "GET", "a.b-c_d")),
])
def test_route_of_every_documented_path(path, expected):
    assert route(path) == expected


@pytest.mark.parametrize("path", [
    "",
    "/",
    "/ota",
    "/ota/south",
    "/ota/south/download",
    "/ota/south/download/",
    "/ota/south/download//check",
    f"/ota/south/download/{TOKEN}/check/extra",
    f"/ota/south/download/{TOKEN}/progress",          # progress lives under /device/download
    f"/ota/south/device/download/{TOKEN}",
    "/ota/south/device/download//progress",
    "/ota/south/check/",
    "/ota/south/checks",
    "/OTA/south/check",
    "ota/south/check",
    "/ota/south/report/x",
    "/ota/device/versions",
    "/ota/download/",
    "/ota/download/a/b",
    "/ota/south/download/a b",
    "/ota/south/download/a%2Fb",
    "/ota/south/download/" + "t" * 65,
    "/favicon.ico",
])
def test_unknown_paths(path):
    assert route(path) == Route(Endpoint.UNKNOWN, "")


# ---------------------------------------------------------------------------------------------
# DetectQuery

# seed 000's detect query
SEED_QUERY = {"dev_id": "527776559", "manuf": "102", "model": "10201", "type": "2",
              "version": "V1", "cdn": "false"}
# what the vendor C SDK sends: no manuf, no model
SDK_QUERY = {"dev_id": "527776559", "type": "1", "version": "1.2", "cdn": "true"}


def test_seed_detect_query():
    query = DetectQuery.parse(SEED_QUERY)
    assert query == DetectQuery(dev_id="527776559", type=TaskType.SOTA, version="V1",
                                manuf="102", model="10201", cdn=False, signal=None, power=None)


def test_vendor_sdk_detect_query_without_manuf_and_model():
    query = DetectQuery.parse(SDK_QUERY)
    assert query.type is TaskType.FOTA
    assert (query.manuf, query.model) == (None, None)
    assert query.cdn is True
    assert query.version == "1.2"


@pytest.mark.parametrize(("extra", "signal", "power"), [
    ({"signal": "10", "power": "50"}, 10, 50),       # API book spelling
    ({"signals": "10", "powers": "30"}, 10, 30),     # the older reference's spelling (seed 001)
    ({"signal": "7"}, 7, None),
    ({"powers": "90"}, None, 90),
    ({}, None, None),
])
def test_signal_and_power_in_both_spellings(extra, signal, power):
    query = DetectQuery.parse({**SEED_QUERY, **extra})
    assert (query.signal, query.power) == (signal, power)


@pytest.mark.parametrize(("cdn", "expected"), [("true", True), ("false", False)])
def test_cdn_values(cdn, expected):
    assert DetectQuery.parse({**SEED_QUERY, "cdn": cdn}).cdn is expected


def _errno_of(query):
    with pytest.raises(ProtocolError) as excinfo:
        DetectQuery.parse(query)
    return excinfo.value.errno


def _without(name):
    return {key: value for key, value in SEED_QUERY.items() if key != name}


@pytest.mark.parametrize("query", [
    _without("dev_id"),
    {**SEED_QUERY, "dev_id": ""},
    _without("type"),
    {**SEED_QUERY, "type": ""},
    {**SEED_QUERY, "type": "0"},
    {**SEED_QUERY, "type": "3"},
    {**SEED_QUERY, "type": "fota"},
    {**SEED_QUERY, "type": "1.0"},
    _without("version"),
    _without("cdn"),               # cdn is a required parameter (seed 001: "CDN | Boolean | is")
    {**SEED_QUERY, "cdn": "maybe"},
    {**SEED_QUERY, "cdn": ""},
    {**SEED_QUERY, "signal": "strong"},
    {**SEED_QUERY, "signals": "10%"},
    {**SEED_QUERY, "power": "1.5"},
    {**SEED_QUERY, "powers": ""},
    {},
], ids=["no-dev_id", "empty-dev_id", "no-type", "empty-type", "type-0", "type-3", "type-word",
        "type-float", "no-version", "no-cdn", "cdn-maybe", "cdn-empty", "signal-word",
        "signals-percent", "power-float", "powers-empty", "nothing"])
def test_missing_or_ill_typed_parameters_are_errno_2(query):
    assert _errno_of(query) == 2


@pytest.mark.parametrize("version", ["", "V 1", "x" * 21, "1.2.3+b", "版本1", "V1/2"])
def test_bad_version_format_is_errno_27(version):
    assert _errno_of({**SEED_QUERY, "version": version}) == 27


@pytest.mark.parametrize("broken", [
    _without("dev_id"),
    {**SEED_QUERY, "type": "9"},
    _without("type"),
    {**SEED_QUERY, "cdn": "maybe"},
    {**SEED_QUERY, "signals": "x"},
    {**SEED_QUERY, "power": "x"},
], ids=["no-dev_id", "bad-type", "no-type", "bad-cdn", "bad-signals", "bad-power"])
def test_parameter_errors_come_before_the_version_format(broken):
    """Decisions: missing or ill-typed parameters (2) are checked before the version format (27)."""
    assert _errno_of({**broken, "version": "not a version!"}) == 2


def test_a_valid_version_is_recorded_as_given():
    assert DetectQuery.parse({**SEED_QUERY, "version": "A-Z_a-z.0-9"}).version == "A-Z_a-z.0-9"


# ---------------------------------------------------------------------------------------------
# report and progress bodies


@pytest.mark.parametrize("code", [int(code) for code in ResultCode])
def test_parse_result_accepts_every_code(code):
    assert parse_result(json.dumps({"result": code}).encode()) == code


def test_parse_result_of_the_seed_body():
    assert parse_result(b'{\n    "result": 201\n\n}') is ResultCode.UPGRADED


BAD_RESULT_BODIES = {
    "empty": b"",
    "not-json": b"result=201",
    "truncated": b'{"result": 201',
    "not-utf8": b'{"result": \xff}',
    "array": b"[201]",
    "number": b"201",
    "string-body": b'"201"',
    "null-body": b"null",
    "missing": b"{}",
    "other-key": b'{"results": 201}',
    "null": b'{"result": null}',
    "true": b'{"result": true}',
    "false": b'{"result": false}',
    "float": b'{"result": 201.0}',
    "string": b'{"result": "201"}',
    "list": b'{"result": [201]}',
    "object": b'{"result": {"code": 201}}',
    "nan": b'{"result": NaN}',
}


@pytest.mark.parametrize("body", BAD_RESULT_BODIES.values(), ids=BAD_RESULT_BODIES.keys())
def test_parse_result_bad_body_is_errno_24(body):
    with pytest.raises(ProtocolError) as excinfo:
        parse_result(body)
    assert excinfo.value.errno == 24


@pytest.mark.parametrize("code", [0, 1, 100, 108, 150, 200, 209, 301, -101, 10**30])
def test_parse_result_unknown_code_is_errno_2(code):
    with pytest.raises(ProtocolError) as excinfo:
        parse_result(json.dumps({"result": code}).encode())
    assert excinfo.value.errno == 2
    with pytest.raises(ProtocolError) as excinfo:
        result_code(code)
    assert excinfo.value.errno == 2


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 107, 201, 208])
def test_parse_step(step):
    assert parse_step(json.dumps({"step": step}).encode()) == step


def test_a_step_above_100_is_read_as_a_result_code():
    assert result_code(parse_step(b'{"step": 101}')) is ResultCode.DOWNLOADED
    assert result_code(parse_step(b'{"step": 201}')) is ResultCode.UPGRADED
    with pytest.raises(ProtocolError) as excinfo:
        result_code(parse_step(b'{"step": 150}'))
    assert excinfo.value.errno == 2


BAD_STEP_BODIES = {
    "empty": b"",
    "not-json": b"step=50",
    "array": b"[50]",
    "missing": b"{}",
    "null": b'{"step": null}',
    "true": b'{"step": true}',
    "float": b'{"step": 50.0}',
    "string": b'{"step": "50"}',
    "negative": b'{"step": -1}',
}


@pytest.mark.parametrize("body", BAD_STEP_BODIES.values(), ids=BAD_STEP_BODIES.keys())
def test_parse_step_bad_body_is_errno_24(body):
    with pytest.raises(ProtocolError) as excinfo:
        parse_step(body)
    assert excinfo.value.errno == 24


# ---------------------------------------------------------------------------------------------
# version report


@pytest.mark.parametrize(("body", "f_version", "s_version"), [
    (b'{"f_version": "1.0.0", "s_version": "V1"}', "1.0.0", "V1"),
    (b'{"s_version": "V1"}', None, "V1"),
    (b'{"f_version": "M5310_1.2"}', "M5310_1.2", None),
    (b'{"f_version": null, "s_version": "V2"}', None, "V2"),
])
def test_version_report(body, f_version, s_version):
    report = VersionReport.parse(body)
    assert (report.f_version, report.s_version) == (f_version, s_version)
    assert report.of(TaskType.FOTA) == f_version      # FOTA: the module's version
    assert report.of(TaskType.SOTA) == s_version      # SOTA: the MCU application's version


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b'"V1"', b"{}", b'{"version": "V1"}', b'{"s_version": 2}',
    b'{"f_version": ["1"]}',
], ids=["empty", "not-json", "array", "string", "no-versions", "other-key", "int", "list"])
def test_version_report_bad_body_is_errno_2(body):
    with pytest.raises(ProtocolError) as excinfo:
        VersionReport.parse(body)
    assert excinfo.value.errno == 2


# ---------------------------------------------------------------------------------------------
# answers


def test_encode_answer_is_compact_json():
    assert encode_answer(Errno.OK) == b'{"errno":0,"error":"succ"}'   # seed: "error": "succ"
    assert encode_answer(Errno.NO_TASK) == b'{"errno":11,"error":"no task"}'


def test_encode_answer_with_data():
    data = {"target": "V1", "token": TOKEN, "size": 22,
            "md5": "ad2f4e4ea2a27eace7e4913139f8f01a", "signal": 10, "power": 50, "retry": 0,
            "interval": 0, "type": 1}
    body = encode_answer(Errno.OK, data)
    assert b" " not in body
    assert b"\n" not in body
    assert json.loads(body) == {"errno": 0, "error": "succ", "data": data}
    assert body.startswith(b'{"errno":0,"error":"succ","data":{')
    assert len(body) < 512 - 100   # room for the status line and a few headers


@pytest.mark.parametrize("errno", list(Errno))
def test_every_errno_encodes_with_a_short_error_text(errno):
    answer = json.loads(encode_answer(errno))
    assert answer == {"errno": int(errno), "error": answer["error"]}
    assert type(answer["errno"]) is int
    assert 0 < len(answer["error"]) <= 32


# ---------------------------------------------------------------------------------------------
# the detect answer's download address (cdn=false): ip and ipPort are strings on the wire

ANSWER = DetectAnswer("V2", TOKEN, 22, "ad2f4e4ea2a27eace7e4913139f8f01a", 10, 50, 3, 2)


def test_detect_answer_writes_ip_and_ip_port_as_strings():
    data = DetectAnswer(**{**_fields(ANSWER), "ip": "10.0.0.7", "ip_port": 8080}).to_data()
    assert (data["ip"], data["ipPort"]) == ("10.0.0.7", "8080")
    assert b'"ipPort":"8080"' in encode_answer(Errno.OK, data)   # the vendor client strcpy()s it


def test_detect_answer_without_address_has_neither_key():
    assert not {"ip", "ipPort"} & ANSWER.to_data().keys()


@pytest.mark.parametrize(("ip_port", "expected"), [
    ("8080", 8080),        # the platform's form
    (8080, 8080),          # a service that sends an integer: read as lenient clients do
    ("80", 80), ("65535", 65535),
    ("0", None), ("65536", None), (-1, None), ("", None), ("8o8o", None), ("\uff18\uff10", None),
    ("+80", None), (" 80", None), (80.0, None), (True, None), (None, None),
])
def test_detect_answer_reads_ip_port_as_string_or_integer(ip_port, expected):
    data = {**ANSWER.to_data(), "ip": "10.0.0.7", "ipPort": ip_port}
    answer = DetectAnswer.from_data(data)
    assert (answer.ip, answer.ip_port) == ("10.0.0.7", expected)
    assert answer.target == ANSWER.target   # a bad port does not cost the device its task


@given(st.integers(1, 65535))
def test_detect_answer_address_round_trips(port):
    answer = DetectAnswer(**{**_fields(ANSWER), "ip": "127.0.0.1", "ip_port": port})
    assert DetectAnswer.from_data(json.loads(json.dumps(answer.to_data()))) == answer


def _fields(answer: DetectAnswer) -> dict[str, object]:
    return {name: getattr(answer, name) for name in DetectAnswer.__slots__}


# ---------------------------------------------------------------------------------------------
# download error bodies: OneNET's raw byte, or the ASCII digit, decoded alike


@pytest.mark.parametrize("error", list(DownloadError))
def test_error_body_forms(error):
    assert error.body == bytes([int(error)])                 # OneNET: the byte's value
    assert error.body_in(ErrorBodyForm.RAW) == error.body
    assert error.body_in(ErrorBodyForm.ASCII) == str(int(error)).encode()
    for form in ErrorBodyForm:
        assert decode_error_body(error.body_in(form)) is error


@given(st.integers(0, 255))
def test_decode_error_body_of_every_byte(value):
    if 1 <= value <= 6:
        expected = DownloadError(value)
    elif ord("1") <= value <= ord("6"):
        expected = DownloadError(value - ord("0"))
    else:
        expected = None   # 0x00, 0x07.., "0", "7".."9", letters: not a documented code
    assert decode_error_body(bytes([value])) == expected


@given(st.binary().filter(lambda body: len(body) != 1))
def test_decode_error_body_of_any_other_length_is_none(body):
    assert decode_error_body(body) is None
