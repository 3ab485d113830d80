"""hil's pytest plugin (registered through the ``pytest11`` entry point).

Thin over the library: fixtures build, yield and tear down; the work is in ``hil.rig``,
``hil.drivers``, ``hil.service``, ``hil.gateway`` and ``hil.conformance``; ``reporting`` is what
a test leaves in its Allure results.

Options (group ``hil``; each has a pytest.ini twin, the command line wins):

=========================  ======================  ==========================================
``--hil-rig NAME|PATH``    ``hil_rigs`` (lines)    rigs to run on (repeatable); a name is
                                                   looked up as ``rigs/NAME.yaml``
``--hil-firmware PATH``    ``hil_firmware``        base image flashed before each test
``--hil-package PATH``     ``hil_package``         the build delivered over the air
``--hil-target-version V`` ``hil_target_version``  the version that build reports (default:
                                                   the package's own; 1.1.0 for the fixtures)
                                                   (these three: ``BOARD=VALUE`` per board,
                                                   repeatable; ``hil.rig.inputs``)
``--hil-ota-service S``    ``hil_ota_service``     ``mock`` (default) or a OneNET base URL
``--hil-timeline-dir DIR`` ``hil_timeline_dir``    where timelines are written
``--hil-lease-dir DIR``    ``hil_lease_dir``       where rig lease locks live
``--hil-lease-timeout S``  ``hil_lease_timeout``   how long a test waits for a busy rig
                                                   (default 600 s), then a rig fault
``--hil-expectations F``   ``hil_expectations``    the expectation profile (default
                                                   ``fixtures/expectations/onenet.yaml``)
``--hil-check-rigs``       ``hil_check_rigs``      check each rig's parts (``hil rigs check``)
                                                   before its first test; a rig that fails
                                                   has all its tests end as rig faults
``--hil-full-restore``     ``hil_full_restore``    the restore before each test writes the
                                                   whole base image (default: only the
                                                   sectors that do not hold it already)
``--hil-progress``                                 a line per finished test: verdict, rig,
                                                   name, time (``hil suite`` uses it)
``--hil-place NAME``       ``hil_place``           no rig file: the rig is this labgrid place
``--hil-place-tags TAGS``  ``hil_place_tags``      no rig file: the rig is any place carrying
                                                   these tags (each xdist worker its own)
``--hil-coordinator H:P``  ``hil_coordinator``     the labgrid coordinator (default
                                                   ``$LG_COORDINATOR``, then labgrid's own)
=========================  ======================  ==========================================

A run on a place (``--hil-place`` or ``--hil-place-tags``) builds its rig from the places that
match at the coordinator (``hil.rig.providers.labgrid.rig_from_places``): the board from their
``board`` tag, the identity from their ``product_id`` and ``dev_id`` tags (the access key from
``$HIL_ACCESS_KEY``), the console from the place's NetworkSerialPort, power from its power port.
Each process (each xdist worker) reserves a place at its first test and holds it to its end,
its identity that place's; the coordinator, not a lease file, keeps two runs off one place, and
each test's report names its place (the ``hil_place`` property, Allure's ``place`` label).
Under ``-n N`` with tags the tests spread over the workers (also with ``--dist loadgroup``), and
more workers than matching places is refused (a worker would wait for a place its own run holds).

Before the first test the controller checks the build (``hil.rig.inputs.check_builds``): each
board's package and base image are read, and a package that is no image, for another board,
damaged or of another version than the target, or a base of the target's version or that does
not boot on a simulated board, stops the run with one line naming the file (exit status 4).

Fixtures: ``rig``, ``board``, ``console``, ``flasher``, ``power``, ``rf``, ``ota_service``,
``ota_task``, ``timeline``, ``gateway`` (the recording, fault-injecting gateway in front of the
OTA service, its timeline fresh for each test) and ``ota`` (a conformance scenario:
``hil.conformance.scenario.OtaScenario``); ``mock_onenet`` is the mock with no rig. Tests
that use a rig are parametrized over the selected rigs (ids: rig names); with no ``--hil-rig``
they run on the simulated rigs in ``rigs/sim-*.yaml`` (under the root directory), and skip if
there are none. A simulated rig's board, console and instruments run for the length of each
test. Each test's console log and timeline are written, as they come, to ``<timeline
dir>/<test>.console.log`` and ``.timeline.jsonl``; ``--dist loadgroup`` keeps each rig's tests
on one worker (the plugin's own xdist scheduler).

Markers: ``@pytest.mark.board("esp32", ...)`` runs a test only on those boards;
``@pytest.mark.needs("power", "rf", "flasher", "power_cut", "space")`` skips it on rigs lacking
one; ``@pytest.mark.phase("verify")`` names a conformance test's OTA phase (default: its module).

A rig fault (probe missing, port gone, instrument silent) ends the test as an ERROR naming the rig
and the part, also when it happens inside the test; a firmware fault is a FAILED test; a scenario
the rig or service cannot run (``hil.errors.Unsupported``) is SKIPPED with its reason. A scenario
whose injected fault never hit where and when it asked (``hil.errors.FaultNotLanded``) ends as
an ERROR, never PASSED (its assertions were not about that fault); one that failed stays FAILED,
with a note naming the fault that missed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest

from hil.conformance.expectations import Profile, load_profile
from hil.conformance.scenario import OtaScenario
from hil.drivers.base import ConsoleProtocol, FlasherProtocol, PowerProtocol, RfProtocol
from hil.errors import ConfigError, FaultNotLanded, FirmwareFault, RigFault, Unsupported
from hil.gateway import Gateway
from hil.gateway.dns import DnsServer, check_no_loop
from hil.onenet.tasks import Package, Task
from hil.pytest_plugin import coverage, reporting
from hil.rig.board import Board
from hil.rig.check import PartCheck, check_rig
from hil.rig.inputs import DEFAULT_TARGET, BoardBuild, check_builds, per_board, resolve_builds
from hil.rig.lease import DEFAULT_LEASE_TIMEOUT, DEFAULT_LOCK_DIR, RigLease
from hil.rig.model import Rig, find_rig, load_rig, rig_of_test
from hil.rig.parts import RigParts
from hil.service.config import read_package
from hil.service.server import MockOneNet
from hil.service.timeline import Timeline

CAPABILITIES = ("console", "flasher", "power", "power_cut", "rf", "space")
# The rigs a run without --hil-rig uses: those of these files whose firmware has a test shell.
# The shell-less (shipped-firmware) ones run by name: tests/test_shipped_suite.py, in parallel.
SIM_RIGS = "sim-*.yaml"
DEFAULT_PROFILE = Path("fixtures/expectations/onenet.yaml")
__all__ = ["DEFAULT_TARGET", "HilOptions"]


@dataclass(frozen=True)
class HilOptions:
    rigs: tuple[Rig, ...]
    builds: Mapping[str, BoardBuild]     # board -> its build under test (hil.rig.inputs)
    ota_service: str
    timeline_dir: Path | None
    lease_dir: Path
    profile: Profile | None
    root: Path
    check_rigs: bool = False
    full_restore: bool = False
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT
    progress: bool = False
    elfs: Mapping[str, Path] = field(default_factory=dict)   # board -> --hil-elf

    def elf_for(self, rig: Rig) -> Path | None:
        """The ELF a crash's addresses are named from: --hil-elf for the rig's board; for a
        simulated rig without one, its firmware model's (``hil.sim.symbols``)."""
        given = self.elfs.get(rig.board)
        if given is not None or rig.sim is None or rig.sim_state_dir is None:
            return given
        from hil.sim.symbols import write_elf

        rig.sim_state_dir.mkdir(parents=True, exist_ok=True)
        return write_elf(rig.board, rig.sim_state_dir / "firmware.elf")

    def update_package(self, rig: Rig) -> tuple[Package, str] | None:
        """The build under test and its version: --hil-package and --hil-target-version, else
        the board's update image in fixtures/images (``<board>-1.1.0.bin``)."""
        build = self.builds.get(rig.board)
        if build is None or build.package is None or build.target is None:
            return None
        return read_package(build.package, "--hil-package"), build.target

    def base_package(self, rig: Rig) -> Package | None:
        """The base build as a package: --hil-firmware, else fixtures/images/<board>-1.0.0.bin."""
        build = self.builds.get(rig.board)
        if build is None or build.base is None:
            return None
        return read_package(build.base, "--hil-firmware")

    def firmware_for(self, rig: Rig) -> Path | None:
        """The base image flashed before each of the rig's tests (None: the factory reset)."""
        build = self.builds.get(rig.board)
        return build.firmware if build is not None else None

    def _shared(self, get: Callable[[BoardBuild], Any]) -> Any:
        values = {get(build) for build in self.builds.values()}
        return values.pop() if len(values) == 1 else None

    @property
    def firmware(self) -> Path | None:
        """The base image every board takes, if one does (``firmware_for`` per rig)."""
        shared: Path | None = self._shared(lambda build: build.firmware)
        return shared

    @property
    def package(self) -> Path | None:
        """The package every board takes, if one was given for all (``update_package``)."""
        shared: Path | None = self._shared(
            lambda build: build.package if build.package_given else None)
        return shared

    @property
    def target_version(self) -> str | None:
        """The target version given for every board, if one was (``update_package``)."""
        shared: str | None = self._shared(
            lambda build: build.target if build.target_given else None)
        return shared


