"""`hil serve` against what users and their environment do to it: task files that name files
other than packages, an output nobody reads, a timeline file reused after a restart."""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from hil.errors import ConfigError
from hil.gateway import Gateway
from hil.onenet.auth import Authorization, SignMethod, product_res
from hil.onenet.codes import TaskType
from hil.service.config import apply_task_file
from hil.service.mock import OtaService
from hil.service.server import MockOneNet, new_access_key
from hil.service.timeline import Timeline

HIL = [sys.executable, "-m", "hil.cli"]
PRODUCT = "245528"
DEV = "527776559"
OUTSIDE_HINT = "(packages are files under the task file's directory or --packages-dir)"


def hil(*args: str) -> subprocess.CompletedProcess[str]:
    # A timeout, not a hang: a FIFO opened for reading would block `hil serve` forever.
    return subprocess.run([*HIL, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def service() -> OtaService:
    return OtaService(PRODUCT, new_access_key())


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    """A task file's directory holding a package, beside a directory it must not reach."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(b"not a package" * 10)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "app.bin").write_bytes(b"\x5a" * 1000)
    (tasks / "sub").mkdir()
    (tasks / "sub" / "app2.bin").write_bytes(b"\xa5" * 2000)
    return tasks


def task_file(directory: Path, package: str, *extra: str) -> Path:
    path = directory / "tasks.yaml"
    path.write_text(f"devices:\n  - dev_id: '{DEV}'\n    tasks:\n"
                    f"      - {{target: '1.1.0', package: {json.dumps(package)}"
                    f"{''.join(', ' + item for item in extra)}}}\n")
    return path


# ------------------------------------------------------------------ 6. what a task file may serve
@pytest.mark.parametrize("package", ["/etc/passwd", "../outside/secret.bin", "/proc/self/environ",
                                     "sub/../../outside/secret.bin"])
def test_a_package_outside_the_task_files_directory_is_refused(bench, service, package):
    path = task_file(bench, package)
    with pytest.raises(ConfigError) as refused:
        apply_task_file(service, path)
    assert str(refused.value) == (f"{path}: devices[0].tasks[0].package: {package} is outside "
                                  f"{bench} {OUTSIDE_HINT}")
    with pytest.raises(KeyError):
        service.task(DEV, TaskType.FOTA)


def test_a_symlink_resolving_outside_is_refused(bench, service):
    (bench / "link.bin").symlink_to(bench.parent / "outside" / "secret.bin")
    path = task_file(bench, "link.bin")
    with pytest.raises(ConfigError) as refused:
        apply_task_file(service, path)
    assert str(refused.value) == (
        f"{path}: devices[0].tasks[0].package: link.bin resolves to "
        f"{bench.parent / 'outside' / 'secret.bin'}, outside {bench} {OUTSIDE_HINT}")


def test_files_under_the_directory_are_served_and_each_is_read_once(bench, service):
    """A subdirectory, an absolute path inside, a symlink staying inside: all packages; a package
    two tasks share is read once (one copy in memory)."""
    (bench / "inner-link.bin").symlink_to(bench / "sub" / "app2.bin")
    path = bench / "tasks.yaml"
    path.write_text(f"""
devices:
  - dev_id: "1"
    tasks:
      - {{type: 1, target: "1.1.0", package: sub/app2.bin}}
      - {{type: 2, target: "1.1.0", package: {bench / 'sub' / 'app2.bin'}}}
  - dev_id: "2"
    tasks:
      - {{type: 1, target: "1.1.0", package: inner-link.bin}}
      - {{type: 2, target: "1.1.0", package: app.bin}}
""")
    apply_task_file(service, path)
    shared = [service.task(dev_id, task_type).package for dev_id, task_type in
              (("1", TaskType.FOTA), ("1", TaskType.SOTA), ("2", TaskType.FOTA))]
    assert all(package is not None and package.data == b"\xa5" * 2000 for package in shared)
    assert len({id(package.data) for package in shared if package is not None}) == 1
    own = service.task("2", TaskType.SOTA).package
    assert own is not None
    assert own.data == b"\x5a" * 1000


def test_a_packages_dir_replaces_the_task_files_directory(bench, service):
    path = task_file(bench, "secret.bin")
    outside = bench.parent / "outside"
    (task,) = apply_task_file(service, path, packages_dir=outside)
    assert task.package is not None
    assert task.package.data == b"not a package" * 10
    other = task_file(bench, "../tasks/app.bin")
    with pytest.raises(ConfigError) as refused:
        apply_task_file(OtaService(PRODUCT, new_access_key()), other, packages_dir=outside)
    assert str(refused.value) == (f"{other}: devices[0].tasks[0].package: ../tasks/app.bin is "
                                  f"outside {outside} {OUTSIDE_HINT}")


def test_a_fifo_is_refused_without_being_opened(bench, tmp_path):
    """`hil serve` says why in one line and exits; opening the FIFO to read would hang it."""
    os.mkfifo(bench / "pipe.bin")
    path = task_file(bench, "pipe.bin")
    result = hil("serve", "--port", "0", "--product-id", PRODUCT, "--access-key",
                 new_access_key(), "--tasks", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (f"hil serve: error: {path}: devices[0].tasks[0].package: pipe.bin: "
                             "cannot read: a named pipe (FIFO), not a package (hil reads regular "
                             "files only)\n")


def test_a_device_file_is_refused_even_inside_the_packages_dir(bench, service):
    path = task_file(bench, "zero")
    with pytest.raises(ConfigError) as refused:
        apply_task_file(service, path, packages_dir=Path("/dev"))
    assert str(refused.value) == (f"{path}: devices[0].tasks[0].package: zero: cannot read: a "
                                  "character device, not a package (hil reads regular files only)")


def test_a_package_over_the_size_limit_is_refused(bench, service):
    (bench / "big.bin").write_bytes(b"\x00" * 4097)
    path = task_file(bench, "big.bin")
    with pytest.raises(ConfigError) as refused:
        apply_task_file(service, path, max_package_bytes=4096)
    assert str(refused.value) == (f"{path}: devices[0].tasks[0].package: big.bin: 4097 bytes: "
                                  "larger than the 4096 bytes hil reads of a package")


def test_serve_refuses_an_outside_package_at_load_in_one_line(bench):
    path = task_file(bench, "/etc/passwd")
    result = hil("serve", "--port", "0", "--product-id", PRODUCT, "--access-key",
                 new_access_key(), "--tasks", str(path))
    assert result.returncode == 2
    assert result.stdout == ""     # never started serving
    assert result.stderr == (f"hil serve: error: {path}: devices[0].tasks[0].package: "
                             f"/etc/passwd is outside {bench} {OUTSIDE_HINT}\n")


def test_serve_bounds_a_package_named_on_the_command_line(tmp_path):
    big = tmp_path / "big.bin"
    with big.open("wb") as file:
        file.truncate(2 * 1024 * 1024 + 1)
    result = hil("serve", "--port", "0", "--product-id", PRODUCT, "--access-key",
                 new_access_key(), "--dev-id", DEV, "--target-version", "1.1.0",
                 "--package", str(big), "--max-package-mib", "2")
    assert result.returncode == 2
    assert result.stderr == (f"hil serve: error: --package: {big}: 2.0 MiB: larger than the "
                             "2 MiB hil reads of a package\n")


@pytest.mark.parametrize(("token", "why"), [
    ("a/b", "'a/b' cannot be in a request path: 1..64 of [A-Za-z0-9_-.]"),
    # (a value echoed in an error is cut to 60 characters)
    ("x" * 65, f"'{'x' * 59}…' cannot be in a request path: 1..64 of [A-Za-z0-9_-.]"),
])
def test_a_token_no_request_can_reach_is_refused(bench, service, token, why):
    path = task_file(bench, "app.bin", f"token: {json.dumps(token)}")
    with pytest.raises(ConfigError) as refused:
        apply_task_file(service, path)
    assert str(refused.value) == f"{path}: devices[0].tasks[0].token: {why}"


def test_a_64_character_token_is_served(bench, service):
    token = "T" * 64
    (task,) = apply_task_file(service, task_file(bench, "app.bin", f"token: {token}"))
    assert task.token == token
    with MockOneNet(PRODUCT) as onenet:
        onenet.service.create_task(DEV, "1.1.0", b"\x5a" * 100, token=token)
        auth = {"Authorization": onenet.authorization()}
        check = requests.get(f"{onenet.url}/ota/south/download/{token}/check?dev_id={DEV}",
                             headers=auth, timeout=30)
        assert check.json()["errno"] == 0
        answer = requests.get(f"{onenet.url}/ota/south/download/{token}",
                              headers={**auth, "Range": "bytes=0-9"}, timeout=30)
    assert (answer.status_code, answer.content) == (206, b"\x5a" * 10)


# ---------------------------------------------------------------- 7. an output nobody reads
EXCHANGES = 3000    # far more log than the 4 KiB pipe and the writer's queue hold
DROPPED = re.compile(r"^hil serve: (\d+) log lines dropped")


def _serve_into_a_small_pipe(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """``hil serve`` whose stdout is the smallest pipe Linux makes (a page), so little log
    fills it; read up to its "serving on" line. The process, its access key and its URL."""
    key = new_access_key()
    process = subprocess.Popen(
        [*HIL, "serve", "--port", "0", "--product-id", PRODUCT, "--access-key", key,
         "--dev-id", DEV, "--target-version", "1.1.0", "--package", str(_package(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stderr is not None
    fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    head = b""
    while b"serving on " not in head or not head.endswith(b"\n"):
        chunk = os.read(process.stdout.fileno(), 4096)
        assert chunk, f"hil serve ended before serving: {process.stderr.read()!r}"
        head += chunk
    return process, key, head.decode().split("serving on ")[1].split()[0]


def test_serve_answers_every_request_while_nobody_reads_its_output(tmp_path):
    process, key, url = _serve_into_a_small_pipe(tmp_path)
    assert process.stdout is not None
    assert process.stderr is not None
    out = process.stdout.fileno()
    lines: list[str] = []
    try:
        # From here on nobody reads stdout while a client makes its exchanges.
        answered = _exchanges(url, key, EXCHANGES)
        assert answered == EXCHANGES
        # Then someone reads: the writer catches up and says what it could not keep.
        drained = threading.Event()
        reader = threading.Thread(target=_read_lines, args=(out, lines, drained), daemon=True)
        reader.start()
        assert drained.wait(timeout=120), lines[-5:]
        assert _exchanges(url, key, 1) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
    reader.join(timeout=60)
    assert status == 0, process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    assert lines[-1] == "stopped"
    logged = [line for line in lines if " -> " in line]
    dropped = [int(match.group(1)) for line in lines if (match := DROPPED.match(line))]
    assert dropped
    assert all(count > 0 for count in dropped)
    # Every exchange is either a line or counted as dropped: none lost without a word.
    assert len(logged) + sum(dropped) == EXCHANGES + 1
    assert " -> " in lines[-2]     # the last exchange, logged once the writer had caught up


UNWRITTEN = re.compile(r"^hil serve: stdout was not read: (\d+) log lines left unwritten at "
                       r"exit \((\d+) dropped before\)$")


def test_serve_stops_when_told_though_nobody_ever_reads_its_output(tmp_path):
    """SIGTERM with stdout still full: it exits, says on stderr what never got written, and
    leaves no line cut in the pipe."""
    process, key, url = _serve_into_a_small_pipe(tmp_path)
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        assert _exchanges(url, key, EXCHANGES) == EXCHANGES
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    process.stdout.close()
    process.stderr.close()
    assert status == 0, err
    (said,) = err.splitlines()
    match = UNWRITTEN.match(said)
    assert match, said
    unwritten, dropped = int(match.group(1)), int(match.group(2))
    assert out.endswith("\n")
    logged = [line for line in out.splitlines() if " -> " in line]
    # Each exchange logged, dropped or left unwritten; the last two unwritten lines are the
    # count of the dropped ones and "stopped".
    assert dropped > 0
    assert len(logged) + dropped + unwritten == EXCHANGES + 2


def _package(tmp_path: Path) -> Path:
    path = tmp_path / "app.bin"
    path.write_bytes(b"\x5a" * 4096)
    return path


def _exchanges(url: str, key: str, count: int) -> int:
    """``count`` detects on keep-alive connections; how many were answered."""
    host, port = url.removeprefix("http://").split(":")
    auth = Authorization.build(key, product_res(PRODUCT), 2**31 - 1, SignMethod.SHA1).header()
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    answered = 0
    try:
        for _ in range(count):
            connection.request("GET", f"/ota/south/check?dev_id={DEV}&type=1&version=1.0.0"
                               "&cdn=false", headers={"Authorization": auth})
            answer = connection.getresponse()
            if json.loads(answer.read())["errno"] == 0:
                answered += 1
    finally:
        connection.close()
    return answered


def _read_lines(fd: int, lines: list[str], drained: threading.Event) -> None:
    buffered = b""
    while chunk := os.read(fd, 65536):
        buffered += chunk
        *whole, buffered = buffered.split(b"\n")
        for line in whole:
            lines.append(line.decode())
            if DROPPED.match(lines[-1]):
                drained.set()
    drained.set()


# ------------------------------------------------------------- 8. a timeline after a restart
def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def detect(url: str, onenet: MockOneNet) -> None:
    requests.get(f"{url}/ota/south/check?dev_id={DEV}&type=1&version=1.0.0&cdn=false",
                 headers={"Authorization": onenet.authorization()}, timeout=30)


def test_a_restarted_mock_continues_the_timeline_files_seq(tmp_path):
    path = tmp_path / "timeline.jsonl"
    key = new_access_key()
    for _ in range(2):
        with MockOneNet(PRODUCT, key, timeline_path=path) as onenet:
            for _ in range(3):
                detect(onenet.url, onenet)
    assert [record["seq"] for record in records(path)] == [1, 2, 3, 4, 5, 6]


def test_a_reset_mock_does_not_reuse_numbers_in_its_file(tmp_path):
    path = tmp_path / "timeline.jsonl"
    with MockOneNet(PRODUCT, timeline_path=path) as onenet:
        detect(onenet.url, onenet)
        onenet.service.reset()
        detect(onenet.url, onenet)
        assert [e.seq for e in onenet.timeline] == [2]
    assert [record["seq"] for record in records(path)] == [1, 2]


def test_a_restarted_gateway_continues_the_timeline_files_seq(tmp_path):
    path = tmp_path / "gateway.jsonl"
    with MockOneNet(PRODUCT) as onenet:
        for _ in range(2):
            timeline = Timeline(path)
            with Gateway(onenet.url, timeline) as gateway:
                detect(gateway.url, onenet)
                timeline.record_hit(DEV, "power-cut during=detect", "detect")
                detect(gateway.url, onenet)
            timeline.close()
    written = records(path)
    assert [record["seq"] for record in written] == [1, 2, 3, 4, 5, 6]
    assert [record.get("kind") for record in written] == [None, "fault-hit", None] * 2


def test_serve_killed_and_restarted_on_its_timeline_keeps_it_valid(tmp_path):
    """SIGKILL, then a last line torn as a full disk or a power loss leaves it: the restarted
    service drops the torn piece and numbers on; every line stays one JSON record."""
    path = tmp_path / "timeline.jsonl"
    key = new_access_key()
    package = _package(tmp_path)
    for restart in range(2):
        process = subprocess.Popen(
            [*HIL, "serve", "--port", "0", "--product-id", PRODUCT, "--access-key", key,
             "--dev-id", DEV, "--target-version", "1.1.0", "--package", str(package),
             "--timeline", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            assert process.stdout is not None
            line = ""
            for line in process.stdout:
                if line.startswith("serving on "):
                    break
            assert line.startswith("serving on "), process.stderr.read() if process.stderr \
                else ""
            assert _exchanges(line.split()[-1], key, 3) == 3
        finally:
            process.kill()
            process.wait(timeout=60)
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
        if restart == 0:
            with path.open("ab") as file:
                file.write(b'{"seq":4,"at":17000')
    written = records(path)
    assert [record["seq"] for record in written] == [1, 2, 3, 4, 5, 6]


def test_a_file_that_is_not_a_timeline_is_refused_not_appended_to(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\nnot a timeline")
    with pytest.raises(ConfigError) as refused:
        Timeline(path)
    assert str(refused.value).startswith(f"{path}: ")
    assert "\n" not in str(refused.value)
    assert path.read_text() == "my notes\nnot a timeline"
