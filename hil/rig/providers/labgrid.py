"""A rig that is a labgrid place (``labgrid: {place: bench-07}`` or ``{tags: {board: nrf52832}}``):
reserved through the labgrid coordinator, its console and power built from the place's resources.

labgrid runs in a virtualenv of its own (``dev.py setup`` makes ``.venv-labgrid``, pinned as
``LABGRID`` in pyproject.toml's ``labgrid`` extra): it depends on pyserial-labgrid, a fork that
installs the same ``serial`` module as pyserial, which hil, pyocd and esptool (and hil's
``hilsim://`` URL handler) import. So hil drives labgrid from outside its own process:

- what changes the coordinator's state goes through ``labgrid-client``, the documented commands a
  person types (``reserve``, ``acquire``, ``power``, ``release``, ``cancel-reservation``);
  the power port is switched by labgrid's own power driver there;
- what is read (places, their resources, reservations) comes from labgrid's client library, run
  by labgrid's Python (``SNAPSHOT``), as JSON: no parsing of labgrid's human output.

``start()``:

1. a guard process starts (``python -m hil.rig.providers.labgrid guard``, its own session, so a
   Ctrl-C to the run's process group leaves it standing). It reads what this process tells it
   (the reservation's token, the place) on a pipe; when the pipe ends without ``done`` (this
   process died: SIGKILL, a crash) it releases the place and cancels the reservation, so the
   next client in the coordinator's queue gets the place. A reservation still waiting when the
   guard itself is gone expires by the coordinator's own timeout (60 s unpolled);
2. ``labgrid-client reserve --wait`` with the rig's filter (``name=<place>`` or its tags), up
   to ``labgrid.wait`` seconds (the coordinator serves reservations by priority, then age: two
   runs asking for one place are served one after the other);
3. ``labgrid-client -p + acquire`` (the place allocated to the token), then the place's
   resources: a ``NetworkSerialPort`` becomes the console (``rfc2217://host:port``, or
   ``socket://`` for ``protocol: raw``), a power port (``power.kind: labgrid``) is switched with
   ``labgrid-client power``. The flasher, where the rig file names no probe or port:

   - an SWD board's probe is the place's ``NetworkService`` named ``pyocd``: the ``pyocd
     server`` on the bench host (``address``, ``port``), opened with pyocd's remote probe
     client as ``remote:address:port``. labgrid has no resource of its own for pyocd's probe
     server (its remote debuggers are USB devices used over SSH, ``NetworkUSBDebugger``); a
     NetworkService is a TCP service at an address and port, which the exporter publishes
     as configured and labgrid's client builds without complaint (an unknown class would
     break ``labgrid-client power`` on the place);
   - an ESP32's bootloader is reached through the place's serial port: in rfc2217 mode
     (ser2net's ``telnet(rfc2217)``, labgrid's default) DTR and RTS reach the USB-UART and
     esptool's resets work (``hil.drivers.esp``); a port exported as raw TCP carries no
     lines and is refused at start, in one line.

   The console is opened only once the exporter's ser2net listens (``wait_listening``: the
   exporter publishes its port before it does).

A run given ``--hil-place``/``--hil-place-tags`` and no rig file has its rig built from the
matching places (``rig_from_places``: board and identity from their tags, the flasher where
every place has one) and, at its first test, bound to the place it got (``bound_to_place``):
each xdist worker its own place. Each test's Allure result records its place (``Place.facts``:
name, tags, exporter), which ``hil report`` shows per board.

Releasing is ``labgrid-client release`` and ``cancel-reservation`` (the place is free for the
next one only then), then the guard is told it is done. With ``labgrid.hold: run`` (the default)
that happens when the process exits (``release_held``, at exit): the place is acquired at the
first test and each later test's parts take it back at once, so a pytest run (each xdist worker)
holds one place; ``hold: test`` releases it at each ``stop()``.

The client's identity at the coordinator is ``LG_USERNAME``: ``<user>-hil<pid>`` (the user's own
``LG_USERNAME`` or login name), so that ``labgrid-client who`` and ``hil rigs`` tell which run
holds a place, and two runs on one host are two clients.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hil.boards import BOARDS, FlasherKind
from hil.configfile import validate
from hil.drivers.base import ConsoleProtocol, FlasherProtocol, PowerProtocol, rfc2217_quiet
from hil.drivers.switched import SwitchedPower, said
from hil.errors import ConfigError, RigFault
from hil.rig.model import Identity, Labgrid, LabgridPower, Rig

PART = "labgrid"
CLIENT_ENV = "HIL_LABGRID_CLIENT"    # the labgrid-client to run (default: .venv-labgrid's)
DEFAULT_COORDINATOR = "127.0.0.1:20408"   # labgrid's own default
COMMAND_TIMEOUT_S = 60.0            # one labgrid-client command (a coordinator that hangs)
GUARD_WAIT_S = 120.0                # the guard's release at a clean stop
LISTEN_WAIT_S = 30.0                # an acquired place's ser2net, until it listens
# Left out of the environment labgrid-client runs in: each would choose another place, token
# or environment than the one this provider hands it.
FOREIGN = ("LG_PLACE", "LG_TOKEN", "LG_ENV", "LG_STATE", "LG_INITIAL_STATE", "LG_PROXY")

# Run by labgrid's own Python (its virtualenv): labgrid's client library reads the coordinator's
# places, resources and reservations; printed as one JSON object.
SNAPSHOT = r"""
import json, sys
from labgrid.remote.client import start_session
from labgrid.remote.common import Reservation
from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2