OPTIONS = pytest.StashKey[HilOptions]()


# ---------------------------------------------------------------------------------- options
def _option(parser: pytest.Parser, group: pytest.OptionGroup, flag: str, ini: str,
            help: str, *, repeat: bool = False) -> None:
    group.addoption(flag, dest=ini, action="append" if repeat else "store", default=None,
                    help=f"{help} (ini: {ini})")
    kind: Literal["linelist", "string"] = "linelist" if repeat else "string"
    parser.addini(ini, help, type=kind)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hil: hardware-in-the-loop OTA testing")
    _option(parser, group, "--hil-rig", "hil_rigs",
            "rig to run on, a name in rigs/ or a YAML path; repeatable", repeat=True)
    _option(parser, group, "--hil-firmware", "hil_firmware",
            "base firmware image flashed before each test; BOARD=PATH per board, repeatable",
            repeat=True)
    _option(parser, group, "--hil-package", "hil_package",
            "OTA package, the build under test; BOARD=PATH per board, repeatable", repeat=True)
    _option(parser, group, "--hil-target-version", "hil_target_version",
            "the version the OTA package reports (default: the package's own); BOARD=V per "
            "board, repeatable", repeat=True)
    _option(parser, group, "--hil-elf", "hil_elf",
            "the unstripped ELF of the build under test: a crash's PC, LR and backtrace are "
            "named by its functions; BOARD=PATH per board, repeatable", repeat=True)
    _option(parser, group, "--hil-ota-service", "hil_ota_service",
            "mock (default) or the base URL of a OneNET OTA service")
    _option(parser, group, "--hil-timeline-dir", "hil_timeline_dir",
            "directory for the OTA timelines (JSON lines)")
    _option(parser, group, "--hil-lease-dir", "hil_lease_dir",
            f"directory of the rig lease locks (default {DEFAULT_LOCK_DIR})")
    _option(parser, group, "--hil-lease-timeout", "hil_lease_timeout",
            f"seconds a test waits for a rig another process holds (default "
            f"{DEFAULT_LEASE_TIMEOUT:g})")
    group.addoption("--hil-progress", dest="hil_progress", action="store_true", default=False,
                    help="a line per finished test (verdict, rig, name, seconds) instead of "
                    "dots")
    _option(parser, group, "--hil-expectations", "hil_expectations",
            f"expectation profile, a YAML file (default {DEFAULT_PROFILE})")
    check = "check each rig's parts before its first test (hil rigs check)"
    group.addoption("--hil-check-rigs", dest="hil_check_rigs", action="store_true",
                    default=None, help=f"{check} (ini: hil_check_rigs)")
    parser.addini("hil_check_rigs", check, type="bool", default=False)
    full = ("the restore before each test writes the whole base image, not only the sectors "
            "that do not hold it already")
    group.addoption("--hil-full-restore", dest="hil_full_restore", action="store_true",
                    default=None, help=f"{full} (ini: hil_full_restore)")
    parser.addini("hil_full_restore", full, type="bool", default=False)
    _option(parser, group, "--hil-place", "hil_place",
            "run on this labgrid place, its rig built from the place (no --hil-rig)")
    _option(parser, group, "--hil-place-tags", "hil_place_tags",
            "run on any labgrid place with these tags, key=value[,key=value] (each xdist "
            "worker reserves its own)")
    _option(parser, group, "--hil-coordinator", "hil_coordinator",
            "the labgrid coordinator, host:port (default $LG_COORDINATOR)")


