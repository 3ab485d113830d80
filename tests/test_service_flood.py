"""Fifty devices updating at once against one mock service, each with its own task and package.

What can go wrong under load is crosstalk: a chunk of one device's package served to another, a
report applied to the wrong task, an exchange recorded against the wrong device. Each device runs
the whole flow on its own thread; half keep one connection (requests.Session), half open a new
one per request like embedded clients.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from hil.onenet.codes import TaskState
from hil.service.server import MockOneNet

DEVICES = 50
CHUNK = 4096
TIMEOUT = 10
RUN_LIMIT_S = 60
BASE, TARGET = "1.0.0", "2.0.0"


def package_of(dev_id: str) -> bytes:
    """Distinct bytes per device, of a size that differs too (the tail chunk is clamped)."""
    size = 5 * CHUNK + 97 * int(dev_id[-2:])
    blocks = (hashlib.sha256(f"{dev_id}:{i}".encode()).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


@dataclass
class Outcome:
    dev_id: str
    received: bytes
    md5_ok: bool
    errnos: list[int]


def run_device(onenet: MockOneNet, dev_id: str, keep_alive: bool,
               start: threading.Barrier) -> Outcome:
    """One device's whole update: version, detect, token, chunks, md5, 101, 201, detect again."""
    session = requests.Session()
    errnos: list[int] = []

    def call(method: str, path: str, *, json: Any = None, **params: Any) -> dict[str, Any]:
        client = session if keep_alive else requests
        response = client.request(method, onenet.url + path, params={"dev_id": dev_id, **params},
                                  json=json, headers=_headers(onenet), timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        answer = response.json()
        errnos.append(answer["errno"])
        return answer

    try:
        start.wait(timeout=TIMEOUT)
        call("POST", "/ota/device/version", json={"s_version": BASE})
        data = call("GET", "/ota/south/check", type=2, version=BASE, cdn="false")["data"]
        token, size = data["token"], data["size"]
        call("GET", f"/ota/south/download/{token}/check")
        received = bytearray()
        for offset in range(0, size, CHUNK):
            client = session if keep_alive else requests
            response = client.get(f"{onenet.url}/ota/south/download/{token}",
                                  headers={**_headers(onenet),
                                           "Range": f"bytes={offset}-{offset + CHUNK - 1}"},
                                  timeout=TIMEOUT)
            assert response.status_code == 206
            received += response.content
        md5_ok = hashlib.md5(received).hexdigest() == data["md5"]
        call("POST", "/ota/south/report", json={"result": 101}, token=token)
        call("POST", "/ota/south/report", json={"result": 201}, token=token)
        call("GET", "/ota/south/check", type=2, version=TARGET, cdn="false")
        return Outcome(dev_id, bytes(received), md5_ok, errnos)
    finally:
        session.close()


def _headers(onenet: MockOneNet) -> dict[str, str]:
    return {"Authorization": onenet.authorization(), "Host": "ota.heclouds.com"}


def test_fifty_devices_update_at_once_without_crosstalk(mock_onenet):
    dev_ids = [f"5277765{n:02d}" for n in range(DEVICES)]
    packages = {dev_id: package_of(dev_id) for dev_id in dev_ids}
    assert len({hashlib.md5(p).digest() for p in packages.values()}) == DEVICES
    tasks = {dev_id: mock_onenet.service.create_task(dev_id, TARGET, packages[dev_id])
             for dev_id in dev_ids}
    owner_of_token = {task.token: dev_id for dev_id, task in tasks.items()}
    owner_of_task = {task.task_id: dev_id for dev_id, task in tasks.items()}

    start = threading.Barrier(DEVICES)
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=DEVICES) as pool:
        futures = [pool.submit(run_device, mock_onenet, dev_id, n % 2 == 0, start)
                   for n, dev_id in enumerate(dev_ids)]
        outcomes = [future.result(timeout=RUN_LIMIT_S) for future in futures]
    elapsed = time.monotonic() - began
    assert elapsed < RUN_LIMIT_S

    for outcome in outcomes:
        assert outcome.received == packages[outcome.dev_id], outcome.dev_id
        assert outcome.md5_ok
        assert outcome.errnos == [0, 0, 0, 0, 0, 11]
    for dev_id in dev_ids:
        assert mock_onenet.service.task(dev_id).state is TaskState.SUCCEEDED
        assert mock_onenet.service.device_version(dev_id) == TARGET
        assert mock_onenet.timeline.reported_codes(dev_id) == [101, 201]

    exchanges = mock_onenet.timeline.exchanges()
    chunks = {dev_id: -(-len(packages[dev_id]) // CHUNK) for dev_id in dev_ids}
    assert len(exchanges) == sum(6 + n for n in chunks.values())
    # Numbered in order, none skipped or shared (from where the session's mock had got to).
    first = exchanges[0].seq
    assert [e.seq for e in exchanges] == list(range(first, first + len(exchanges)))
    for exchange in exchanges:
        assert exchange.status in (200, 206), exchange.summary()
        assert exchange.dev_id in packages, exchange.summary()
        if exchange.task_id is not None:
            assert owner_of_task[exchange.task_id] == exchange.dev_id, exchange.summary()
        if exchange.phase == "download":
            token = exchange.target.rsplit("/", 1)[1]
            assert owner_of_token[token] == exchange.dev_id, exchange.summary()
            size = len(packages[exchange.dev_id])
            assert exchange.content_range is not None
            assert exchange.content_range.endswith(f"/{size}"), exchange.summary()
        if exchange.phase == "report":
            assert f"token={tasks[exchange.dev_id].token}" in exchange.target
    for dev_id in dev_ids:
        mine = mock_onenet.timeline.exchanges(dev_id)
        assert [str(e.phase) for e in mine] == (["version", "detect", "token"]
                                                + ["download"] * chunks[dev_id]
                                                + ["report", "report", "detect"])
