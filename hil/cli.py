"""The ``hil`` command.

    hil run           the main job on its default, the simulated rigs: each board flashed with
                      its base image and updated over the air from the mock service, every
                      exchange printed, PASS or FAIL at the end
    hil serve         the mock OneNET OTA service for one device (or a --tasks file of several)
    hil token         print an Authorization value (the seed's Python snippet, as a command)
    hil rigs          list the rigs in rigs/ with their board and capabilities (a labgrid
                      place's rig: its places at the coordinator, free, reserved or acquired)
    hil rigs check    check rig files and that each part of each rig answers (with --firmware,
                      that the base image is for the rig's board and boots on a simulated one)
    hil flash         flash an image through a rig's flasher
    hil console       an interactive terminal on a rig's console
    hil sim image     write a firmware image for a simulated board, its version inside
    hil sim up        run a simulated rig's bench until stopped (a board on a pty for others)
    hil suite         the conformance suite on the simulated rigs (or the rigs named), then
                      its Allure report and sign-off (what `python3 dev.py run` runs); the
                      build (--firmware, --package, --target-version) is checked first, each
                      finished test is a line, Ctrl-C stops it all in one line (exit 130)
    hil defects       the suite's power: the conformance suite against each named defect of
                      the simulated firmware, a table of the tests that caught each one
    hil report        the Allure HTML report of one or several results directories, and the
                      release sign-off beside it (signoff.md, .json): exit 0 on GO, 1 on NO-GO

Bad arguments get one line on stderr and exit status 2; secrets are never echoed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hil import __version__
from hil.errors import ConfigError, HilError, RigFault
from hil.onenet.auth import Authorization, SignMethod, decode_access_key, device_res, product_res
from hil.onenet.codes import ErrorBodyForm, TaskState, TaskType, is_valid_version
from hil.rig.lease import RigLease
from hil.service.config import (
    FIRST_RUN_INTERVAL_S,
    FIRST_RUN_RETRY,
    FIRST_RUN_TYPE,
    MAX_PACKAGE_BYTES,
    apply_task_file,
    describe_task,
    read_package,
)
from hil.service.printer import BackgroundPrinter
from hil.service.server import MockOneNet

if TYPE_CHECKING:
    from hil.rig.model import Rig

ACCESS_KEY_ENV = "HIL_ACCESS_KEY"
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the line names the argument that was wrong.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _access_key(args: argparse.Namespace, prog: str) -> str:
    key: str | None = args.access_key or os.environ.get(ACCESS_KEY_ENV)
    if not key:
        _fail(prog, f"give --access-key or set {ACCESS_KEY_ENV}")
    try:
        decode_access_key(key)
    except ValueError as error:
        _fail(prog, f"--access-key: {error}")
    return key


def _version_arg(value: str) -> str:
    if not is_valid_version(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not 1..20 of [a-zA-Z0-9_-.]")
    return value


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative")
    return number


def _positive(value: str) -> int:
    number = _non_negative(value)
    if number == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None


# ---------------------------------------------------------------------------------- hil token
def cmd_token(args: argparse.Namespace) -> int:
    prog = "hil token"
    key = _access_key(args, prog)
    et = args.et if args.et is not None else int(time.time()) + args.expires_in
    res = device_res(args.product_id, args.device) if args.device else product_res(args.product_id)
    print(Authorization.build(key, res, et, SignMethod(args.method)).header())
    return 0


# ---------------------------------------------------------------------------------- hil serve
def _stop_on_signals() -> threading.Event:
    """An event that Ctrl-C or SIGTERM sets, for commands that run until told to stop."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


# How long `hil serve` waits at exit for a reader of its last lines: a pipe nobody reads must not
# keep it from stopping on Ctrl-C or SIGTERM.
SERVE_EXIT_WAIT_S = 5.0


def cmd_serve(args: argparse.Namespace) -> int:
    prog = "hil serve"
    key = _access_key(args, prog)
    if args.packages_dir is not None and not args.packages_dir.is_dir():
        _fail(prog, f"--packages-dir: {args.packages_dir} is not a directory")
    limit = args.max_package_mib * 1024 * 1024
    # Exchanges go to the log, the listeners and --timeline; none pile up in memory.
    try:
        onenet = MockOneNet(args.product_id, key, host=args.host, port=args.port,
                            timeline_path=args.timeline, keep_timeline=False,
                            error_body=ErrorBodyForm(args.error_body))
    except ConfigError as error:
        _fail(prog, f"--timeline: {error}")
    except OSError as error:
        _fail(prog, f"--timeline: cannot open {args.timeline}: {error.strerror}")
    service = onenet.service
    try:
        if args.tasks:
            tasks = apply_task_file(service, args.tasks, packages_dir=args.packages_dir,
                                    max_package_bytes=limit)
        else:
            missing = [flag for flag, value in (("--dev-id", args.dev_id),
                                                ("--package", args.package),
                                                ("--target-version", args.target_version))
                       if value is None]
            if missing:
                _fail(prog, f"give --tasks FILE or {', '.join(missing)}")
            package = read_package(args.package, "--package", limit=limit)
            tasks = [service.create_task(
                args.dev_id, args.target_version, package, task_type=TaskType(args.type),
                manuf=args.manuf, model=args.model, signal=args.signal, power=args.power,
                retry=args.retry, interval=args.interval,
                enforce_thresholds=args.enforce_thresholds)]
            if args.version:
                service.set_device_version(args.dev_id, args.version, TaskType(args.type))
    except ConfigError as error:
        service.timeline.close()
        _fail(prog, str(error))
    # What a device's client must ask for (type) and will be told (retry, interval), before it
    # asks: a client detecting the other type hears errno 11, and nothing else says why.
    for task in tasks:
        print(describe_task(task), flush=True)
    print(f"download error bodies: {args.error_body}", flush=True)
    # From here on lines are printed by a writer thread: the server's loop never waits on a
    # stdout nobody reads (lines it cannot keep up with are counted and the count printed).
    printer = BackgroundPrinter(sys.stdout, fallback=sys.stderr).start()
    service.timeline.subscribe(lambda exchange: printer.print_line(exchange.summary()))

    stop = _stop_on_signals()
    try:
        onenet.start()
    except OSError as error:
        printer.close(timeout=SERVE_EXIT_WAIT_S)
        _fail(prog, f"cannot listen on {args.host}:{args.port}: {error.strerror}")
    printer.print_line(f"serving on {onenet.url}")
    stop.wait()
    onenet.stop()
    printer.close("stopped", timeout=SERVE_EXIT_WAIT_S)
    return 0


