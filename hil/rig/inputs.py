"""The build under test, per board family, checked before a suite runs its first test.

A suite takes, per board family of the selected rigs, the package delivered over the air, the
version it must report (the target) and the base image flashed before each test. Each option
takes a plain value (every board) or ``BOARD=VALUE`` (that board; repeat the option per board)::

    --hil-package app.bin                                # one board family selected
    --hil-package esp32=esp.bin --hil-package nrf52832=nrf.signed.bin
    --hil-target-version 1.1.0                           # or esp32=1.1.0-esp ...

Once an option names a file for one board, every selected board needs one (a suite never mixes
a given build with the fixtures' on the quiet). With no options a board takes the fixtures:
``fixtures/images/<board>-<target>.bin`` (target 1.1.0) and ``<board>-1.0.0.bin`` as the base.
Without ``--hil-target-version`` a given package's own version is the target.

``check_builds`` reads every file (``hil.boards.images``) and refuses, with one line naming the
file, when: it is no firmware image hil can read; it is for another board family than the
rig's; it is damaged (hash or checksum); the package's version is not the target; the base's
version is the target; the base does not boot on a simulated board of the family
(``hil.rig.check.boots_on_sim``). A raw Cortex-M binary carries no version: as a package it is
taken only with an explicit target version, as a base with the version its boot line says;
both with a warning.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hil.boards import BOARDS
from hil.boards.images import FirmwareImage, UnknownImage, read_image
from hil.configfile import IMAGE_LIMIT, read_bounded
from hil.errors import ConfigError
from hil.onenet.codes import is_valid_version
from hil.rig.model import Rig

DEFAULT_TARGET = "1.1.0"    # the update image fixtures/images holds for each board
DEFAULT_BASE = "1.0.0"      # the base image fixtures/images holds for each board
_PER_BOARD = re.compile(r"([A-Za-z0-9_]+)=(.*)", re.DOTALL)


@dataclass(frozen=True)
class Flags:
    """How the options are spelled where they were given (pytest's or ``hil suite``'s)."""

    firmware: str = "--hil-firmware"
    package: str = "--hil-package"
    target: str = "--hil-target-version"


PYTEST_FLAGS = Flags()
SUITE_FLAGS = Flags("--firmware", "--package", "--target-version")


@dataclass(frozen=True)
class BoardBuild:
    board: str
    package: Path | None       # the build under test; None: none given and no fixture
    target: str | None         # the version it must report; None: a given package's is unknown
    firmware: Path | None      # the base flashed before each test; None: the factory reset
    base: Path | None          # the base as checked and reported: firmware, else the fixture
    package_given: bool = False
    target_given: bool = False
    plain_package: bool = False   # one --hil-package for every board (not BOARD=FILE)
    plain_firmware: bool = False


def per_board(flag: str, values: Sequence[str]) -> dict[str | None, str]:
    """``["esp32=a.bin", "b.bin"]`` -> ``{"esp32": "a.bin", None: "b.bin"}`` (None: every board
    without its own). ConfigError naming ``flag`` for an unknown board, an empty value or a
    board given twice. A path with ``=`` in its first part is written ``./x=y.bin``."""
    found: dict[str | None, str] = {}
    for value in values:
        match = _PER_BOARD.fullmatch(value)
        board, given = (match.group(1), match.group(2)) if match else (None, value)
        if board is not None and board not in BOARDS:
            raise ConfigError(flag, f"{value!r}: unknown board {board!r}; give BOARD=VALUE "
                              f"with BOARD one of {', '.join(BOARDS)}, or a plain value")
        if not given:
            raise ConfigError(flag, f"{value!r}: empty value")
        if board in found:
            raise ConfigError(flag, f"given twice for {board or 'every board'}: "
                              f"{found[board]!r} and {given!r}")
        found[board] = given
    return found


def resolve_builds(boards: Sequence[str], *, firmware: Sequence[str], package: Sequence[str],
                   target: Sequence[str], root: Path, base_dir: Path = Path(),
                   flags: Flags = PYTEST_FLAGS) -> dict[str, BoardBuild]:
    """Each board's build from the options (module docstring); relative paths are taken from
    ``base_dir``. ConfigError (one line, naming the option) for a bad value or a missing
    file."""
    firmwares, packages, targets = (per_board(flags.firmware, firmware),
                                    per_board(flags.package, package),
                                    per_board(flags.target, target))
    for given in targets.values():
        if not is_valid_version(given):
            raise ConfigError(flags.target, f"{given!r} is not a OneNET version (1..20 of "
                              "[a-zA-Z0-9_.-])")
    for flag, files in ((flags.firmware, firmwares), (flags.package, packages)):
        for value in files.values():     # a file named is checked, selected board or not
            if not (base_dir / value).exists():
                raise ConfigError(flag, f"no such file {base_dir / value}")
    builds = {}
    for board in dict.fromkeys(boards):
        own_firmware = _file(flags.firmware, board, firmwares, base_dir)
        own_package = _file(flags.package, board, packages, base_dir)
        version: str | None = targets.get(board, targets.get(None))
        if own_package is None:
            version = version or DEFAULT_TARGET
            fixture = root / "fixtures" / "images" / f"{board}-{version}.bin"
            path = fixture if fixture.is_file() else None
        else:
            path = own_package
            if version is None:     # the package says what it is
                try:
                    version = read_image(read_bounded(own_package, IMAGE_LIMIT,
                                                      "package")).version
                except (UnknownImage, ConfigError):
                    version = None  # refused by check_builds, naming the file
        base = own_firmware or root / "fixtures" / "images" / f"{board}-{DEFAULT_BASE}.bin"
        builds[board] = BoardBuild(
            # A given base is checked whatever it is (a FIFO is refused by name, not skipped).
            board, path, version, own_firmware,
            base if own_firmware is not None or base.is_file() else None,
            package_given=own_package is not None,
            target_given=board in targets or None in targets,
            plain_package=board not in packages and None in packages,
            plain_firmware=board not in firmwares and None in firmwares)
    return builds


def _file(flag: str, board: str, given: Mapping[str | None, str], base_dir: Path
          ) -> Path | None:
    if not given:
        return None
    value = given.get(board, given.get(None))
    if value is None:
        named = ", ".join(str(key) for key in given)
        raise ConfigError(flag, f"none for {board} (given for {named} only): give "
                          f"{flag} {board}=FILE")
    return base_dir / value


# ---------------------------------------------------------------------------------- checks
@dataclass
class InputReport:
    """What ``check_builds`` found: one line per file checked, and the warnings."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class BadInput(ConfigError):
    """A build input that would make every test fail for the wrong reason."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(str(path), message)


def _read(path: Path, what: str) -> FirmwareImage:
    # Bounded: a FIFO or a device (--package /dev/zero) is refused, not read until memory ends.
    try:
        data = read_bounded(path, IMAGE_LIMIT, what)
    except ConfigError as error:
        raise BadInput(path, f"{what}: {error.message}") from None
    try:
        return read_image(data)
    except UnknownImage as error:
        raise BadInput(path, f"{what}: {error}") from None


def _read_for(path: Path, what: str, rig: Rig, flag: str, hint: bool) -> FirmwareImage:
    """``path`` read as an image for ``rig``'s board, whole: one line naming it otherwise."""
    image = _read(path, what)
    _for_board(path, what, image, rig, flag, hint)
    if image.damage:
        raise BadInput(path, f"{what} is damaged: {image.damage}")
    return image


