"""The mock OneNET OTA service: tasks per device, every southbound endpoint, operator actions.

``OtaService.handle`` turns one HTTP request into one HTTP answer and one timeline exchange; it
does no I/O of its own, so it serves under ``hil.service.http`` and under tests alike. Each
endpoint handler reads as the checks of ONENET.md in their documented order; the state questions
are all answered by the table in ``hil.onenet.tasks``.
"""

from __future__ import annotations

import logging
import secrets
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from hil.errors import AuthorizationError, ConfigError, ProtocolError, ServiceCrashed
from hil.onenet.auth import Authorization, decode_access_key, redact_authorization
from hil.onenet.codes import (
    DownloadError,
    Errno,
    ErrorBodyForm,
    ResultCode,
    TaskState,
    TaskType,
    is_valid_version,
    meets_threshold,
)
from hil.onenet.messages import (
    DetectAnswer,
    DetectQuery,
    Endpoint,
    Route,
    VersionReport,
    encode_answer,
    is_valid_token,
    parse_result,
    parse_step,
    result_code,
    route,
)
from hil.onenet.ranges import resolve_range
from hil.onenet.tasks import TOKEN_LIFETIME_S, Action, Package, Task, apply, report_action
from hil.service.http import HttpRequest, HttpResponse
from hil.service.timeline import Began, Exchange, Timeline

log = logging.getLogger(__name__)

_TOKEN_ALPHABET = string.ascii_letters + string.digits
_JSON = (("Content-Type", "application/json"),)
_BODY_IN_TIMELINE = 512   # request bodies are short JSON; a longer one is cut in the record


def new_task_token() -> str:
    """A token shaped like the platform's (``ota_iF0hnXrq2CxLrP8vZ39l``)."""
    return "ota_" + "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(20))


@dataclass
class Device:
    """What the service knows of a device: its names, its own key if any, its recorded versions."""

    dev_id: str
    name: str
    key: bytes | None = field(default=None, repr=False)
    versions: dict[TaskType, str] = field(default_factory=dict)


@dataclass
class _Record:
    """What one handler learned, turned into an ``Exchange`` once the answer is decided."""

    dev_id: str | None = None
    errno: int | None = None
    answer: dict[str, Any] | None = None
    result: int | None = None
    content_range: str | None = None
    length: int | None = None
    error_byte: int | None = None
    task: Task | None = None
    reason: str | None = None


