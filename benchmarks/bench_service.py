"""Download throughput of the mock OneNET service, measured with wrk beside nginx on the same file.

    .venv/bin/python benchmarks/bench_service.py [--duration S] [--connections N] [--package-kib K]

The mock runs in a child process of its own (``MockOneNet`` on a loopback port, its timeline
written to a JSON-lines file as in real use), so the load generator never shares its GIL. wrk
(one thread, ``--connections`` keep-alive connections) drives two loads against it:

- ``4 KiB ranged``: ``GET /ota/south/download/{token}`` with ``Range: bytes=a-b``, rotating over
  the 4 KiB-aligned chunks of the package (how devices download), answered 206;
- ``whole package``: the same GET with no Range, answered 200 with the whole package.

nginx (one worker, ``access_log off``, a generated config in a temp dir), when installed, serves
the same bytes at the same path and gets the same two loads: it is the yardstick. The table gives
requests/s, payload MB/s (10^6 bytes of body per second) and latency p50/p99 for each, and the
ratio hil/nginx; the goal is a ratio >= 0.3 in 4 KiB ranged requests/s.

Before loading, both servers must answer a ranged request 206 with the right bytes and a plain
request 200 with the whole package (a benchmark of error answers measures nothing); after, wrk
must count no non-2xx answer and no socket error, and the mock's timeline must hold only package
answers (the one-byte error answer of OneNET is a 200, so only the timeline can tell). Exit status:
0 when all checks hold (whatever the ratio), 1 when one fails, 2 when wrk is missing.

``--profile FILE`` runs the mock's server thread under cProfile and writes pstats to FILE (the
figures of such a run are slowed by the profiler: do not record them as results).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEV_ID = "527776559"
TARGET_VERSION = "1.1.0"
CHUNK = 4096
GOAL_RATIO = 0.3
RESULT_MARK = "WRK_RESULT "
INSTALL_HINT = "apt-get install -y nginx-light wrk"
# Server and load generator each on a core of their own (when there are two): left to the
# scheduler, they sometimes share one and the figures of a run halve (seen here, 16k vs 25k req/s).
_PINNED = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
SERVER_CPU, CLIENT_CPU = (sorted(os.sched_getaffinity(0))[:2] if _PINNED else (None, None))

# The wrk script. Arguments after "--": mode ("range" or "full"), Authorization value, package
# size, chunk size. Every request is prepared once in init(); request() hands them out in turn.
WRK_LUA = r"""
local requests = {}
local count = 0
local i = 0

function init(args)
   local mode, auth = args[1], args[2]
   local size, chunk = tonumber(args[3]), tonumber(args[4])
   if mode == "range" then
      for offset = 0, size - 1, chunk do
         local last = math.min(offset + chunk, size) - 1
         requests[#requests + 1] = wrk.format("GET", nil,
            {["Authorization"] = auth, ["Range"] = "bytes=" .. offset .. "-" .. last})
      end
   else
      requests[1] = wrk.format("GET", nil, {["Authorization"] = auth})
   end
   count = #requests
end

function request()
   i = i % count + 1
   return requests[i]
end