def _for_board(path: Path, what: str, image: FirmwareImage, rig: Rig, flag: str,
               hint: bool) -> None:
    if image.board == rig.board:
        return
    if image.board is None:
        raise BadInput(path, f"{what}: {image.format} for {image.target}, not a board hil "
                       f"knows; rig {rig.name}'s board is {rig.board}")
    per_board = f" (several boards: give {flag} {rig.board}=FILE)" if hint else ""
    raise BadInput(path, f"{what}: {image.describe()}, but rig {rig.name}'s board is "
                   f"{rig.board}{per_board}")


def check_builds(builds: Mapping[str, BoardBuild], rigs: Sequence[Rig], *,
                 flags: Flags = PYTEST_FLAGS,
                 boots: Callable[[str, Path], tuple[bool, str]] | None = None
                 ) -> InputReport:
    """Check every board's build (module docstring); BadInput for the first problem, the cheap
    checks of every board before any boot. ``boots(board, path)`` -> (ok, version or why):
    default, ``hil.rig.check.boots_on_sim``."""
    report = InputReport()
    to_boot: list[tuple[BoardBuild, FirmwareImage]] = []
    for board, build in builds.items():
        rig = next((rig for rig in rigs if rig.board == board), None)
        if rig is None:
            continue
        package = None
        if build.package is not None:
            package = _read_for(build.package, "package", rig, flags.package,
                                build.plain_package and len(builds) > 1)
            if package.version is None:
                if not build.target_given:
                    raise BadInput(build.package, f"package: a {package.format} carries no "
                                   f"version: give {flags.target} (or an MCUboot image: "
                                   "imgtool sign)")
                report.warnings.append(f"{build.package}: a {package.format} carries no "
                                       f"version; trusting {flags.target} {build.target}")
            elif package.version != build.target:
                raise BadInput(build.package, f"package carries version {package.version}, "
                               f"not the target version {build.target} ({flags.target})")
            report.lines.append(f"{board}: package {build.package.name}: "
                                f"{package.describe()}; target {build.target}")
        if build.base is not None:
            base = _read_for(build.base, "base image", rig, flags.firmware,
                             build.plain_firmware and len(builds) > 1)
            if base.version is not None and base.version == build.target:
                raise BadInput(build.base, f"base image carries version {base.version}, the "
                               "target version: the update would change nothing")
            if base.version is None:
                report.warnings.append(f"{build.base}: a {base.format} carries no version; "
                                       "its boot line says which it is")
            to_boot.append((build, base))
    if boots is None:
        from hil.rig.check import boots_on_sim

        def boots(board: str, path: Path) -> tuple[bool, str]:
            check = boots_on_sim(board, path)
            return check.ok, check.detail

    for build, base in to_boot:
        assert build.base is not None
        ok, said = boots(build.board, build.base)
        if not ok:
            raise BadInput(build.base, f"base image does not boot on a simulated "
                           f"{build.board}: {said}")
        if said == build.target:
            raise BadInput(build.base, f"base image boots version {said}, the target version: "
                           "the update would change nothing")
        report.lines.append(f"{build.board}: base {build.base.name}: {base.describe()}; "
                            f"boots {said} on a simulated {build.board}")
    return report