def _value(config: pytest.Config, name: str) -> Any:
    given = config.getoption(name)
    return given if given else config.getini(name)


def _given(config: pytest.Config, name: str) -> tuple[list[str], Path]:
    """A repeatable option's values and the directory its relative paths start from: the
    current directory for the command line, the root directory for the ini file."""
    given = config.getoption(name)
    if given:
        return list(given), Path()    # as given: pytest runs where it was started
    return list(config.getini(name) or []), config.rootpath


def _lease_timeout(config: pytest.Config) -> float:
    value = _value(config, "hil_lease_timeout")
    if not value:
        return DEFAULT_LEASE_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise pytest.UsageError(f"--hil-lease-timeout: {value!r} is not a positive number of "
                                "seconds")
    return seconds


def _builds(config: pytest.Config, rigs: tuple[Rig, ...]) -> dict[str, BoardBuild]:
    firmware, firmware_dir = _given(config, "hil_firmware")
    package, package_dir = _given(config, "hil_package")
    target, _ = _given(config, "hil_target_version")
    if firmware and package and firmware_dir != package_dir:
        raise pytest.UsageError("give --hil-firmware and --hil-package both on the command "
                                "line or both in the ini file")
    try:
        return resolve_builds([rig.board for rig in rigs], firmware=firmware, package=package,
                              target=target, root=config.rootpath,
                              base_dir=package_dir if package else firmware_dir)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None


def _elfs(config: pytest.Config, rigs: tuple[Rig, ...]) -> dict[str, Path]:
    """--hil-elf per board, each checked to be an ELF with a symbol table."""
    from hil.drivers.elf import ElfSymbols

    given, base_dir = _given(config, "hil_elf")
    try:
        values = per_board("--hil-elf", given)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    found: dict[str, Path] = {}
    for board in {rig.board for rig in rigs}:
        value = values.get(board, values.get(None))
        if value is None:
            continue
        path = base_dir / value
        if not path.is_file():
            raise pytest.UsageError(f"--hil-elf: no such file {path}")
        try:
            ElfSymbols(path)
        except (ValueError, OSError) as error:
            raise pytest.UsageError(f"--hil-elf: {error}") from None
        found[board] = path
    return found


def _existing(config: pytest.Config, name: str, flag: str) -> Path | None:
    value = _value(config, name)
    if not value:
        return None
    path = Path(value)
    if not path.is_absolute() and not config.getoption(name):
        path = config.rootpath / path   # ini paths are relative to the ini file's directory
    if not path.is_file():
        raise pytest.UsageError(f"{flag}: no such file {path}")
    return path


# The rigs built from labgrid places (--hil-place, --hil-place-tags), by name.
PLACE_RIGS = pytest.StashKey[frozenset[str]]()


def _place_rig(config: pytest.Config) -> Rig | None:
    """The rig of a run on a labgrid place (--hil-place or --hil-place-tags), built from the
    places that match at the coordinator; None when neither is given."""
    from hil.configfile import validate
    from hil.rig.model import Labgrid
    from hil.rig.providers.labgrid import LabgridClient, rig_from_places

    place, tags = _value(config, "hil_place"), _value(config, "hil_place_tags")
    if not place and not tags:
        return None
    if place and tags:
        raise pytest.UsageError("--hil-place, --hil-place-tags: give one of them (a place by "
                                "name, or any place with these tags)")
    option = f"--hil-place {place}" if place else f"--hil-place-tags {tags}"
    if _value(config, "hil_rigs"):
        raise pytest.UsageError(f"{option}: the rig is built from the place; leave out "
                                "--hil-rig (or name the place in the rig file's labgrid: section)")
    section: dict[str, Any] = {"place": place} if place else {"tags": _tags(tags)}
    coordinator = _value(config, "hil_coordinator")
    if coordinator:
        section["coordinator"] = coordinator
    try:
        spec = validate(Labgrid, section, option)
        from hil.rig.providers.labgrid import coordinator_address

        snapshot = LabgridClient(coordinator_address(spec)).snapshot()
        rig = rig_from_places(spec, snapshot, option)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    except RigFault as fault:
        raise pytest.UsageError(f"{option}: {fault}") from None
    workers = getattr(config.option, "numprocesses", None)
    matching = len(snapshot.matching(spec))
    if isinstance(workers, int) and workers > matching and not hasattr(config, "workerinput"):
        raise pytest.UsageError(
            f"{option}: -n {workers}, but {matching} place{'s' if matching > 1 else ''} "
            f"match at {coordinator_address(spec)}: a worker would wait for a place its own "
            f"run holds (-n {matching} at most)")
    return rig


