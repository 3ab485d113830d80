"""The gateway's fault model with no sockets: validation, targeting, how faults combine, and the
pure transforms (Authorization defects, Content-Range shift, corruption).

Targeting is checked against a reference model by hypothesis over random request sequences:
the requests a fault targets are numbered from 1 since arming, and it fires on numbers
index..index+count-1 (or index.. onwards), each with its probability drawn from its own seed.
"""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.errors import AuthorizationError
from hil.gateway import AUTH_VARIANTS, Armed, Fault, FaultKind
from hil.gateway.faults import (
    Plan,
    Seen,
    alter_authorization,
    corrupt,
    shift_content_range,
    widen_range,
)
from hil.onenet.auth import Authorization
from hil.onenet.messages import Endpoint

KEY = "c2VjcmV0LWtleS1mb3ItdGVzdHM="


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(("options", "message"), [
    ({"kind": "sleep"}, "Fault.kind: 'sleep' is not one of"),
    ({"kind": FaultKind.STALL, "rate": 10}, "Fault.rate: not a parameter of a stall fault"),
    ({"kind": FaultKind.LATENCY}, "Fault.ms: a latency fault needs it"),
    ({"kind": FaultKind.LATENCY, "ms": -1}, "Fault.ms: must be >= 0"),
    ({"kind": FaultKind.BANDWIDTH, "rate": 0}, "Fault.rate: must be above 0"),
    ({"kind": FaultKind.ERROR_BYTE, "code": 7}, "Fault.code: must be >= 1 and <= 6"),
    ({"kind": FaultKind.HTTP_5XX, "code": 404}, "Fault.code: must be >= 500 and <= 599"),
    ({"kind": FaultKind.TRUNCATE, "bytes": 1.5}, "Fault.bytes: must be an integer"),
    ({"kind": FaultKind.CORRUPT, "bytes": 0}, "Fault.bytes: a corrupt fault flips at least 1"),
    ({"kind": FaultKind.OVERSIZE, "bytes": 0}, "Fault.bytes: must be >= 1"),
    ({"kind": FaultKind.SLICER, "size": 0}, "Fault.size: must be >= 1"),
    ({"kind": FaultKind.AUTH, "variant": "stale"}, "Fault.variant: must be one of"),
    ({"kind": FaultKind.HOOK, "action": 3}, "Fault.action: must be callable"),
    ({"kind": FaultKind.DROP, "index": 0}, "Fault.index: must be an integer >= 1"),
    ({"kind": FaultKind.DROP, "count": 0}, "Fault.count: must be an integer >= 1 or None"),
    ({"kind": FaultKind.DROP, "probability": 1.5}, "Fault.probability: must be in 0..1"),
    ({"kind": FaultKind.DROP, "offset": 4, "phase": Endpoint.DETECT},
     "Fault.offset: targets downloads, not detect"),
    ({"kind": FaultKind.DROP, "phase": "flash"}, "Fault.phase: 'flash' is not an OTA phase"),
])
def test_a_bad_fault_is_one_line_naming_the_field(options, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as raised:
        Fault(**options)
    assert "\n" not in str(raised.value)


def test_defaults_are_filled_and_strings_accepted():
    assert Fault(FaultKind.STALL).seconds == 30
    assert Fault(FaultKind.RESET).bytes == 0
    assert Fault(FaultKind.CORRUPT).bytes == 1
    assert Fault(FaultKind.CONTENT_RANGE).bytes == 1
    assert Fault(FaultKind.HTTP_5XX).code == 503
    fault = Fault("latency", phase="download", ms=5)   # type: ignore[arg-type]
    assert (fault.kind, fault.phase, fault.jitter_ms) == (FaultKind.LATENCY, Endpoint.DOWNLOAD, 0)
    assert Fault(FaultKind.DROP) == Fault(FaultKind.DROP)


@pytest.mark.parametrize(("fault", "label"), [
    (Fault(FaultKind.STALL, seconds=2.0), "stall 2s"),
    (Fault(FaultKind.TRUNCATE, bytes=1000), "truncate@1000"),
    (Fault(FaultKind.ERROR_BYTE, code=3), "error-byte 3"),
    (Fault(FaultKind.HOOK, action=lambda: None), "hook"),
    (Fault(FaultKind.CONTENT_RANGE, bytes=-2), "content-range -2"),
    (Fault(FaultKind.AUTH, variant="bad-sign"), "auth bad-sign"),
    (Fault(FaultKind.BANDWIDTH, rate=1000), "bandwidth 1000B/s"),
    (Fault(FaultKind.OVERSIZE), "oversize +4096B"),
])
def test_labels(fault, label):
    assert fault.label == label


# ------------------------------------------------------------------------------ targeting
def download(start: int, end: int, dev_id: str = "d1") -> Seen:
    return Seen(Endpoint.DOWNLOAD, dev_id, (start, end))


def test_offset_targets_the_download_whose_range_holds_it():
    armed = Armed(Fault(FaultKind.DROP, offset=4096, count=None))
    requests = [Seen(Endpoint.DETECT, "d1"), download(0, 4095), download(4096, 8191),
                download(0, 10_000), download(4097, 5000)]
    assert [armed.consider(seen) for seen in requests] == [False, False, True, True, False]


def test_hits_and_seqs():
    armed = Armed(Fault(FaultKind.DROP, index=2, count=2))
    fired = [armed.consider(Seen(Endpoint.DETECT, "d1")) for _ in range(5)]
    assert fired == [False, True, True, False, False]
    assert armed.hits == 2
    armed.recorded(7)
    assert armed.seqs == [7]


PHASES = [Endpoint.DETECT, Endpoint.TOKEN_CHECK, Endpoint.DOWNLOAD, Endpoint.REPORT]
DEVICES = ["d1", "d2", None]


@st.composite
def seen_requests(draw: st.DrawFn) -> Seen:
    phase = draw(st.sampled_from(PHASES))
    dev_id = draw(st.sampled_from(DEVICES))
    if phase is not Endpoint.DOWNLOAD:
        return Seen(phase, dev_id)
    start = draw(st.integers(0, 20_000))
    return Seen(phase, dev_id, (start, start + draw(st.integers(0, 8192))))


@st.composite
def faults(draw: st.DrawFn) -> Fault:
    offset = draw(st.none() | st.integers(0, 30_000))
    phase = draw(st.sampled_from([None, Endpoint.DOWNLOAD] if offset is not None
                                 else [None, *PHASES]))
    return Fault(FaultKind.DROP, phase=phase, dev_id=draw(st.sampled_from(DEVICES)),
                 offset=offset, index=draw(st.integers(1, 6)),
                 count=draw(st.none() | st.integers(1, 6)),
                 probability=draw(st.sampled_from([1.0, 0.5, 0.0])),
                 seed=draw(st.integers(0, 2**32)))


def reference(fault: Fault, requests: list[Seen]) -> list[bool]:
    """Which requests the fault fires on, computed the plain way."""
    def targeted(seen: Seen) -> bool:
        if fault.phase is not None and seen.phase != fault.phase:
            return False
        if fault.dev_id is not None and seen.dev_id != fault.dev_id:
            return False
        return fault.offset is None or (seen.span is not None
                                        and seen.span[0] <= fault.offset <= seen.span[1])

    numbered = []
    number = 0
    for seen in requests:
        number += targeted(seen)
        numbered.append(number if targeted(seen) else 0)
    window = [n != 0 and n >= fault.index and (fault.count is None
                                               or n < fault.index + fault.count)
              for n in numbered]
    draws = random.Random(fault.seed)
    return [in_window and (fault.probability == 1.0 or draws.random() < fault.probability)
            for in_window in window]


@settings(max_examples=300, deadline=None)
@given(fault=faults(), requests=st.lists(seen_requests(), max_size=40))
def test_targeting_matches_the_reference_model(fault, requests):
    armed = Armed(fault)
    fired = [armed.consider(seen) for seen in requests]
    assert fired == reference(fault, requests)
    assert armed.hits == sum(fired)
    # The same seed, armed again, decides the same way.
    again = Armed(fault)
    assert [again.consider(seen) for seen in requests] == fired


def test_different_seeds_differ():
    requests = [Seen(Endpoint.DETECT, "d1")] * 64
    runs = {seed: [Armed(Fault(FaultKind.DROP, count=None, probability=0.5, seed=seed))
                   .consider(seen) for seen in requests] for seed in (1, 2)}
    assert runs[1] != runs[2]


# ------------------------------------------------------------------------------ plans
def plan_of(*faults: Fault) -> Plan:
    return Plan.of([Armed(fault) for fault in faults])


def test_a_plan_composes_in_its_fixed_order():
    plan = plan_of(Fault(FaultKind.LATENCY, ms=10), Fault(FaultKind.HTTP_5XX),
                   Fault(FaultKind.ERROR_BYTE, code=3), Fault(FaultKind.LATENCY, ms=5),
                   Fault(FaultKind.RESET, bytes=100), Fault(FaultKind.LIMIT, bytes=100),
                   Fault(FaultKind.STALL, seconds=1), Fault(FaultKind.STALL, seconds=2),
                   Fault(FaultKind.AUTH, variant="missing"))
    assert plan.delay == pytest.approx(0.015)
    assert plan.answer is not None
    assert plan.answer.kind is FaultKind.HTTP_5XX   # the first answering fault
    assert (plan.cut, plan.reset) == (100, True)    # a tie goes to reset
    assert plan.stall == 2
    assert plan.auth_variants == ["missing"]
    assert plan.labels[:2] == ["latency 10ms", "http-5xx 503"]


def test_pacing_takes_the_slowest():
    plan = plan_of(Fault(FaultKind.BANDWIDTH, rate=1000), Fault(FaultKind.SLICER, size=100,
                                                                 delay_ms=20))
    assert plan.pace is not None
    assert (plan.pace.size, plan.pace.gap) == (100, pytest.approx(0.1))   # 100 B at 1000 B/s
    alone = plan_of(Fault(FaultKind.BANDWIDTH, rate=50_000)).pace
    assert alone is not None
    assert (alone.size, alone.gap) == (500, pytest.approx(0.01))


# ------------------------------------------------------------------------------ transforms
def authorization(encoded: bool = True) -> str:
    return Authorization.build(KEY, "products/245528", 4_000_000_000).header(encoded=encoded)


@pytest.mark.parametrize("encoded", [True, False])
@pytest.mark.parametrize("variant", AUTH_VARIANTS)
def test_every_auth_variant_fails_verification(variant, encoded):
    altered = alter_authorization(authorization(encoded), variant, now=1_800_000_000)
    if variant == "missing":
        assert altered is None
        return
    Authorization.parse(authorization(encoded)).verify(base64.b64decode(KEY), 1_800_000_000)
    with pytest.raises(AuthorizationError):
        Authorization.parse(altered).verify(base64.b64decode(KEY), 1_800_000_000)
    if variant in ("expired", "bad-sign"):   # still well-formed: only et or sign differ
        parsed, original = Authorization.parse(altered), Authorization.parse(authorization())
        assert parsed.res == original.res
        assert (parsed.et < 1_800_000_000) == (variant == "expired")
        assert (parsed.sign != original.sign) == (variant == "bad-sign")


def test_garbled_is_not_key_value_pairs():
    garbled = alter_authorization(authorization(), "garbled")
    assert garbled is not None
    assert "&" not in garbled
    assert "=" not in garbled


def test_shift_content_range_keeps_the_length():
    head = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/9000\r\n\r\n"
    assert shift_content_range(head, 3) == head.replace(b"0-4095", b"3-4098")
    assert shift_content_range(head, -3) == head   # never below 0
    assert shift_content_range(b"HTTP/1.1 200 OK\r\n\r\n", 1) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_corrupt_flips_exactly_that_many_bytes():
    body = bytes(100)
    flipped = corrupt(body, 5, random.Random(1))
    assert len(flipped) == 100
    assert sorted(set(flipped)) == [0, 0xFF]
    assert flipped.count(0xFF) == 5
    assert corrupt(body, 5, random.Random(1)) == flipped
    assert corrupt(b"ab", 5, random.Random(1)) == bytes([ord("a") ^ 0xFF, ord("b") ^ 0xFF])


@pytest.mark.parametrize(("value", "widened"), [
    (b"bytes=8192-12287", b"bytes=8192-16383"),
    (b"8192-12287", b"8192-16383"),              # the vendor C SDK's form
    (b"Bytes = 0 - 99", b"Bytes = 0 - 4195"),
    (b"bytes=8192-", b"bytes=8192-"),            # to the end already
    (b"bytes=-100", b"bytes=-100"),
    (b"bytes=0-1,5-9", b"bytes=0-1,5-9"),        # not what a device sends: left alone
])
def test_widen_range_asks_past_the_end_of_a_closed_range(value, widened):
    assert widen_range(value, 4096) == widened


def test_the_largest_oversize_wins():
    plan = Plan.of([Armed(Fault(FaultKind.OVERSIZE, bytes=10)),
                    Armed(Fault(FaultKind.OVERSIZE, bytes=4096))])
    assert plan.widen == 4096
