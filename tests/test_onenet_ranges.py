"""The download Range rules of ONENET.md ("download: Range semantics" and the decisions section).

``resolve_range`` answers a ByteRange (the service sends 206 with Content-Range) or None (the whole
file with 200). Every rule and every example of seed 000 is a row below; the properties at the end
restate the rules independently and compare.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hil.onenet.ranges import ByteRange, resolve_range

LEN = 1000   # a package big enough that no seed example is clamped


# (header, length, expected (start, end)) for every documented form: 206 answers.
RANGED = [
    # seed 000 examples, against a 1000-byte package
    ("bytes=0-", LEN, (0, 999)),          # "bytes = 0 -, get all the data" (still 206)
    ("bytes=2-", LEN, (2, 999)),          # "get the third data to the last one"
    ("bytes=0-99", LEN, (0, 99)),         # "get the first 100 bytes"
    ("bytes=-100", LEN, (900, 999)),      # "get the last 100 bytes of data"
    # the same examples without the "bytes=" prefix (API book, vendor C SDK)
    ("0-", LEN, (0, 999)),
    ("2-", LEN, (2, 999)),
    ("0-99", LEN, (0, 99)),
    ("-100", LEN, (900, 999)),
    # 1. start-: start >= len falls back to 0
    ("bytes=999-", LEN, (999, 999)),
    ("bytes=1000-", LEN, (0, 999)),
    ("bytes=1001-", LEN, (0, 999)),
    ("bytes=123456789-", LEN, (0, 999)),
    ("5-", 6, (5, 5)),
    ("6-", 6, (0, 5)),
    ("0-", 1, (0, 0)),
    ("1-", 1, (0, 0)),
    # 2. start-end: end >= len clamps to len-1, then start > end falls back to 0
    ("bytes=10-20", LEN, (10, 20)),
    ("bytes=7-7", LEN, (7, 7)),
    ("bytes=0-998", LEN, (0, 998)),
    ("bytes=0-999", LEN, (0, 999)),        # covers the whole file, still a 206 range
    ("bytes=0-1000", LEN, (0, 999)),
    ("bytes=500-5000", LEN, (500, 999)),
    ("bytes=999-5000", LEN, (999, 999)),
    ("bytes=1000-5000", LEN, (0, 999)),    # clamp end to 999 first, then 1000 > 999 -> start 0
    ("bytes=5000-1000", LEN, (0, 999)),
    ("bytes=20-10", LEN, (0, 10)),
    ("bytes=1-0", LEN, (0, 0)),
    ("bytes=0-0", LEN, (0, 0)),
    ("4096-8191", 5000, (4096, 4999)),     # the vendor SDK's last 4 KiB chunk asks past the end
    ("8192-12287", 5000, (0, 4999)),       # a chunk wholly past the end: clamp, then start 0
    ("3-4", 4, (3, 3)),
    ("4-9", 4, (0, 3)),
    # 3. -n: the last n bytes; n > len is the whole file, still answered as a range
    ("bytes=-1", LEN, (999, 999)),
    ("bytes=-999", LEN, (1, 999)),
    ("bytes=-1000", LEN, (0, 999)),
    ("bytes=-1001", LEN, (0, 999)),
    ("-100", 22, (0, 21)),
    ("-1", 1, (0, 0)),
    # 5. leading zeros
    ("01-02", LEN, (1, 2)),
    ("bytes=01-02", LEN, (1, 2)),
    ("bytes=0010-", LEN, (10, 999)),
    ("bytes=000-000", LEN, (0, 0)),
    ("bytes=-0100", LEN, (900, 999)),
    ("00001-", 3, (1, 2)),
    # whitespace padding around the whole value
    (" bytes=0-99 ", LEN, (0, 99)),
    ("\tbytes=2-\t", LEN, (2, 999)),
    ("  -100", LEN, (900, 999)),
    ("01-02  ", LEN, (1, 2)),
]


@pytest.mark.parametrize(("header", "length", "expected"), RANGED)
def test_documented_forms_resolve_to_a_206_range(header, length, expected):
    answer = resolve_range(header, length)
    assert answer == ByteRange(expected[0], expected[1], length)


# Headers that fit none of the forms: the whole file with status 200.
WHOLE_FILE = [
    None,                  # no Range at all
    "",
    "   ",
    "bytes=",
    "bytes=-",
    "-",
    "-0",                  # asks for nothing: malformed (decisions section)
    "bytes=-0",
    "bytes=-000",
    "a-b",
    "bytes=a-b",
    "bytes=1-b",
    "bytes=a-2",
    "1-2,3-4",             # several ranges
    "bytes=1-2,3-4",
    "bytes=0-1, 5-6",
    "items=0-1",           # another unit
    "bits=0-1",
    "bytes=1-2-3",
    "1-2-3",
    "bytes=--1",
    "bytes=+1-2",
    "bytes=1-+2",
    "bytes=0x10-",
    "bytes=1.5-2",
    "12",                  # no dash
    "bytes=12",
    "bytes 0-99",          # the Content-Range spelling is not a Range
    "bytes=bytes=0-1",
    "=0-1",
    "\uff11-\uff12",      # fullwidth digits: int() would take them, the rules do not
    "٣-٤",                # Arabic-Indic digits
    "bytes=\uff11-",
    "bytes=-\uff15",
    "bytes=0-99\nX: y",    # header injection attempt
    "bytes=0\x00-99",
]


@pytest.mark.parametrize("header", WHOLE_FILE)
def test_malformed_or_missing_range_is_the_whole_file(header):
    assert resolve_range(header, LEN) is None


@pytest.mark.parametrize("header", ["0-", "-1", "0-0", "bytes=5-10"])
def test_an_empty_package_has_no_range(header):
    assert resolve_range(header, 0) is None


# A device may send any number of digits; a long run of them is still a documented form.
# (Python's int() refuses strings over 4300 digits unless the code avoids it.)
HUGE = "9" * 5000
LONG_ZEROS = "0" * 5000


@pytest.mark.parametrize(("header", "expected"), [
    (f"bytes={HUGE}-", (0, 9)),              # start >= len -> start 0
    (f"bytes=0-{HUGE}", (0, 9)),             # end >= len -> len-1
    (f"bytes={HUGE}-{HUGE}", (0, 9)),        # clamp, then start > end -> 0
    (f"bytes=-{HUGE}", (0, 9)),              # n > len -> whole file
    (f"bytes={LONG_ZEROS}1-", (1, 9)),       # leading zeros are allowed
    (f"{LONG_ZEROS}3-{LONG_ZEROS}4", (3, 4)),
])
def test_very_long_numbers_follow_the_same_rules(header, expected):
    assert resolve_range(header, 10) == ByteRange(expected[0], expected[1], 10)


@pytest.mark.parametrize(("byte_range", "content_range", "size"), [
    (ByteRange(0, 99, 1000), "bytes 0-99/1000", 100),
    (ByteRange(900, 999, 1000), "bytes 900-999/1000", 100),
    (ByteRange(0, 0, 1), "bytes 0-0/1", 1),
    (ByteRange(4096, 4999, 5000), "bytes 4096-4999/5000", 904),
])
def test_content_range_and_size(byte_range, content_range, size):
    assert byte_range.content_range == content_range
    assert byte_range.size == size


PACKAGE = bytes(range(256)) * 4   # 1024 distinct-ish bytes, so a wrong offset shows


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-99", PACKAGE[:100]),
    ("bytes=-100", PACKAGE[-100:]),
    ("bytes=2-", PACKAGE[2:]),
    ("bytes=1000-5000", PACKAGE[1000:]),
    ("bytes=0-0", PACKAGE[:1]),
    ("1023-", PACKAGE[1023:]),
])
def test_slice_sends_exactly_the_requested_bytes(header, expected):
    byte_range = resolve_range(header, len(PACKAGE))
    assert byte_range is not None
    assert byte_range.slice(PACKAGE) == expected
    assert len(expected) == byte_range.size


def test_seed_example_package_of_22_bytes():
    """The detect example of seed 000 announces "size": 22; the seed's Range examples on it."""
    data = bytes(range(22))
    assert resolve_range("bytes=0-", 22).slice(data) == data
    assert resolve_range("bytes=2-", 22).slice(data) == data[2:]
    assert resolve_range("bytes=0-99", 22).slice(data) == data            # end clamped to 21
    assert resolve_range("bytes=-100", 22).slice(data) == data            # n > len: whole file
    assert resolve_range("bytes=-100", 22).content_range == "bytes 0-21/22"