def _tags(value: str) -> dict[str, str]:
    """``board=nrf52832,rack=b`` as a dict; one line naming the option when malformed."""
    tags: dict[str, str] = {}
    for word in value.split(","):
        key, equals, tag = word.strip().partition("=")
        if not equals or not key:
            raise pytest.UsageError(f"--hil-place-tags: {word.strip()!r} is not key=value "
                                    "(board=nrf52832,rack=b)")
        tags[key] = tag
    return tags


def _load_rigs(config: pytest.Config) -> tuple[Rig, ...]:
    """The selected rigs; with none selected, the simulated ones with a test shell
    (``rigs/sim-*.yaml`` but the shell-less ones)."""
    rigs: list[Rig] = []
    on_place = _place_rig(config)
    config.stash[PLACE_RIGS] = frozenset([on_place.name] if on_place else [])
    if on_place is not None:
        return (on_place,)
    chosen = _value(config, "hil_rigs")
    names = chosen or [str(path) for path in sorted((config.rootpath / "rigs").glob(SIM_RIGS))]
    for name in names:
        try:
            rig = load_rig(find_rig(name, config.rootpath / "rigs"))
        except ConfigError as error:
            raise pytest.UsageError(str(error)) from None
        if not chosen and rig.shell_less:
            continue
        if any(known.name == rig.name for known in rigs):
            raise pytest.UsageError(f"--hil-rig: rig {rig.name} is selected twice")
        rigs.append(rig)
    return tuple(rigs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "board(*names): run only on rigs with one of these boards "
                            "(esp32, nrf52832, gd32)")
    config.addinivalue_line("markers", "needs(*capabilities): skip on rigs lacking one of "
                            f"{', '.join(CAPABILITIES)}")
    config.addinivalue_line("markers", "phase(name): the OTA phase a conformance test is about "
                            "(its Allure feature; default: the module, test_<phase>.py)")
    service = _value(config, "hil_ota_service") or "mock"
    if service != "mock" and not service.startswith(("http://", "https://")):
        raise pytest.UsageError(f"--hil-ota-service: {service!r} is neither mock nor an "
                                "http(s):// base URL")
    timeline_dir = _value(config, "hil_timeline_dir")
    lease_dir = _value(config, "hil_lease_dir")
    profile_path = _existing(config, "hil_expectations", "--hil-expectations")
    if profile_path is None and (config.rootpath / DEFAULT_PROFILE).is_file():
        profile_path = config.rootpath / DEFAULT_PROFILE
    try:
        profile = load_profile(profile_path) if profile_path else None
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    rigs = _load_rigs(config)
    config.stash[OPTIONS] = HilOptions(
        rigs=rigs, builds=_builds(config, rigs),
        ota_service=service.rstrip("/"),
        timeline_dir=Path(timeline_dir) if timeline_dir else None,
        lease_dir=Path(lease_dir) if lease_dir else DEFAULT_LOCK_DIR,
        profile=profile, root=config.rootpath,
        check_rigs=bool(config.getoption("hil_check_rigs") or config.getini("hil_check_rigs")),
        full_restore=bool(config.getoption("hil_full_restore")
                          or config.getini("hil_full_restore")),
        lease_timeout=_lease_timeout(config), progress=bool(config.getoption("hil_progress")),
        elfs=_elfs(config, rigs))
    if config.stash[OPTIONS].progress and not hasattr(config, "workerinput"):
        config.pluginmanager.register(Progress(config, rigs), "hil-progress")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Coverage recorded from here on (controller and workers); the build checked once, by
    the controller, before any test runs (xdist starts its workers after this hook): a bad
    input stops the run in one line (exit status 4)."""
    config = session.config
    options = config.stash.get(OPTIONS, None)
    if options is not None:
        coverage.register(config, options.rigs)
    if options is None or hasattr(config, "workerinput") or not options.rigs:
        return
    try:
        found = check_builds(options.builds, options.rigs)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for warning in found.warnings:
            reporter.write_line(f"hil: warning: {warning}", yellow=True)
        if config.option.verbose > 0:
            for line in found.lines:
                reporter.write_line(f"hil: {line}")


class Progress:
    """``--hil-progress``: one line per test as it finishes, in place of pytest's dots::

        PASSED  sim-esp32      detect/happy path ... 3.1 s
        SKIPPED sim-gd32       power/cut during flash ... 0.0 s: rig sim-gd32 lacks power_cut
        FAILED  sim-nrf52832   download/resume ... 4.2 s: download phase: expected report ...

    The verdict is the test's (a setup or teardown error makes it ERROR), the time its setup,
    call and teardown together. Registered on the controller only: xdist sends it every
    worker's reports."""

    def __init__(self, config: pytest.Config, rigs: tuple[Rig, ...]) -> None:
        self._config = config
        self._rigs = [rig.name for rig in rigs]
        self._tests: dict[str, tuple[str, float, str]] = {}   # nodeid -> verdict, s, why
        self._finished = 0
        self._session: pytest.Session | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._session = session

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config
                                 ) -> Generator[None, Any, Any]:
        status = yield
        if isinstance(status, tuple) and len(status) == 3:
            category, _, word = status
            return category, "", word       # no dot: this plugin writes the test's line
        return status

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        status = self._config.hook.pytest_report_teststatus(report=report, config=self._config)
        word = status[2][0] if isinstance(status[2], tuple) else status[2]
        verdict, seconds, why = self._tests.get(report.nodeid, ("PASSED", 0.0, ""))
        seconds += report.duration
        if verdict == "PASSED" and not report.passed:
            verdict = (word or report.outcome).upper() if report.when == "call" else \
                ("SKIPPED" if report.skipped else "ERROR")
            why = _why(report)
        elif report.when == "call" and word:
            verdict = word.upper()          # XFAIL, XPASS
        self._tests[report.nodeid] = (verdict, seconds, why)
        if report.when == "teardown":
            del self._tests[report.nodeid]
            self._finished += 1
            total = self._session.testscollected if self._session is not None else 0
            count = f"[{self._finished}/{total}] " if total else ""
            rig = rig_of_test(report.nodeid, self._rigs) or "-"
            line = f"{verdict:<7} {rig:<14} {_short_name(report.nodeid, rig)} ... " \
                f"{seconds:.1f} s{': ' + why if why else ''}"
            reporter = self._config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"{count}{line}")