class OtaService:
    """The mock service's state and logic. Thread-safe: the server thread answers devices while a
    test's thread acts as the operator (create, cancel, pause, resume, expire the token)."""

    def __init__(self, product_id: str, access_key: str, *, timeline: Timeline | None = None,
                 clock: Callable[[], float] = time.time,
                 token_factory: Callable[[], str] = new_task_token,
                 error_body: ErrorBodyForm = ErrorBodyForm.RAW) -> None:
        self.product_id = product_id
        # How download error answers write their code: OneNET's raw byte, or the ASCII digit
        # some servers send (a test may switch it; ``reset`` restores the constructor's form).
        self.error_body = self._initial_error_body = ErrorBodyForm(error_body)
        self._key = decode_access_key(access_key)
        self.timeline = timeline if timeline is not None else Timeline()
        self.clock = clock
        self._token_factory = token_factory
        self._lock = threading.RLock()
        self._devices: dict[str, Device] = {}
        self._device_names: dict[str, str] = {}
        self._tasks: dict[int, Task] = {}
        self._latest: dict[tuple[str, TaskType], int] = {}
        self._by_token: dict[str, int] = {}
        self._crashes: list[BaseException] = []

    def __repr__(self) -> str:   # never the key
        return f"OtaService(product_id={self.product_id!r}, devices={len(self._devices)})"

    # ---------------------------------------------------------------- operator actions
    def add_device(self, dev_id: str, *, name: str | None = None, access_key: str | None = None,
                   version: str | None = None, task_type: TaskType = TaskType.SOTA) -> Device:
        """Register a device (idempotent). ``access_key`` is its own device key, if it has one."""
        with self._lock:
            device = self._devices.get(dev_id)
            if device is None:
                device = Device(dev_id, name or dev_id,
                                decode_access_key(access_key) if access_key else None)
                if device.name in self._device_names:
                    raise ConfigError(f"device {dev_id}", f"name {device.name!r} is taken")
                self._devices[dev_id] = device
                self._device_names[device.name] = dev_id
            if version is not None:
                self.set_device_version(dev_id, version, task_type)
            return device

    def create_task(self, dev_id: str, target: str, package: Package | bytes | None, *,
                    task_type: TaskType = TaskType.SOTA, manuf: str | None = None,
                    model: str | None = None, delta_from: str | None = None, signal: int = 0,
                    power: int = 0, retry: int = 0, interval: int = 0,
                    enforce_thresholds: bool = False, token: str | None = None,
                    token_lifetime: float = TOKEN_LIFETIME_S) -> Task:
        """A new pending task for ``dev_id`` (registered on the fly). One live task per type."""
        if not is_valid_version(target):
            raise ConfigError(f"task of {dev_id}", f"target version {target!r} is not valid")
        if isinstance(package, bytes):
            package = Package(package)
        if package is None and delta_from is None:
            raise ConfigError(f"task of {dev_id}", "a full-package task needs its package")
        if package is not None and package.size == 0:
            raise ConfigError(f"task of {dev_id}", "the package is empty")
        if token is not None and not is_valid_token(token):
            raise ConfigError(f"task of {dev_id}", f"token {token!r} cannot be in a request "
                              "path: 1..64 of [A-Za-z0-9_-.]")
        with self._lock:
            self.add_device(dev_id)
            current = self._live_task(dev_id, task_type)
            if current is not None:
                raise ConfigError(f"task of {dev_id}", f"task {current.task_id} "
                                  f"({task_type.name}) is still {current.state}")
            task = Task(
                task_id=len(self._tasks) + 1, dev_id=dev_id, type=task_type, target=target,
                token=token or self._token_factory(),
                token_expires_at=self.clock() + token_lifetime, package=package, manuf=manuf,
                model=model, delta_from=delta_from, signal=signal, power=power, retry=retry,
                interval=interval, enforce_thresholds=enforce_thresholds)
            if task.token in self._by_token:
                raise ConfigError(f"task of {dev_id}", f"token {task.token} is already in use")
            self._store(task)
            self._by_token[task.token] = task.task_id
            return task

    def task(self, dev_id: str, task_type: TaskType = TaskType.SOTA) -> Task:
        """The newest task of ``dev_id`` of that type, whatever its state."""
        with self._lock:
            task_id = self._latest.get((dev_id, task_type))
            if task_id is None:
                raise KeyError(f"device {dev_id} has no {task_type.name} task")
            return self._tasks[task_id]

    def cancel(self, dev_id: str, task_type: TaskType = TaskType.SOTA) -> Task:
        return self._operate(dev_id, task_type, Action.CANCEL)

    def pause(self, dev_id: str, task_type: TaskType = TaskType.SOTA) -> Task:
        return self._operate(dev_id, task_type, Action.PAUSE)

    def resume(self, dev_id: str, task_type: TaskType = TaskType.SOTA) -> Task:
        return self._operate(dev_id, task_type, Action.RESUME)

    def expire_token(self, dev_id: str, task_type: TaskType = TaskType.SOTA) -> Task:
        """Make the task's token expired now (token check answers 12, downloads the byte 3)."""
        with self._lock:
            return self._store(replace(self.task(dev_id, task_type),
                                       token_expires_at=self.clock()))

    def set_device_version(self, dev_id: str, version: str,
                           task_type: TaskType = TaskType.SOTA) -> None:
        with self._lock:
            self.add_device(dev_id).versions[task_type] = version

    def device_version(self, dev_id: str, task_type: TaskType = TaskType.SOTA) -> str | None:
        with self._lock:
            return self._devices[dev_id].versions.get(task_type)

    def reset(self) -> None:
        """Forget every device and task, clear the timeline and go back to the error body form
        the service was made with (between tests)."""
        with self._lock:
            self._devices.clear()
            self._device_names.clear()
            self._tasks.clear()
            self._latest.clear()
            self._by_token.clear()
            self._crashes.clear()
            self.error_body = self._initial_error_body
            self.timeline.clear()

    def raise_crashes(self) -> None:
        """Re-raise, on the caller's thread, a handler crash of the server thread."""
        with self._lock:
            crashes, self._crashes = self._crashes, []
        if crashes:
            raise ServiceCrashed(f"{len(crashes)} request(s) crashed the mock service; "
                                 f"first: {crashes[0]!r}") from crashes[0]

    # ---------------------------------------------------------------- HTTP
    def handle(self, request: HttpRequest) -> HttpResponse:
        started = Began.now(self.clock)
        target = route(request.path)
        record = _Record()
        with self._lock:
            try:
                response = self._dispatch(request, target, record)
            except Exception as crash:   # a bug here must not cost the device its answer
                log.exception("mock service crashed on %s %s", request.method, request.target)
                self._crashes.append(crash)
                record.errno, record.reason = Errno.INTERNAL, repr(crash)
                response = self._json(record, Errno.INTERNAL)
            self.timeline.record(self._exchange(request, target, record, response, started))
        return response

    def _dispatch(self, request: HttpRequest, target: Route, record: _Record) -> HttpResponse:
        if target.endpoint is Endpoint.UNKNOWN:
            record.reason = "no such endpoint"
            return self._json(record, Errno.BAD_REQUEST, status=404)
        if request.method != target.method:
            record.reason = f"{target.endpoint} takes {target.method}"
            return self._json(record, Errno.BAD_REQUEST, status=405)
        if target.endpoint is Endpoint.DOWNLOAD:
            return self._download(request, target.token or "", record)
        handler = {
            Endpoint.DETECT: self._detect,
            Endpoint.TOKEN_CHECK: self._token_check,
            Endpoint.PROGRESS: self._progress,
            Endpoint.REPORT: self._report,
            Endpoint.VERSION: self._version,
        }[target.endpoint]
        try:
            data = handler(request, target, record)
        except ProtocolError as refused:
            record.reason = refused.reason
            return self._json(record, Errno(refused.errno))
        return self._json(record, Errno.OK, data)

    # Each endpoint: the checks in ONENET.md's order; a ProtocolError carries the errno.
    def _detect(self, request: HttpRequest, _: Route, record: _Record) -> dict[str, Any]:
        self._authorize(request, request.query.get("dev_id"))
        query = DetectQuery.parse(request.query)
        device = self._known_device(query.dev_id, record)
        device.versions[query.type] = query.version   # the device's current version, always
        task = self._live_task(device.dev_id, query.type)
        if task is None:
            raise ProtocolError(Errno.NO_TASK, f"no live {query.type.name} task")
        record.task = task
        if (query.manuf and task.manuf and query.manuf != task.manuf) or \
                (query.model and task.model and query.model != task.model):
            record.task = self._store(task.with_state(TaskState.FAILED))
            raise ProtocolError(Errno.MANUF_MODEL_MISMATCH, "manuf or model differ from the task")
        if task.delta_from is not None and query.version != task.delta_from:
            record.task = self._store(task.with_state(TaskState.FAILED))
            raise ProtocolError(Errno.VERSION_MISMATCH,
                                f"the delta applies to {task.delta_from}, not {query.version}")
        if task.package is None:
            raise ProtocolError(Errno.NO_DELTA_PACKAGE, "the task has no delta package")
        if task.state is TaskState.PAUSED:
            raise ProtocolError(Errno.TASK_SUSPENDED, "the task is paused")
        if task.enforce_thresholds and not (meets_threshold(query.signal, task.signal)
                                            and meets_threshold(query.power, task.power)):
            raise ProtocolError(Errno.BELOW_THRESHOLD, "signal or power below the threshold")
        ip, port = (None, None) if query.cdn else request.local
        return DetectAnswer(
            task.target, task.token, task.package.size, task.package.md5, task.signal,
            task.power, task.retry, task.interval, task.package_kind, ip, port).to_data()

    def _token_check(self, request: HttpRequest, target: Route, record: _Record) -> None:
        dev_id = request.query.get("dev_id")
        self._authorize(request, dev_id)
        task = self._by_token_of(target.token, dev_id, Errno.TOKEN_DEVICE_MISMATCH, record)
        if task.token_expired(self.clock()):
            raise ProtocolError(Errno.TOKEN_EXPIRED, "the token has expired")
        record.task = self._store(apply(task, Action.TOKEN_CHECK))

    def _progress(self, request: HttpRequest, target: Route, record: _Record) -> None:
        dev_id = request.query.get("dev_id")
        self._authorize(request, dev_id)
        task = self._by_token_of(target.token, dev_id, Errno.AUTH_FAILED, record)
        record.result = step = parse_step(request.body)
        if step <= 100:
            record.task = self._store(apply(task, Action.PROGRESS, step=step))
        else:   # the vendor C SDK reports its results as steps 101, 201, ...
            self._accept_result(task, result_code(step), record)

    def _report(self, request: HttpRequest, _: Route, record: _Record) -> None:
        dev_id = request.query.get("dev_id")
        self._authorize(request, dev_id)
        task = self._by_token_of(request.query.get("token"), dev_id, Errno.AUTH_FAILED, record)
        result = parse_result(request.body)
        record.result = int(result)
        self._accept_result(task, result, record)

    def _version(self, request: HttpRequest, _: Route, record: _Record) -> None:
        dev_id = request.query.get("dev_id")
        self._authorize(request, dev_id)
        if not dev_id:
            raise ProtocolError(Errno.BAD_REQUEST, "query parameter dev_id is missing")
        device = self._known_device(dev_id, record)
        report = VersionReport.parse(request.body)
        for task_type in TaskType:
            version = report.of(task_type)
            if version is None:
                continue
            device.versions[task_type] = version
            task = self._live_task(dev_id, task_type)
            if task is not None and task.target == version:
                record.task = self._store(task.with_state(TaskState.SUCCEEDED))

    def _download(self, request: HttpRequest, token: str, record: _Record) -> HttpResponse:
        task_id = self._by_token.get(token)
        task = self._tasks[task_id] if task_id is not None else None
        if task is not None:
            record.dev_id, record.task = task.dev_id, task
        try:
            self._authorize(request, task.dev_id if task else None)
            if task is None:
                raise ProtocolError(Errno.TOKEN_DEVICE_MISMATCH, "unknown token")
            if task.token_expired(self.clock()):
                raise ProtocolError(Errno.TOKEN_EXPIRED, "the token has expired")
            apply(task, Action.DOWNLOAD)   # raises unless the state allows downloads
        except ProtocolError as refused:
            record.reason = refused.reason
            return self._error_byte(record, DownloadError.INVALID_TOKEN)
        if task.package is None:
            record.reason = "the task has no package"
            return self._error_byte(record, DownloadError.NOT_FOUND)
        package = task.package
        headers = [("Content-Type", "application/octet-stream")]
        wanted = resolve_range(request.header("range"), package.size)
        if wanted is None:
            status, body = 200, package.data
        else:
            status, body = 206, wanted.slice(package.data)
            headers.append(("Content-Range", wanted.content_range))
            record.content_range = wanted.content_range
        headers.append(("Content-Disposition", f'attachment; filename="{package.filename}"'))
        record.length = len(body)
        return HttpResponse(status, body, tuple(headers))

    # ---------------------------------------------------------------- helpers
    def _authorize(self, request: HttpRequest, dev_id: str | None) -> Authorization:
        auth = Authorization.parse(request.header("authorization"))
        if auth.product_id != self.product_id:
            raise AuthorizationError("res names another product")
        key = self._key
        if auth.device_name is not None:
            owner = self._devices.get(self._device_names.get(auth.device_name, ""))
            if owner is None:
                raise AuthorizationError("res names an unknown device")
            if dev_id is not None and owner.dev_id != dev_id:
                raise AuthorizationError("res names another device")
            # A device with a key of its own signs with it; otherwise the product key serves.
            key = owner.key or self._key
        auth.verify(key, self.clock())
        return auth

    def _known_device(self, dev_id: str, record: _Record) -> Device:
        device = self._devices.get(dev_id)
        if device is None:
            raise ProtocolError(Errno.AUTH_FAILED, "unknown device")
        record.dev_id = dev_id
        return device

    def _by_token_of(self, token: str | None, dev_id: str | None, mismatch: Errno,
                     record: _Record) -> Task:
        task_id = self._by_token.get(token or "")
        if dev_id in self._devices:
            record.dev_id = dev_id
        if task_id is None or not dev_id or self._tasks[task_id].dev_id != dev_id:
            raise ProtocolError(mismatch, "the token is not this device's")
        record.task = self._tasks[task_id]
        return record.task

    def _accept_result(self, task: Task, result: ResultCode, record: _Record) -> None:
        record.task = self._store(apply(task, report_action(result), result=result))
        if result is ResultCode.UPGRADED:
            self._devices[task.dev_id].versions[task.type] = task.target

    def _live_task(self, dev_id: str, task_type: TaskType) -> Task | None:
        task_id = self._latest.get((dev_id, task_type))
        task = self._tasks.get(task_id) if task_id is not None else None
        return task if task is not None and task.state.is_live else None

    def _store(self, task: Task) -> Task:
        self._tasks[task.task_id] = task
        self._latest[(task.dev_id, task.type)] = task.task_id
        return task

    def _operate(self, dev_id: str, task_type: TaskType, action: Action) -> Task:
        with self._lock:
            return self._store(apply(self.task(dev_id, task_type), action))

    @staticmethod
    def _json(record: _Record, errno: Errno, data: dict[str, Any] | None = None,
              status: int = 200) -> HttpResponse:
        record.errno = int(errno)
        record.answer = {"errno": int(errno), "error": errno.text}
        if data is not None:
            record.answer["data"] = data
        return HttpResponse(status, encode_answer(errno, data), _JSON)

    def _error_byte(self, record: _Record, error: DownloadError) -> HttpResponse:
        record.error_byte = int(error)
        return HttpResponse(200, error.body_in(self.error_body), close_delimited=True)

    def _exchange(self, request: HttpRequest, target: Route, record: _Record,
                  response: HttpResponse, started: Began) -> Exchange:
        headers = dict(request.headers)
        if "authorization" in headers:
            headers["authorization"] = redact_authorization(headers["authorization"])
        task = record.task
        at, duration_ms = started.span()
        return Exchange(
            seq=self.timeline.next_seq(), at=at, dev_id=record.dev_id,
            phase=target.endpoint, method=request.method, target=request.target,
            request_headers=headers,
            request_body=request.body[:_BODY_IN_TIMELINE].decode("utf-8", "replace"),
            status=response.status, errno=record.errno, answer=record.answer,
            result=record.result, range=request.header("range"),
            content_range=record.content_range, length=record.length,
            error_byte=record.error_byte, task_id=task.task_id if task else None,
            task_state=task.state.value if task else None, reason=record.reason,
            duration_ms=duration_ms)