# ---------------------------------------------------------------------------------------------
# Properties: an independent restatement of the rules, and robustness on arbitrary text.


def expected_range(kind, first, second, length):
    """ONENET.md's rules written out plainly: (start, end), or None for the whole file."""
    if kind == "from":                       # rule 1
        start = first
        if start >= length:
            start = 0
        return start, length - 1
    if kind == "span":                       # rule 2: clamp end first, then compare
        start, end = first, second
        if end >= length:
            end = length - 1
        if start > end:
            start = 0
        return start, end
    # rule 3: "-n"; "-0" is malformed (decisions section)
    count = first
    if count == 0:
        return None
    if count > length:
        return 0, length - 1
    return length - count, length - 1


def _digits(value, zeros):
    return "0" * zeros + str(value)


@st.composite
def documented_headers(draw):
    kind = draw(st.sampled_from(["from", "span", "suffix"]))
    first = draw(st.integers(min_value=0, max_value=10**12))
    second = draw(st.integers(min_value=0, max_value=10**12))
    zeros = draw(st.integers(min_value=0, max_value=3))
    zeros2 = draw(st.integers(min_value=0, max_value=3))
    if kind == "from":
        body = f"{_digits(first, zeros)}-"
    elif kind == "span":
        body = f"{_digits(first, zeros)}-{_digits(second, zeros2)}"
    else:
        body = f"-{_digits(first, zeros)}"
    prefix = draw(st.sampled_from(["bytes=", ""]))
    pad_left = draw(st.sampled_from(["", " ", "\t", "  "]))
    pad_right = draw(st.sampled_from(["", " ", "\t", "  "]))
    return pad_left + prefix + body + pad_right, kind, first, second