def _why(report: pytest.TestReport) -> str:
    """The first line of why a test did not pass, short."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):                  # a skip: (file, line, "Skipped: why")
        text = str(longrepr[2]).removeprefix("Skipped: ")
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr or "")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= 140 else first[:137] + "..."


def _short_name(nodeid: str, rig: str) -> str:
    """``testcases/test_detect.py::test_happy_path[sim-esp32]`` -> ``detect/happy path``."""
    path, _, rest = nodeid.partition("::")
    function, _, params = rest.partition("[")
    module = Path(path).stem.removeprefix("test_")
    name = function.split("::")[-1].removeprefix("test_").replace("_", " ")
    # The rig is one whole dash-separated part of the parameters (its name may hold dashes).
    others = f"-{params.removesuffix(']')}-".replace(f"-{rig}-", "-", 1)[1:-1]
    return f"{module}/{name}" + (f" [{others}]" if others else "")


def pytest_report_header(config: pytest.Config) -> str | None:
    options = config.stash.get(OPTIONS, None)
    if options is None or not options.rigs:
        return None
    rigs = ", ".join(f"{rig.name} ({rig.board})" for rig in options.rigs)
    return f"hil: rigs {rigs}; OTA service {options.ota_service}"


# ---------------------------------------------------------------------------------- collection
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "_hil_rig" not in metafunc.fixturenames:
        return
    rigs = metafunc.config.stash[OPTIONS].rigs
    if rigs:
        metafunc.parametrize("_hil_rig", rigs, ids=[rig.name for rig in rigs])
    else:   # one unparametrized run that skips, saying how to select a rig
        metafunc.parametrize("_hil_rig", [None], ids=["no-rig"])


# First: xdist's own hook reads the xdist_group marks given here (--dist loadgroup).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        rig: Rig | None = callspec.params.get("_hil_rig") if callspec else None
        needed = [cap for mark in item.iter_markers("needs") for cap in mark.args]
        unknown = sorted(set(needed) - set(CAPABILITIES))
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.needs: unknown capability "
                                    f"{unknown[0]!r}; known: {', '.join(CAPABILITIES)}")
        if rig is None:
            continue
        boards = [name for mark in item.iter_markers("board") for name in mark.args]
        if boards and rig.board not in boards:
            item.add_marker(pytest.mark.skip(
                reason=f"runs on {', '.join(boards)}; rig {rig.name} is a {rig.board}"))
        missing = [cap for cap in needed if cap not in rig.capabilities]
        if missing:
            item.add_marker(pytest.mark.skip(
                reason=f"rig {rig.name} lacks {', '.join(missing)}"))
        # Under `pytest -n N --dist loadgroup` every test of a rig goes to one worker.
        item.add_marker(pytest.mark.xdist_group(rig.name))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: every test of a rig on one worker, the rigs spread over the
    workers (so no worker queues on another's rig lease).

    pytest-xdist 3.8 names each test's group by rewriting ``item._nodeid``, which pytest 9 no
    longer reads: its loadgroup silently spreads a rig's tests over all workers. The controller
    can still tell a test's rig from its id (``test_x[sim-esp32-...]``), so the scheduler groups
    by that; tests on no rig are balanced one by one."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    names = [rig.name for rig in config.stash[OPTIONS].rigs]
    # A rig of any place with some tags is one rig per worker: its tests spread like others.
    spread = {rig.name for rig in config.stash[OPTIONS].rigs
              if rig.name in config.stash.get(PLACE_RIGS, frozenset())
              and rig.labgrid is not None and rig.labgrid.tags}

    class RigScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            rig = rig_of_test(nodeid, names)
            return f"rig {rig}" if rig is not None and rig not in spread else nodeid

    return RigScheduling(config, log)


# ---------------------------------------------------------------------------------- rig faults
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    parts = getattr(item, "funcargs", {}).get("rig_parts")
    if call.when == "call" and isinstance(parts, RigParts):
        console = parts.opened("console")
        log = console.log_text() if console is not None else None
        if log is not None:
            # Before the report is built, so a failure shows the board's side of the story.
            item.add_report_section("call", f"console {parts.rig.name}", log)
        scenario = item.funcargs.get("ota")   # type: ignore[attr-defined]
        if isinstance(scenario, OtaScenario) and reporting.alluredir(item.config):
            clock = item.stash.get(reporting.CLOCK, None)
            reporting.attempt_steps(scenario, console.lines() if console is not None else [],
                                    clock.ends if clock else [],
                                    call.excinfo.value if call.excinfo else None)
            reporting.attach_evidence(scenario, log)
    rig = getattr(item, "funcargs", {}).get("rig")
    if call.excinfo is not None and isinstance(call.excinfo.value, RigFault) \
            and isinstance(rig, Rig):
        call.excinfo.value.for_rig(rig.name)   # a driver's fault, named for the report
    report: pytest.TestReport = yield
    if call.excinfo is not None and call.excinfo.errisinstance((RigFault, FaultNotLanded)):
        report.hil_rig_fault = str(call.excinfo.value)  # type: ignore[attr-defined]
    return report


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    try:
        outcome = yield
    except Unsupported as unsupported:
        pytest.skip(str(unsupported))
    except FirmwareFault as failure:
        # The board's failure stays the verdict (a defect must not hide behind an ERROR);
        # the fault that missed is said beside it, for whoever reads the failure.
        not_landed = _faults_not_landed(pyfuncitem)
        if not_landed is not None:
            failure.add_note(f"note: {not_landed} (this failure may not be about it)")
        raise
    not_landed = _faults_not_landed(pyfuncitem)
    if not_landed is not None:
        # Raised in the test's call, so it is the test's outcome (ERROR, Allure's broken),
        # not a pass with an error in teardown.
        raise not_landed
    return outcome


def _faults_not_landed(item: pytest.Function) -> FaultNotLanded | None:
    """The first fault of the test's scenario that did not hit where and when it asked."""
    scenario = item.funcargs.get("ota")
    if not isinstance(scenario, OtaScenario):
        return None
    try:
        scenario.check_faults_landed()
    except FaultNotLanded as not_landed:
        return not_landed
    return None


