"""The Allure HTML report, built by the real Allure report generator.

    index = generate([Path("host-a/allure-results"), Path("host-b/allure-results")],
                     Path("allure-report"))

The generator is Allure 2's command line (allure-commandline on the npm registry, a Java
program; Java 8+ must be on PATH or in JAVA_HOME), which ``python3 dev.py setup`` installs into
``.allure/`` at the version pinned there and in ``ALLURE_VERSION``. ``HIL_ALLURE`` may name
another ``allure`` executable (a lab host without the project checkout). Several results
directories merge into one report. The generator reads a copy of the results with every secret
masked (``hil.report.redact``) and writes into a new hidden directory of the report directory;
the report is then masked again and moved in place of an earlier report's entries, those Allure
and hil write (``ALLURE_ENTRIES``, ``HIL_ENTRIES``): nothing else is ever removed. A directory
is an earlier report only when it holds Allure's page, data, widgets, history and script
together; a directory with other things in it is refused in one line, never written to.

The report is a web application that loads its data over HTTP: open it through a server
(``.allure/node_modules/.bin/allure open REPORT_DIR``, or ``python3 -m http.server -d
REPORT_DIR``), not as a file.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hil
from hil.errors import ConfigError, HilError
from hil.report.redact import Redactor

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


# What Allure 2's generator writes at the top of a report (2.46: index.html, assets/, data/,
# export/, history/, widgets/; earlier 2.x: app.js, styles.css, favicon.ico, plugin(s)/), and
# what hil writes beside it. Only these are ever removed from a report directory.
ALLURE_ENTRIES = ("index.html", "app.js", "styles.css", "favicon.ico", "assets", "data",
                  "export", "history", "plugin", "plugins", "widgets")
HIL_ENTRIES = ("signoff.md", "signoff.json")
_SCRATCH = ".hil-report-"      # the new report is generated in a hidden directory of -o


def is_report(directory: Path) -> bool:
    """Does ``directory`` hold an Allure 2 report: its page, its data, its widgets (the
    summary), its history and its script (``assets/`` since 2.3x, ``app.js`` before)?"""
    return (directory / "index.html").is_file() and (directory / "data").is_dir() \
        and (directory / "widgets" / "summary.json").is_file() \
        and (directory / "history").is_dir() \
        and ((directory / "assets").is_dir() or (directory / "app.js").is_file())


def check_report_dir(report_dir: Path, results_dirs: Sequence[Path]) -> None:
    """Refuse a report directory the report cannot go to without harm: one of the results, a
    directory holding them, or a directory with things in it that is no Allure report."""
    target = report_dir.resolve()
    for results in results_dirs:
        source = results.resolve()
        if target == source or target in source.parents:
            raise ConfigError(f"-o {report_dir}", f"would be wiped, and it holds the results "
                                                  f"{results}: give another report directory")
    if report_dir.exists() and not report_dir.is_dir():
        raise ConfigError(f"-o {report_dir}", "exists and is not a directory")
    if report_dir.is_dir() and not is_report(report_dir) \
            and any(not entry.name.startswith(_SCRATCH) for entry in report_dir.iterdir()):
        raise ConfigError(f"-o {report_dir}", "is not empty and holds no Allure report: not "
                                              "wiping it; give a new, an empty or an old report "
                                              "directory")


def generate(results_dirs: Sequence[Path], report_dir: Path, *,
             environment: Mapping[str, str] | None = None,
             executor: Mapping[str, Any] | None = None,
             redact: Redactor | None = None) -> Path:
    """Run the generator over ``results_dirs`` into ``report_dir``; return its index.html.

    The generator reads a merged copy of the results with every secret masked (``redact``,
    default: ``Redactor.from_environment()``): the user's directories are never written to.
    ``environment`` and ``executor`` (the sign-off: the verdict, computed from every results
    directory) replace the directories' own ``environment.properties`` and ``executor.json``.
    The report is generated beside, masked again, then put in place of an earlier report's
    entries (``ALLURE_ENTRIES``, ``HIL_ENTRIES``): nothing else in ``report_dir`` is
    touched."""
    check_report_dir(report_dir, results_dirs)
    allure = find_generator()
    _check_java()
    redact = redact if redact is not None else Redactor.from_environment()
    created = not report_dir.exists()
    report_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="hil-report-") as scratch, \
                tempfile.TemporaryDirectory(prefix=_SCRATCH, dir=report_dir) as beside:
            merged = Path(scratch) / "results"
            replaced = {name for name, given in (("environment.properties", environment),
                                                 ("executor.json", executor))
                        if given is not None}
            _merged_copy(results_dirs, merged, redact, replaced)
            if environment is not None:
                (merged / "environment.properties").write_text(
                    redact(properties_text(environment)), encoding="utf-8")
            if executor is not None:
                (merged / "executor.json").write_text(
                    redact(json.dumps(executor, ensure_ascii=False)), encoding="utf-8")
            fresh = Path(beside) / "report"
            _run(allure, [merged], fresh)
            for path in sorted(fresh.rglob("*")):    # a last guard: what Allure made of it
                if path.is_file() and not path.is_symlink():
                    redact.file_in_place(path)
            _put_in_place(fresh, report_dir)
    except BaseException:
        if created and not any(report_dir.iterdir()):
            report_dir.rmdir()
        raise
    return report_dir / "index.html"


def _put_in_place(fresh: Path, report_dir: Path) -> None:
    """The entries of the new report ``fresh`` moved into ``report_dir``, in place of an earlier
    report's (only the entries Allure and hil write are removed)."""
    new = [entry.name for entry in fresh.iterdir()]
    foreign = [name for name in new if name not in ALLURE_ENTRIES
               and os.path.lexists(report_dir / name)]
    if foreign:       # a name a future Allure writes that is the user's here: keep the user's
        raise GeneratorFailed(f"allure generate wrote {foreign[0]}, and {report_dir} has one "
                              "hil did not write: not replacing it")
    for name in (*ALLURE_ENTRIES, *HIL_ENTRIES):
        _remove(report_dir / name)
    for name in new:
        (fresh / name).rename(report_dir / name)


def _remove(path: Path) -> None:
    # A symbolic link is removed, never followed: what it points to is not the report's.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _merged_copy(results_dirs: Sequence[Path], merged: Path, redact: Redactor,
                 replaced: set[str]) -> None:
    """Every file of every results directory in one, secrets masked (Allure's result and
    attachment names are UUIDs: they do not collide; categories.json is the plugin's, the same
    in each; the first directory's ``environment.properties`` is kept, unless it is in
    ``replaced``: the sign-off's takes its place). Only regular files are read: a FIFO or a
    device among the results is skipped."""
    merged.mkdir(parents=True)
    for directory in results_dirs:
        for source in directory.iterdir():
            target = merged / source.name
            if source.name in replaced or target.exists() or not _regular(source):
                continue
            try:
                redact.copy(source, target)
            except OSError as error:
                raise ConfigError(str(source), f"cannot read: {error.strerror}") from None


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


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
