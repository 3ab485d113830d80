"""The gateway's added latency per request: the mock direct vs the mock through the gateway.

    .venv/bin/python benchmarks/bench_gateway.py [--requests N] [--rounds R] [--package-kib K]

The mock runs in a child process as in ``bench_service.py`` (its timeline written to a file), the
gateway in a second child (``Gateway`` in front of the mock, its timeline written to a file too,
as in a real run), each pinned to a core of its own where there are two. This process is the
device: one keep-alive connection per target, sequential requests, each timed from the first
byte sent to the last byte of its answer read. Two loads, ``--requests`` each per target:

- ``detect``: ``GET /ota/south/check`` answered errno 0 with the task (a ~200-byte JSON answer);
- ``4 KiB ranged``: ``GET /ota/south/download/{token}`` with ``Range: bytes=a-b``, answered 206.

Direct and gateway requests alternate in ``--rounds`` blocks so that drift of the machine hits
both alike. It prints the median, p90 and p99 per target and load, and the gateway's added
median; the goal is at most 0.5 ms added. Every answer is checked (status, length, Content-Range)
and the gateway's timeline must hold exactly the requests sent through it, none faulted. Exit
status: 0 when the checks hold (whatever the figures), 1 when one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench_service import (
    CHUNK,
    DEV_ID,
    SERVER_CPU,
    BenchError,
    Children,
    make_package,
    start_mock,
)

GOAL_ADDED_MS = 0.5
GATEWAY_CPU = (sorted(os.sched_getaffinity(0))[1]
               if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2
               else None)


# ------------------------------------------------------------------------------ gateway child
def serve_gateway(upstream: str, timeline: Path) -> int:
    """Child process: a gateway in front of ``upstream`` until stdin closes."""
    from hil.gateway import Gateway
    from hil.service.timeline import Timeline

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with Gateway(upstream, Timeline(timeline, keep=False)) as gateway:
            print(json.dumps({"url": gateway.url}), flush=True)
            sys.stdin.read()
            gateway.raise_errors()
    except KeyboardInterrupt:
        return 130
    return 0


def start_gateway(children: Children, upstream: str,
                  timeline: Path) -> tuple[str, subprocess.Popen[str]]:
    proc = children.start("gateway", [sys.executable, str(Path(__file__).resolve()),
                                      "--gateway-child", upstream, "--timeline", str(timeline)],
                          cpu=GATEWAY_CPU, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise BenchError(f"the gateway child exited with status {proc.wait()} before listening")
    return str(json.loads(line)["url"]), proc


# ------------------------------------------------------------------------------ the device
class Connection:
    """A keep-alive connection; ``ask`` sends a request and reads its whole answer. The mock
    (like OneNET) closes a connection after 1000 requests: ``reopen_if_closing`` then opens a
    new one, outside the timed part."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.closing = False
        self._open()

    def _open(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.closing = False

    def reopen_if_closing(self) -> None:
        if self.closing:
            self.sock.close()
            self._open()

    def ask(self, request: bytes) -> tuple[bytes, bytes]:
        self.sock.sendall(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, rest = self.buffer[:end], self.buffer[end + 4:]
        marker = head.find(b"Content-Length: ")
        if marker < 0:
            raise BenchError(f"an answer without Content-Length: {head[:200]!r}")
        line_end = head.find(b"\r\n", marker)
        size = int(head[marker + 16:line_end if line_end >= 0 else len(head)])
        while len(rest) < size:
            rest += self._recv()
        self.buffer = rest[size:]
        self.closing = b"\r\nConnection: close" in head
        return head, rest[:size]

    def _fill(self) -> None:
        self.buffer += self._recv()

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BenchError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Load:
    name: str
    requests: list[bytes]            # handed out in turn
    checks: list[tuple[bytes, int]]  # per request: what the head must hold, the body length


def loads(path: str, authorization: str, size: int) -> list[Load]:
    detect = (f"GET /ota/south/check?dev_id={DEV_ID}&type=2&version=1.0.0&cdn=true HTTP/1.1\r\n"
              f"Host: ota.heclouds.com\r\nAuthorization: {authorization}\r\n\r\n").encode()
    ranged, checks = [], []
    for offset in range(0, size, CHUNK):
        last = min(offset + CHUNK, size) - 1
        ranged.append((f"GET {path} HTTP/1.1\r\nHost: ota.heclouds.com\r\n"
                       f"Authorization: {authorization}\r\nRange: bytes={offset}-{last}\r\n\r\n"
                       ).encode())
        checks.append((f"Content-Range: bytes {offset}-{last}/{size}".encode(), last - offset + 1))
    return [Load("detect", [detect], [(b'"errno":0', -1)]), Load("4 KiB ranged", ranged, checks)]


def timed(connection: Connection, load: Load, count: int, start: int) -> list[float]:
    """``count`` requests of ``load``, each checked; their latencies in milliseconds."""
    latencies = []
    clock = time.perf_counter_ns
    for number in range(start, start + count):
        at = number % len(load.requests)
        began = clock()
        head, body = connection.ask(load.requests[at])
        latencies.append((clock() - began) / 1e6)
        connection.reopen_if_closing()
        must_hold, length = load.checks[at]
        if length >= 0:
            if must_hold not in head or len(body) != length:
                raise BenchError(f"{load.name}: a wrong answer {head[:120]!r}, {len(body)} bytes")
        elif must_hold not in body:
            raise BenchError(f"{load.name}: a wrong answer {body[:120]!r}")
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def count_lines(path: Path) -> tuple[int, int]:
    """Lines in a timeline file, and how many of them carry a fault label."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return len(lines), sum(1 for line in lines if '"fault"' in line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000,
                        help="timed requests per load and target (2000)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="blocks in which direct and gateway requests alternate (4)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="untimed requests per load and target first (200)")
    parser.add_argument("--package-kib", type=int, default=64, help="package size in KiB (64)")
    parser.add_argument("--gateway-child", metavar="UPSTREAM", help=argparse.SUPPRESS)
    parser.add_argument("--timeline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < args.rounds or args.rounds < 1 or args.package_kib < 4 \
            or args.package_kib % 4:
        parser.error("--requests >= --rounds >= 1; --package-kib a multiple of 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gateway_child:
        return serve_gateway(args.gateway_child, args.timeline)

    size = len(make_package(args.package_kib))
    print(f"hil gateway latency benchmark  {time.strftime('%Y-%m-%d %H:%M')}  "
          f"{os.cpu_count()} CPUs  {platform.python_implementation()} {platform.python_version()}")
    print("cores: " + (f"mock pinned to CPU {SERVER_CPU}, gateway to CPU {GATEWAY_CPU}, "
                       "this process (the device) not pinned" if GATEWAY_CPU is not None
                       else "not pinned (fewer than 2 usable)"))
    print(f"load: {args.requests} sequential keep-alive requests per load and target in "
          f"{args.rounds} alternating rounds, warm-up {args.warmup}; package {size} bytes\n")
    results: dict[tuple[str, str], list[float]] = {}
    sent_through = 0
    try:
        with tempfile.TemporaryDirectory(prefix="hil-bench-gw-") as tmp_name, \
                Children() as children:
            tmp = Path(tmp_name)
            mock, mock_proc, _ = start_mock(children, tmp, args.package_kib, None)
            parts = urlsplit(mock.url)
            base = f"{parts.scheme}://{parts.netloc}"
            gateway_timeline = tmp / "gateway.jsonl"
            gateway_url, gateway_proc = start_gateway(children, base, gateway_timeline)
            connections = {"direct": Connection(base), "gateway": Connection(gateway_url)}
            per_round = args.requests // args.rounds
            for load in loads(parts.path, mock.authorization, size):
                for target, connection in connections.items():
                    timed(connection, load, args.warmup, 0)
                    sent_through += args.warmup if target == "gateway" else 0
                for number in range(args.rounds):
                    for target, connection in connections.items():
                        results.setdefault((target, load.name), []).extend(
                            timed(connection, load, per_round, number * per_round))
                        sent_through += per_round if target == "gateway" else 0
            for connection in connections.values():
                connection.close()
            children.stop(gateway_proc)   # its timeline complete
            recorded, faulted = count_lines(gateway_timeline)
            children.stop(mock_proc)
    except KeyboardInterrupt:
        print("\ninterrupted: every child process was stopped", file=sys.stderr)
        return 130
    except BenchError as failure:
        print(f"\nerror: {failure}", file=sys.stderr)
        return 1

    header = f"{'load':<14} {'target':<9} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8}"
    print(header)
    print("-" * len(header))
    added = {}
    for load_name in ("detect", "4 KiB ranged"):
        for target in ("direct", "gateway"):
            values = results[target, load_name]
            print(f"{load_name if target == 'direct' else '':<14} {target:<9} "
                  f"{statistics.median(values):>10.3f} {percentile(values, 0.9):>8.3f} "
                  f"{percentile(values, 0.99):>8.3f}")
        added[load_name] = (statistics.median(results["gateway", load_name])
                            - statistics.median(results["direct", load_name]))
        verdict = "met" if added[load_name] <= GOAL_ADDED_MS else "NOT met"
        print(f"{'':<14} {'added':<9} {added[load_name]:>10.3f}   goal <= {GOAL_ADDED_MS} ms "
              f"-> {verdict}")
    print(f"\nchecks: every answer right; the gateway's timeline holds {recorded} exchanges "
          f"({sent_through} sent through it), {faulted} with a fault label")
    if recorded != sent_through or faulted:
        print("error: the gateway's timeline does not match what was sent", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
