"""The Allure HTML report, built by the real Allure report generator.

    index = generate([Path("host-a/allure-results"), Path("host-b/allure-results")],
                     Path("allure-report"))

The generator is Allure 2's command line (allure-commandline on the npm registry, a Java
program; Java 8+ must be on PATH or in JAVA_HOME), which ``python3 dev.py setup`` installs into
``.allure/`` at the version pinned there and in ``ALLURE_VERSION``. ``HIL_ALLURE`` may name
another ``allure`` executable (a lab host without the project checkout). Several results
directories merge into one report; the report directory is replaced (``--clean``), so a
directory that holds anything but an earlier Allure report is refused rather than wiped.

The report is a web application that loads its data over HTTP: open it through a server
(``.allure/node_modules/.bin/allure open REPORT_DIR``, or ``python3 -m http.server -d
REPORT_DIR``), not as a file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hil
from hil.errors import ConfigError, HilError

ALLURE_VERSION = "2.46.1"   # keep equal to dev.py's NPM_TOOLS pin
ALLURE_ENV = "HIL_ALLURE"
SETUP = "python3 dev.py setup"
TIMEOUT = 600.0


class GeneratorFailed(HilError):
    """The Allure generator ran and failed; the message is its last line of output."""


def _project_roots() -> list[Path]:
    # The checkout hil runs from (an editable install), then the working directory.
    return list(dict.fromkeys([Path(hil.__file__).resolve().parent.parent, Path.cwd()]))


def find_generator() -> Path:
    """The ``allure`` executable: ``$HIL_ALLURE``, else the project's ``.allure/`` install at
    ``ALLURE_VERSION``. A missing or stale one is a ConfigError that says how to install it."""
    chosen = os.environ.get(ALLURE_ENV)
    if chosen:
        path = Path(chosen)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"${ALLURE_ENV}", f"{chosen} is not an executable file")
        return path
    for root in _project_roots():
        executable = root / ".allure" / "node_modules" / ".bin" / "allure"
        if not executable.exists():
            continue
        installed = _installed_version(root / ".allure")
        if installed != ALLURE_VERSION:
            raise ConfigError(str(executable), f"Allure {installed or '(unknown version)'} is "
                              f"installed, hil pins {ALLURE_VERSION}: run `{SETUP}`")
        return executable
    raise ConfigError("allure", f"the Allure report generator (allure-commandline "
                      f"{ALLURE_VERSION}) is not installed in .allure/: run `{SETUP}` in the "
                      f"project, or set ${ALLURE_ENV}")


def _installed_version(prefix: Path) -> str | None:
    manifest = prefix / "node_modules" / "allure-commandline" / "package.json"
    try:
        version = json.loads(manifest.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None
    return version if isinstance(version, str) else None


def _check_java() -> None:
    home = os.environ.get("JAVA_HOME")
    if (home and (Path(home) / "bin" / "java").exists()) or shutil.which("java"):
        return
    raise ConfigError("java", "the Allure generator is a Java program and no java is on PATH "
                              "(install a JRE 8+, e.g. Debian's openjdk-17-jre-headless, or set "
                              "JAVA_HOME)")


def check_report_dir(report_dir: Path, results_dirs: Sequence[Path]) -> None:
    """Refuse a report directory that ``--clean`` would wrongly wipe: one of the results, a
    directory holding them, or a directory with other things than an Allure report."""
    target = report_dir.resolve()
    for results in results_dirs:
        source = results.resolve()
        if target == source or target in source.parents:
            raise ConfigError(f"-o {report_dir}", f"would be wiped, and it holds the results "
                                                  f"{results}: give another report directory")
    if report_dir.exists() and not report_dir.is_dir():
        raise ConfigError(f"-o {report_dir}", "exists and is not a directory")
    if report_dir.is_dir() and any(report_dir.iterdir()) \
            and not (report_dir / "index.html").exists():
        raise ConfigError(f"-o {report_dir}", "is not empty and holds no Allure report: not "
                                              "wiping it; give a new or an old report directory")


def generate(results_dirs: Sequence[Path], report_dir: Path, *,
             environment: Mapping[str, str] | None = None,
             executor: Mapping[str, Any] | None = None) -> Path:
    """Run the generator over ``results_dirs`` into ``report_dir``; return its index.html.

    ``environment`` and ``executor`` (the sign-off: the verdict, computed from every results
    directory) replace the directories' own ``environment.properties`` and ``executor.json``:
    the generator then reads a merged copy of the results (hard links where it can), so the
    user's directories are never written to."""
    check_report_dir(report_dir, results_dirs)
    allure = find_generator()
    _check_java()
    if environment is None and executor is None:
        return _run(allure, results_dirs, report_dir)
    with tempfile.TemporaryDirectory(prefix="hil-report-") as scratch:
        merged = Path(scratch) / "results"
        _merged_copy(results_dirs, merged)
        if environment is not None:
            (merged / "environment.properties").write_text(properties_text(environment),
                                                           encoding="utf-8")
        if executor is not None:
            (merged / "executor.json").write_text(json.dumps(executor, ensure_ascii=False),
                                                  encoding="utf-8")
        return _run(allure, [merged], report_dir)


_REPLACED = {"environment.properties", "executor.json"}


def _merged_copy(results_dirs: Sequence[Path], merged: Path) -> None:
    """Every file of every results directory in one (Allure's result and attachment names are
    UUIDs: they do not collide; categories.json is the plugin's, the same in each)."""
    merged.mkdir(parents=True)
    for directory in results_dirs:
        for source in directory.iterdir():
            target = merged / source.name
            if not source.is_file() or source.name in _REPLACED or target.exists():
                continue
            try:
                os.link(source, target)
            except OSError:          # another file system, or links not allowed
                shutil.copy2(source, target)


def properties_text(values: Mapping[str, str]) -> str:
    """Java properties, as Allure's Environment widget reads them (keys' spaces escaped)."""
    def escape(text: str, key: bool = False) -> str:
        text = text.replace("\\", "\\\\").replace("\n", " ")
        return text.replace(" ", "\\ ").replace("=", "\\=").replace(":", "\\:") if key \
            else text
    return "".join(f"{escape(key, key=True)}={escape(value)}\n" for key, value in values.items())


def _run(allure: Path, results_dirs: Sequence[Path], report_dir: Path) -> Path:
    command = [str(allure), "generate", "--clean", "--output", str(report_dir),
               *(str(path) for path in results_dirs)]
    # No analytics beacon in the page: reports are read offline and on lab networks.
    environment = {**os.environ, "ALLURE_NO_ANALYTICS": "1"}
    try:
        # The generator found above, with paths as arguments: no shell, nothing untrusted.
        done = subprocess.run(command, capture_output=True, text=True, env=environment,  # noqa: S603
                              timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise GeneratorFailed(f"allure generate: no report after {TIMEOUT:.0f} s") from None
    except OSError as error:
        raise GeneratorFailed(f"allure generate: cannot run {allure}: {error.strerror}") \
            from None
    index = report_dir / "index.html"
    if done.returncode != 0 or not index.exists():
        output = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise GeneratorFailed(f"allure generate exited {done.returncode}: {output[-1]}")
    return index
