#!/usr/bin/env python3
"""Set up hil and run it, with nothing but Python 3.11+ on the machine.

    python3 dev.py run  [hil suite options]  set up, then the main job: the conformance suite on
                                             the simulated rigs, its Allure report and sign-off
    python3 dev.py test [pytest options]     set up, then run the tests (on 3 xdist workers)
    python3 dev.py lint                      set up, then ruff and mypy
    python3 dev.py hil ...                   set up, then any hil command
    python3 dev.py setup                     set up only

Setting up makes .venv and installs hil with its pinned dependencies (pyproject.toml), makes
.venv-labgrid with labgrid (pyproject.toml's `labgrid` extra: a lab's coordinator, exporter and
client, apart from hil's pyserial), and installs the report tools from the npm registry into
.allure/ (NPM_TOOLS, needs Node.js' npm); each part is skipped while its pins are unchanged
since the last setup.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".hil-setup"
# From the npm registry, exact versions, no install scripts: nothing else is downloaded.
#   allure-commandline: the Allure 2 report generator `hil report` runs (a Java program, packaged
#     whole in the npm tarball; Allure 2 reads the categories.json the plugin writes)
#   playwright-core: drives Debian's chromium in the report's page test (no browser of its own)
NPM_TOOLS = {"allure-commandline": "2.46.1", "playwright-core": "1.65.1"}
NPM_PREFIX = ROOT / ".allure"
NPM_STAMP = NPM_PREFIX / ".hil-setup"
# labgrid (coordinator, exporter, client) in a virtualenv of its own, from pyproject.toml's
# `labgrid` extra: its pyserial fork must not replace hil's pyserial (hil.rig.providers.labgrid).
LABGRID_VENV = ROOT / ".venv-labgrid"
LABGRID_BIN = LABGRID_VENV / ("Scripts" if os.name == "nt" else "bin")
LABGRID_STAMP = LABGRID_VENV / ".hil-setup"


def setup() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"dev.py: hil needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    setup_venv()
    setup_labgrid()
    setup_npm_tools()


def setup_venv() -> None:
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


def setup_labgrid() -> None:
    import tomllib

    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["labgrid"]
    wanted = " ".join(pins)
    if LABGRID_STAMP.exists() and LABGRID_STAMP.read_text() == wanted:
        return
    if not sys.platform.startswith("linux"):
        # labgrid's exporter and its USB resources are Linux'; hil runs without it.
        print("dev.py: not on Linux: skipping labgrid (rigs that are labgrid places need it)",
              file=sys.stderr, flush=True)
        return
    if not (LABGRID_BIN / "python").exists():
        print("dev.py: creating .venv-labgrid", flush=True)
        venv.create(LABGRID_VENV, with_pip=True)
    print(f"dev.py: installing {wanted} into .venv-labgrid", flush=True)
    subprocess.run([LABGRID_BIN / "python", "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *pins], check=True)
    LABGRID_STAMP.write_text(wanted)


def setup_npm_tools() -> None:
    wanted = [f"{name}@{version}" for name, version in NPM_TOOLS.items()]
    if NPM_STAMP.exists() and NPM_STAMP.read_text() == " ".join(wanted) \
            and (NPM_PREFIX / "node_modules" / ".bin" / "allure").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        # hil runs without it; only `hil report` needs the generator, and says so.
        print("dev.py: npm not found: skipping the report tools (hil report needs Node.js "
              "and npm)", file=sys.stderr, flush=True)
        return
    print(f"dev.py: installing {', '.join(wanted)} from the npm registry into .allure",
          flush=True)
    NPM_PREFIX.mkdir(exist_ok=True)
    subprocess.run([npm, "install", "--prefix", str(NPM_PREFIX), "--save-exact",
                    "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error",
                    *wanted], check=True)
    NPM_STAMP.write_text(" ".join(wanted))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test", "lint", "hil", "setup"):
        print(__doc__, file=sys.stderr)
        return 2
    setup()
    command, rest = argv[0], argv[1:]
    if command == "setup":
        return 0
    os.chdir(ROOT)
    if command == "run":
        return subprocess.call([BIN / "hil", "suite", *rest])
    if command == "hil":
        return subprocess.call([BIN / "hil", *rest])
    if command == "test":
        # Side by side on three pytest-xdist workers: most tests wait on simulated boards and
        # sockets rather than compute, so three share two cores well (a whole run takes about
        # half the time); each rig's tests stay on one worker (loadgroup). `-n 0` runs serially.
        parallel = [] if any(arg.startswith(("-n", "--numprocesses")) for arg in rest) \
            else ["-n", "3", "--dist", "loadgroup"]
        return subprocess.call([BIN / "python", "-m", "pytest", *parallel, *rest])
    status = subprocess.call([BIN / "ruff", "check", "hil", "tests", "testcases", "benchmarks",
                                 "dev.py"])
    return subprocess.call([BIN / "mypy", "hil"]) or status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
