"""The OTA task and its state machine, written as data.

``ACCEPTS`` says, for every action a device or operator can take, which task states allow it
(``Errno.OK``) and which errno answers it in every other state. ``apply`` looks the action up and,
when allowed, moves the task to its next state. The service never decides a state question
anywhere else, so the table is the whole truth (ONENET.md, "Decisions where the documents are
silent").

    pending --token check--> downloading --101 or step 100--> upgrading --201--> succeeded
       any failure code -> failed; the operator cancels or pauses at any time; resume restores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from enum import StrEnum

from hil.errors import ProtocolError
from hil.onenet.codes import Errno, PackageKind, ResultCode, TaskState, TaskType

TOKEN_LIFETIME_S = 2 * 24 * 3600   # "token (valid 2 days)"


class Action(StrEnum):
    TOKEN_CHECK = "token check"
    DOWNLOAD = "download"
    PROGRESS = "progress"               # a step 0..100
    REPORT_DOWNLOAD = "report 1xx"      # a 1xx result, by /report or a /progress step above 100
    REPORT_UPGRADE = "report 2xx"
    CANCEL = "cancel"                   # operator actions from here on
    PAUSE = "pause"
    RESUME = "resume"


_P, _D, _U = TaskState.PENDING, TaskState.DOWNLOADING, TaskState.UPGRADING
_S, _F, _C, _Z = TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.PAUSED
E = Errno

ACCEPTS: dict[Action, dict[TaskState, Errno]] = {
    #                      pending  downloading  upgrading            succeeded           failed               cancelled             paused
    Action.TOKEN_CHECK:     {_P: E.OK, _D: E.OK, _U: E.INVALID_STATE, _S: E.TASK_FINISHED, _F: E.TASK_FINISHED, _C: E.TASK_CANCELLED, _Z: E.INVALID_STATE},
    Action.DOWNLOAD:        {_P: E.OK, _D: E.OK, _U: E.OK, _S: E.TASK_FINISHED, _F: E.TASK_FINISHED, _C: E.TASK_CANCELLED, _Z: E.INVALID_STATE},
    Action.PROGRESS:        {_P: E.INVALID_STATE, _D: E.OK, _U: E.INVALID_STATE, _S: E.INVALID_STATE, _F: E.INVALID_STATE, _C: E.INVALID_STATE, _Z: E.INVALID_STATE},
    Action.REPORT_DOWNLOAD: {_P: E.OK, _D: E.OK, _U: E.INVALID_OPERATION, _S: E.TASK_FINISHED, _F: E.TASK_FINISHED, _C: E.TASK_CANCELLED, _Z: E.INVALID_OPERATION},
    Action.REPORT_UPGRADE:  {_P: E.OK, _D: E.OK, _U: E.OK, _S: E.TASK_FINISHED, _F: E.TASK_FINISHED, _C: E.TASK_CANCELLED, _Z: E.INVALID_OPERATION},
    Action.CANCEL:          {_P: E.OK, _D: E.OK, _U: E.OK, _S: E.TASK_FINISHED, _F: E.TASK_FINISHED, _C: E.TASK_CANCELLED, _Z: E.OK},
    Action.PAUSE:           {_P: E.OK, _D: E.OK, _U: E.OK, _S: E.TASK_FINISHED, _F: E.TASK_FINISHED, _C: E.TASK_CANCELLED, _Z: E.INVALID_OPERATION},
    Action.RESUME:          {_P: E.INVALID_OPERATION, _D: E.INVALID_OPERATION, _U: E.INVALID_OPERATION, _S: E.TASK_FINISHED, _F: E.TASK_FINISHED, _C: E.TASK_CANCELLED, _Z: E.OK},
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Package:
    """An OTA package as the service serves it."""

    data: bytes = field(repr=False)
    filename: str = "package.bin"

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class Task:
    """One upgrade task of one device, with its current state. Immutable: ``apply`` returns a new one."""

    task_id: int
    dev_id: str
    type: TaskType
    target: str
    token: str
    token_expires_at: float
    package: Package | None          # None only for a delta task whose package is missing (32)
    manuf: str | None = None         # None: the task does not restrict manuf / model
    model: str | None = None
    delta_from: str | None = None    # a delta task applies only to this version (9 otherwise)
    signal: int = 0
    power: int = 0
    retry: int = 0
    interval: int = 0
    enforce_thresholds: bool = False
    state: TaskState = TaskState.PENDING
    paused_from: TaskState | None = None

    @property
    def package_kind(self) -> PackageKind:
        return PackageKind.DELTA if self.delta_from is not None else PackageKind.FULL

    def token_expired(self, now: float) -> bool:
        return now >= self.token_expires_at

    def with_state(self, state: TaskState) -> Task:
        return replace(self, state=state)


def decide(action: Action, state: TaskState) -> Errno:
    """The errno ``action`` gets in ``state`` (OK when the state allows it)."""
    return ACCEPTS[action][state]


def apply(task: Task, action: Action, result: ResultCode | None = None,
          step: int | None = None) -> Task:
    """Take ``action`` on ``task``; raise ProtocolError with the table's errno when refused."""
    errno = decide(action, task.state)
    if errno is not Errno.OK:
        raise ProtocolError(errno, f"{action} refused while the task is {task.state}")
    if action is Action.TOKEN_CHECK and task.state is TaskState.PENDING:
        return task.with_state(TaskState.DOWNLOADING)
    if action is Action.PROGRESS and step == 100:
        return task.with_state(TaskState.UPGRADING)
    if action in (Action.REPORT_DOWNLOAD, Action.REPORT_UPGRADE):
        assert result is not None, "a report action needs its result code"
        return task.with_state(result.next_state)
    if action is Action.CANCEL:
        return replace(task, state=TaskState.CANCELLED, paused_from=None)
    if action is Action.PAUSE:
        return replace(task, state=TaskState.PAUSED, paused_from=task.state)
    if action is Action.RESUME:
        return replace(task, state=task.paused_from or TaskState.PENDING, paused_from=None)
    return task


def report_action(result: ResultCode) -> Action:
    return Action.REPORT_DOWNLOAD if result.is_download_phase else Action.REPORT_UPGRADE
