#!/usr/bin/env python3
"""Set up hil and run it, with nothing but Python 3.11+ on the machine.

    python3 dev.py run  [hil run options]    set up, then run the main job
    python3 dev.py test [pytest options]     set up, then run the tests
    python3 dev.py lint                      set up, then ruff and mypy
    python3 dev.py hil ...                   set up, then any hil command

Setting up makes .venv and installs hil with its pinned dependencies (pyproject.toml); it is
skipped while pyproject.toml is unchanged since the last setup.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".hil-setup"


def setup() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"dev.py: hil needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("dev.py: creating .venv", flush=True)
        venv.create(VENV, with_pip=True)
    print("dev.py: installing hil and its pinned dependencies into .venv", flush=True)
    subprocess.run([BIN / "python", "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "--editable", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test", "lint", "hil"):
        print(__doc__, file=sys.stderr)
        return 2
    setup()
    command, rest = argv[0], argv[1:]
    os.chdir(ROOT)
    if command == "run":
        return subprocess.call([BIN / "hil", "run", *rest])
    if command == "hil":
        return subprocess.call([BIN / "hil", *rest])
    if command == "test":
        return subprocess.call([BIN / "python", "-m", "pytest", *rest])
    status = subprocess.call([BIN / "ruff", "check", "hil", "tests", "testcases", "benchmarks",
                                 "dev.py"])
    return subprocess.call([BIN / "mypy", "hil"]) or status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