session = start_session(sys.argv[1])
try:
    resources = [{"path": [exporter, group, entry.cls, name], "cls": entry.cls,
                  "params": entry.params, "acquired": entry.acquired, "avail": entry.avail}
                 for exporter, groups in session.resources.items()
                 for group, entries in groups.items() for name, entry in entries.items()]
    places = {name: {"acquired": place.acquired, "reservation": place.reservation,
                     "tags": dict(place.tags),
                     "acquired_resources": [list(path) for path in place.acquired_resources],
                     "matched_resources": [res["path"] for res in resources
                                           if any(match.ismatch(tuple(res["path"]))
                                                  for match in place.matches)]}
              for name, place in session.places.items()}
    answer = session.loop.run_until_complete(
        session.stub.GetReservations(pb2.GetReservationsRequest()))
    reservations = {}
    for message in answer.reservations:
        res = Reservation.from_pb2(message)
        reservations[res.token] = {"owner": res.owner, "state": res.state.name,
                                   "places": [name for group in res.allocations.values()
                                              for name in group]}
    print(json.dumps({"places": places, "resources": resources,
                      "reservations": reservations}, default=str))
finally:
    session.loop.run_until_complete(session.stop())
    session.loop.run_until_complete(session.close())
"""


def client_path() -> Path:
    """``labgrid-client``: ``$HIL_LABGRID_CLIENT``, else the one ``dev.py setup`` installs
    beside hil's virtualenv (the pinned labgrid), else the one on PATH."""
    given = os.environ.get(CLIENT_ENV)
    if given:
        return Path(given)
    beside = Path(sys.prefix).parent / ".venv-labgrid" / "bin" / "labgrid-client"
    if beside.is_file():
        return beside
    found = shutil.which("labgrid-client")
    if found:
        return Path(found)
    raise RigFault(PART, "labgrid-client not found: `python3 dev.py setup` installs labgrid "
                   f"into .venv-labgrid; or put it on PATH, or name it in ${CLIENT_ENV}")


def labgrid_python(client: Path) -> Path:
    """The Python labgrid is installed in: the interpreter of ``labgrid-client``'s ``#!``."""
    try:
        with client.open("rb") as script:
            first = script.readline().decode(errors="replace").strip()
    except OSError as error:
        raise RigFault(PART, f"{client}: {error.strerror}") from None
    if not first.startswith("#!") or not first[2:].split():
        raise RigFault(PART, f"{client} is not labgrid's Python script (no #! line)")
    return Path(first[2:].split()[0])


def coordinator_address(spec: Labgrid | None) -> str:
    """The rig's ``labgrid.coordinator``, else ``$LG_COORDINATOR``, else labgrid's default."""
    return (spec.coordinator if spec is not None and spec.coordinator else None) \
        or os.environ.get("LG_COORDINATOR") or DEFAULT_COORDINATOR


def hil_user() -> str:
    """This process's name at the coordinator (see the module docstring)."""
    return f"{os.environ.get('LG_USERNAME') or getpass.getuser()}-hil{os.getpid()}"