lengths = st.one_of(st.integers(min_value=1, max_value=64),
                    st.integers(min_value=1, max_value=10**13))


@given(documented_headers(), lengths)
def test_documented_forms_agree_with_the_rules(case, length):
    header, kind, first, second = case
    answer = resolve_range(header, length)
    expected = expected_range(kind, first, second, length)
    if expected is None:
        assert answer is None
        return
    assert answer is not None
    assert (answer.start, answer.end) == expected
    assert answer.length == length
    assert 0 <= answer.start <= answer.end <= length - 1
    assert answer.content_range == f"bytes {answer.start}-{answer.end}/{length}"


@given(documented_headers(), st.binary(min_size=1, max_size=300))
def test_slice_length_matches_size(case, data):
    header = case[0]
    answer = resolve_range(header, len(data))
    if answer is not None:
        chunk = answer.slice(data)
        assert len(chunk) == answer.size >= 1
        assert chunk == data[answer.start:answer.end + 1]


@given(st.one_of(st.none(), st.text(), st.text(alphabet="bytes=0123456789-, \t\uff11٣")),
       st.integers(min_value=-5, max_value=10**6))
def test_arbitrary_text_never_raises_and_stays_in_bounds(header, length):
    answer = resolve_range(header, length)
    if answer is not None:
        assert length >= 1
        assert 0 <= answer.start <= answer.end <= length - 1
        assert answer.size == answer.end - answer.start + 1
