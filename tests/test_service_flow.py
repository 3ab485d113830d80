"""Whole OTA updates against the mock service over real HTTP, asserted on the service's timeline.

Two device styles from ONENET.md: the documented one (``Range: bytes=a-b``, results by /report)
and the vendor C SDK's (no manuf/model at detect, ``Range: a-b``, a token check before every
chunk, results as /progress steps 101 and 201). Then a device that reboots mid-update, and the
timeline's JSON-lines file.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from hil.onenet.codes import TaskState, TaskType
from hil.service.server import MockOneNet

TIMEOUT = 5
CHUNK = 4096
DEV = "527776559"
MANUF, MODEL = "102", "10201"   # nRF52832 in the chip table
BASE, TARGET = "1.0.0", "1.1.0"


def package_of(size: int, seed: str = "pkg") -> bytes:
    """Non-repeating bytes: a chunk served from the wrong offset changes the md5."""
    blocks = (hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


class Device:
    """A device's HTTP side, one method per OneNET call; every answer checked as it arrives."""

    def __init__(self, onenet: MockOneNet, dev_id: str = DEV,
                 authorization: Callable[[], str] | None = None) -> None:
        self.url = onenet.url
        self.dev_id = dev_id
        self._authorization = authorization or onenet.authorization
        self.http = requests.Session()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None,
              **params: Any) -> dict[str, Any]:
        response = self.http.request(
            method, self.url + path, params={"dev_id": self.dev_id, **params},
            data=None if body is None else json.dumps(body),
            headers={"Authorization": self._authorization(),
                     "Content-Type": "application/json"}, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert isinstance(answer["errno"], int)
        return answer

    def post_version(self, **versions: str) -> int:
        return self._json("POST", "/ota/device/version", versions)["errno"]

    def detect(self, version: str, *, manuf: str | None = MANUF, model: str | None = MODEL,
               task_type: TaskType = TaskType.SOTA) -> dict[str, Any]:
        params: dict[str, Any] = {"type": int(task_type), "version": version, "cdn": "false"}
        if manuf is not None:
            params["manuf"] = manuf
        if model is not None:
            params["model"] = model
        return self._json("GET", "/ota/south/check", **params)

    def check_token(self, token: str) -> int:
        return self._json("GET", f"/ota/south/download/{token}/check")["errno"]

    def chunk(self, token: str, start: int, size: int, *, prefix: str = "bytes=") -> bytes:
        """One ranged GET; checks the 206 and the Content-Range a careful device checks."""
        end = start + CHUNK - 1
        response = self.http.get(f"{self.url}/ota/south/download/{token}",
                                 headers={"Authorization": self._authorization(),
                                          "Range": f"{prefix}{start}-{end}"}, timeout=TIMEOUT)
        assert response.status_code == 206
        last = min(end, size - 1)
        assert response.headers["Content-Range"] == f"bytes {start}-{last}/{size}"
        assert int(response.headers["Content-Length"]) == last - start + 1 == len(response.content)
        return response.content

    def download(self, token: str, size: int, *, start: int = 0, prefix: str = "bytes=",
                 check_every_chunk: bool = False) -> bytes:
        data = bytearray()
        for offset in range(start, size, CHUNK):
            if check_every_chunk:
                assert self.check_token(token) == 0
            data += self.chunk(token, offset, size, prefix=prefix)
        return bytes(data)

    def report(self, token: str, result: int) -> int:
        return self._json("POST", "/ota/south/report", {"result": result}, token=token)["errno"]

    def progress(self, token: str, step: int) -> int:
        return self._json("POST", f"/ota/south/device/download/{token}/progress",
                          {"step": step})["errno"]


@pytest.fixture
def device(mock_onenet):
    client = Device(mock_onenet)
    yield client
    client.close()


def phases(onenet: MockOneNet, dev_id: str = DEV) -> list[str]:
    return [str(e.phase) for e in onenet.timeline.exchanges(dev_id)]


# ------------------------------------------------------------------------------- whole flows
def test_documented_flow_from_version_report_to_no_task(mock_onenet, device):
    package = package_of(64 * 1024)
    task = mock_onenet.service.create_task(DEV, TARGET, package, manuf=MANUF, model=MODEL)

    assert device.post_version(f_version="M5310_V1", s_version=BASE) == 0
    found = device.detect(BASE)
    assert found["errno"] == 0
    data = found["data"]
    assert (data["target"], data["token"], data["size"]) == (TARGET, task.token, len(package))
    assert device.check_token(data["token"]) == 0
    received = device.download(data["token"], data["size"])
    assert hashlib.md5(received).hexdigest() == data["md5"]
    assert received == package
    assert device.report(data["token"], 101) == 0
    assert device.report(data["token"], 201) == 0
    assert device.detect(TARGET)["errno"] == 11

    chunks = len(package) // CHUNK
    assert phases(mock_onenet) == (["version", "detect", "token"] + ["download"] * chunks
                                   + ["report", "report", "detect"])
    assert mock_onenet.timeline.reported_codes(DEV) == [101, 201]
    exchanges = mock_onenet.timeline.exchanges(DEV)
    assert [e.task_state for e in exchanges] == (
        [None, "pending", "downloading"] + ["downloading"] * chunks
        + ["upgrading", "succeeded", None])
    assert [e.errno for e in exchanges if e.phase != "download"] == [0, 0, 0, 0, 0, 11]
    downloads = [e for e in exchanges if e.phase == "download"]
    assert [e.content_range for e in downloads] == [
        f"bytes {i * CHUNK}-{i * CHUNK + CHUNK - 1}/{len(package)}" for i in range(chunks)]
    assert all(e.status == 206 and e.length == CHUNK for e in downloads)
    assert mock_onenet.service.task(DEV).state is TaskState.SUCCEEDED
    assert mock_onenet.service.device_version(DEV) == TARGET
    assert mock_onenet.service.device_version(DEV, TaskType.FOTA) == "M5310_V1"


@pytest.mark.parametrize("size", [64 * 1024, 50_000], ids=["64KiB", "50000-clamped-tail"])
def test_vendor_sdk_flow(mock_onenet, device, size):
    package = package_of(size, seed="sdk")
    task = mock_onenet.service.create_task(DEV, TARGET, package, manuf=MANUF, model=MODEL)

    found = device.detect(BASE, manuf=None, model=None)   # the SDK sends neither
    assert found["errno"] == 0
    token = found["data"]["token"]
    assert token == task.token
    received = device.download(token, size, prefix="", check_every_chunk=True)
    assert hashlib.md5(received).hexdigest() == found["data"]["md5"]
    assert device.progress(token, 101) == 0
    assert mock_onenet.service.task(DEV).state is TaskState.UPGRADING
    assert device.progress(token, 201) == 0
    assert device.detect(TARGET, manuf=None, model=None)["errno"] == 11

    chunks = -(-size // CHUNK)
    assert phases(mock_onenet) == (["detect"] + ["token", "download"] * chunks
                                   + ["progress", "progress", "detect"])
    assert mock_onenet.timeline.reported_codes(DEV) == [101, 201]
    downloads = mock_onenet.timeline.exchanges(DEV, "download")
    assert [e.range for e in downloads] == [f"{i * CHUNK}-{i * CHUNK + CHUNK - 1}"
                                            for i in range(chunks)]
    assert downloads[-1].content_range == f"bytes {(chunks - 1) * CHUNK}-{size - 1}/{size}"
    assert downloads[-1].length == size - (chunks - 1) * CHUNK
    assert mock_onenet.service.task(DEV).state is TaskState.SUCCEEDED
    assert mock_onenet.service.device_version(DEV) == TARGET


def test_whole_file_download_in_one_request(mock_onenet, device):
    package = package_of(64 * 1024, seed="whole")
    task = mock_onenet.service.create_task(DEV, TARGET, package)
    assert device.check_token(task.token) == 0
    response = device.http.get(f"{mock_onenet.url}/ota/south/download/{task.token}",
                               headers={"Authorization": mock_onenet.authorization()},
                               timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.content == package
    assert "Content-Range" not in response.headers


def test_a_failed_download_is_reported_and_ends_the_task(mock_onenet, device):
    task = mock_onenet.service.create_task(DEV, TARGET, package_of(10_000))
    assert device.check_token(task.token) == 0
    device.chunk(task.token, 0, 10_000)
    assert device.report(task.token, 106) == 0   # bad signal
    assert device.detect(BASE)["errno"] == 11
    assert mock_onenet.timeline.reported_codes(DEV) == [106]
    assert mock_onenet.service.task(DEV).state is TaskState.FAILED
    assert mock_onenet.service.device_version(DEV) == BASE


# ------------------------------------------------------------------------------ reboots
def test_rebooted_device_gets_the_same_token_and_resumes(mock_onenet, device):
    package = package_of(64 * 1024, seed="reboot")
    mock_onenet.service.create_task(DEV, TARGET, package, manuf=MANUF, model=MODEL)
    first = device.detect(BASE)["data"]
    assert device.check_token(first["token"]) == 0
    partial = device.chunk(first["token"], 0, len(package)) + \
        device.chunk(first["token"], CHUNK, len(package))

    device.close()   # power cycle: the device forgets its connection and its token
    with Device(mock_onenet) as rebooted:
        again = rebooted.detect(BASE)
        assert again["errno"] == 0
        assert again["data"] == first
        assert mock_onenet.service.task(DEV).state is TaskState.DOWNLOADING
        assert rebooted.check_token(again["data"]["token"]) == 0
        rest = rebooted.download(again["data"]["token"], len(package), start=2 * CHUNK)
        assert partial + rest == package
        assert rebooted.report(again["data"]["token"], 101) == 0

    with Device(mock_onenet) as after_install:   # rebooted again while installing
        found = after_install.detect(BASE)
        assert found["errno"] == 0
        assert found["data"]["token"] == first["token"]
        assert mock_onenet.service.task(DEV).state is TaskState.UPGRADING
        assert after_install.report(first["token"], 201) == 0
    assert mock_onenet.timeline.reported_codes(DEV) == [101, 201]
    assert mock_onenet.service.task(DEV).state is TaskState.SUCCEEDED


# ------------------------------------------------------------------------- timeline file
ACCESS_KEY = base64.b64encode(hashlib.sha256(b"flow-test-key").digest()).decode()


def test_timeline_file_has_one_line_per_exchange_as_it_happens_and_no_secrets(tmp_path: Path):
    path = tmp_path / "run" / "timeline.jsonl"
    signs: list[str] = []

    with MockOneNet(access_key=ACCESS_KEY, timeline_path=path) as onenet:
        def authorization(encoded: bool = True) -> str:
            value = onenet.authorization(encoded=encoded)
            signs.append(value.rsplit("&sign=", 1)[1])
            return value

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

        package = package_of(3 * CHUNK, seed="timeline")
        task = onenet.service.create_task(DEV, TARGET, package)
        def forged() -> str:
            value = authorization()[:-7] + "AAAA%3D"   # the sign's tail replaced
            signs.append(value.rsplit("&sign=", 1)[1])
            return value

        with Device(onenet, authorization=authorization) as device, \
                Device(onenet, authorization=lambda: authorization(encoded=False)) as raw, \
                Device(onenet, authorization=forged) as forger:
            steps: list[Callable[[], object]] = [
                lambda: device.post_version(s_version=BASE),
                lambda: forger.detect(BASE),
                lambda: raw.detect(BASE),
                lambda: device.check_token(task.token),
                *[lambda start=start: device.chunk(task.token, start, len(package))
                  for start in range(0, len(package), CHUNK)],
                lambda: device.report(task.token, 101),
                lambda: raw.progress(task.token, 201),
            ]
            for count, step in enumerate(steps, start=1):
                step()
                written = lines()   # read while the server runs: each line is there at once
                assert len(written) == count == len(onenet.timeline)
        text = path.read_text(encoding="utf-8")
        onenet.service.raise_crashes()

    written = [json.loads(line) for line in text.splitlines()]
    assert [line["seq"] for line in written] == list(range(1, len(steps) + 1))
    assert [line["phase"] for line in written] == (
        ["version", "detect", "detect", "token"] + ["download"] * 3 + ["report", "progress"])
    assert [line.get("errno") for line in written] == [0, 1, 0, 0, None, None, None, 0, 0]
    assert [line.get("result") for line in written][-2:] == [101, 201]
    assert all(line["dev_id"] == DEV for line in written if line["phase"] != "detect")
    # No secret on disk: neither the access key nor any signature sent, in any spelling.
    for secret in {ACCESS_KEY, quote(ACCESS_KEY, safe=""), *signs}:
        assert secret not in text
    for sign in signs:
        assert quote(sign, safe="") not in text
    auth_values = [line["request_headers"]["authorization"] for line in written]
    assert all("sign=" not in value or value.endswith("sign=<redacted>")
               for value in auth_values)
