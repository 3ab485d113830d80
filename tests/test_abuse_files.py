"""Files that are not what hil expects: `hil report`'s output directory, secrets in what the
report is made of, and input files built to hang, exhaust or drown hil.

Each is run as the user runs it, the `hil` command in a subprocess, with a memory ceiling and a
generous deadline, so that an input that would hang or eat memory fails its test instead of the
test run. Every bad input must come back as one line naming the file, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from hil.report.redact import Redactor
from hil.service.server import new_access_key

ROOT = Path(__file__).resolve().parent.parent
HIL = Path(sys.executable).with_name("hil")
DEADLINE = 300            # seconds: the real Allure generator on a loaded machine included
MEMORY = 2 * 1024 ** 3    # what `hil` may use here: reading /dev/zero whole goes past it
LINE = 400                # an error line longer than this echoes what it should not


def hil(*args: str | Path, env: dict[str, str] | None = None, bounded: bool = True
        ) -> subprocess.CompletedProcess[str]:
    """`hil` run as a user runs it; ``bounded``: within ``MEMORY`` (not for a run that reaches
    the Allure generator: Java reserves more address space than that)."""
    def ceiling() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    environment = {**os.environ, **(env or {})}
    return subprocess.run([str(HIL), *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=DEADLINE, check=False,
                          preexec_fn=ceiling if bounded else None)


def one_line(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The single error line of a refused input; it says each of ``expected``."""
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1, done.stderr[-2000:]
    assert len(lines[0]) < LINE, lines[0][:LINE]
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def result(directory: Path, **fields: Any) -> Path:
    """One Allure result file, as allure-pytest writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    name = fields.pop("name", "test_detect[bench-esp32]")
    document = {"uuid": str(uuid.uuid4()), "historyId": hashlib.md5(name.encode()).hexdigest(),
                "name": name, "fullName": f"testcases.test_detect#{name}", "status": "passed",
                "labels": [{"name": "board", "value": "esp32"},
                           {"name": "feature", "value": "detect"},
                           {"name": "rig", "value": "bench-esp32"}],
                "start": 1700000000000, "stop": 1700000001000, **fields}
    path = directory / f"{document['uuid']}-result.json"
    path.write_text(json.dumps(document))
    (directory / "environment.properties").write_text("firmware.build=1.1.0\n")
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


# ------------------------------------------------------------- 3. what `-o DIR` may remove
def test_a_directory_with_only_an_index_html_is_not_a_report_and_is_left_alone(tmp_path):
    result(tmp_path / "results")
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("x\n")
    (mine / "precious.txt").write_text("keep\n")
    done = hil("report", tmp_path / "results", "-o", mine)
    one_line(done, f"-o {mine}: is not empty and holds no Allure report")
    assert snapshot(mine) == {"index.html": b"x\n", "precious.txt": b"keep\n"}


def test_a_new_report_replaces_only_what_allure_and_hil_wrote(tmp_path):
    results, report = tmp_path / "results", tmp_path / "report"
    result(results)
    first = hil("report", results, "-o", report, bounded=False)
    assert first.returncode in (0, 1), first.stderr
    before = set(os.listdir(report))
    assert {"index.html", "data", "widgets", "history", "signoff.md", "signoff.json"} <= before
    # The user's things beside an old report: a file, a folder, a link to a folder elsewhere.
    (report / "precious.txt").write_text("keep\n")
    (report / "notes").mkdir()
    (report / "notes" / "todo.md").write_text("- sign\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept.txt").write_text("kept\n")
    (report / "link").symlink_to(elsewhere)
    (report / "widgets" / "summary.json").write_text('{"stale": true}')

    result(results, name="test_download[bench-esp32]")       # a second test: a new report
    second = hil("report", results, "-o", report, bounded=False)
    assert second.returncode in (0, 1), second.stderr
    assert (report / "precious.txt").read_text() == "keep\n"
    assert (report / "notes" / "todo.md").read_text() == "- sign\n"
    assert (report / "link").is_symlink()
    assert (elsewhere / "kept.txt").read_text() == "kept\n"
    summary = json.loads((report / "widgets" / "summary.json").read_text())
    assert summary["statistic"]["total"] == 2
    assert set(os.listdir(report)) == before | {"precious.txt", "notes", "link"}


def test_the_reports_own_page_is_left_as_allure_wrote_it(tmp_path):
    """The secrets' last guard covers what Allure made of the results, never its own scripts:
    masking ``this.sign=e.sign`` in Allure's JavaScript broke the whole page."""
    results, report = tmp_path / "results", tmp_path / "report"
    result(results)
    done = hil("report", results, "-o", report, bounded=False)
    assert done.returncode in (0, 1), done.stderr
    scripts = [*(report / "assets").rglob("*.js")] or [report / "app.js"]
    for path in scripts:
        script = path.read_bytes()
        assert b"sign=***" not in script, path
        assert b"***" not in script.replace(b"`*****`", b""), path   # Allure's own mask