# ------------------------------------------------------------------------------ what is read
@dataclass(frozen=True)
class Resource:
    path: tuple[str, ...]            # exporter, group, class, name
    cls: str
    params: dict[str, Any]
    acquired: str | None             # the place that holds it
    avail: bool


@dataclass(frozen=True)
class Place:
    name: str
    tags: dict[str, str]
    acquired: str | None             # host/user of the client holding it
    reservation: str | None          # the token it is allocated to
    resources: tuple[Resource, ...]  # those it holds while acquired
    # Those its matches name, acquired or not: what the place will hold once acquired.
    matched: tuple[Resource, ...] = ()

    @property
    def exporter(self) -> str:
        """Where its resources are: the exporters' names (labgrid's name for a bench host,
        its host name by default), each with the address its serial port is served at when
        that differs (``bench-host-3 (10.0.0.7)``)."""
        hosts: dict[str, str] = {}
        for resource in self.resources or self.matched:
            host = str(resource.params.get("host") or "") \
                if resource.cls == "NetworkSerialPort" else ""
            if host and host != resource.path[0]:
                hosts[resource.path[0]] = f"{resource.path[0]} ({host})"
            else:
                hosts.setdefault(resource.path[0], resource.path[0])
        return ", ".join(hosts[name] for name in sorted(hosts)) or "unknown"

    def facts(self) -> dict[str, str]:
        """What a test's report records of the place it ran on (Allure labels; ``hil report``
        shows them): its name, its tags, its exporter."""
        return {"place": self.name,
                "place_tags": ", ".join(f"{key}={value}"
                                        for key, value in sorted(self.tags.items())),
                "place_exporter": self.exporter}


@dataclass(frozen=True)
class Reservation:
    token: str
    owner: str                       # host/user
    state: str                       # waiting, allocated, acquired, expired, invalid
    places: tuple[str, ...]


@dataclass(frozen=True)
class Snapshot:
    """The coordinator's places, resources and reservations at one moment."""

    places: dict[str, Place]
    resources: tuple[Resource, ...]
    reservations: dict[str, Reservation]

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Snapshot:
        resources = tuple(Resource(tuple(entry["path"]), entry["cls"], entry["params"] or {},
                                   entry["acquired"], bool(entry["avail"]))
                          for entry in document["resources"])
        by_path = {resource.path: resource for resource in resources}
        places = {name: Place(name, dict(place["tags"]), place["acquired"],
                              place["reservation"],
                              tuple(by_path[tuple(path)] for path in place["acquired_resources"]
                                    if tuple(path) in by_path),
                              tuple(by_path[tuple(path)]
                                    for path in place.get("matched_resources", ())
                                    if tuple(path) in by_path))
                  for name, place in document["places"].items()}
        reservations = {token: Reservation(token, res["owner"], res["state"],
                                           tuple(res["places"]))
                        for token, res in document["reservations"].items()}
        return cls(places, resources, reservations)

    def state(self, place: Place) -> str:
        """``free``, ``reserved for host/user`` or ``acquired by host/user``."""
        if place.acquired:
            return f"acquired by {place.acquired}"
        reservation = self.reservations.get(place.reservation or "")
        if reservation is not None:
            return f"reserved for {reservation.owner}"
        return "free"

    def matching(self, spec: Labgrid) -> list[Place]:
        """The places a rig's ``labgrid`` section can be given (by name, or by all its tags)."""
        if spec.place is not None:
            return [place for name, place in self.places.items() if name == spec.place]
        return [place for _, place in sorted(self.places.items())
                if all(place.tags.get(key) == value for key, value in spec.tags.items())]