# ---------------------------------------------------------------------------------- hil run


def demo_package(size: int = 64 * 1024) -> bytes:
    """Deterministic, non-repeating bytes, so a misplaced range changes the md5."""
    blocks = (hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def cmd_run(args: argparse.Namespace) -> int:
    """Each simulated rig (or the rigs named), from its flashed base image through a whole OTA
    update against the mock service; every exchange printed; PASS when every board reported
    [101, 201] and booted the new version."""
    from hil.rig.model import find_rig
    from hil.sim.bench import sim_access_key

    names = args.rigs or [str(path) for path in sorted(args.rigs_dir.glob("sim-*.yaml"))]
    if not names:
        _fail("hil run", f"no rigs given and no sim-*.yaml in {args.rigs_dir}")
    rigs: list[Rig] = []
    for name in names:
        rig = _load(find_rig(name, args.rigs_dir))
        if isinstance(rig, ConfigError):
            _fail("hil run", str(rig))
        if rig.sim is None:
            _fail("hil run", f"rig {rig.name} is not simulated: hil run builds its images with "
                  "hil.sim.images, which only simulated boards boot")
        if rig.shell_less and not args.rigs:
            continue     # `hil run` drives the shell (ota check); the suite runs these
        sim_access_key(rig)
        rigs.append(rig)
    args.out.mkdir(parents=True, exist_ok=True)
    timeline_path = args.out / "timeline.jsonl"
    timeline_path.unlink(missing_ok=True)
    keys = {(rig.identity.product_id, os.environ[rig.identity.access_key_env]) for rig in rigs}
    if len(keys) != 1:
        _fail("hil run", "the rigs must share one product and access key (one mock service)")
    ((product_id, key),) = keys
    with MockOneNet(product_id, key, timeline_path=timeline_path) as onenet:
        onenet.service.timeline.subscribe(
            lambda e: print(f"  service | {e.summary()}", flush=True))
        verdicts = [(rig.name, _run_update(rig, onenet, args.out)) for rig in rigs]
    print(f"timeline: {timeline_path}")
    for name, verdict in verdicts:
        print(f"{name:<16} {verdict}")
    passed = all(verdict.startswith("PASS") for _, verdict in verdicts)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def _run_update(rig: Rig, onenet: MockOneNet, out: Path) -> str:
    """One rig's update (``hil run``): its verdict line."""
    from hil.onenet.tasks import Package
    from hil.rig.board import Board
    from hil.rig.parts import RigParts
    from hil.sim.images import build_image

    dev_id = rig.identity.dev_id
    base = out / f"{rig.board}-1.0.0.bin"
    base.write_bytes(build_image(rig.board, "1.0.0"))
    print(f"{rig.name}: flashing {base.name} through {rig.flasher.kind}", flush=True)
    try:
        with RigLease(rig.name), RigParts(rig) as parts:
            board = Board(parts)
            base_version = board.restore_base(base)
            service = onenet.service
            service.add_device(dev_id)
            service.create_task(dev_id, "1.1.0", Package(build_image(rig.board, "1.1.0"),
                                                          f"{rig.board}-1.1.0.bin"),
                                manuf=rig.family.manuf, model=rig.family.model)
            print(f"{rig.name}: runs {base_version}; task {base_version} -> 1.1.0", flush=True)
            board.point_at(onenet.url)
            since = board.console.mark()
            board.start_update()
            events = board.wait_update_end(timeout=120)
            downloads = sum(1 for event in events if event.fields.get("phase") == "download")
            for event in events:
                if event.fields.get("phase") != "download":
                    print(f"  {rig.name:<7} | ota " + " ".join(
                        f"{k}={v}" for k, v in event.fields.items()), flush=True)
            print(f"  {rig.name:<7} | ({downloads} download chunks)", flush=True)
            booted = board.console.expect(board.contract.events["boot"], 5, since=since)
            running = board.version()
    except HilError as error:
        return f"FAIL: {error}"
    codes = service.timeline.reported_codes(dev_id)
    state = service.task(dev_id).state
    verdict = f"codes {codes}, task {state}, boot line {booted.group('version')}, runs {running}"
    ok = codes == [101, 201] and state is TaskState.SUCCEEDED and running == "1.1.0" \
        and booted.group("version") == "1.1.0"
    return ("PASS  " if ok else "FAIL  ") + verdict


# ---------------------------------------------------------------------------------- rigs
def _rig_paths(args: argparse.Namespace) -> list[Path]:
    from hil.rig.model import find_rig

    if args.rigs:
        return [find_rig(name, args.rigs_dir) for name in args.rigs]
    return sorted(args.rigs_dir.glob("*.yaml"))


def _load(path: Path) -> Rig | ConfigError:
    from hil.rig.model import load_rig

    try:
        return load_rig(path)
    except ConfigError as error:
        return error


def cmd_rigs(args: argparse.Namespace) -> int:
    if args.rigs[:1] == ["check"]:
        args.rigs = args.rigs[1:]
        return cmd_rigs_check(args)
    paths = _rig_paths(args)
    if not paths:
        print(f"no rig files in {args.rigs_dir}")
        return 1
    status = 0
    snapshots: dict[str, Any] = {}      # a labgrid coordinator's state, read once per address
    for path in paths:
        rig = _load(path)
        if isinstance(rig, ConfigError):
            print(f"{path.stem:<16} INVALID  {rig}")
            status = 1
            continue
        parts = f"flasher={rig.flasher.kind} power={rig.power.kind} rf={rig.rf.kind}"
        print(f"{rig.name:<16} {rig.board:<9} {rig.part_number:<15} {parts:<40} "
              f"ota={rig.ota.service}  can: {' '.join(sorted(rig.capabilities))}")
        if rig.labgrid is not None:
            status = _print_places(rig, snapshots) or status
    return status


def _print_places(rig: Rig, snapshots: dict[str, Any]) -> int:
    """A labgrid rig's places at its coordinator, one line each, with their state (free,
    reserved for host/user, acquired by host/user); 1 when the coordinator cannot be read."""
    from hil.rig.providers.labgrid import LabgridClient, coordinator_address

    assert rig.labgrid is not None
    address = coordinator_address(rig.labgrid)
    if address not in snapshots:
        try:
            snapshots[address] = LabgridClient(address).snapshot()
        except RigFault as fault:
            snapshots[address] = fault
    snapshot = snapshots[address]
    wanted = " ".join(rig.labgrid.filters)
    if isinstance(snapshot, RigFault):
        print(f"{'':<16} place {wanted}: FAULT  {snapshot}")
        return 1
    places = snapshot.matching(rig.labgrid)
    if not places:
        print(f"{'':<16} place {wanted}: none at {address}")
    for place in places:
        print(f"{'':<16} place {place.name:<16} {snapshot.state(place)}  ({address})")
    return 0


def check_rig(rig: Rig) -> bool:
    """Does each part of ``rig`` answer? One line per part; True when all do."""
    from hil.rig.check import check_rig as check_parts

    checks = check_parts(rig)
    for check in checks:
        print(f"{rig.name:<16} {check.part:<8} {'ok   ' if check.ok else 'FAULT'}  "
              f"{check.detail}")
    return all(check.ok for check in checks)


def check_base(rig: Rig, firmware: Path) -> bool:
    """Is ``firmware`` a base image for ``rig`` that boots on a simulated board of its family?
    One line; True when it is."""
    from hil.rig.inputs import SUITE_FLAGS, BoardBuild, check_builds

    build = BoardBuild(rig.board, None, None, firmware, firmware)
    try:
        found = check_builds({rig.board: build}, [rig], flags=SUITE_FLAGS)
    except ConfigError as error:
        print(f"{rig.name:<16} {'boot':<8} FAULT  {error}")
        return False
    detail = found.lines[-1].split(": ", 1)[1]
    print(f"{rig.name:<16} {'boot':<8} ok     {detail}")
    return True


def cmd_rigs_check(args: argparse.Namespace) -> int:
    from hil.rig.inputs import per_board

    paths = _rig_paths(args)
    if not paths:
        print(f"no rig files in {args.rigs_dir}")
        return 1
    try:
        firmware = per_board("--firmware", args.firmware or [])
    except ConfigError as error:
        _fail("hil rigs check", str(error))
    ok = True
    for path in paths:
        rig = _load(path)
        if isinstance(rig, ConfigError):
            print(f"{path.stem:<16} {'file':<8} FAULT  {rig}")
            ok = False
            continue
        try:
            with RigLease(rig.name):       # never beside a suite that is using the rig
                ok = check_rig(rig) and ok
                image = firmware.get(rig.board, firmware.get(None))
                if image is not None:
                    ok = check_base(rig, Path(image)) and ok
        except RigFault as busy:
            print(f"{rig.name:<16} {'lease':<8} FAULT  {busy}")
            ok = False
    return 0 if ok else 1


def _one_rig(args: argparse.Namespace, prog: str) -> Rig:
    from hil.rig.model import find_rig

    rig = _load(find_rig(args.rig, args.rigs_dir))
    if isinstance(rig, ConfigError):
        _fail(prog, str(rig))
    return rig


def _print_progress(tool: str) -> Callable[[int, int], None]:
    """The tool's own progress (pyocd's erase and program passes, esptool's bytes sent) as one
    line redrawn in place, finished with a newline at 100 %."""
    def show(done: int, total: int) -> None:
        percent = 100 * done // total if total else 100
        bar = "#" * (percent // 4)
        end = "\n" if done >= total else ""
        print(f"\r{tool} {bar:<25} {percent:3d}%", end=end, flush=True)
    return show


def cmd_flash(args: argparse.Namespace) -> int:
    from hil.rig.parts import RigParts

    prog = "hil flash"
    rig = _one_rig(args, prog)
    if not args.image.is_file():
        _fail(prog, f"no such image {args.image}")
    try:
        with RigLease(rig.name), RigParts(rig) as parts:
            flasher = parts.flasher()
            if flasher is None:
                _fail(prog, f"rig {rig.name} has no flasher (flasher.kind: none)")
            flasher.program(args.image, progress=_print_progress(rig.flasher.kind))
            flasher.reset()
    except RigFault as fault:
        print(f"{prog}: {fault.for_rig(rig.name)}", file=sys.stderr)
        return 1
    print(f"flashed {args.image} on {rig.name}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    prog = "hil console"
    rig = _one_rig(args, prog)
    spec = rig.console
    address = spec.port or spec.url
    if spec.command is not None:
        # A host build: the program runs while the terminal is open, its console on a pty
        # linked beside its state directory (hil.drivers.process).
        address = f"{rig.process_state_dir}.console"
    if address is None:
        from hil.drivers.console import find_port_by_serial_number

        try:
            address = find_port_by_serial_number(str(spec.serial_number))
        except RigFault as fault:
            _fail(prog, str(fault.for_rig(rig.name)))
    from hil.rig.parts import RigParts

    try:
        # A simulated rig's board runs while the terminal is open (no driver opens here).
        with RigLease(rig.name), RigParts(rig):
            _terminal(rig, address)
    except RigFault as fault:
        _fail(prog, str(fault.for_rig(rig.name)))
    return 0


def _terminal(rig: Rig, address: str) -> None:
    import serial
    from serial.tools.miniterm import Miniterm

    spec = rig.console
    try:
        port = serial.serial_for_url(address, baudrate=spec.baudrate)
    except (serial.SerialException, OSError) as error:
        _fail("hil console", f"rig {rig.name}: console: cannot open {address}: {error}")
    terminal = Miniterm(port, echo=False, eol="lf")
    terminal.set_rx_encoding("utf-8")
    terminal.set_tx_encoding("utf-8")
    print(f"--- {rig.name} console on {address} at {spec.baudrate} baud; quit with Ctrl-]",
          file=sys.stderr)
    terminal.start()
    with contextlib.suppress(KeyboardInterrupt):
        terminal.join(True)
    terminal.join()
    terminal.close()


# ---------------------------------------------------------------------------------- hil sim
def cmd_sim_image(args: argparse.Namespace) -> int:
    # Imported here: esptool and imgtool are only needed for images.
    from hil.boards import BOARDS
    from hil.sim.images import build_image, esp32_secure_version, image_version

    prog = "hil sim image"
    try:
        if args.secure_version is not None and args.board != "esp32":
            raise ValueError(f"--secure-version: only the ESP32's images carry a secure "
                             f"version (anti-rollback), not {args.board}'s")
        image = build_image(args.board, args.version, payload_size=args.size, key=args.key,
                            fails_self_test=args.fails_self_test,
                            secure_version=args.secure_version)
    except ValueError as error:
        _fail(prog, str(error))
    try:
        args.output.write_bytes(image)
    except OSError as error:
        _fail(prog, f"-o: cannot write {args.output}: {error.strerror}")
    secure = (f", secure version {esp32_secure_version(image)}" if args.board == "esp32"
              else "")
    failing = ", fails its self-test" if args.fails_self_test else ""
    print(f"wrote {args.output}: {args.board} image, version "
          f"{image_version(args.board, image)}{secure}, signed with {args.key}{failing}, "
          f"{len(image)} bytes, for {BOARDS[args.board].app_address:#x}")
    return 0


UNPLUGGED_S = 2.0     # hil sim up, SIGUSR1: how long the console's adapter is gone


def cmd_sim_up(args: argparse.Namespace) -> int:
    """A simulated rig's bench, up until Ctrl-C or SIGTERM, for other programs to drive: the
    board behind its console pty (and probe), the instruments on theirs. SIGUSR1 unplugs the
    console for UNPLUGGED_S (a USB re-enumeration); SIGUSR2 hangs the firmware until the board
    is power-cycled."""
    from hil.rig.model import find_rig
    from hil.sim.bench import SimBench, expected_addresses

    prog = "hil sim up"
    rig = _load(find_rig(args.rig, args.rigs_dir))
    if isinstance(rig, ConfigError):
        _fail(prog, str(rig))
    if rig.sim is None:
        _fail(prog, f"rig {rig.name} is not simulated (no sim: section)")
    stop = _stop_on_signals()
    try:
        with SimBench(rig) as bench:
            # Bench faults for robustness tests, from outside, as a lab would suffer them.
            signal.signal(signal.SIGUSR1, lambda *_: bench.unplug_console(UNPLUGGED_S))
            signal.signal(signal.SIGUSR2, lambda *_: bench.hang_firmware())
            for key, address in expected_addresses(rig).items():
                print(f"{rig.name}: {key.split('.')[0]} at {address}", flush=True)
            print(f"{rig.name}: up (Ctrl-C or SIGTERM stops it)", flush=True)
            stop.wait()
    except RigFault as fault:
        _fail(prog, str(fault))
    print(f"{rig.name}: stopped", flush=True)
    return 0


# ---------------------------------------------------------------------------------- defects
def cmd_defects(args: argparse.Namespace) -> int:
    from hil.conformance.power import available_defects, check_defects, run_suite, table, verdict
    from hil.sim.defects import Defect

    prog = "hil defects"
    testcases = args.root / "testcases"
    if not testcases.is_dir():
        _fail(prog, f"no testcases/ under {args.root}: give --root, the project directory")
    rig_path = args.rig or args.root / "rigs" / "sim-nrf52832.yaml"
    rig = _load(rig_path)
    if isinstance(rig, ConfigError):
        _fail(prog, str(rig))
    try:
        defects = sorted(Defect.parse(args.defect), key=list(Defect).index) if args.defect \
            else available_defects(rig)
    except ValueError as error:
        _fail(prog, f"--defect: {error}")
    try:
        check_defects(rig, defects, str(rig_path))
    except ConfigError as error:
        _fail(prog, str(error))
    print(f"{prog}: the suite in {testcases} on {rig_path.name}, against "
          f"{len(defects)} defect(s) and a control, {args.workers} workers", flush=True)
    started = time.monotonic()
    try:
        results = run_suite(rig_path, defects, workers=args.workers, root=args.root,
                            testcases=testcases)
    except (ConfigError, RuntimeError) as error:
        _fail(prog, str(error))
    print(table(results))
    good, why = verdict(results)
    print(f"{'PASS' if good else 'FAIL'}: {why} ({time.monotonic() - started:.0f} s)")
    return 0 if good else 1


# ---------------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    return _report("hil report", args.results, args.output, args.waive,
                   sorted(args.rigs_dir.glob("*.yaml")))


def _key_variables(rig_paths: Iterable[Path]) -> set[str]:
    """The variables holding the rigs' access keys (``identity.access_key_env``) of the rig
    files that load, and the default one: the report masks their values."""
    from hil.rig.model import Identity

    names = {Identity.model_fields["access_key_env"].default}
    for path in rig_paths:
        rig = _load(path)
        if not isinstance(rig, ConfigError):
            names.add(rig.identity.access_key_env)
    return names


def _report(prog: str, results_dirs: list[Path], output: Path, waive: Path | None,
            rig_paths: Iterable[Path] = ()) -> int:
    """The Allure report of ``results_dirs`` in ``output`` and the sign-off beside it; 0 on GO.
    Every line printed and every file written is masked of the keys of ``rig_paths``' rigs and
    of secret-named variables (``hil.report.redact``)."""
    import json

    from hil.report.generate import GeneratorFailed, generate
    from hil.report.redact import Redactor
    from hil.report.signoff import decide, load_waivers, read_results, write

    redact = Redactor.from_environment(names=_key_variables(rig_paths))
    # Input first, so a typo costs no report generation; the sign-off goes into the report
    # directory once the report is in place.
    try:
        results = read_results(results_dirs, redact)
        waivers = load_waivers(waive) if waive else ()
        signoff = decide(results, waivers)
        index = generate(results_dirs, output, redact=redact,
                         environment={key: redact(value)
                                      for key, value in signoff.environment().items()},
                         executor=json.loads(redact(json.dumps(signoff.executor()))))
        markdown, document = write(signoff, output, redact)
    except (ConfigError, GeneratorFailed) as error:
        _fail(prog, redact(str(error)))
    except OSError as error:
        _fail(prog, redact(f"-o: cannot write {output}: {error.strerror}"))
    for line in (f"report:   {index} (serve it over HTTP: python3 -m http.server -d {output})",
                 f"sign-off: {markdown}, {document}", signoff.coverage_line(),
                 signoff.verdict_line()):
        print(redact(line))
    return 0 if signoff.go else 1


EXIT_INTERRUPTED = 130     # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
STOP_GRACE_S = 30.0        # after Ctrl-C: how long pytest may take to tear its tests down


def _suite_build(args: argparse.Namespace, prog: str) -> list[str]:
    """The rigs and the build, checked before pytest starts (``hil.rig.inputs``); the pytest
    options that pass them on, with the files as absolute paths."""
    from hil.rig.inputs import SUITE_FLAGS, check_builds, resolve_builds
    from hil.rig.model import find_rig

    rigs_dir = args.root / "rigs"
    paths = [find_rig(name, rigs_dir) for name in args.rigs] or sorted(rigs_dir.glob("sim-*.yaml"))
    rigs = []
    for path in paths:
        rig = _load(path)
        if isinstance(rig, ConfigError):
            _fail(prog, str(rig))
        rigs.append(rig)
    try:
        builds = resolve_builds([rig.board for rig in rigs], firmware=args.firmware or [],
                                package=args.package or [], target=args.target_version or [],
                                root=args.root, base_dir=Path.cwd(), flags=SUITE_FLAGS)
        found = check_builds(builds, rigs, flags=SUITE_FLAGS)
    except ConfigError as error:
        _fail(prog, str(error))
    for warning in found.warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr, flush=True)
    for line in found.lines:
        print(f"{prog}: {line}", flush=True)
    options = [f"--hil-rig={path.resolve()}" for path in paths] if args.rigs else []
    for build in builds.values():
        if build.firmware is not None:
            options.append(f"--hil-firmware={build.board}={build.firmware.resolve()}")
        if build.package_given and build.package is not None:
            options.append(f"--hil-package={build.board}={build.package.resolve()}")
        if build.target_given and build.target is not None:
            options.append(f"--hil-target-version={build.board}={build.target}")
    return options


class _Suite:
    """pytest run in its own session (so the terminal's Ctrl-C reaches hil alone), its output
    relayed line by line. ``interrupt()`` sends SIGINT to pytest and its workers and stops the
    relay: pytest's own interrupt report is not shown, hil says one line instead."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        self.interrupted = threading.Event()
        self.finished = ""       # the last progress count relayed, "12/168"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(  # noqa: S603 - this interpreter's own pytest
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True)
        self._relay = threading.Thread(target=self._read, name="hil suite relay", daemon=True)
        self._relay.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if self.interrupted.is_set():
                continue
            if line.startswith("[") and "/" in line.split("]", 1)[0]:
                self.finished = line[1:].split("]", 1)[0]
            sys.stdout.write(line)
            sys.stdout.flush()

    def _signal_group(self, signum: int) -> bool:
        try:
            os.killpg(self.process.pid, signum)
            return True
        except ProcessLookupError:
            return False        # every process of the session is gone

    def interrupt(self, *_: object) -> None:
        if self.interrupted.is_set():          # a second Ctrl-C: no more waiting
            self._signal_group(signal.SIGKILL)
            return
        self.interrupted.set()
        self._signal_group(signal.SIGINT)

    def wait(self) -> int:
        """pytest's exit status, once it and its workers are gone (after an interrupt, each
        gets STOP_GRACE_S to tear down, then SIGTERM, then SIGKILL)."""
        deadline: float | None = None
        while True:
            try:
                status = self.process.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if self.interrupted.is_set():
                    deadline = deadline or time.monotonic() + STOP_GRACE_S
                    if time.monotonic() > deadline:
                        self._signal_group(signal.SIGKILL)
        # Workers of an interrupted pytest may outlive it for a moment: none is left behind.
        stop = time.monotonic() + (STOP_GRACE_S if self.interrupted.is_set() else 5.0)
        while self._signal_group(0) and time.monotonic() < stop:
            time.sleep(0.1)
        if self._signal_group(signal.SIGKILL):
            time.sleep(0.1)
        self._relay.join(timeout=5.0)
        return status


def cmd_suite(args: argparse.Namespace) -> int:
    """The conformance suite on the rigs (default: the simulated ones), then its report."""
    import shutil

    prog = "hil suite"
    testcases = args.root / "testcases"
    if not testcases.is_dir():
        _fail(prog, f"no testcases/ under {args.root}: give --root, the project directory")
    started = time.monotonic()
    try:
        build = _suite_build(args, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted while checking the build; no test ran", file=sys.stderr)
        return EXIT_INTERRUPTED
    results = args.out / "allure-results"
    shutil.rmtree(results, ignore_errors=True)       # this run's results only
    command = [sys.executable, "-m", "pytest", str(testcases), *build, "-n", str(args.workers),
               "--dist", "loadgroup", "-p", "no:cacheprovider", "-q", "--no-header",
               "--hil-progress", "-o", "console_output_style=classic",
               "--hil-check-rigs", f"--alluredir={results}",
               f"--hil-timeline-dir={args.out / 'timelines'}", "--rootdir", str(args.root)]
    if args.lease_timeout is not None:
        command.append(f"--hil-lease-timeout={args.lease_timeout}")
    if args.full_restore:
        command.append("--hil-full-restore")
    if sys.stdout.isatty():
        command.append("--color=yes")
    print(f"{prog}: {' '.join(command[1:])}", flush=True)
    suite = _Suite(command, args.root)
    handlers = {signum: signal.signal(signum, suite.interrupt)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = suite.wait()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    elapsed = time.monotonic() - started
    if suite.interrupted.is_set():
        # No report: a partial run is NO-GO by its coverage; the results stay for a look.
        print(f"{prog}: interrupted after {suite.finished or '0'} tests ({elapsed:.0f} s); "
              f"pytest and its workers stopped, no report (partial results in {results})",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    print(f"{prog}: the suite exited {status} after {elapsed:.0f} s", flush=True)
    if status not in (0, 1):        # 1: tests failed; anything else: it did not run
        _fail(prog, f"pytest could not run the suite (exit status {status})")
    from hil.rig.model import find_rig

    # The report masks the keys of the rigs run on and of every rig in rigs/.
    rigs_dir = args.root / "rigs"
    rig_paths = [find_rig(name, rigs_dir) for name in args.rigs] + sorted(rigs_dir.glob("*.yaml"))
    return _report(prog, [results], args.out / "allure-report", args.waive, rig_paths)


# ---------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hil", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hil {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    token = commands.add_parser("token", help="print an Authorization value")
    token.add_argument("--product-id", required=True)
    token.add_argument("--access-key", help=f"base64 access key (default: ${ACCESS_KEY_ENV})")
    token.add_argument("--method", choices=[m.value for m in SignMethod], default="sha1")
    expiry = token.add_mutually_exclusive_group()
    expiry.add_argument("--et", type=_non_negative, help="expiry as a Unix time")
    expiry.add_argument("--expires-in", type=_non_negative, default=3600, metavar="S",
                        help="expiry in seconds from now (default 3600)")
    token.add_argument("--device", metavar="NAME", help="device-level res for this device name")
    token.set_defaults(run=cmd_token)

    serve = commands.add_parser("serve", help="run the mock OneNET OTA service")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    serve.add_argument("--port", type=_non_negative, default=8080, help="0 picks a free port")
    serve.add_argument("--product-id", required=True)
    serve.add_argument("--access-key",
                       help=f"base64 product access key (default: ${ACCESS_KEY_ENV})")
    serve.add_argument("--tasks", type=Path, metavar="FILE.yaml", help="several devices and tasks")
    serve.add_argument("--packages-dir", type=Path, metavar="DIR",
                       help="where a task file's packages are (default: the task file's "
                            "directory); no package outside it is served")
    serve.add_argument("--max-package-mib", type=_positive, metavar="MIB",
                       default=MAX_PACKAGE_BYTES // (1024 * 1024),
                       help="refuse a package larger than this many MiB (default %(default)s)")
    serve.add_argument("--dev-id")
    serve.add_argument("--manuf")
    serve.add_argument("--model")
    serve.add_argument("--type", type=int, choices=[1, 2], default=int(FIRST_RUN_TYPE),
                       help="1 FOTA (default: the vendor's example client detects it), 2 SOTA")
    serve.add_argument("--version", type=_version_arg, help="the device's current version")
    serve.add_argument("--package", type=Path)
    serve.add_argument("--target-version", type=_version_arg)
    serve.add_argument("--signal", type=_int, default=0)
    serve.add_argument("--power", type=_int, default=0)
    serve.add_argument("--retry", type=_non_negative, default=FIRST_RUN_RETRY,
                       help=f"retries of a failed chunk (default {FIRST_RUN_RETRY})")
    serve.add_argument("--interval", type=_non_negative, default=FIRST_RUN_INTERVAL_S,
                       metavar="S", help=f"seconds between retries (default "
                       f"{FIRST_RUN_INTERVAL_S})")
    serve.add_argument("--enforce-thresholds", action="store_true",
                       help="answer detect with errno 10 below signal/power (off: devices enforce)")
    serve.add_argument("--error-body", choices=[form.value for form in ErrorBodyForm],
                       default=ErrorBodyForm.RAW.value,
                       help="a download error's code as OneNET sends it, one raw byte (default), "
                       "or as the ASCII digit")
    serve.add_argument("--timeline", type=Path, metavar="FILE",
                       help="append every exchange to FILE as JSON lines (a restart numbers on)")
    serve.set_defaults(run=cmd_serve)

    rigs_dir = _Parser(add_help=False)
    rigs_dir.add_argument("--rigs-dir", type=Path, default=Path("rigs"),
                          help="where rig names are looked up (default ./rigs)")

    run = commands.add_parser("run", parents=[rigs_dir],
                              help="update each simulated rig from its base image (the main job)")
    run.add_argument("rigs", nargs="*", metavar="RIG",
                     help="simulated rigs (default: rigs/sim-*.yaml)")
    run.add_argument("--out", type=Path, default=Path(".hil/run"),
                     help="where the timeline and images go (default .hil/run)")
    run.set_defaults(run=cmd_run)
    # `hil rigs [RIG...]` lists, `hil rigs check [RIG...]` checks. One positional list read by
    # hand: argparse cannot put an optional sub-command before a variable-length positional.
    rigs = commands.add_parser(
        "rigs", parents=[rigs_dir],
        usage="hil rigs [check] [--rigs-dir DIR] [--firmware [BOARD=]FILE] [RIG ...]",
        help="list the rigs; 'hil rigs check' checks that every part answers")
    rigs.add_argument("rigs", nargs="*", metavar="RIG",
                      help="names or paths (default: all); 'check' first checks them")
    rigs.add_argument("--firmware", action="append", metavar="[BOARD=]FILE",
                      help="check: also that this base image is for the rig's board and boots "
                      "on a simulated one (BOARD=FILE per board, repeatable)")
    rigs.set_defaults(run=cmd_rigs)

    flash = commands.add_parser("flash", parents=[rigs_dir], help="flash through a rig")
    flash.add_argument("--rig", required=True)
    flash.add_argument("image", type=Path)
    flash.set_defaults(run=cmd_flash)

    console = commands.add_parser("console", parents=[rigs_dir], help="a rig's console")
    console.add_argument("--rig", required=True)
    console.set_defaults(run=cmd_console)

    sim = commands.add_parser("sim", help="simulated boards' helpers")
    sim_commands = sim.add_subparsers(dest="sim_command", metavar="COMMAND", required=True,
                                     parser_class=_Parser)
    image = sim_commands.add_parser("image", help="write a firmware image for a simulated board")
    image.add_argument("--board", required=True, choices=["esp32", "nrf52832", "gd32"])
    image.add_argument("--version", required=True,
                       help="the version inside the image (MCUboot: MAJOR.MINOR.REVISION[+BUILD])")
    image.add_argument("-o", "--output", required=True, type=Path, metavar="FILE")
    image.add_argument("--size", type=_non_negative, metavar="BYTES",
                       help="payload bytes (default 64 KiB; 16 KiB on gd32)")
    image.add_argument("--key", default="root", choices=["root", "other"],
                       help="the key it is signed with (MCUboot: imgtool ED25519; ESP32: "
                       "Secure Boot V2 RSA-3072). root: the one the simulated bootloader "
                       "trusts; default")
    image.add_argument("--fails-self-test", action="store_true",
                       help="a build whose self-test fails (it resets before it confirms "
                       "itself, and is reverted)")
    image.add_argument("--secure-version", type=_non_negative, metavar="N",
                       help="ESP32: esp_app_desc_t.secure_version, the anti-rollback version "
                       "(default 1)")
    image.set_defaults(run=cmd_sim_image)
    up = sim_commands.add_parser("up", parents=[rigs_dir],
                                 help="run a simulated rig's bench until stopped")
    up.add_argument("rig", help="a simulated rig's name in rigs/ or its file")
    up.set_defaults(run=cmd_sim_up)

    suite = commands.add_parser("suite", help="the conformance suite, then its report")
    suite.add_argument("rigs", nargs="*", metavar="RIG",
                       help="rigs to run on (default: the simulated rigs, rigs/sim-*.yaml)")
    suite.add_argument("-n", "--workers", type=_positive, default=3,
                       help="pytest-xdist workers (default 3: one per simulated rig)")
    suite.add_argument("--out", type=Path, default=Path(".hil"),
                       help="where allure-results/, allure-report/ and timelines/ go "
                       "(default .hil)")
    suite.add_argument("--waive", type=Path, metavar="FILE", help="rig faults waived (YAML)")
    per_board = "; BOARD=VALUE per board, repeatable"
    suite.add_argument("--firmware", action="append", metavar="[BOARD=]FILE",
                       help="base image flashed before each test (default: fixtures/images/"
                       f"<board>-1.0.0.bin){per_board}")
    suite.add_argument("--package", action="append", metavar="[BOARD=]FILE",
                       help="the build under test, delivered over the air (default: "
                       f"fixtures/images/<board>-1.1.0.bin){per_board}")
    suite.add_argument("--target-version", action="append", metavar="[BOARD=]V",
                       help=f"the version the package reports (default: its own){per_board}")
    suite.add_argument("--lease-timeout", type=_positive, metavar="S",
                       help="seconds a test waits for a busy rig (default 600)")
    suite.add_argument("--full-restore", action="store_true",
                       help="write the whole base image at each restore, not only the "
                       "sectors that differ (pytest's --hil-full-restore)")
    suite.add_argument("--root", type=Path, default=Path.cwd(),
                       help="the project directory with testcases/ (default: here)")
    suite.set_defaults(run=cmd_suite)

    defects = commands.add_parser("defects", help="the suite against each firmware defect")
    defects.add_argument("--rig", type=Path, help="a simulated rig file (default "
                         "rigs/sim-nrf52832.yaml)")
    defects.add_argument("--defect", action="append", metavar="NAME",
                         help="only this defect (repeatable; default: every one)")
    defects.add_argument("-n", "--workers", type=_positive, default=8,
                         help="pytest-xdist workers (default 8: the scenarios mostly wait)")
    defects.add_argument("--root", type=Path, default=Path.cwd(),
                         help="the project directory with testcases/ (default: here)")
    defects.set_defaults(run=cmd_defects)

    report = commands.add_parser("report", help="the Allure report and the release sign-off")
    report.add_argument("results", nargs="*", type=Path, default=[Path("allure-results")],
                        metavar="RESULTS_DIR",
                        help="allure-results directories, one per host (default allure-results)")
    report.add_argument("-o", "--output", required=True, type=Path, metavar="REPORT_DIR",
                        help="where the report and signoff.md/.json go: a new or empty "
                             "directory, or an earlier report (only its report files are "
                             "replaced)")
    report.add_argument("--waive", type=Path, metavar="FILE.yaml",
                        help="known rig faults: a YAML list of {test, rig, reason}")
    report.add_argument("--rigs-dir", type=Path, default=Path("rigs"),
                        help="rig files whose access keys (identity.access_key_env) are masked "
                             "in everything the report writes (default ./rigs)")
    report.set_defaults(run=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `hil rigs check --rigs-dir D bench-01`: names after an option still belong to the list.
    if args.command == "rigs" and not any(word.startswith("-") for word in extra):
        args.rigs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