def test_a_onenet_signature_is_masked_and_code_that_says_sign_is_not():
    redact = Redactor()
    assert redact("res=products%2F1&et=9&sign=AbCdEfGhIjKlMnOpQrStUvWx%2B%3D") \
        == "res=products%2F1&et=9&sign=***"
    assert redact("version%3D2018%26sign%3DAbCdEfGhIjKlMnOpQrStUv%252B") \
        == "version%3D2018%26sign%3D***"
    code = "this.sign=e.sign===void 0?`-`:e.sign+``"
    assert redact(code) == code


# ------------------------------------------------------------------- 4. secrets, every form
def _key() -> str:
    """A OneNET-shaped key (base64 of 32 bytes) whose URL-encoded forms differ from it."""
    while True:
        key = new_access_key()
        if "+" in key and "/" in key:
            return key


def _forms(key: str) -> dict[str, bytes]:
    raw = base64.b64decode(key)
    quoted = urllib.parse.quote(key, safe="")
    return {"raw": key.encode(), "quote": quoted.encode(),
            "quote-slash-safe": urllib.parse.quote(key).encode(),
            "quote_plus": urllib.parse.quote_plus(key).encode(),
            "quote-lower-hex": quoted.replace("%2B", "%2b").replace("%2F", "%2f")
                                     .replace("%3D", "%3d").encode(),
            "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode(),
            "hex-dump": raw.hex(" ").encode(), "decoded-bytes": raw}


def test_no_form_of_the_rigs_key_reaches_anything_hil_report_writes(tmp_path):
    key = _key()
    forms = _forms(key)
    text_forms = " | ".join(form.decode() for name, form in forms.items()
                            if name != "decoded-bytes")
    results = tmp_path / "results"
    results.mkdir()
    # Attachments: text, JSON and binary, the key in every form; the binary one has a form
    # across the 1 MiB boundary a streamed copy reads by.
    text, data, binary = (f"{uuid.uuid4()}-attachment.{ext}" for ext in ("txt", "json", "bin"))
    (results / text).write_text(f"console: {text_forms}\n")
    (results / data).write_text(json.dumps({"authorization": text_forms,
                                            "escaped": key.replace("/", "\\/")}))
    blob = bytearray(os.urandom(1024 * 1024 - 7))
    for form in forms.values():
        blob += b"\x00" + form
    (results / binary).write_bytes(bytes(blob))
    message = f"token phase: refused key {forms['quote'].decode()} marker-message {text_forms}"
    attachments = [{"name": "console.log", "source": text, "type": "text/plain"},
                   {"name": "exchange.json", "source": data, "type": "application/json"},
                   {"name": "capture.bin", "source": binary, "type": "application/octet-stream"}]
    result(results, status="failed",
           statusDetails={"message": message, "trace": f"Traceback: {text_forms}"},
           parameters=[{"name": "auth", "value": text_forms}],
           steps=[{"name": f"token: {text_forms}", "status": "failed",
                   "attachments": attachments, "start": 1, "stop": 2}],
           attachments=attachments)
    (results / "environment.properties").write_text(
        f"firmware.build=1.1.0\nlab.url=https://lab/?k={forms['quote_plus'].decode()}\n"
        f"lab.note={text_forms}\n")
    untouched = snapshot(results)
    # The rig says which variable holds its key; the name says nothing of a secret.
    rigs = tmp_path / "rigs"
    rigs.mkdir()
    rig = yaml.safe_load((ROOT / "rigs" / "sim-esp32.yaml").read_text())
    rig["identity"]["access_key_env"] = "BENCH_07"
    (rigs / "bench-07.yaml").write_text(yaml.safe_dump(rig))
    report = tmp_path / "report"

    done = hil("report", results, "-o", report, "--rigs-dir", rigs,
               env={"BENCH_07": key, "HIL_ACCESS_KEY": ""}, bounded=False)
    assert done.returncode == 1, done.stderr
    assert "marker-message" in done.stdout            # the message is in the verdict line
    written = {f"<{stream}>": getattr(done, stream).encode() for stream in ("stdout", "stderr")}
    written |= {str(path): path.read_bytes() for path in report.rglob("*") if path.is_file()}
    leaks = [(where, name) for where, content in written.items()
             for name, form in forms.items() if form in content]
    assert leaks == []
    # What was planted made it into the report, masked: the test looked where the key was.
    texts = b"".join(written.values())
    assert texts.count(b"marker-message") >= 3
    assert b"***" in texts
    attached = list((report / "data" / "attachments").iterdir())
    assert len(attached) == 3
    assert all(b"***" in path.read_bytes() for path in attached)
    environment = json.loads((report / "widgets" / "environment.json").read_text())
    assert any("***" in str(item["values"]) for item in environment
               if item["name"] == "lab.note")
    assert snapshot(results) == untouched          # the user's results are never rewritten


