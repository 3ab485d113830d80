"""The suite's power: the conformance suite run against every named defect of the simulated
firmware (``hil.sim.defects``), to show that each one fails at least one scenario. On a host
build (``console.command``) a defect is a build of the program with ``-DDEFECT_<NAME>``
(``console.defects``), one program per defect in the work directory; the defects its source
lacks (``console.known_defects``) are refused in one line.

One pytest run does it all: a copy of a simulated rig per defect (its own name, state directory
and probe, the defect switched on), plus the rig itself as the control (it must pass
everything), all passed with ``--hil-rig`` under ``-n N --dist loadgroup``, so each rig's tests
run on one worker. The JUnit XML it writes says which tests failed on which rig, and with what
message: the failure messages name the phase (``download phase: expected report codes [104]
...``), which is what the table shows.

Only a failure catches a defect: a test that could not run (a setup error, a rig fault, a fault
that never landed: ``BROKEN``) proves nothing about the firmware. The table counts those apart,
and the control rig must have none.

    hil defects                              # on rigs/sim-nrf52832.yaml, every defect
    hil defects --rig rigs/sim-gd32.yaml --defect early-101 -n 4
    hil defects --rig rigs/host-agent.yaml --defect skips-md5 --defect restarts-download
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hil.configfile import read_yaml, validate
from hil.errors import ConfigError
from hil.rig.model import Rig, rig_of_test
from hil.sim.bench import expected_addresses
from hil.sim.defects import Defect

_PHASE = re.compile(r"\b(detect|token|download|verify|flash|report) phase:")
# A test that failed in its call with one of these did not test the firmware (pytest's JUnit
# XML writes a call's exception as a <failure> whatever it is; the plugin calls them ERROR).
BROKEN = ("hil.errors.FaultNotLanded", "hil.errors.RigFault")


@dataclass
class Caught:
    """What one rig (a defect, or the control with none) failed."""

    rig: str
    defect: Defect | None
    tests: list[str] = field(default_factory=list)        # test names, rig id left out
    phases: list[str] = field(default_factory=list)       # one per test, from its message
    messages: list[str] = field(default_factory=list)     # each failure's first line
    passed: int = 0
    skipped: int = 0
    broken: list[str] = field(default_factory=list)       # tests that could not run


def available_defects(rig: Rig) -> list[Defect]:
    """The defects ``rig`` can be given: every one for a simulated rig, those its source can be
    built with (``console.known_defects``) for a host build."""
    if rig.console.command is not None:
        return sorted(Defect.parse(rig.console.known_defects), key=list(Defect).index)
    return list(Defect)


def check_defects(rig: Rig, defects: Sequence[Defect], where: str) -> None:
    """ConfigError (one line) for a defect ``rig`` cannot be given."""
    known = available_defects(rig)
    lacking = [defect.value for defect in defects if defect not in known]
    if lacking:
        raise ConfigError(where, f"console.known_defects: the host build {rig.name} can be "
                          f"built with {', '.join(d.value for d in known) or 'no defect'}; "
                          f"not with {', '.join(lacking)}")


def defect_rig(base: dict[str, Any], rig: Rig, defect: Defect | None, root: Path
               ) -> dict[str, Any]:
    """The rig file of ``rig`` with ``defect`` switched on, under its own name, state directory
    (under ``root``) and probe; for a host build, its own program built with the defect
    (``console.defects``: the build's ``{defines}``) under ``root``."""
    name = f"{rig.name}--{defect.value}" if defect else f"{rig.name}--control"
    document: dict[str, Any] = copy.deepcopy(base)
    document["name"] = name
    if rig.console.command is not None:
        from hil.rig.providers.process import program_path

        program = root / "programs" / name if defect else program_path(rig)
        document["console"] = {**document["console"], "state_dir": str(root / name),
                               "command": [str(program), *rig.console.command[1:]],
                               "defects": [defect.value] if defect else []}
        validate(Rig, document, name)
        return document
    document["sim"] = {**document.get("sim", {}), "state_dir": str(root / name),
                       "defects": [defect.value] if defect else []}
    if rig.flasher.kind == "swd":
        document["flasher"] = {**document["flasher"], "probe": f"hilsim-{name}"}
    provisional = validate(Rig, document, name)
    for key, address in expected_addresses(provisional).items():
        part, _, field_name = key.partition(".")
        document[part] = {**document[part], field_name: address}
    validate(Rig, document, name)
    return document


def run_suite(rig_path: Path, defects: Sequence[Defect], *, workers: int, root: Path,
              testcases: Path, extra: Iterable[str] = ()) -> list[Caught]:
    """The suite once over the control rig and one rig per defect; what each rig failed."""
    base = read_yaml(rig_path)
    rig = validate(Rig, base, str(rig_path))
    if rig.sim is None and rig.console.command is None:
        raise ConfigError(str(rig_path), "sim: the suite's power is measured on a simulated rig "
                          "or a host build (console.command)")
    check_defects(rig, defects, str(rig_path))
    with tempfile.TemporaryDirectory(prefix="hil-defects-") as work:
        workdir = Path(work)
        (workdir / "state" / "programs").mkdir(parents=True)
        rigs: list[tuple[Defect | None, str]] = []
        args: list[str] = []
        for defect in (None, *defects):
            document = defect_rig(base, rig, defect, workdir / "state")
            path = workdir / f"{document['name']}.yaml"
            path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
            rigs.append((defect, document["name"]))
            args += ["--hil-rig", str(path)]
        junit = workdir / "junit.xml"
        # This interpreter's own pytest, on our own rig files.
        subprocess.run([sys.executable, "-m", "pytest", str(testcases), *args,  # noqa: S603
                        "-n", str(workers), "--dist", "loadgroup", "-p", "no:cacheprovider",
                        "-q", "--no-header", "-o", "junit_family=xunit2",
                        f"--junitxml={junit}", "--rootdir", str(root), *extra],
                       cwd=root, check=False, stdout=subprocess.DEVNULL)
        if not junit.is_file():
            raise RuntimeError("the suite wrote no JUnit report: pytest could not run it")
        return _read_junit(junit, rigs)


def _read_junit(path: Path, rigs: list[tuple[Defect | None, str]]) -> list[Caught]:
    caught = {name: Caught(name, defect) for defect, name in rigs}
    for case in ET.parse(path).getroot().iter("testcase"):   # noqa: S314 (our own pytest's file)
        test = case.get("name", "")
        name = rig_of_test(test, caught)
        if name is None:
            continue
        entry = caught[name]
        failure = case.find("failure")
        message = failure.get("message", "") if failure is not None else ""
        if case.find("skipped") is not None:
            entry.skipped += 1
        elif case.find("error") is not None or message.startswith(BROKEN):
            entry.broken.append(re.sub(rf"\[{re.escape(name)}-?", "[", test).replace("[]", ""))
        elif failure is None:
            entry.passed += 1
        else:
            message = failure.get("message") or (failure.text or "")
            phase = _PHASE.search(message)
            module = case.get("classname", "").rpartition(".")[2].removeprefix("test_")
            entry.tests.append(re.sub(rf"\[{re.escape(name)}-?", "[", test).replace("[]", ""))
            entry.phases.append(phase.group(1) if phase else module)
            entry.messages.append(message.strip().splitlines()[0] if message.strip() else "")
    return [caught[name] for _, name in rigs]


def table(results: list[Caught]) -> str:
    """The defect table, then one failure message per defect (what a firmware engineer reads)."""
    lines = [f"{'defect':<26} {'caught by':<9} {'phases':<28} tests"]
    for entry in results:
        label = entry.defect.value if entry.defect else "(none: the control)"
        phases = ", ".join(sorted(set(entry.phases))) or "-"
        shown = ", ".join(entry.tests[:3]) + (f", +{len(entry.tests) - 3} more"
                                              if len(entry.tests) > 3 else "")
        count = f"{len(entry.tests)} test" + ("s" if len(entry.tests) != 1 else "")
        lines.append(f"{label:<26} {count:<9} {phases:<28} {shown or '-'}")
    lines.append("")
    for entry in results:
        if entry.defect and entry.messages:
            lines.append(f"{entry.defect.value}: {entry.messages[0]}")
    for entry in results:
        if entry.broken:
            label = entry.defect.value if entry.defect else "the control"
            lines.append(f"(not a catch) on {label}, {len(entry.broken)} test(s) could not "
                         f"run: {', '.join(entry.broken[:3])}"
                         + (f", +{len(entry.broken) - 3} more" if len(entry.broken) > 3 else ""))
    return "\n".join(lines)


def verdict(results: list[Caught]) -> tuple[bool, str]:
    control = next(entry for entry in results if entry.defect is None)
    missed = [entry.defect.value for entry in results if entry.defect and not entry.tests]
    if control.tests:
        return False, (f"the control rig (no defect) failed {len(control.tests)} test(s): "
                       f"{', '.join(control.tests[:3])}; the suite's verdicts mean nothing")
    if control.broken:
        return False, (f"the control rig (no defect) could not run {len(control.broken)} "
                       f"test(s): {', '.join(control.broken[:3])}; the suite's verdicts mean "
                       "nothing")
    if control.passed == 0:
        return False, "the control rig passed no test: the suite did not run"
    if missed:
        return False, f"{len(missed)} defect(s) caught by no test: {', '.join(missed)}"
    return True, (f"every defect ({len(results) - 1}) is caught; the control passed "
                  f"{control.passed} tests ({control.skipped} skipped)")