def pytest_report_teststatus(report: pytest.TestReport,
                             config: pytest.Config) -> tuple[str, str, str] | None:
    # A rig fault inside the test body is the bench's failure, not the firmware's: count it
    # with the errors, as pytest counts a fault while setting the rig up. So is a fault that
    # never landed: the test did not test what it says.
    if report.when == "call" and report.failed and getattr(report, "hil_rig_fault", None):
        return "error", "E", "ERROR"
    return None


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture
def _hil_rig() -> Rig | None:
    """The rig of this test; parametrized by pytest_generate_tests."""
    return None


@pytest.fixture
def hil_options(pytestconfig: pytest.Config) -> HilOptions:
    return pytestconfig.stash[OPTIONS]


@pytest.fixture
def rig(_hil_rig: Rig | None, hil_options: HilOptions,
        pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> Iterator[Rig]:
    """The rig this test runs on, leased for the length of the test."""
    if _hil_rig is None:
        pytest.skip("no rig selected and no rigs/sim-*.yaml: give --hil-rig NAME (or hil_rigs "
                    "in pytest.ini)")
    if _hil_rig.name in pytestconfig.stash.get(PLACE_RIGS, frozenset()):
        yield _on_place(pytestconfig, request, _hil_rig)
        return
    lease = RigLease(_hil_rig.name, hil_options.lease_dir, timeout=hil_options.lease_timeout,
                     on_wait=lambda line: _tell(pytestconfig, line))
    with lease:
        if hil_options.check_rigs:
            _checked(pytestconfig, _hil_rig)
        yield _hil_rig


TOLD_PLACES = pytest.StashKey[set[str]]()


def _on_place(config: pytest.Config, request: pytest.FixtureRequest, rig: Rig) -> Rig:
    """A rig built from places (--hil-place, --hil-place-tags): the place this process holds
    for the run (reserved at its first test), the rig's identity that place's board's. The
    coordinator keeps other runs off it (no lease file: workers on one host hold different
    places of one rig); the test's report names the place."""
    from hil.rig.providers.labgrid import bound_to_place

    bound, place = bound_to_place(rig)
    request.node.user_properties.append(("hil_place", place.name))
    if reporting.alluredir(config):
        reporting.place_labels(place)
    if config.stash[OPTIONS].check_rigs:
        _checked(config, bound)     # once per process: its own place's parts
    told = config.stash.setdefault(TOLD_PLACES, set())
    if place.name not in told:
        told.add(place.name)
        _tell(config, f"rig {rig.name}: place {place.name} ({place.acquired}), "
                      f"device {bound.identity.dev_id}")
    return bound


def _tell(config: pytest.Config, line: str) -> None:
    """A line for the person at the terminal, now, past pytest's capture (an xdist worker's
    stderr is the terminal's too)."""
    import sys

    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None \
            else contextlib.nullcontext():
        print(f"hil: {line}", file=sys.stderr, flush=True)


RIG_CHECKS = pytest.StashKey[dict[str, PartCheck | None]]()


def _checked(config: pytest.Config, rig: Rig) -> None:
    """The rig's parts checked once a session; a rig that failed fails each of its tests at
    once as a rig fault (an ERROR, Allure's broken), naming the part, instead of running it."""
    checks = config.stash.setdefault(RIG_CHECKS, {})
    if rig.name not in checks:
        checks[rig.name] = next((check for check in check_rig(rig) if not check.ok), None)
    failed = checks[rig.name]
    if failed is not None:
        raise RigFault(failed.part, f"failed the rig check before the suite: {failed.detail}",
                       rig.name)


@pytest.fixture
def rig_parts(rig: Rig, request: pytest.FixtureRequest, pytestconfig: pytest.Config,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[RigParts]:
    """The rig's drivers, opened as fixtures ask for them; the console log goes into the
    test's report (pytest_runtest_makereport) and, line by line as it comes, to
    ``<timeline dir>/<test>.console.log`` (so a killed run leaves it on disk)."""
    log = _test_file(pytestconfig, tmp_path_factory, request.node.nodeid, "console.log")
    with RigParts(rig, console_log=log) as parts:
        yield parts


@pytest.fixture
def console(rig_parts: RigParts) -> ConsoleProtocol:
    return rig_parts.console()


def _part(rig: Rig, part: str, get: Callable[[], Any]) -> Any:
    driver = get()
    if driver is None:
        pytest.skip(f"rig {rig.name} has no {part} (add @pytest.mark.needs({part!r}))")
    return driver


@pytest.fixture
def flasher(rig: Rig, rig_parts: RigParts) -> FlasherProtocol:
    flasher: FlasherProtocol = _part(rig, "flasher", rig_parts.flasher)
    return flasher


@pytest.fixture
def power(rig: Rig, rig_parts: RigParts) -> PowerProtocol:
    power: PowerProtocol = _part(rig, "power", rig_parts.power)
    return power


@pytest.fixture
def rf(rig: Rig, rig_parts: RigParts) -> RfProtocol:
    rf: RfProtocol = _part(rig, "rf", rig_parts.rf)
    return rf


@pytest.fixture
def board(rig_parts: RigParts, hil_options: HilOptions, request: pytest.FixtureRequest) -> Board:
    """The board, back in its base state: the base image flashed (rigs with a flasher, when
    --hil-firmware is given; only the sectors that differ, all of it with --hil-full-restore),
    else the firmware's factory reset. A board that does not answer (a test left it hung) is
    power-cycled through the rig's supply first."""
    board = Board(rig_parts)
    board.revive()          # a board a test left hung is power-cycled, so this one can run
    board.restore_base(hil_options.firmware_for(board.rig), full=hil_options.full_restore)
    # A rig file's labgrid place, known once acquired (a place-built rig's: in _on_place).
    place = getattr(rig_parts.provider, "place", None)
    if place is not None and reporting.alluredir(request.config) and board.rig.name not in \
            request.config.stash.get(PLACE_RIGS, frozenset()):
        reporting.place_labels(place)
    return board


class _MockPool:
    """One mock service per (product, key) for the session: rigs of one product share it."""

    def __init__(self, timeline_dir: Path) -> None:
        self._timeline_dir = timeline_dir
        self._mocks: dict[tuple[str, str], MockOneNet] = {}

    def get(self, product_id: str, access_key: str) -> MockOneNet:
        key = (product_id, access_key)
        if key not in self._mocks:
            path = self._timeline_dir / f"ota-{product_id}-{len(self._mocks)}.timeline.jsonl"
            self._mocks[key] = MockOneNet(product_id, access_key, timeline_path=path).start()
        return self._mocks[key]

    def close(self) -> None:
        for mock in self._mocks.values():
            mock.stop()


@pytest.fixture(scope="session")
def _hil_mocks(pytestconfig: pytest.Config,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[_MockPool]:
    pool = _MockPool(_timeline_dir(pytestconfig, tmp_path_factory))
    yield pool
    pool.close()


@pytest.fixture
def ota_service(rig: Rig, hil_options: HilOptions, _hil_mocks: _MockPool
                ) -> Iterator[MockOneNet]:
    """The mock OTA service the rig's board updates from, empty for this test (a test that
    operates the service itself; conformance scenarios use ``gateway`` and ``ota``, which take
    the real service too)."""
    if hil_options.ota_service != "mock":
        pytest.skip(f"--hil-ota-service {hil_options.ota_service}: this test operates the mock "
                    "service itself; on the real platform the operator owns the tasks")
    from hil.rig.providers import fresh_access_key

    fresh_access_key(rig)    # a board hil runs (simulated, a host build) shares a fresh key
    key = os.environ.get(rig.identity.access_key_env)
    if not key:
        raise RigFault("identity", f"{rig.identity.access_key_env} is not set: the mock must "
                       "sign with the access key the board has", rig.name)
    mock = _hil_mocks.get(rig.identity.product_id, key)
    mock.service.reset()
    yield mock
    mock.service.raise_crashes()


@pytest.fixture
def ota_task(ota_service: MockOneNet, rig: Rig, hil_options: HilOptions) -> Task:
    """An OTA task for the rig's device: --hil-package up to --hil-target-version."""
    build = hil_options.builds.get(rig.board)
    given = hil_options.update_package(rig)
    if build is None or not build.package_given or given is None:
        pytest.skip("no OTA build given: --hil-package and --hil-target-version")
    package, target = given
    ota_service.service.add_device(rig.identity.dev_id, name=rig.identity.device_name)
    return ota_service.service.create_task(
        rig.identity.dev_id, target, package, manuf=rig.family.manuf, model=rig.family.model)


@pytest.fixture
def timeline(ota_service: MockOneNet) -> Timeline:
    return ota_service.timeline


def _timeline_dir(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    return config.stash[OPTIONS].timeline_dir or factory.getbasetemp()


@pytest.fixture(scope="session")
def _mock_onenet_session(pytestconfig: pytest.Config,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockOneNet]:
    path = _timeline_dir(pytestconfig, tmp_path_factory) / "mock-onenet.timeline.jsonl"
    with MockOneNet(timeline_path=path) as onenet:
        yield onenet


@pytest.fixture
def mock_onenet(_mock_onenet_session: MockOneNet) -> Iterator[MockOneNet]:
    """The mock OneNET service with no rig, empty (no devices, no tasks, empty timeline)."""
    _mock_onenet_session.service.reset()
    yield _mock_onenet_session
    _mock_onenet_session.service.raise_crashes()


# ---------------------------------------------------------------------------------- gateway
class _GatewayPool:
    """One gateway per address boards reach this host at (``ota.gateway_host``, and the
    firmware's ``ota.port``), for the session; each test gives it its upstream and a fresh
    timeline. A rig whose firmware has a hard-coded host (``ota.host``) gets hil's DNS beside
    its gateway, answering that host with the gateway's address, for the session too."""

    def __init__(self) -> None:
        self._gateways: dict[tuple[str, int, bool], Gateway] = {}
        self._dns: dict[tuple[str, int], DnsServer] = {}

    def get(self, rig: Rig, upstream: str) -> Gateway:
        ota = rig.ota
        host = ota.gateway_host or "127.0.0.1"
        key = (host, ota.gateway_port, ota.host is not None)
        if key not in self._gateways:
            try:
                # A board with a hard-coded host sends Host: <that host>: kept upstream.
                self._gateways[key] = Gateway(upstream, host=host, port=key[1],
                                              keep_host=key[2]).start()
            except OSError as error:
                hint = " (below 1024: root or CAP_NET_BIND_SERVICE)" if 0 < key[1] < 1024 else ""
                raise RigFault("gateway", f"cannot listen on {host}:{key[1]}: "
                               f"{error.strerror or error}{hint}", rig.name) from None
        gateway = self._gateways[key]
        gateway.upstream = upstream
        dns = ota.dns_config
        if dns is not None and ota.host is not None:
            listen = dns.listen_address(host)
            if listen not in self._dns:
                try:
                    check_no_loop(urlsplit(upstream).hostname or "", {ota.host: host})
                    self._dns[listen] = DnsServer({ota.host: host}, *listen, ttl=dns.ttl,
                                                  forward=dns.forward_address).start()
                except RigFault as fault:
                    raise fault.for_rig(rig.name) from None
        return gateway

    def dns(self, rig: Rig) -> DnsServer | None:
        """The DNS server answering the rig's ``ota.host`` (once its gateway is up)."""
        dns = rig.ota.dns_config
        if dns is None:
            return None
        return self._dns.get(dns.listen_address(rig.ota.gateway_host or "127.0.0.1"))

    def close(self) -> None:
        for gateway in self._gateways.values():
            gateway.stop()
        for dns in self._dns.values():
            dns.stop()


@pytest.fixture(scope="session")
def _hil_gateways() -> Iterator[_GatewayPool]:
    pool = _GatewayPool()
    yield pool
    pool.close()


def _test_file(config: pytest.Config, factory: pytest.TempPathFactory, nodeid: str,
               suffix: str) -> Path:
    """``<timeline dir>/<test>.<suffix>``, emptied: one test's record on disk."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in nodeid)[-150:]
    path = _timeline_dir(config, factory) / f"{name}.{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return path


@pytest.fixture
def gateway(rig: Rig, hil_options: HilOptions, _hil_gateways: _GatewayPool,
            request: pytest.FixtureRequest, pytestconfig: pytest.Config,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway between the rig's board and the OTA service (the mock, or the real one with
    --hil-ota-service URL), no fault armed, recording this test's timeline into
    ``<timeline dir>/<test>.timeline.jsonl``."""
    upstream = (request.getfixturevalue("ota_service").url if hil_options.ota_service == "mock"
                else hil_options.ota_service)
    gateway = _hil_gateways.get(rig, upstream)
    path = _test_file(pytestconfig, tmp_path_factory, request.node.nodeid, "timeline.jsonl")
    gateway.clear()
    gateway.timeline = Timeline(path)
    yield gateway
    gateway.clear()
    gateway.timeline.close()
    gateway.raise_errors()


@pytest.fixture
def ota_dns(gateway: Gateway, rig: Rig, _hil_gateways: _GatewayPool) -> DnsServer | None:
    """hil's DNS server answering the rig's ``ota.host`` with the gateway's address (None for a
    rig without a hard-coded host): ``hil.gateway.dns.resolve(rig.ota.host, ota_dns.address)``
    is what the board gets."""
    return _hil_gateways.dns(rig)


@pytest.fixture
def ota(rig: Rig, board: Board, gateway: Gateway, hil_options: HilOptions,
        request: pytest.FixtureRequest) -> OtaScenario:
    """A conformance scenario on this rig (``hil.conformance.scenario``): the build under test
    as the task's package, the expectation profile, the board pointed at the gateway."""
    if hil_options.profile is None:
        pytest.skip(f"no expectation profile: give --hil-expectations (or add "
                    f"{DEFAULT_PROFILE} under the root directory)")
    build = hil_options.update_package(rig)
    if build is None:
        pytest.skip(f"no OTA build for {rig.board}: give --hil-package and "
                    "--hil-target-version")
    package, target = build
    mock = request.getfixturevalue("ota_service") if hil_options.ota_service == "mock" else None
    scenario = OtaScenario(rig=rig, board=board, gateway=gateway, mock=mock,
                           profile=hil_options.profile, package=package, target=target,
                           base_package=hil_options.base_package(rig),
                           dns=request.getfixturevalue("ota_dns"), elf=hil_options.elf_for(rig))
    if reporting.alluredir(request.config):
        # What the restore left running. Asking a shell-less board whose log names no boot
        # line would reset it: its check at boot, on the network already, began an attempt
        # of its own that met the task and faults this test was still arming (the test's own
        # attempt then found errno 11 at detect).
        running = board.restored_version if board.shell_less else None
        reporting.label(request.node, rig, firmware=running or board.version(), target=target)
        clock = request.node.stash[reporting.CLOCK] = reporting.AttemptClock()
        scenario.observers.append(clock)
    return scenario


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The results directory's environment, categories and this session's coverage, once, by
    the controller."""
    config = session.config
    directory = reporting.alluredir(config)
    options = config.stash.get(OPTIONS, None)
    if directory is None or options is None or hasattr(config, "workerinput"):
        return
    builds = {rig.board: build for rig in options.rigs
              if (build := options.update_package(rig)) is not None}
    bases = {rig.board: image for rig in options.rigs
             if (image := options.base_package(rig)) is not None}
    base = ", ".join(f"{board}={package.filename}" for board, package in sorted(bases.items()))
    profile = f"{options.profile.name} ({options.profile.path})" if options.profile else ""
    recorder = coverage.recorder(config)
    reporting.write_session_files(
        directory, build=", ".join(sorted({target for _, target in builds.values()})),
        base=base, packages={board: package for board, (package, _) in builds.items()},
        rigs=list(options.rigs), service=options.ota_service, bases=bases, profile=profile,
        started=recorder.started if recorder else None)
    if recorder is not None:
        recorder.write(directory, {"args": list(config.invocation_params.args)})
