"""The device side of a OneNET OTA update over HTTP (requests), as a well-behaved device does it.

This is the seed of the simulated boards' firmware agent: one whole attempt (version report,
detect, token check, ranged download in chunks with every answer checked, md5, 101, install,
reboot, 201 or 204), narrating it as console-contract events (``ota phase=... key=value``,
``boot version=V``, ``ota end``; ../shared/DESIGN.md). Retries, thresholds, persistence across
reboots and named defects belong to the simulated board that will drive it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from hil.onenet.codes import Errno, ResultCode, TaskType
from hil.onenet.messages import DetectAnswer

# Token check answers after which a device ends the attempt without a report (ONENET.md).
_END_WITHOUT_REPORT = {Errno.TOKEN_EXPIRED, Errno.TASK_FINISHED, Errno.TASK_CANCELLED}


@dataclass
class Attempt:
    """What one attempt did: its console events, the codes it reported, the version it runs."""

    events: list[str] = field(default_factory=list)
    reported: list[int] = field(default_factory=list)
    version: str = ""


class OtaAgent:
    def __init__(self, base_url: str, dev_id: str, version: str,
                 authorization: Callable[[], str], *, manuf: str | None = None,
                 model: str | None = None, task_type: TaskType = TaskType.SOTA,
                 chunk_size: int = 4096, timeout: float = 10.0,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.dev_id = dev_id
        self.version = version
        self._authorization = authorization
        self.manuf, self.model, self.task_type = manuf, model, task_type
        self.chunk_size = chunk_size
        self.timeout = timeout
        self._on_event = on_event

    def run_once(self) -> Attempt:
        attempt = Attempt(version=self.version)
        with requests.Session() as http:
            self._attempt(http, attempt)
        self._emit(attempt, "ota end")
        return attempt

    # ---------------------------------------------------------------------------------------
    def _attempt(self, http: requests.Session, attempt: Attempt) -> None:
        version_key = "s_version" if self.task_type is TaskType.SOTA else "f_version"
        self._call(http, "POST", f"/ota/device/version?dev_id={self.dev_id}",
                   json={version_key: self.version})
        query = {"dev_id": self.dev_id, "type": int(self.task_type), "version": self.version,
                 "cdn": "true"}
        if self.manuf and self.model:
            query |= {"manuf": self.manuf, "model": self.model}
        detect = self._call(http, "GET", "/ota/south/check", params=query)
        if detect["errno"] != Errno.OK:
            self._emit(attempt, f"ota phase=detect errno={detect['errno']}")
            return
        task = DetectAnswer.from_data(detect.get("data"))
        self._emit(attempt, f"ota phase=detect errno=0 target={task.target} size={task.size}")
        token, size = task.token, task.size
        check = self._call(http, "GET", f"/ota/south/download/{token}/check?dev_id={self.dev_id}")
        self._emit(attempt, f"ota phase=token errno={check['errno']}")
        if check["errno"] in _END_WITHOUT_REPORT:
            return
        if check["errno"] != Errno.OK:
            self._report(http, attempt, token, ResultCode.DOWNLOAD_UNKNOWN)
            return
        package = self._download(http, attempt, token, size)
        if package is None:
            self._report(http, attempt, token, ResultCode.DOWNLOAD_UNKNOWN)
            return
        md5_ok = hashlib.md5(package, usedforsecurity=False).hexdigest() == task.md5
        self._emit(attempt, f"ota phase=verify md5={'ok' if md5_ok else 'bad'}")
        if not md5_ok:
            self._report(http, attempt, token, ResultCode.UPGRADE_MD5_MISMATCH)
            return
        self._report(http, attempt, token, ResultCode.DOWNLOADED)
        self._emit(attempt, f"ota phase=flash bytes={len(package)}")
        attempt.version = task.target   # installed into the inactive slot and booted
        self._emit(attempt, f"boot version={attempt.version}")
        booted_target = attempt.version == task.target
        self._report(http, attempt, token, ResultCode.UPGRADED if booted_target
                     else ResultCode.UPGRADE_VERSION_MISMATCH)

    def _download(self, http: requests.Session, attempt: Attempt, token: str,
                  size: int) -> bytes | None:
        """The package in ``chunk_size`` ranges; None as soon as one answer is not right."""
        received = bytearray()
        while len(received) < size:
            start = len(received)
            end = min(start + self.chunk_size, size) - 1
            answer = http.get(f"{self.base_url}/ota/south/download/{token}",
                              headers={"Authorization": self._authorization(),
                                       "Range": f"bytes={start}-{end}"}, timeout=self.timeout)
            self._emit(attempt, f"ota phase=download offset={start} status={answer.status_code}")
            # A one-byte body without Content-Length is OneNET's error answer, not package bytes.
            if (answer.status_code != 206 or "Content-Length" not in answer.headers
                    or answer.headers.get("Content-Range") != f"bytes {start}-{end}/{size}"
                    or len(answer.content) != end - start + 1):
                return None
            received += answer.content
        return bytes(received)

    def _report(self, http: requests.Session, attempt: Attempt, token: str,
                result: ResultCode) -> None:
        answer = self._call(http, "POST", f"/ota/south/report?dev_id={self.dev_id}&token={token}",
                            json={"result": int(result)})
        attempt.reported.append(int(result))
        self._emit(attempt, f"ota phase=report result={int(result)} errno={answer['errno']}")

    def _call(self, http: requests.Session, method: str, path: str,
              **kwargs: Any) -> dict[str, Any]:
        answer = http.request(method, self.base_url + path, timeout=self.timeout,
                              headers={"Authorization": self._authorization()}, **kwargs)
        body: dict[str, Any] = answer.json()
        return body

    def _emit(self, attempt: Attempt, line: str) -> None:
        attempt.events.append(line)
        if self._on_event is not None:
            self._on_event(line)
