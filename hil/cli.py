"""The ``hil`` command.

    hil run      the main job on its default: for now the mock service serving a demo package
                 to a demo device, every exchange printed, PASS or FAIL at the end
    hil serve    the mock OneNET OTA service for one device (or a --tasks file of several)
    hil token    print an Authorization value (the seed's Python snippet, as a command)

Bad arguments get one line on stderr and exit status 2; secrets are never echoed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hil import __version__
from hil.errors import ConfigError
from hil.onenet.auth import Authorization, SignMethod, decode_access_key, device_res, product_res
from hil.onenet.codes import CHIP_CODES, Chip, TaskState, TaskType, is_valid_version
from hil.service.config import apply_task_file, read_package
from hil.service.server import DEMO_PRODUCT_ID, MockOneNet

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
def cmd_serve(args: argparse.Namespace) -> int:
    prog = "hil serve"
    key = _access_key(args, prog)
    # Exchanges go to the log, the listeners and --timeline; none pile up in memory.
    onenet = MockOneNet(args.product_id, key, host=args.host, port=args.port,
                        timeline_path=args.timeline, keep_timeline=False)
    service = onenet.service
    try:
        if args.tasks:
            apply_task_file(service, args.tasks)
        else:
            missing = [flag for flag, value in (("--dev-id", args.dev_id),
                                                ("--package", args.package),
                                                ("--target-version", args.target_version))
                       if value is None]
            if missing:
                _fail(prog, f"give --tasks FILE or {', '.join(missing)}")
            package = read_package(args.package, "--package")
            service.create_task(
                args.dev_id, args.target_version, package, task_type=TaskType(args.type),
                manuf=args.manuf, model=args.model, signal=args.signal, power=args.power,
                retry=args.retry, interval=args.interval,
                enforce_thresholds=args.enforce_thresholds)
            if args.version:
                service.set_device_version(args.dev_id, args.version, TaskType(args.type))
    except ConfigError as error:
        _fail(prog, str(error))
    service.timeline.subscribe(lambda exchange: print(exchange.summary(), flush=True))

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        onenet.start()
    except OSError as error:
        _fail(prog, f"cannot listen on {args.host}:{args.port}: {error.strerror}")
    print(f"serving on {onenet.url}", flush=True)
    stop.wait()
    onenet.stop()
    print("stopped", flush=True)
    return 0


# ---------------------------------------------------------------------------------- hil run
DEMO_DEV_ID = "527776559"     # the seed's device


def demo_package(size: int = 64 * 1024) -> bytes:
    """Deterministic, non-repeating bytes, so a misplaced range changes the md5."""
    blocks = (hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here: requests (under the agent) is not needed by `hil token` or `hil serve`.
    from hil.onenet.tasks import Package
    from hil.sim.agent import OtaAgent

    manuf, model = CHIP_CODES[Chip.NRF52832]
    timeline_path = args.out / "timeline.jsonl"
    timeline_path.unlink(missing_ok=True)
    with MockOneNet(DEMO_PRODUCT_ID, timeline_path=timeline_path) as onenet:
        service = onenet.service
        service.create_task(DEMO_DEV_ID, "1.1.0", Package(demo_package(), "demo-app-1.1.0.bin"),
                            manuf=manuf, model=model, retry=2, interval=1)
        service.set_device_version(DEMO_DEV_ID, "1.0.0")
        print(f"mock OneNET on {onenet.url}: device {DEMO_DEV_ID} (nRF52832), "
              "task 1.0.0 -> 1.1.0, 64 KiB package")
        service.timeline.subscribe(lambda e: print("  service |", e.summary(), flush=True))
        agent = OtaAgent(onenet.url, DEMO_DEV_ID, "1.0.0", onenet.authorization,
                         manuf=manuf, model=model,
                         on_event=lambda line: print("  device  |", line, flush=True))
        attempt = agent.run_once()
        codes = service.timeline.reported_codes(DEMO_DEV_ID)
        task = service.task(DEMO_DEV_ID)
    passed = codes == [101, 201] and task.state is TaskState.SUCCEEDED \
        and attempt.version == task.target
    print(f"reported codes {codes}, task {task.state}, device runs {attempt.version}")
    print(f"timeline: {timeline_path}")
    print("PASS" if passed else "FAIL: expected codes [101, 201] and a succeeded task")
    return 0 if passed else 1


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
    serve.add_argument("--dev-id")
    serve.add_argument("--manuf")
    serve.add_argument("--model")
    serve.add_argument("--type", type=int, choices=[1, 2], default=2, help="1 FOTA, 2 SOTA")
    serve.add_argument("--version", type=_version_arg, help="the device's current version")
    serve.add_argument("--package", type=Path)
    serve.add_argument("--target-version", type=_version_arg)
    serve.add_argument("--signal", type=_int, default=0)
    serve.add_argument("--power", type=_int, default=0)
    serve.add_argument("--retry", type=_non_negative, default=0)
    serve.add_argument("--interval", type=_non_negative, default=0, metavar="S")
    serve.add_argument("--enforce-thresholds", action="store_true",
                       help="answer detect with errno 10 below signal/power (off: devices enforce)")
    serve.add_argument("--timeline", type=Path, metavar="FILE",
                       help="append every exchange to FILE as JSON lines")
    serve.set_defaults(run=cmd_serve)

    run = commands.add_parser("run", help="the main job (now: the mock serving a demo device)")
    run.add_argument("--out", type=Path, default=Path(".hil/run"), help="where the timeline goes")
    run.set_defaults(run=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