# ------------------------------------------------------------------------------ labgrid-client
class LabgridClient:
    """``labgrid-client`` as one client of one coordinator: each call a command that exits."""

    def __init__(self, coordinator: str, *, user: str | None = None,
                 client: Path | None = None) -> None:
        self.coordinator = coordinator
        self.client = client or client_path()
        self.env = {key: value for key, value in os.environ.items() if key not in FOREIGN}
        self.env["LG_COORDINATOR"] = coordinator
        if user is not None:
            self.env["LG_USERNAME"] = user

    def run(self, *args: str, token: str | None = None,
            timeout: float = COMMAND_TIMEOUT_S) -> str:
        """Run one command; its output, or a RigFault with the line labgrid ended on."""
        env = self.env if token is None else {**self.env, "LG_TOKEN": token}
        command = f"labgrid-client {' '.join(args)}"
        try:
            done = subprocess.run([str(self.client), *args], env=env,  # noqa: S603 (ours)
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except FileNotFoundError:
            raise RigFault(PART, f"{self.client} not found (${CLIENT_ENV})") from None
        except subprocess.TimeoutExpired:
            raise RigFault(PART, f"{command}: no answer from the coordinator at "
                           f"{self.coordinator} within {timeout:g} s") from None
        if done.returncode != 0:
            why = said(done.stderr) if done.stderr.strip() else said(done.stdout)
            raise RigFault(PART, f"{command} (coordinator {self.coordinator}) failed: {why}")
        return done.stdout

    def snapshot(self, timeout: float = COMMAND_TIMEOUT_S) -> Snapshot:
        """The coordinator's state, read by labgrid's client library (``SNAPSHOT``)."""
        python = labgrid_python(self.client)
        try:
            done = subprocess.run([str(python), "-c", SNAPSHOT, self.coordinator],  # noqa: S603
                                  env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            raise RigFault(PART, f"{python} (labgrid's Python) not found") from None
        except subprocess.TimeoutExpired:
            raise RigFault(PART, f"no answer from the coordinator at {self.coordinator} "
                           f"within {timeout:g} s") from None
        if done.returncode != 0:
            raise RigFault(PART, f"reading the coordinator at {self.coordinator}: "
                           f"{said(done.stderr)}")
        return Snapshot.from_json(json.loads(done.stdout))


# ------------------------------------------------------------------------------ the parts
class LabgridPowerPort(SwitchedPower):
    """The place's power port, switched by labgrid's power driver (``labgrid-client power``)."""

    what = "a labgrid place's power port (power.kind: labgrid)"

    def __init__(self, client: LabgridClient, place: str, *, off_s: float, timeout: float
                 ) -> None:
        """``place``: as ``labgrid-client -p`` takes it (``+TOKEN``: the reserved place)."""
        super().__init__(off_s=off_s, timeout=timeout)
        self.client = client
        self.place = place

    def open(self) -> None:
        pass                # labgrid-client was found at start; nothing is held

    def identify(self) -> str:
        """``power for place bench-07 is on``: labgrid asking the port itself."""
        return said(self.client.run("-p", self.place, "power", "get", timeout=self.timeout))

    def output(self, on: bool) -> None:
        self.client.run("-p", self.place, "power", "on" if on else "off", timeout=self.timeout)


def console_url(resource: Resource) -> str:
    """A ``NetworkSerialPort`` as a pyserial URL."""
    host, port = resource.params.get("host"), resource.params.get("port")
    if not host or not port:
        raise RigFault("console", f"{'/'.join(resource.path)} has no port on its exporter "
                       "(its ser2net did not start? see the exporter's log)")
    if resource.params.get("protocol", "rfc2217") == "raw":
        return f"socket://{host}:{port}"
    # ser2net leaves unanswered a SET_CONTROL that repeats the port's state, and pyserial
    # waits for the answer (labgrid ships its own pyserial fork for this); pyserial's
    # ign_set_control does not wait.
    return f"rfc2217://{host}:{port}?ign_set_control"


def wait_listening(resource: Resource, place: str, timeout: float = LISTEN_WAIT_S) -> None:
    """Wait for the place's ser2net to listen. The exporter starts it when the place is
    acquired and publishes its port after waiting 0.5 s for it not to exit, not for it to
    listen: on a loaded host the console would be refused (the next run on a place just
    released, typically)."""
    url = console_url(resource)
    host, port = resource.params["host"], int(resource.params["port"])
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except OSError as error:
            if time.monotonic() > end:
                raise RigFault("console", f"{url}: {error.strerror or error} for {timeout:g} s "
                               f"after place {place} was acquired (its exporter's ser2net "
                               "did not start? see the exporter's log)") from None
        time.sleep(0.1)


class Hold:
    """One acquired place: its client, reservation token and guard. ``acquire()`` reserves
    (waiting in the queue) and acquires; ``release()`` gives it back (see the module
    docstring)."""

    def __init__(self, spec: Labgrid, coordinator: str, user: str) -> None:
        self.spec = spec
        self.coordinator = coordinator
        self.client = LabgridClient(coordinator, user=user)
        self.token: str | None = None
        self.acquired = False
        self.place: Place | None = None
        self._guard: subprocess.Popen[str] | None = None

    def acquire(self) -> Place:
        client = self.client
        try:
            self._guard = start_guard(client)
            self.token = self._reserve(client)
            self._tell("acquiring")
            # The place by its token: a name given to -p is matched as a substring.
            client.run("-p", f"+{self.token}", "acquire")
            self.acquired = True
            snapshot = client.snapshot()
            name = next((name for name, place in snapshot.places.items()
                         if place.reservation == self.token), None)
            if name is None:
                raise RigFault(PART, f"the coordinator shows no place for reservation "
                               f"{self.token}")
            self.place = snapshot.places[name]
            return self.place
        except BaseException:
            self.release()
            raise

    def _reserve(self, client: LabgridClient) -> str:
        """``labgrid-client reserve --wait``: the token as soon as the reservation exists (told
        to the guard, which cancels it should this process die while waiting), then the wait
        for the allocation (labgrid-client polls each second, which keeps the reservation from
        expiring), at most ``labgrid.wait`` seconds. A waiter outliving this process ends at
        its next poll once the guard has cancelled the reservation."""
        end = time.monotonic() + self.spec.wait
        waiting = subprocess.Popen([str(client.client), "reserve", "--shell", "--wait",  # noqa: S603
                                    *self.spec.filters], env=client.env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        with waiting:
            assert waiting.stdout is not None
            first = waiting.stdout.readline().strip()
            token = first.split("=", 1)[1] if first.startswith("export LG_TOKEN=") else None
            if token is not None:
                self.token = token
                self._tell(f"token {token}")
            try:
                _, stderr = waiting.communicate(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                waiting.kill()
                waiting.communicate()
                raise RigFault(PART, f"no place for {' '.join(self.spec.filters)} within "
                               f"{self.spec.wait:g} s at {self.coordinator} (labgrid.wait); "
                               "`hil rigs` shows who holds it") from None
        if waiting.returncode != 0 or token is None:
            raise RigFault(PART, f"labgrid-client reserve {' '.join(self.spec.filters)} "
                           f"(coordinator {self.coordinator}) failed: "
                           f"{said(stderr) if stderr.strip() else first or 'no token'}")
        return token

    def release(self) -> None:
        """Release the place and cancel the reservation: the next client's turn."""
        client, token, acquired = self.client, self.token, self.acquired
        self.token, self.acquired, self.place = None, False, None
        done = False
        try:
            if token is not None:
                release(client, token, acquired)
            done = True
        finally:
            guard, self._guard = self._guard, None
            if guard is not None:
                # "done": the guard leaves the coordinator alone. Had the release above
                # failed, the guard tries it once more as the pipe ends.
                if done:
                    self._tell_guard(guard, "done")
                stop_guard(guard)

    def _tell(self, line: str) -> None:
        if self._guard is not None:
            self._tell_guard(self._guard, line)

    @staticmethod
    def _tell_guard(guard: subprocess.Popen[str], line: str) -> None:
        assert guard.stdin is not None
        with contextlib.suppress(OSError):
            guard.stdin.write(line + "\n")
            guard.stdin.flush()


# The places held for the run (labgrid.hold: run), by rig, coordinator and filter: a rig's next
# RigParts in this process takes its place back without asking the coordinator again.
_HELD: dict[tuple[str, str, tuple[str, ...]], Hold] = {}
_IN_USE: set[int] = set()
_HELD_LOCK = threading.Lock()


def release_held() -> None:
    """Release every place this process holds for its run (at exit; the guards cover a
    process that dies without exiting). The first fault is raised once all were tried."""
    with _HELD_LOCK:
        holds = list(_HELD.values())
        _HELD.clear()
    faults = []
    for hold in holds:
        try:
            hold.release()
        except RigFault as fault:
            faults.append(fault)
    if faults:
        raise faults[0]


def _release_at_exit() -> None:
    try:
        release_held()
    except RigFault as fault:      # one line, not a traceback; the guard tries once more
        print(f"hil: {fault}", file=sys.stderr)


atexit.register(_release_at_exit)


class LabgridProvider:
    """The parts of a rig that is a labgrid place (see the module docstring).

    With ``labgrid.hold: run`` (the default) the place is reserved and acquired at the first
    start and kept for the rest of the process (a pytest run, an xdist worker): each test's
    RigParts takes it back at once, and it is released at exit (``release_held``). With
    ``hold: test`` each stop releases it, and runs share the place test by test."""

    def __init__(self, rig: Rig) -> None:
        if rig.labgrid is None:
            raise RigFault(PART, "not a labgrid place (no labgrid: section)", rig.name)
        self.rig = rig
        self.spec: Labgrid = rig.labgrid
        self.coordinator = coordinator_address(self.spec)
        self.user = hil_user()
        self.hold: Hold | None = None

    @property
    def place(self) -> Place | None:
        return self.hold.place if self.hold is not None else None

    @property
    def client(self) -> LabgridClient | None:
        return self.hold.client if self.hold is not None else None

    @property
    def token(self) -> str | None:
        return self.hold.token if self.hold is not None else None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.hold is not None:
            return
        key = (self.rig.name, self.coordinator, self.spec.filters)
        with _HELD_LOCK:
            held = _HELD.get(key) if self.spec.hold == "run" else None
            if held is not None and id(held) not in _IN_USE:
                _IN_USE.add(id(held))
                self.hold = held
                return
        hold = Hold(self.spec, self.coordinator, self.user)
        place = hold.acquire()
        try:
            self._check_resources(place)
            wait_listening(self._serial_port(place), place.name)
        except BaseException:
            hold.release()
            raise
        self.hold = hold
        if self.spec.hold == "run":
            with _HELD_LOCK:
                if key not in _HELD:       # else another RigParts of the rig holds one too
                    _HELD[key] = hold
                _IN_USE.add(id(hold))

    def stop(self) -> None:
        hold, self.hold = self.hold, None
        if hold is None:
            return
        with _HELD_LOCK:
            _IN_USE.discard(id(hold))
            kept = any(held is hold for held in _HELD.values())
        if not kept:
            hold.release()

    def _check_resources(self, place: Place) -> None:
        if self.rig.power.kind == "labgrid" and self._power_port(place) is None:
            raise RigFault("power", f"place {place.name} has no power port "
                           "(power.kind: labgrid)")
        serial_port = self._serial_port(place)
        flasher = self.rig.flasher
        if flasher.kind == "swd" and flasher.probe is None and probe_service(place.resources) \
                is None:
            raise RigFault("flasher", f"place {place.name} has no {PROBE_SERVICE!r} "
                           "NetworkService (its SWD probe's `pyocd server`: address, port)")
        if flasher.kind == "esp" and flasher.port is None and not carries_lines(serial_port):
            raise RigFault("flasher", f"place {place.name}'s serial port is raw TCP, which "
                           "carries no DTR/RTS for the ESP32's bootloader: export it in "
                           "rfc2217 mode (NetworkSerialPort protocol: rfc2217)")

    # ------------------------------------------------------------------ the parts
    def _serial_port(self, place: Place) -> Resource:
        ports = [r for r in place.resources if r.cls == "NetworkSerialPort"]
        if not ports:
            raise RigFault("console", f"place {place.name} has no NetworkSerialPort "
                           "(a RawSerialPort or USBSerialPort exported through ser2net)")
        return ports[0]

    @staticmethod
    def _power_port(place: Place) -> Resource | None:
        return power_port(place.resources)

    def _place(self) -> Place:
        if self.place is None or self.client is None:
            raise RigFault(PART, "the place is not acquired (the provider was not started)",
                           self.rig.name)
        return self.place

    def console(self, log_path: Path | None) -> ConsoleProtocol | None:
        from hil.drivers.console import SerialConsole

        class NetworkConsole(SerialConsole):
            def open(self) -> None:
                # pyserial's rfc2217 client refuses a write timeout (NotImplementedError); its
                # writes go to a TCP socket, which ser2net drains.
                self.write_timeout = None    # type: ignore[assignment]
                with rfc2217_quiet():
                    super().open()

        port = self._serial_port(self._place())
        spec = self.rig.console
        return NetworkConsole(url=console_url(port), baudrate=spec.baudrate,
                              ok_pattern=spec.ok, err_pattern=spec.err, log_path=log_path)

    def flasher(self) -> FlasherProtocol | None:
        """The place's: its SWD probe through its pyocd server, an ESP32's bootloader through
        its serial port (RFC 2217 carries DTR/RTS); as the rig file says where it names the
        probe or port."""
        from hil.rig.parts import build_flasher

        spec = self.rig.flasher
        if spec.kind == "swd" and spec.probe is None:
            service = probe_service(self._place().resources)
            assert service is not None          # checked at start
            return build_flasher(self.rig, probe=probe_url(service))
        if spec.kind == "esp" and spec.port is None:
            return build_flasher(self.rig, port=console_url(self._serial_port(self._place())))
        return None

    def power(self) -> PowerProtocol | None:
        if not isinstance(self.rig.power, LabgridPower):
            return None
        self._place()
        assert self.client is not None
        return LabgridPowerPort(self.client, f"+{self.token}", off_s=self.rig.power.off_s,
                                timeout=self.rig.power.timeout)

    def point_at(self, url: str) -> bool:
        return False        # the board is told through its shell, as on a local bench


# The NetworkService that is a place's SWD probe: the `pyocd server` on its exporter's host
# (labgrid has no resource for pyocd's remote probe server; a NetworkService is a TCP service
# at an address and port, published by the exporter as configured).
PROBE_SERVICE = "pyocd"


def probe_service(resources: Sequence[Resource]) -> Resource | None:
    """A place's SWD probe server: its NetworkService named ``pyocd``."""
    return next((r for r in resources
                 if r.cls == "NetworkService" and r.path[-1] == PROBE_SERVICE), None)


def probe_url(resource: Resource) -> str:
    """The ``pyocd`` NetworkService as pyocd's remote probe id, ``remote:host:port``."""
    address, port = resource.params.get("address"), resource.params.get("port")
    if not address or not port:
        raise RigFault("flasher", f"{'/'.join(resource.path)} names no address and port of "
                       "its pyocd server")
    return f"remote:{address}:{port}"


def carries_lines(resource: Resource) -> bool:
    """Whether a NetworkSerialPort carries DTR/RTS: rfc2217 (ser2net's default) does, raw
    TCP does not."""
    return str(resource.params.get("protocol", "rfc2217")) != "raw"


def power_port(resources: Sequence[Resource]) -> Resource | None:
    """A place's power port: a NetworkPowerPort (any of labgrid's power models), a PDU."""
    return next((r for r in resources
                 if r.cls.endswith("PowerPort") or r.cls == "PDUDaemonPort"), None)


# ------------------------------------------------------------------------------ a rig from places
# The place's tags that are its board's identity at the OTA service: each place is one board,
# and the place a run (an xdist worker) gets is known only once it is reserved. The access key
# is no tag (tags are public at the coordinator): it stays in $HIL_ACCESS_KEY.
IDENTITY_TAGS = ("product_id", "dev_id")


def rig_from_places(spec: Labgrid, snapshot: Snapshot, option: str) -> Rig:
    """The rig of a run given a place (``--hil-place``) or tags (``--hil-place-tags``) and no
    rig file, from the places that match at the coordinator (read, not reserved): the board is
    their ``board`` tag, the identity their ``product_id`` and ``dev_id`` tags (each place's
    own, bound when the run gets one: ``bound_to_place``), the console the place's
    NetworkSerialPort, power its power port (``power.kind: labgrid``; the firmware's hook when
    a place has none), rf the firmware's hook. ``option`` names the option in the one-line
    ConfigError a missing piece gives."""
    places = snapshot.matching(spec)
    where = coordinator_address(spec)
    if not places:
        raise ConfigError(option, f"no place at the coordinator {where} "
                          f"{'has that name' if spec.place else 'carries these tags'} "
                          "(labgrid-client places)")
    for place in places:
        missing = [tag for tag in ("board", *IDENTITY_TAGS) if not place.tags.get(tag)]
        if missing:
            raise ConfigError(option, f"place {place.name} has no {missing[0]} tag (its "
                              f"board: labgrid-client -p {place.name} set-tags board=... "
                              "product_id=... dev_id=...)")
        if not any(r.cls == "NetworkSerialPort" for r in place.matched):
            raise ConfigError(option, f"place {place.name} has no NetworkSerialPort (its "
                              "console: a serial port its exporter shares through ser2net)")
    boards = sorted({place.tags["board"] for place in places})
    if len(boards) > 1:
        raise ConfigError(option, f"the matching places are of different boards "
                          f"({', '.join(boards)}): add board=... to the tags")
    first = places[0]
    # A place without a power port makes the run's power the firmware's hook: the capabilities
    # (what tests may need) are the run's, whichever place a worker gets.
    powered = all(power_port(place.matched) is not None for place in places)
    # A flasher when every place has one: an SWD board's pyocd server, an ESP32's serial port
    # in rfc2217 mode (the ESP32's bootloader is reached through it).
    flasher = BOARDS[boards[0]].flasher
    if flasher is FlasherKind.SWD:
        flashable = all(probe_service(place.matched) is not None for place in places)
    else:
        flashable = flasher is FlasherKind.ESP and all(
            carries_lines(port) for place in places for port in place.matched
            if port.cls == "NetworkSerialPort")
    name = spec.place or "lab-" + "-".join(value for _, value in sorted(spec.tags.items()))
    document = {
        "name": name, "board": boards[0],
        "identity": {tag: first.tags[tag] for tag in IDENTITY_TAGS},
        "labgrid": spec.model_dump(exclude_defaults=True),
        "power": {"kind": "labgrid"} if powered else {"kind": "console"},
        "rf": {"kind": "console"},
        "flasher": {"kind": flasher.value} if flashable else {"kind": "none"},
    }
    return validate(Rig, document, option)


def identity_of(place: Place, identity: Identity) -> Identity:
    """The identity of the board at ``place`` (its tags), the access key's variable kept."""
    missing = [tag for tag in IDENTITY_TAGS if not place.tags.get(tag)]
    if missing:
        raise RigFault("identity", f"place {place.name} has no {missing[0]} tag")
    return identity.model_copy(update={tag: place.tags[tag] for tag in IDENTITY_TAGS})


def bound_to_place(rig: Rig) -> tuple[Rig, Place]:
    """``rig`` (from ``rig_from_places``) with the identity of the place this process holds for
    it: reserved and acquired now at the first test, held for the run (``hold: run``), so the
    test's RigParts take the same place back."""
    provider = LabgridProvider(rig)
    provider.start()
    try:
        place = provider._place()
    finally:
        provider.stop()
    return rig.model_copy(update={"identity": identity_of(place, rig.identity)}), place


def start_guard(client: LabgridClient) -> subprocess.Popen[str]:
    """The guard (see the module docstring), for ``client``'s coordinator and identity."""
    return subprocess.Popen([sys.executable, "-m", "hil.rig.providers.labgrid", "guard"],
                            env={**client.env, CLIENT_ENV: str(client.client)},
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def stop_guard(guard: subprocess.Popen[str]) -> None:
    assert guard.stdin is not None
    with contextlib.suppress(OSError):
        guard.stdin.close()
    try:
        guard.wait(GUARD_WAIT_S)
    except subprocess.TimeoutExpired:
        guard.kill()
        guard.wait()


def release(client: LabgridClient, token: str, acquired: bool) -> None:
    """Release the place reserved with ``token`` (when it was acquired: an acquire that failed
    half-way may have gone through at the coordinator, so a failed release is then no fault)
    and cancel the reservation; the first RigFault is raised once both were tried."""
    faults: list[RigFault] = []
    steps: list[Sequence[str]] = [("-p", f"+{token}", "release"), ("cancel-reservation", token)]
    for step in steps if acquired else steps[1:]:
        try:
            client.run(*step)
        except RigFault as fault:
            faults.append(fault)
    if faults:
        raise faults[0]


def guard(lines: IO[str], client: LabgridClient,
          log: Callable[[str], None] = lambda line: None) -> None:
    """Read what the provider tells; at the end of ``lines`` without ``done``, release the
    place and cancel the reservation (best effort: the coordinator may be gone too)."""
    token, acquiring = None, False
    for line in lines:
        word, _, value = line.strip().partition(" ")
        if word == "done":
            return
        if word == "token":
            token = value
        elif word == "acquiring":
            acquiring = True
    if token is None:
        return
    try:
        release(client, token, acquiring)
        log(f"labgrid guard: released reservation {token}")
    except RigFault as fault:
        log(f"labgrid guard: {fault}")


def main(argv: list[str]) -> int:
    if argv != ["guard"]:
        print("usage: python -m hil.rig.providers.labgrid guard", file=sys.stderr)
        return 2
    # The run's Ctrl-C reaches its process group, not this session; a SIGTERM still ends the
    # guard after its release (the pipe is read to its end first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = LabgridClient(os.environ.get("LG_COORDINATOR", DEFAULT_COORDINATOR),
                           client=Path(os.environ[CLIENT_ENV]))
    guard(sys.stdin, client, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

