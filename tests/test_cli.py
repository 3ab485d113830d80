"""The `hil` command, run as a user runs it: a subprocess, with curl as the independent device."""

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hil.cli import demo_package
from hil.service.server import new_access_key

HIL = [sys.executable, "-m", "hil.cli"]
VECTOR_KEY = "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw="


def hil(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HIL, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


class Served:
    """`hil serve` in a subprocess; its URL read from the `serving on` line, the lines it
    printed before (what it serves) kept in ``preamble``."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([*HIL, "serve", "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Lines are read on a thread: a select() on the pipe misses lines that a readline()
        # already pulled into the text wrapper's buffer (several printed at once).
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.preamble: list[str] = []
        line = self._readline(timeout=20)
        while not line.startswith("serving on ") and len(self.preamble) < 20:
            self.preamble.append(line)
            line = self._readline(timeout=20)
        assert line.startswith("serving on http://127.0.0.1:"), line
        self.url = line.split()[-1]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.strip())

    def _readline(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            self.process.kill()
            self.process.wait()
            self._reader.join(timeout=20)
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()        # not left to the garbage collector of a later test
            pytest.fail("hil serve printed nothing within the timeout")

    def stop(self) -> tuple[int, str, str]:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=20)
        self._reader.join(timeout=20)       # stdout is the reader's, to its end
        assert self.process.stderr is not None
        assert self.process.stdout is not None
        err = self.process.stderr.read()
        self.process.stderr.close()
        self.process.stdout.close()
        rest = []
        while not self._lines.empty():
            rest.append(self._lines.get())
        return self.process.returncode, "".join(f"{line}\n" for line in rest), err


def curl(*args: str) -> bytes:
    return subprocess.run(["curl", "--silent", "--show-error", "--max-time", "10", *args],
                          capture_output=True, check=True, timeout=30).stdout


@pytest.fixture
def package_file(tmp_path: Path) -> Path:
    path = tmp_path / "app-1.1.0.bin"
    path.write_bytes(demo_package(64 * 1024))
    return path


def test_token_reproduces_the_public_test_vector():
    result = hil("token", "--product-id", "123123", "--access-key", VECTOR_KEY,
                 "--et", "1537255523", "--method", "sha1")
    assert result.returncode == 0
    assert result.stdout.strip() == ("version=2018-10-31&res=products%2F123123&et=1537255523"
                                     "&method=sha1&sign=lsaPSiiGvEFFjXu5WU7a6IkScqE%3D")


def test_token_device_level_and_expiry_from_now():
    before = int(time.time())
    result = hil("token", "--product-id", "245528", "--device", "bench-01", "--expires-in", "60",
                 "--method", "sha256", env={"HIL_ACCESS_KEY": VECTOR_KEY})
    fields = dict(pair.split("=", 1) for pair in result.stdout.strip().split("&"))
    assert fields["res"] == "products%2F245528%2Fdevices%2Fbench-01"
    assert fields["method"] == "sha256"
    assert before + 60 <= int(fields["et"]) <= int(time.time()) + 60


@pytest.mark.parametrize(("args", "names"), [
    (["token", "--product-id", "1", "--access-key", "not base64!"], "--access-key"),
    (["token", "--product-id", "1"], "HIL_ACCESS_KEY"),
    (["token", "--product-id", "1", "--access-key", VECTOR_KEY, "--et", "soon"], "--et"),
    (["token", "--product-id", "1", "--access-key", VECTOR_KEY, "--et", "1", "--expires-in", "5"],
     "--expires-in"),
    (["serve", "--product-id", "1", "--access-key", VECTOR_KEY, "--port", "http"], "--port"),
    (["serve", "--product-id", "1", "--access-key", VECTOR_KEY, "--dev-id", "5",
      "--package", "/no/such/file.bin", "--target-version", "1.1"], "/no/such/file.bin"),
    (["serve", "--product-id", "1", "--access-key", VECTOR_KEY, "--dev-id", "5"],
     "--package, --target-version"),
    (["serve", "--product-id", "1", "--access-key", VECTOR_KEY, "--target-version", "1 1"],
     "--target-version"),
    (["serve", "--product-id", "1", "--access-key", VECTOR_KEY, "--type", "3"], "--type"),
    (["nonsense"], "nonsense"),
])
def test_bad_arguments_get_one_line_and_status_2(args, names):
    result = hil(*args, env={"HIL_ACCESS_KEY": ""})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert names in result.stderr
    assert "Traceback" not in result.stderr
    assert VECTOR_KEY not in result.stderr + result.stdout


def test_serve_carries_curl_through_a_whole_update(package_file: Path, tmp_path: Path):
    key = new_access_key()
    timeline = tmp_path / "timeline.jsonl"
    served = Served("--product-id", "245528", "--access-key", key, "--dev-id", "527776559",
                    "--manuf", "102", "--model", "10201", "--type", "2", "--version", "1.0.0",
                    "--package", str(package_file), "--target-version", "1.1.0",
                    "--retry", "2", "--interval", "5", "--timeline", str(timeline))
    try:
        auth = hil("token", "--product-id", "245528", "--access-key", key).stdout.strip()
        header = ["-H", f"Authorization: {auth}"]

        def json_call(*args: str) -> dict:
            return json.loads(curl(*header, *args))

        detect = json_call(f"{served.url}/ota/south/check?dev_id=527776559&manuf=102&model=10201"
                           "&type=2&version=1.0.0&cdn=false")
        assert detect["errno"] == 0
        data = detect["data"]
        assert (data["target"], data["size"], data["retry"], data["interval"]) == \
            ("1.1.0", 65536, 2, 5)
        token = data["token"]
        assert json_call(f"{served.url}/ota/south/download/{token}/check?dev_id=527776559") == \
            {"errno": 0, "error": "succ"}
        chunks = [curl(*header, "-H", f"Range: bytes={start}-{start + 4095}",
                       f"{served.url}/ota/south/download/{token}")
                  for start in range(0, 65536, 4096)]
        assert all(len(chunk) == 4096 for chunk in chunks)
        assert hashlib.md5(b"".join(chunks)).hexdigest() == data["md5"]
        report = f"{served.url}/ota/south/report?dev_id=527776559&token={token}"
        assert json_call("-d", '{"result":101}', report)["errno"] == 0
        assert json_call("-d", '{"result":201}', report)["errno"] == 0
        # The update is over: the task is finished and the next detect finds nothing.
        assert json_call("-d", '{"result":201}', report)["errno"] == 20
        assert json_call(f"{served.url}/ota/south/check?dev_id=527776559&type=2"
                         "&version=1.1.0&cdn=true")["errno"] == 11
    finally:
        status, out, err = served.stop()
    assert status == 0, err
    lines = out.splitlines()
    assert lines[-1] == "stopped"
    # One log line per exchange (the `serving on` line was read already): detect, check,
    # 16 chunks, 3 reports, detect.
    assert len(lines) == 22 + 1
    assert " download " in lines[2]
    assert "206 bytes 0-4095/65536" in lines[2]
    records = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert [r["phase"] for r in records].count("download") == 16
    assert key not in out + err + timeline.read_text()


def test_serve_reports_a_bad_task_file_in_one_line(tmp_path: Path):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("devices:\n  - dev_id: '1'\n    tasks:\n      - {target: '1.1', retry: -1}\n")
    result = hil("serve", "--port", "0", "--product-id", "1", "--access-key", VECTOR_KEY,
                 "--tasks", str(tasks))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"{tasks}: devices[0].tasks[0].retry" in result.stderr


def test_serve_runs_a_task_file_of_several_devices(tmp_path: Path, package_file: Path):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"""
devices:
  - dev_id: 527776559
    version: "1.0.0"
    tasks:
      - {{type: 2, manuf: "102", model: "10201", target: "1.1.0", package: {package_file.name}}}
  - dev_id: "527776560"
    tasks:
      - {{type: 1, target: "2.0.0", package: {package_file.name}, signal: 10, power: 50}}
""")
    key = new_access_key()
    served = Served("--product-id", "245528", "--access-key", key, "--tasks", str(tasks))
    try:
        auth = hil("token", "--product-id", "245528", "--access-key", key).stdout.strip()
        first = json.loads(curl("-H", f"Authorization: {auth}", f"{served.url}/ota/south/check?"
                                "dev_id=527776559&type=2&version=1.0.0&cdn=true"))
        second = json.loads(curl("-H", f"Authorization: {auth}", f"{served.url}/ota/south/check?"
                                 "dev_id=527776560&type=1&version=1.0.0&cdn=true"))
        wrong_type = json.loads(curl("-H", f"Authorization: {auth}", f"{served.url}/ota/south/"
                                     "check?dev_id=527776560&type=2&version=1.0.0&cdn=true"))
    finally:
        status, _, _ = served.stop()
    assert status == 0
    assert first["data"]["target"] == "1.1.0"
    assert (second["data"]["target"], second["data"]["signal"]) == ("2.0.0", 10)
    assert wrong_type["errno"] == 11
    assert served.preamble == [
        "task 1: dev_id=527776559 type=2 (SOTA) target=1.1.0 retry=3 interval=2s",
        "task 2: dev_id=527776560 type=1 (FOTA) target=2.0.0 retry=3 interval=2s",
        "download error bodies: raw"]


@pytest.mark.parametrize(("option", "wire"), [
    ((), b"\x03"), (("--error-body", "raw"), b"\x03"), (("--error-body", "ascii"), b"3")])
def test_serve_defaults_carry_the_vendor_example_through_a_first_run(
        package_file: Path, tmp_path: Path, option: tuple[str, ...], wire: bytes):
    """Only the flags a first run needs: the task is what the vendor's example client asks for
    (FOTA, no manuf/model, cdn=false) with retries to spare, said at start; the download
    address comes as strings; a download error is OneNET's raw byte unless asked otherwise."""
    key = new_access_key()
    served = Served("--product-id", "245528", "--access-key", key, "--dev-id", "527776559",
                    "--package", str(package_file), "--target-version", "1.1.0", *option)
    try:
        auth = hil("token", "--product-id", "245528", "--access-key", key).stdout.strip()
        detect = json.loads(curl("-H", f"Authorization: {auth}", f"{served.url}/ota/south/check?"
                                 "dev_id=527776559&type=1&version=1.0.0&cdn=false"))
        error = subprocess.run(
            ["curl", "--silent", "--max-time", "10", "--include", "-H", f"Authorization: {auth}",
             f"{served.url}/ota/south/download/ota_unknown"],
            capture_output=True, timeout=30).stdout
    finally:
        status, _, err = served.stop()
    assert status == 0, err
    assert served.preamble == [
        "task 1: dev_id=527776559 type=1 (FOTA) target=1.1.0 retry=3 interval=2s",
        f"download error bodies: {option[1] if option else 'raw'}"]
    assert detect["errno"] == 0
    data = detect["data"]
    assert (data["retry"], data["interval"]) == (3, 2)
    assert (data["ip"], data["ipPort"]) == ("127.0.0.1", served.url.rsplit(":", 1)[1])
    head, _, body = error.partition(b"\r\n\r\n")
    assert body == wire
    assert b"content-length" not in head.lower()


def test_run_updates_each_simulated_rig_from_its_flashed_base_image(tmp_path: Path):
    result = hil("run", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "PASS"
    for rig in ("sim-esp32", "sim-gd32", "sim-nrf52832"):
        assert f"{rig:<16} PASS  codes [101, 201], task succeeded, boot line 1.1.0, " \
            "runs 1.1.0" in lines
    # The service's side, as recorded: each device's two reports, in order.
    reports = [json.loads(line) for line in (tmp_path / "timeline.jsonl").read_text().splitlines()]
    for dev_id in ("sim-esp32", "sim-gd32", "sim-nrf52832"):
        codes = [entry["result"] for entry in reports
                 if entry.get("dev_id") == dev_id and entry.get("result") is not None]
        assert codes == [101, 201], dev_id


def test_run_refuses_a_rig_that_is_not_simulated(tmp_path: Path):
    result = hil("run", "--out", str(tmp_path), "lab-nrf52832")
    assert result.returncode == 2
    assert result.stderr.strip() == ("hil run: error: rig lab-nrf52832 is not simulated: hil run "
                                     "builds its images with hil.sim.images, which only "
                                     "simulated boards boot")


