"""The task state machine (ONENET.md, "Task states" and "Decisions where the documents are silent").

The expected table below is written from the document, row by row, not from hil's ``ACCEPTS``.
"""

import dataclasses

import pytest

from hil.errors import ProtocolError
from hil.onenet.codes import (
    Errno,
    ResultCode,
    TaskState,
    TaskType,
    is_valid_version,
    meets_threshold,
)
from hil.onenet.tasks import ACCEPTS, Action, Package, Task, apply, decide, report_action

STATES = ["pending", "downloading", "upgrading", "succeeded", "failed", "cancelled", "paused"]

# Rows whose errnos ONENET.md states outright (decisions section).
DOCUMENTED_ERRNOS = {
    # "Token check: ... task pending or downloading 0; upgrading or paused 17; succeeded or failed
    #  20; cancelled 22."
    Action.TOKEN_CHECK: {"pending": 0, "downloading": 0, "upgrading": 17, "succeeded": 20,
                         "failed": 20, "cancelled": 22, "paused": 17},
    # "Progress steps 0..100 only while downloading (else 17)"
    Action.PROGRESS: {"pending": 17, "downloading": 0, "upgrading": 17, "succeeded": 17,
                      "failed": 17, "cancelled": 17, "paused": 17},
    # "Reports ...: accepted while pending or downloading (1xx and 2xx) and upgrading (2xx only;
    #  a 1xx there is 21). Succeeded or failed: 20; cancelled: 22; paused: 21"
    Action.REPORT_DOWNLOAD: {"pending": 0, "downloading": 0, "upgrading": 21, "succeeded": 20,
                             "failed": 20, "cancelled": 22, "paused": 21},
    Action.REPORT_UPGRADE: {"pending": 0, "downloading": 0, "upgrading": 0, "succeeded": 20,
                            "failed": 20, "cancelled": 22, "paused": 21},
}

# Rows where the document says only which states allow the action.
DOCUMENTED_ALLOWED = {
    # "Download: allowed while pending, downloading or upgrading; otherwise the one-byte error
    #  body 3."
    Action.DOWNLOAD: {"pending", "downloading", "upgrading"},
    # "the operator may cancel or pause a task at any time" -- any task that is not over yet;
    # pausing a paused task and resuming one that is not paused make no sense.
    Action.CANCEL: {"pending", "downloading", "upgrading", "paused"},
    Action.PAUSE: {"pending", "downloading", "upgrading"},
    Action.RESUME: {"paused"},
}


def test_the_table_covers_every_action_and_state():
    assert set(ACCEPTS) == set(Action)
    for action, row in ACCEPTS.items():
        assert set(row) == set(TaskState), action
    assert set(DOCUMENTED_ERRNOS) | set(DOCUMENTED_ALLOWED) == set(Action)


@pytest.mark.parametrize(("action", "state", "errno"), [
    (action, state, errno)
    for action, row in DOCUMENTED_ERRNOS.items() for state, errno in row.items()
])
def test_documented_errno_cell(action, state, errno):
    assert decide(action, TaskState(state)) == errno
    assert ACCEPTS[action][TaskState(state)] == errno


@pytest.mark.parametrize(("action", "state", "allowed"), [
    (action, state, state in allowed)
    for action, allowed in DOCUMENTED_ALLOWED.items() for state in STATES
])
def test_documented_allowed_cell(action, state, allowed):
    assert (decide(action, TaskState(state)) == Errno.OK) is allowed


# ---------------------------------------------------------------------------------------------
# apply: the transitions

def make_task(state="pending", paused_from=None):
    return Task(task_id=1, dev_id="527776559", type=TaskType.SOTA, target="V2",
                token="ota_iF0hnXrq2CxLrP8vZ39l", token_expires_at=1e12,
                package=Package(b"\x01" * 22), state=TaskState(state),
                paused_from=None if paused_from is None else TaskState(paused_from))


