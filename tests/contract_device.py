"""An emulated firmware console that speaks the console contract, for the console driver's tests.

Both transports are real, only the firmware is not: a pty pair (the driver opens the slave path
by ``port=``, as it would ``/dev/ttyUSB0``) or a TCP server on 127.0.0.1 (the driver opens
``socket://127.0.0.1:PORT``, as for a ser2net bench).

The device runs on its own thread. Everything a test asks of it (print lines, flood, go silent,
vanish) is queued to that thread, so only that thread touches the link and a test never blocks on
a full buffer. Errors on the device thread are re-raised by ``stop()`` on the test thread.

    with ContractDevice("pty", version="1.2.0") as device:
        with SerialConsole(port=device.port) as console:
            assert console.command("sys version") == ["version=1.2.0"]
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
import tty
from collections.abc import Callable, Sequence
from typing import Literal, Self

Transport = Literal["pty", "tcp"]

DEFAULT_OTA_EVENTS = (
    "ota phase=detect errno=0 target=V2 size=65536",
    "ota phase=token errno=0",
    "ota phase=download offset=0 status=206",
    "ota phase=download offset=4096 status=206",
    "ota phase=verify errno=0",
    "ota phase=report result=101 errno=0",
    "ota end",
)

_IDLE_S = 0.05       # how often the device thread looks at the clock when nothing happens
_STOP_S = 5.0
_WRITE_SLICE = 64 * 1024
_GONE = (errno.EIO, errno.EPIPE, errno.ECONNRESET, errno.EBADF)


def flood_lines(total_bytes: int, width: int = 64) -> list[str]:
    """Numbered lines of ``width`` bytes (newline included) adding up to ``total_bytes``."""
    count = max(1, total_bytes // width)
    filler = "abcdefghijklmnopqrstuvwxyz0123456789" * (width // 36 + 1)
    return [f"flood {index:08d} {filler[:width - 16]}"[:width - 1] for index in range(count)]


class _PtyLink:
    """The device's end of a pty pair. It keeps the slave open itself so that the driver opening
    and closing the slave path never makes the master read fail; vanishing closes both ends."""

    def __init__(self) -> None:
        self._master, self._slave = os.openpty()
        # A UART does not echo or translate line endings; a fresh pty does until the driver's
        # open() puts it in raw mode, so make it raw from the start.
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self.is_open = True

    @property
    def connected(self) -> bool:
        return self.is_open

    def read_fds(self) -> list[int]:
        return [self._master] if self.is_open else []

    def readable(self, fd: int) -> bytes:
        try:
            return os.read(self._master, 65536)
        except BlockingIOError:
            return b""

    def write_fd(self) -> int | None:
        return self._master if self.is_open else None

    def write(self, data: memoryview) -> int:
        return os.write(self._master, data)

    def peer_gone(self) -> None:
        pass   # the device holds the slave, so the master never sees its peer go

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            os.close(self._master)
            os.close(self._slave)


class _TcpLink:
    """A one-client TCP server; a client that disconnects may be followed by another."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.url = f"socket://127.0.0.1:{self._listener.getsockname()[1]}"
        self._client: socket.socket | None = None
        self.is_open = True

    @property
    def connected(self) -> bool:
        return self._client is not None

    def read_fds(self) -> list[int]:
        if not self.is_open:
            return []
        fds = [self._listener.fileno()]
        if self._client is not None:
            fds.append(self._client.fileno())
        return fds

    def readable(self, fd: int) -> bytes:
        if fd == self._listener.fileno():
            client, _ = self._listener.accept()
            client.setblocking(False)
            if self._client is not None:   # the old one went away without us noticing
                self._client.close()
            self._client = client
            return b""
        assert self._client is not None
        try:
            data = self._client.recv(65536)
        except BlockingIOError:
            return b""
        except ConnectionResetError:
            data = b""
        if not data:
            self.peer_gone()
        return data

    def write_fd(self) -> int | None:
        return self._client.fileno() if self._client is not None else None

    def write(self, data: memoryview) -> int:
        assert self._client is not None
        return self._client.send(data)

    def peer_gone(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            self.peer_gone()
            self._listener.close()


class ContractDevice:
    """A firmware test shell on a pty or a TCP port, answering the console contract.

    ``ok_line`` and ``err_line`` (with ``{reason}``) make it another vendor's shell.
    ``received`` is every line the host sent; ``hooks`` the values of ``test power|signal|space``.
    """

    def __init__(self, transport: Transport = "pty", *, version: str = "1.0.0",
                 ota_events: Sequence[str] = DEFAULT_OTA_EVENTS, ok_line: str = "OK",
                 err_line: str = "ERR {reason}") -> None:
        self.transport = transport
        self.version = version
        self.ota_events = list(ota_events)
        self.ok_line = ok_line
        self.err_line = err_line
        self._link: _PtyLink | _TcpLink = _PtyLink() if transport == "pty" else _TcpLink()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._state = threading.Condition()   # guards what the test thread reads or queues
        self._actions: list[tuple[float, Callable[[], None]]] = []
        self._received: list[str] = []
        self._hooks: dict[str, list[int]] = {}
        self._ota_server: str | None = None
        self._silent = False
        self._deaf = False
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._inbox = b""
        self._thread = threading.Thread(target=self._run, name=f"contract device {transport}",
                                        daemon=True)
        self._closed = False

    # -- where the driver finds it -------------------------------------------------------------
    @property
    def port(self) -> str:
        """The slave path of the pty (for ``SerialConsole(port=...)``)."""
        assert isinstance(self._link, _PtyLink), "a tcp device has a url, not a port"
        return self._link.path

    @property
    def url(self) -> str:
        """``socket://127.0.0.1:PORT`` (for ``SerialConsole(url=...)``)."""
        assert isinstance(self._link, _TcpLink), "a pty device has a port, not a url"
        return self._link.url

    @property
    def where(self) -> dict[str, str]:
        """``port=`` or ``url=`` for the driver, whichever this transport has."""
        return {"port": self.port} if self.transport == "pty" else {"url": self.url}

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, close every fd, and re-raise what failed on the device thread."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(_STOP_S)
        alive = self._thread.is_alive()
        if not alive:   # never close an fd a live thread may still select on
            self._link.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        if alive:
            raise RuntimeError("the contract device thread did not stop")
        if self._error is not None:
            raise RuntimeError("the contract device thread failed") from self._error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what a test asks of it ----------------------------------------------------------------
    def say(self, *lines: str) -> None:
        """Print these lines (each with ``\\n``)."""
        self.write_raw("".join(f"{line}\n" for line in lines).encode())

    def write_raw(self, data: bytes, *, delay: float = 0.0) -> None:
        """Write these bytes as they are (line endings, partial lines), after ``delay`` s."""
        self._queue(lambda: self._write(data), delay)

    def flood(self, lines: Sequence[str]) -> None:
        """Write all these lines as fast as the link takes them."""
        self.write_raw("".join(f"{line}\n" for line in lines).encode())

    def go_silent(self, silent: bool = True) -> None:
        """Keep receiving (and recording) commands but answer none, like a hung shell."""
        with self._state:
            self._silent = silent

    def go_deaf(self) -> None:
        """Stop reading the link at all, like a board wedged with its UART interrupt off: what
        the host sends piles up until its writes stall."""
        with self._state:
            self._deaf = True
        self._wake()

    def vanish(self, *, delay: float = 0.0) -> None:
        """Close the device's side after ``delay`` s: the pty hangs up, the socket closes."""
        self._queue(self._link.close, delay)

    @property
    def received(self) -> list[str]:
        with self._state:
            return list(self._received)

    @property
    def hooks(self) -> dict[str, list[int]]:
        with self._state:
            return {hook: list(values) for hook, values in self._hooks.items()}

    @property
    def ota_server(self) -> str | None:
        with self._state:
            return self._ota_server

    def wait_received(self, line: str, timeout: float = 5.0) -> None:
        """Wait until the host has sent ``line``."""
        with self._state:
            if not self._state.wait_for(lambda: line in self._received, timeout):
                raise AssertionError(f"the device did not receive {line!r} in {timeout} s; "
                                     f"it received {self._received!r}")

    def _queue(self, action: Callable[[], None], delay: float) -> None:
        with self._state:
            self._actions.append((time.monotonic() + delay, action))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    # -- the device thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                with self._state:
                    # Output waits for a client: on tcp nobody may be connected yet.
                    due = [item for item in self._actions
                           if item[0] <= now and self._link.connected]
                    for item in due:
                        self._actions.remove(item)
                    upcoming = [at - now for at, _ in self._actions if at > now]
                    deaf = self._deaf
                for _, action in due:
                    action()
                timeout = min([_IDLE_S, *upcoming])
                fds = [self._wake_r, *([] if deaf else self._link.read_fds())]
                ready, _, _ = select.select(fds, [], [], timeout)
                for fd in ready:
                    if fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif self._link.is_open:
                        self._feed(self._link.readable(fd))
        except BaseException as error:   # re-raised by stop() on the test thread
            self._error = error

    def _feed(self, data: bytes) -> None:
        *lines, self._inbox = (self._inbox + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip("\r")
            with self._state:
                self._received.append(line)
                self._state.notify_all()
                silent = self._silent
            answer = self._answer(line)
            if answer and not silent:
                self._write("".join(f"{text}\n" for text in answer).encode())

    def _answer(self, line: str) -> list[str]:
        ok, version = self.ok_line, self.version
        match line.split():
            case []:
                return []
            case ["sys", "version"]:
                return [f"version={version}", ok]
            case ["sys", "reboot"]:
                return [ok, f"boot version={version}"]
            case ["ota", "server", url]:
                with self._state:
                    self._ota_server = url
                return [ok]
            case ["ota", "check"]:
                return [ok, *self.ota_events]
            case ["test", "power" | "signal" | "space" as hook, value]:
                try:
                    number = int(value)
                except ValueError:
                    return [self.err_line.format(reason=f"not a number: {value}")]
                with self._state:
                    self._hooks.setdefault(hook, []).append(number)
                return [ok]
            case ["test", "factory"]:
                return [ok]
            case _:
                return [self.err_line.format(reason="unknown command")]

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` unless the link goes or the device stops; never blocks long."""
        view = memoryview(data)
        while view and not self._stopping.is_set():
            fd = self._link.write_fd()
            if fd is None:
                return
            _, writable, _ = select.select([], [fd], [], _IDLE_S)
            if not writable:
                continue
            try:
                written = self._link.write(view[:_WRITE_SLICE])
            except BlockingIOError:
                continue
            except OSError as error:
                if error.errno not in _GONE:
                    raise
                self._link.peer_gone()
                return
            view = view[written:]
