"""How fast `hil report` masks secrets and how fast its loaders refuse what they must.

    .venv/bin/python benchmarks/bench_files.py [--mib N]

Prints: the masked copy (``Redactor.copy``, streamed) of an N MiB attachment of random bytes with
one key and its forms planted, in MiB/s, against ``shutil.copyfile`` of the same file (the
reference: what the copy would cost with no masking); the time to refuse a 30 MB rig file, a
rig file nested 500 deep and one whose YAML aliases expand to a billion values. Fails when a
planted form survives the copy or a bad file is not refused.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path

from hil.errors import ConfigError
from hil.report.redact import Redactor
from hil.rig.model import load_rig
from hil.service.server import new_access_key


def _timed(action: object) -> float:
    started = time.perf_counter()
    action()          # type: ignore[operator]
    return time.perf_counter() - started


def bench_copy(directory: Path, mib: int) -> None:
    key = new_access_key()
    raw = base64.b64decode(key)
    forms = [key.encode(), urllib.parse.quote(key, safe="").encode(), raw.hex().encode(),
             raw.hex().upper().encode(), raw]
    redact = Redactor.from_environment({"BENCH_KEY": key}, names=["BENCH_KEY"])
    # Two attachments: one with no secret (the common case), one with a form in every MiB.
    for planted in (False, True):
        source = directory / f"attachment-{planted}.bin"
        with source.open("wb") as file:
            for index in range(mib):
                form = forms[index % len(forms)] if planted else b""
                file.write(os.urandom(1024 * 1024 - len(form)) + form)
        masked, plain = directory / f"masked-{planted}.bin", directory / f"plain-{planted}.bin"
        seconds = _timed(lambda: redact.copy(source, masked))       # noqa: B023
        reference = _timed(lambda: shutil.copyfile(source, plain))  # noqa: B023
        data = masked.read_bytes()
        survived = [form for form in forms if form in data]
        what = "a form of the key in every MiB" if planted else "no secret"
        print(f"masked copy of {mib} MiB, {what}: {mib / seconds:.0f} MiB/s "
              f"(shutil.copyfile: {mib / reference:.0f} MiB/s)")
        if survived:
            raise SystemExit(f"FAIL: {len(survived)} planted forms survived the masked copy")


def bench_refusals(directory: Path) -> None:
    huge = directory / "huge.yaml"
    huge.write_text("name: " + "x" * 30_000_000 + "\n")
    deep = directory / "deep.yaml"
    deep.write_text("name: " + "[" * 500 + "]" * 500 + "\n")
    laughs = directory / "laughs.yaml"
    laughs.write_text("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{this}: &{this} [{', '.join([f'*{prev}'] * 10)}]\n"
        for prev, this in zip("abcdefgh", "bcdefghi", strict=True)))
    for path in (huge, deep, laughs):
        def load(path: Path = path) -> None:
            try:
                load_rig(path)
            except ConfigError as error:
                print(f"  {error}")
                return
            raise SystemExit(f"FAIL: {path} was not refused")
        print(f"refused {path.name} in {_timed(load) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="attachment size (default 256)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hil-bench-files-") as scratch:
        bench_copy(Path(scratch), args.mib)
        bench_refusals(Path(scratch))


if __name__ == "__main__":
    main()