def test_token_check_moves_pending_to_downloading():
    assert apply(make_task("pending"), Action.TOKEN_CHECK).state == "downloading"


def test_token_check_while_downloading_stays_downloading():
    # the vendor SDK may check the token before every chunk
    assert apply(make_task("downloading"), Action.TOKEN_CHECK).state == "downloading"


@pytest.mark.parametrize("state", ["pending", "downloading", "upgrading"])
def test_download_does_not_change_the_state(state):
    assert apply(make_task(state), Action.DOWNLOAD).state == state


@pytest.mark.parametrize(("step", "state"), [(0, "downloading"), (1, "downloading"),
                                             (50, "downloading"), (99, "downloading"),
                                             (100, "upgrading")])
def test_progress_step_100_moves_to_upgrading(step, state):
    assert apply(make_task("downloading"), Action.PROGRESS, step=step).state == state


# Every result code and where it takes a task (ONENET.md, "report result codes").
NEXT_STATE = {
    101: "upgrading", 102: "failed", 103: "failed", 104: "failed", 105: "failed", 106: "failed",
    107: "failed", 201: "succeeded", 202: "failed", 203: "failed", 204: "failed", 205: "failed",
    206: "failed", 207: "failed", 208: "failed",
}


def test_every_documented_result_code_exists():
    assert {int(code) for code in ResultCode} == set(NEXT_STATE)


@pytest.mark.parametrize(("code", "state"), NEXT_STATE.items())
def test_result_code_next_state_and_phase(code, state):
    result = ResultCode(code)
    assert result.next_state == state
    assert result.is_download_phase is (100 <= code < 200)
    assert report_action(result) is (
        Action.REPORT_DOWNLOAD if code < 200 else Action.REPORT_UPGRADE)


@pytest.mark.parametrize(("code", "state"), NEXT_STATE.items())
@pytest.mark.parametrize("before", ["pending", "downloading"])
def test_reports_while_pending_or_downloading(before, code, state):
    result = ResultCode(code)
    assert apply(make_task(before), report_action(result), result=result).state == state


@pytest.mark.parametrize(("code", "state"),
                         [(code, state) for code, state in NEXT_STATE.items() if code >= 200])
def test_2xx_reports_while_upgrading(code, state):
    result = ResultCode(code)
    assert apply(make_task("upgrading"), report_action(result), result=result).state == state


@pytest.mark.parametrize("code", [code for code in NEXT_STATE if code < 200])
def test_1xx_report_while_upgrading_is_invalid_operation(code):
    task = make_task("upgrading")
    result = ResultCode(code)
    with pytest.raises(ProtocolError) as excinfo:
        apply(task, report_action(result), result=result)
    assert excinfo.value.errno == 21
    assert task.state == "upgrading"


def test_the_happy_path_of_the_vendor_sdk():
    """token check, progress to 100, then results through /progress: 101 then 201."""
    task = apply(make_task("pending"), Action.TOKEN_CHECK)
    for step in (10, 50, 100):
        task = apply(task, Action.PROGRESS, step=step)
    assert task.state == "upgrading"
    task = apply(task, report_action(ResultCode(201)), result=ResultCode(201))
    assert task.state == "succeeded"


def test_the_happy_path_with_report():
    task = apply(make_task("pending"), Action.TOKEN_CHECK)
    task = apply(task, report_action(ResultCode(101)), result=ResultCode(101))
    assert task.state == "upgrading"
    task = apply(task, report_action(ResultCode(201)), result=ResultCode(201))
    assert task.state == "succeeded"


@pytest.mark.parametrize("state", ["pending", "downloading", "upgrading", "paused"])
def test_cancel(state):
    paused_from = "downloading" if state == "paused" else None
    task = apply(make_task(state, paused_from), Action.CANCEL)
    assert task.state == "cancelled"
    assert task.paused_from is None