# --------------------------------------------------------------------- 5. bounded loaders
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_hil_rigs_lists_every_rig_when_some_files_are_built_to_break_it(tmp_path):
    rigs = tmp_path / "rigs"
    rigs.mkdir()
    shutil.copy(ROOT / "rigs" / "sim-esp32.yaml", rigs / "a-good.yaml")
    (rigs / "deep.yaml").write_text(f"name: {_nested(500)}\n")
    os.mkfifo(rigs / "fifo.yaml")
    (rigs / "zero.yaml").symlink_to("/dev/zero")
    with (rigs / "huge.yaml").open("w") as huge:              # 30 MB, one value
        huge.write("name: " + "x" * 30_000_000 + "\n")
    (rigs / "laughs.yaml").write_text(
        "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(f"{this}: &{this} [{', '.join([f'*{prev}'] * 10)}]\n"
                  for prev, this in zip("abcdefgh", "bcdefghi", strict=True)))
    good = (ROOT / "rigs" / "sim-esp32.yaml").read_text()
    (rigs / "long-value.yaml").write_text(good.replace("board: esp32",
                                                       "board: " + "y" * 900_000))
    (rigs / "number.yaml").write_text(good + "\nspare: " + "9" * 5000 + "\n")

    done = hil("rigs", "--rigs-dir", rigs)
    assert done.stderr == "", done.stderr[-2000:]
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == \
        ["sim-esp32", "deep", "fifo", "huge", "laughs", "long-value", "number", "zero"]
    assert all(len(line) < LINE for line in lines), [line[:LINE] for line in lines]
    said = {line.split()[0]: line for line in lines}
    assert "INVALID" not in said["sim-esp32"]
    assert "esp32-wroom-32" in said["sim-esp32"]
    for name, why in {"deep": "nested too deep", "fifo": "cannot read: a named pipe (FIFO)",
                      "zero": "cannot read: a character device",
                      "huge": "28.6 MiB: larger than the 1 MiB hil reads of a rig file",
                      "laughs": "more than 100000 values",
                      "long-value": "board: unknown board 'yyyy",
                      "number": "not valid YAML"}.items():
        assert f"INVALID  {rigs / name}.yaml: " in said[name]
        assert why in said[name]


def _plant(path: Path, content: str) -> Path:
    """``path`` made a FIFO (``"fifo"``), a link to a device (``"/dev/..."``) or a file holding
    ``content``."""
    if content == "fifo":
        os.mkfifo(path)
    elif content.startswith("/dev/"):
        path.symlink_to(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(("content", "expected"), [
    (_nested(100_000), "x-result.json: not valid JSON: nested too deep"),
    ('{"status": "passed", "start": ' + "9" * 5000 + "}",
     "x-result.json: not valid JSON: Exceeds the limit (4300 digits)"),
    ('{"status": "' + "z" * 100_000 + '"}', "status: 'zzzzz"),
    ("fifo", "x-result.json: cannot read: a named pipe (FIFO), not a results file"),
    ("/dev/zero", "x-result.json: cannot read: a character device, not a results file"),
], ids=["nested", "5000-digits", "long-status", "fifo", "dev-zero"])
def test_a_results_file_built_to_break_the_reader_is_one_line(tmp_path, content, expected):
    results = tmp_path / "results"
    results.mkdir()
    _plant(results / "x-result.json", content)
    one_line(hil("report", results, "-o", tmp_path / "report"), str(results), expected)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(("content", "expected"), [
    (_nested(500), "w.yaml: not valid YAML: nested too deep"),
    ("fifo", "w.yaml: cannot read: a named pipe (FIFO), not a waiver file"),
    ("/dev/zero", "w.yaml: cannot read: a character device, not a waiver file"),
], ids=["nested", "fifo", "dev-zero"])
def test_a_waiver_file_built_to_break_the_reader_is_one_line(tmp_path, content, expected):
    result(tmp_path / "results")
    waivers = _plant(tmp_path / "w.yaml", content)
    one_line(hil("report", tmp_path / "results", "-o", tmp_path / "report", "--waive",
                 waivers), expected)


def test_an_environment_properties_fifo_is_one_line(tmp_path):
    path = result(tmp_path / "results")
    (path.parent / "environment.properties").unlink()
    os.mkfifo(path.parent / "environment.properties")
    one_line(hil("report", tmp_path / "results", "-o", tmp_path / "report"),
             "environment.properties: cannot read: a named pipe (FIFO)")


@pytest.mark.parametrize("option", ["--package", "--firmware"])
@pytest.mark.parametrize("given", ["/dev/zero", "fifo"])
def test_a_package_or_base_image_that_is_no_file_is_one_line(tmp_path, option, given):
    if given == "fifo":
        given = str(tmp_path / "image.bin")
        os.mkfifo(given)
    kind = "a character device" if given == "/dev/zero" else "a named pipe (FIFO)"
    what = "package" if option == "--package" else "base image"
    done = hil("suite", "sim-esp32", option, given, "--target-version", "1.1.0",
               "--root", ROOT, "--out", tmp_path / "out")
    one_line(done, f"hil suite: error: {given}: {what}: cannot read: {kind}, not a {what}")
    assert not (tmp_path / "out" / "allure-results").exists()      # no test ran