function done(summary, latency, _)
   local e = summary.errors
   io.write(string.format(
      "WRK_RESULT {\"requests\":%.0f,\"bytes\":%.0f,\"duration_us\":%.0f,\"connect\":%.0f," ..
      "\"read\":%.0f,\"write\":%.0f,\"status\":%.0f,\"timeout\":%.0f,\"p50_us\":%.0f," ..
      "\"p99_us\":%.0f,\"mean_us\":%.1f,\"max_us\":%.0f}\n",
      summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
      e.timeout, latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


class BenchError(Exception):
    """A check failed or a server would not start: the run is not worth reporting."""


def make_package(kib: int) -> bytes:
    """The same pseudo-random package in every process and every run."""
    return random.Random(f"hil-bench-package-{kib}").randbytes(kib * 1024)


# ------------------------------------------------------------------------------ the mock child
def serve(package_kib: int, timeline: Path, profile: Path | None) -> int:
    """Child process: run the mock until stdin closes (the parent ends or dies)."""
    import asyncio
    import cProfile

    from hil.service.server import MockOneNet

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # so `with` below cleans up
    profiler = cProfile.Profile() if profile else None

    def on_server_thread(function: Any) -> None:
        # cProfile follows the thread that enables it: the requests run on the loop's thread.
        async def call() -> None:
            function()
        loop = onenet.server._loop   # private, but this is a benchmark of exactly that loop
        asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10)

    try:
        # As `hil serve` runs it: the timeline goes to its file, not into memory.
        with MockOneNet(timeline_path=timeline, keep_timeline=False) as onenet:
            task = onenet.service.create_task(DEV_ID, TARGET_VERSION, make_package(package_kib))
            if profiler is not None:
                on_server_thread(profiler.enable)
            print(json.dumps({"url": onenet.url, "token": task.token,
                              "authorization": onenet.authorization(expires_in=3600)}),
                  flush=True)
            sys.stdin.read()   # blocks until the parent closes the pipe
            if profiler is not None:
                on_server_thread(profiler.disable)
                profiler.dump_stats(str(profile))
    except KeyboardInterrupt:   # Ctrl-C reaches the whole process group; the parent reports it
        return 130
    return 0


# ------------------------------------------------------------------------------ child processes
def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child if the parent dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


class Children:
    """Every process started by the run; all are ended on exit, Ctrl-C included."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[str]]] = []

    def start(self, name: str, command: list[str], *, cpu: int | None = None,
              **options: Any) -> subprocess.Popen[str]:
        def preexec() -> None:
            if sys.platform.startswith("linux"):
                _die_with_parent()
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        proc = subprocess.Popen(command, text=True, preexec_fn=preexec, **options)
        self._procs.append((name, proc))
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[str]) -> None:
        if proc.stdin is not None and not proc.stdin.closed:
            # The mock ends by itself once its stdin closes (and writes its profile, if any).
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for _, proc in reversed(self._procs):
            self.stop(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[str], name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise BenchError(f"{name} is not listening on 127.0.0.1:{port} after {timeout:g} s")


@dataclass(frozen=True)
class Target:
    name: str
    url: str             # of the package, path included
    authorization: str


def start_mock(children: Children, tmp: Path, package_kib: int,
               profile: Path | None) -> tuple[Target, subprocess.Popen[str], Path]:
    timeline = tmp / "timeline.jsonl"
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-child",
               "--package-kib", str(package_kib), "--timeline", str(timeline)]
    if profile is not None:
        command += ["--profile", str(profile)]
    proc = children.start("hil mock", command, cpu=SERVER_CPU, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()   # the child prints one JSON line once it listens
    if not line:
        raise BenchError(f"the mock child exited with status {proc.wait()} before listening")
    info = json.loads(line)
    return Target("hil", f"{info['url']}/ota/south/download/{info['token']}",
                  info["authorization"]), proc, timeline


def start_nginx(children: Children, nginx: str, tmp: Path, package: bytes,
                path: str) -> Target:
    # The same path as the mock's, so wrk requests are byte for byte alike but for the Host port.
    www = tmp / "www"
    file = www / path.lstrip("/")
    file.parent.mkdir(parents=True)
    file.write_bytes(package)
    # Run as root, nginx's worker drops to nobody: it must be able to read the file.
    tmp.chmod(0o711)
    for directory in file.relative_to(www).parents:   # ota/south/download, ..., "."
        (www / directory).chmod(0o755)
    file.chmod(0o644)
    build = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp}/nginx-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if f"--without-http_{kind}_module" not in build)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(f"""\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp_paths}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    server_tokens off;
    keepalive_requests 1000;   # as the mock (and the real OneNET server)
    server {{
        listen 127.0.0.1:{port};
        root {www};
    }}
}}
""")
    proc = children.start("nginx", [nginx, "-p", str(tmp), "-c", str(conf),
                                    "-e", str(tmp / "nginx-error.log")],
                          cpu=SERVER_CPU, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, "nginx")
    except BenchError:
        log = tmp / "nginx-error.log"
        raise BenchError(f"nginx did not start: {log.read_text()[-500:] if log.exists() else ''}"
                         ) from None
    return Target("nginx", f"http://127.0.0.1:{port}{path}", "")


# ------------------------------------------------------------------------------ checks
def _get(conn: http.client.HTTPConnection, path: str,
         headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path, headers=headers)
    answer = conn.getresponse()
    return answer.status, dict(answer.getheaders()), answer.read()


def verify(target: Target, package: bytes) -> None:
    """A ranged request gets 206 and the right bytes, a plain one 200 and the whole package."""
    url = urlsplit(target.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        _verify(conn, url.path, target, package)
    except (OSError, http.client.HTTPException) as error:
        raise BenchError(f"{target.name}: the check request failed: {error!r}") from None
    finally:
        conn.close()


def _verify(conn: http.client.HTTPConnection, path: str, target: Target, package: bytes) -> None:
    auth = {"Authorization": target.authorization} if target.authorization else {}
    size = len(package)
    for start in sorted({0, CHUNK, (size // 2) // CHUNK * CHUNK, (size - 1) // CHUNK * CHUNK}):
        end = min(start + CHUNK, size) - 1
        status, headers, body = _get(conn, path, {**auth, "Range": f"bytes={start}-{end}"})
        expected_range = f"bytes {start}-{end}/{size}"
        if status != 206 or body != package[start:end + 1] \
                or headers.get("Content-Range") != expected_range:
            raise BenchError(
                f"{target.name}: Range bytes={start}-{end} answered {status} with "
                f"{len(body)} bytes, Content-Range {headers.get('Content-Range')!r} "
                f"(want 206, {end - start + 1} package bytes, {expected_range!r})")
    status, _, body = _get(conn, path, auth)
    if status != 200 or body != package:
        raise BenchError(f"{target.name}: a plain GET answered {status} with {len(body)} "
                         f"bytes (want 200 and the {size}-byte package)")


def check_timeline(timeline: Path, size: int) -> int:
    """Every exchange the mock recorded is a download answered with package bytes."""
    count = 0
    with timeline.open(encoding="utf-8") as lines:
        for line in lines:
            exchange = json.loads(line)
            count += 1
            good = (exchange.get("phase") == "download" and "error_byte" not in exchange
                    and ((exchange.get("status") == 206 and exchange.get("length") == CHUNK)
                         or (exchange.get("status") == 200 and exchange.get("length") == size)))
            if not good:
                raise BenchError(f"the mock's timeline holds a non-package answer: {line[:300]}")
    return count


# ------------------------------------------------------------------------------ wrk
@dataclass(frozen=True)
class Result:
    requests: int
    bytes: int
    duration_us: int
    non_2xx: int
    socket_errors: int
    p50_us: float
    p99_us: float
    payload: int   # body bytes per answer

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6)

    @property
    def mb_s(self) -> float:
        return self.rps * self.payload / 1e6


def run_wrk(children: Children, wrk: str, script: Path, target: Target, mode: str,
            size: int, connections: int, duration: int) -> Result:
    command = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
               "-s", str(script), target.url, "--", mode, target.authorization, str(size),
               str(CHUNK)]
    proc = children.start("wrk", command, cpu=CLIENT_CPU, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration + 30:g} s") from None
    found = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not found:
        raise BenchError(f"wrk failed (status {proc.returncode}): {(err or out).strip()[-500:]}")
    raw = json.loads(found[-1][len(RESULT_MARK):])
    payload = CHUNK if mode == "range" else size
    result = Result(requests=int(raw["requests"]), bytes=int(raw["bytes"]),
                    duration_us=int(raw["duration_us"]), non_2xx=int(raw["status"]),
                    socket_errors=sum(int(raw[k]) for k in ("connect", "read", "write", "timeout")),
                    p50_us=raw["p50_us"], p99_us=raw["p99_us"], payload=payload)
    if result.requests == 0:
        raise BenchError(f"wrk completed no request against {target.name}")
    # wrk counts headers too; fewer bytes than the bodies alone means short (error) answers.
    if result.bytes < result.requests * payload:
        raise BenchError(f"{target.name} {mode}: {result.bytes} bytes for {result.requests} "
                         f"answers of {payload} body bytes: some answers were not the package")
    return result


def tool_version(command: list[str]) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


# ------------------------------------------------------------------------------ report
LOADS = (("range", "4 KiB ranged, 206"), ("full", "whole package, 200"))


def print_table(results: dict[tuple[str, str], Result], package_kib: int) -> None:
    header = f"{'load':<24} {'server':<10} {'req/s':>10} {'MB/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    print(header)
    print("-" * len(header))
    for mode, title in LOADS:
        label = title if mode == "range" else f"whole {package_kib} KiB, 200"
        for server in ("hil", "nginx"):
            result = results.get((server, mode))
            if result is None:
                continue
            print(f"{label:<24} {server:<10} {result.rps:>10,.0f} {result.mb_s:>9.1f} "
                  f"{result.p50_us / 1000:>8.2f} {result.p99_us / 1000:>8.2f}")
            label = ""
        hil, nginx = results.get(("hil", mode)), results.get(("nginx", mode))
        if hil is not None and nginx is not None:
            ratio = hil.rps / nginx.rps
            goal = ""
            if mode == "range":
                verdict = "met" if ratio >= GOAL_RATIO else "NOT met"
                goal = f"   goal: ratio >= {GOAL_RATIO} -> {verdict}"
            print(f"{'':<24} {'hil/nginx':<10} {ratio:>10.3f} {hil.mb_s / nginx.mb_s:>9.3f} "
                  f"{hil.p50_us / nginx.p50_us:>8.1f}x {hil.p99_us / nginx.p99_us:>7.1f}x{goal}")
    print("MB/s: 10^6 bytes of package per second (headers not counted); latencies from wrk.\n"
          "hil/nginx row: throughput ratios, then how many times longer hil's latencies are.")


def _interrupt(*_: object) -> None:
    """SIGTERM ends the run the way Ctrl-C does: through the cleanup of every child."""
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per load (5)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (16)")
    parser.add_argument("--package-kib", type=int, default=64, help="package size in KiB (64)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of unrecorded ranged load per server first (1)")
    parser.add_argument("--profile", type=Path, help="cProfile the mock's server thread into FILE")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timeline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.package_kib < 4 or args.package_kib % 4 or args.duration <= 0 \
            or args.connections < 1:
        parser.error("--package-kib must be a multiple of 4, --duration > 0, --connections >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_child:
        return serve(args.package_kib, args.timeline, args.profile)

    wrk = shutil.which("wrk")
    if wrk is None:
        print(f"error: wrk is not installed (install it: {INSTALL_HINT})", file=sys.stderr)
        return 2
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    signal.signal(signal.SIGTERM, _interrupt)

    package = make_package(args.package_kib)
    size = len(package)
    profile = args.profile.resolve() if args.profile else None
    print(f"hil download benchmark  {time.strftime('%Y-%m-%d %H:%M')}  "
          f"{os.cpu_count()} CPUs  {platform.python_implementation()} {platform.python_version()}")
    print("cores: " + (f"servers pinned to CPU {SERVER_CPU}, wrk to CPU {CLIENT_CPU}" if _PINNED
                       else "not pinned (fewer than 2 usable)"))
    print(f"wrk: {tool_version([wrk, '-v'])}")
    print(f"nginx: {tool_version([nginx, '-v']) if nginx else 'not installed'}")
    print(f"load: wrk -t1 -c{args.connections} -d{args.duration:g}s, package {size} bytes, "
          f"{CHUNK}-byte ranges, warm-up {args.warmup:g} s per server")
    if profile is not None:
        print(f"profiling the mock into {profile}: its figures are slowed by cProfile")
    print()

    results: dict[tuple[str, str], Result] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="hil-bench-") as tmp_name, \
                Children() as children:
            tmp = Path(tmp_name)
            script = tmp / "bench.lua"
            script.write_text(WRK_LUA)
            mock, mock_proc, timeline = start_mock(children, tmp, args.package_kib, profile)
            verify(mock, package)
            targets = [mock]
            if nginx is None:
                print(f"nginx is not installed: no comparison (install it: {INSTALL_HINT})\n")
            else:
                targets.append(start_nginx(children, nginx, tmp, package,
                                           urlsplit(mock.url).path))
                verify(targets[-1], package)
            for target in targets:
                if args.warmup > 0:
                    run_wrk(children, wrk, script, target, "range", size, args.connections,
                            args.warmup)
                for mode, title in LOADS:
                    print(f"  {target.name:<6} {title} ...", end=" ", flush=True)
                    result = run_wrk(children, wrk, script, target, mode, size,
                                     args.connections, args.duration)
                    results[target.name, mode] = result
                    print(f"{result.rps:,.0f} req/s")
            children.stop(mock_proc)   # its timeline complete, its profile written
            exchanges = check_timeline(timeline, size)
            served = sum(r.requests for (name, _), r in results.items() if name == "hil")
    except KeyboardInterrupt:
        print("\ninterrupted: every child process was stopped", file=sys.stderr)
        return 130
    except BenchError as failure:
        print(f"\nerror: {failure}", file=sys.stderr)
        return 1

    print()
    print_table(results, args.package_kib)
    print()
    bad = {key: r for key, r in results.items() if r.non_2xx or r.socket_errors}
    print(f"checks: 206/200 with the right bytes before the loads; the mock's timeline holds "
          f"{exchanges:,} package answers ({served:,} counted by wrk in the measured loads) "
          f"and nothing else")
    if profile is not None:
        print(f"profile written to {profile} (python -m pstats {profile})")
    if bad:
        for (name, mode), r in bad.items():
            print(f"error: {name} {mode}: {r.non_2xx} non-2xx answers, {r.socket_errors} socket "
                  "errors (connect/read/write/timeout)", file=sys.stderr)
        return 1
    print("wrk: 0 non-2xx answers, 0 socket errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
