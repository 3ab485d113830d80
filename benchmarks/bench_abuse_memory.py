"""Memory of the mock and the gateway under clients that pipeline downloads and never read.

    .venv/bin/python benchmarks/bench_abuse_memory.py [--cases 10x1000,20x2000] [--kib 64]

The mock runs in a child process as ``hil serve`` runs it (``bench_service.py``'s child: the
timeline to a file, none kept in memory), the gateway in a second child in front of it
(``bench_gateway.py``'s). For each case ``CxN`` this process opens C connections (to the mock,
then to the gateway), each sending N pipelined ``GET /ota/south/download/{token}`` requests for
``--kib`` KiB (``Range: bytes=0-...``) in one go and never reading an answer (its receive buffer
set to 8 KiB). Once the services have stopped answering (their timelines unchanged for 2 s) it
reads each child's memory from ``/proc/<pid>/status``: VmRSS before the case (idle), VmHWM (the
peak), then the clients close and, once the children's sockets are back to what they were,
VmRSS again ``--settle`` seconds later (after). It prints, per case and process: idle, peak and
after in MB, peak-idle, and the requests answered while nobody read. The goal: peak-idle under
100 MB and after within 10 MB of idle. Exit status 0 when every figure meets it, 1 otherwise, 2
on a broken run.

Each case starts fresh children (VmHWM is a process's peak since it started).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench_gateway import start_gateway
from bench_service import BenchError, Children, start_mock

GOAL_PEAK_MB = 100
GOAL_AFTER_MB = 10


@dataclass
class Memory:
    idle: float   # MB
    peak: float
    after: float = 0.0


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no {field} in /proc/{pid}/status")


def sockets_of(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def lines(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError), path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    return 0


def settle(count: Callable[[], int], quiet: float = 2.0, limit: float = 120.0) -> int:
    """``count()`` once unchanged for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return last


def wait_sockets(pid: int, target: int, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while sockets_of(pid) > target and time.monotonic() < deadline:
        time.sleep(0.1)


def abuse(url: str, request: bytes, connections: int, pipelined: int) -> list[socket.socket]:
    """Open the connections and send each its requests in one go (until the server stops
    reading); they are returned open, unread."""
    parts = urlsplit(url)
    socks = []
    for _ in range(connections):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.connect((parts.hostname, parts.port))
        sock.settimeout(5)
        socks.append(sock)
    blob = request * pipelined

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):   # a timeout: the server stopped reading
            sock.sendall(blob)

    senders = [threading.Thread(target=send, args=(sock,)) for sock in socks]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    return socks


def run_case(connections: int, pipelined: int, kib: int, via_gateway: bool, settle_s: float
             ) -> tuple[dict[str, Memory], int, int]:
    with tempfile.TemporaryDirectory() as tmp, Children() as children:
        target, mock_proc, mock_timeline = start_mock(children, Path(tmp), kib, None)
        procs = {"mock": mock_proc}
        timelines = {"mock": mock_timeline}
        url = target.url
        if via_gateway:
            parts = urlsplit(target.url)
            gateway_timeline = Path(tmp) / "gateway.jsonl"
            gateway_url, gateway_proc = start_gateway(
                children, f"{parts.scheme}://{parts.netloc}", gateway_timeline)
            procs["gateway"] = gateway_proc
            timelines["gateway"] = gateway_timeline
            url = gateway_url + parts.path
        parts = urlsplit(url)
        request = (f"GET {parts.path} HTTP/1.1\r\nHost: ota.heclouds.com\r\n"
                   f"Authorization: {target.authorization}\r\n"
                   f"Range: bytes=0-{kib * 1024 - 1}\r\n\r\n").encode()
        # Warm up: one request answered and read, so idle is a server that has served.
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
            while sock.recv(1 << 16):
                pass
        time.sleep(0.5)
        idle_sockets = {name: sockets_of(proc.pid) for name, proc in procs.items()}
        memory = {name: Memory(status_mb(proc.pid, "VmRSS"), 0.0)
                  for name, proc in procs.items()}
        socks = abuse(url, request, connections, pipelined)
        first = "gateway" if via_gateway else "mock"
        answered = settle(lambda: lines(timelines[first])) - 1
        for name, proc in procs.items():
            memory[name].peak = status_mb(proc.pid, "VmHWM")
        for sock in socks:
            sock.close()
        for name, proc in procs.items():
            wait_sockets(proc.pid, idle_sockets[name])
        time.sleep(settle_s)
        for name, proc in procs.items():
            memory[name].after = status_mb(proc.pid, "VmRSS")
            if proc.poll() is not None:
                raise BenchError(f"the {name} child died (status {proc.returncode})")
        return memory, answered, connections * pipelined


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="10x1000,20x2000",
                        help="connections x pipelined requests, comma-separated (10x1000,20x2000)")
    parser.add_argument("--kib", type=int, default=64, help="KiB each request downloads (64)")
    parser.add_argument("--only", choices=["mock", "gateway"], help="one target only")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds from the clients' sockets gone to reading 'after' (1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [tuple(int(n) for n in case.split("x")) for case in args.cases.split(",")]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.kib} KiB answers; "
          f"hil from {Path(__import__('hil').__file__).parent}")
    print(f"{'case':<22} {'process':<8} {'idle MB':>8} {'peak MB':>8} {'after MB':>9} "
          f"{'peak-idle':>10} {'answered':>14}")
    ok = True
    try:
        for connections, pipelined in cases:
            for via_gateway in (False, True):
                if args.only and (args.only == "gateway") != via_gateway:
                    continue
                memory, answered, sent = run_case(connections, pipelined, args.kib, via_gateway,
                                                  args.settle)
                name = f"{connections}x{pipelined} {'gateway' if via_gateway else 'mock'}"
                for process, figures in memory.items():
                    grew = figures.peak - figures.idle
                    ok &= grew < GOAL_PEAK_MB and figures.after - figures.idle < GOAL_AFTER_MB
                    print(f"{name:<22} {process:<8} {figures.idle:8.1f} {figures.peak:8.1f} "
                          f"{figures.after:9.1f} {grew:10.1f} {answered:>6}/{sent:<7}",
                          flush=True)
    except (BenchError, subprocess.SubprocessError, OSError) as error:
        print(f"bench_abuse_memory: {error}", file=sys.stderr)
        return 2
    print(f"goal (peak-idle < {GOAL_PEAK_MB} MB, after-idle < {GOAL_AFTER_MB} MB): "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