@pytest.mark.parametrize("state", ["pending", "downloading", "upgrading"])
def test_pause_then_resume_restores_the_state(state):
    paused = apply(make_task(state), Action.PAUSE)
    assert paused.state == "paused"
    resumed = apply(paused, Action.RESUME)
    assert resumed.state == state
    assert resumed.paused_from is None
    assert dataclasses.replace(resumed, state=TaskState.PENDING) == make_task("pending")


@pytest.mark.parametrize(("action", "step"), [(Action.TOKEN_CHECK, None),
                                              (Action.PROGRESS, 50),
                                              (Action.DOWNLOAD, None)])
def test_a_paused_task_refuses_device_actions_until_resumed(action, step):
    paused = apply(make_task("downloading"), Action.PAUSE)
    with pytest.raises(ProtocolError):
        apply(paused, action, step=step)
    assert apply(apply(paused, Action.RESUME), action, step=step).state == "downloading"


# Every refused cell: ProtocolError with the table's errno, the task untouched.
REFUSED = [
    (action, state, errno)
    for action, row in DOCUMENTED_ERRNOS.items() for state, errno in row.items() if errno != 0
] + [
    (action, state, None)
    for action, allowed in DOCUMENTED_ALLOWED.items() for state in STATES if state not in allowed
]


@pytest.mark.parametrize(("action", "state", "errno"), REFUSED)
def test_refused_actions_raise_and_leave_the_task_unchanged(action, state, errno):
    task = make_task(state, "downloading" if state == "paused" else None)
    before = dataclasses.replace(task)
    result = {Action.REPORT_DOWNLOAD: ResultCode(101),
              Action.REPORT_UPGRADE: ResultCode(201)}.get(action)
    step = 100 if action is Action.PROGRESS else None
    with pytest.raises(ProtocolError) as excinfo:
        apply(task, action, result=result, step=step)
    assert excinfo.value.errno != 0
    if errno is not None:
        assert excinfo.value.errno == errno
    assert task == before


# ---------------------------------------------------------------------------------------------
# States, thresholds and versions


@pytest.mark.parametrize(("state", "live"), [
    # detect returns a task while pending, downloading or upgrading; a paused one is still the
    # device's task (detect answers 19 for it, not 11)
    ("pending", True), ("downloading", True), ("upgrading", True), ("paused", True),
    ("succeeded", False), ("failed", False), ("cancelled", False),
])
def test_is_live(state, live):
    assert TaskState(state).is_live is live


@pytest.mark.parametrize(("value", "threshold", "meets"), [
    # ONENET.md: "signal and power (the task runs only above these ...)"; seed 001: "Task is
    # performed under a larger signal", "at a greater power level than that". Strictly above.
    (11, 10, True),
    (10, 10, False),
    (9, 10, False),
    (1, 0, True),
    (0, 0, False),
    (-1, 0, False),
    (51, 50, True),
    (50, 50, False),
    (49, 50, False),
    (100, 50, True),
    (None, 50, True),    # signal/power are optional in detect: an unreported value cannot fail
    (None, 0, True),
])
def test_meets_threshold(value, threshold, meets):
    assert meets_threshold(value, threshold) is meets


@pytest.mark.parametrize(("version", "valid"), [
    ("V1", True),
    ("1.2", True),
    ("1.1.0", True),
    ("a", True),
    ("A-Z_a-z.0-9", True),
    ("_", True),
    ("-", True),
    (".", True),
    ("x" * 20, True),
    ("1" * 20, True),
    ("", False),
    ("x" * 21, False),
    ("1.2.3-beta+build", False),
    ("V 1", False),
    (" V1", False),
    ("V1\n", False),
    ("V1/2", False),
    ("v1,2", False),
    ("\uff11", False),          # fullwidth digit
    ("٣", False),           # Arabic-Indic digit
    ("é", False),
    ("V1\x00", False),
])
def test_is_valid_version(version, valid):
    assert is_valid_version(version) is valid
