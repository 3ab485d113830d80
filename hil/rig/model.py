"""Rig files: one YAML file describes one bench, loaded into a typed, frozen, validated ``Rig``.

::

    name: bench-01
    board: nrf52832                   # esp32 | nrf52832 | gd32
    chip: nrf52832_xxaa               # optional part number
    identity:
      product_id: "245528"
      dev_id: "527776559"
      access_key_env: HIL_ACCESS_KEY  # the name of the variable; the key never lives here
    console: {port: /dev/ttyACM0, baudrate: 115200}   # or url: ..., or serial_number: ...
                                      # shell: none for firmware as it ships (no test shell)
    # or a host build run as the board (hil.rig.providers.process):
    #   console: {command: [examples/onenet-agent/agent], build: [make, ...], env: {...}}
    #   flasher: {kind: process}    power: {kind: process}
    flasher: {kind: swd, probe: "000683xxxxxx", target: nrf52832}   # swd | esp | none
    power: {kind: scpi, url: "socket://127.0.0.1:5025"}  # scpi|usb-hub|command|console|none
    #   a USB hub port (uhubctl):  power: {kind: usb-hub, hub: "1-1.4", port: 2}
    #   a relay or PDU's own tool: power: {kind: command, on: [relay, "3", "on"],
    #                                      off: relay 3 off, status: relay 3 state}
    rf: {kind: console}                                             # attenuator | console | none
    ota: {service: mock}              # mock or a base URL; gateway_host for lab networks
                                      # trigger: reset | power-cycle | wait (shell: none)
    # firmware with a hard-coded host: the gateway on gateway_host:port, hil's DNS answering
    # host with gateway_host: ota: {host: ota.heclouds.com, port: 80, gateway_host: 192.168.1.10}
    sim: {defects: [early-101]}       # a simulated rig: hil runs the board and its bench
                                      # shipped: true: its firmware as it ships, no shell
    # or a labgrid place, reserved through the coordinator (hil.rig.providers.labgrid): the
    # console is its NetworkSerialPort, power.kind: labgrid its power port; no console port
    labgrid: {place: bench-07}        # or {tags: {board: nrf52832}}; coordinator: host:port

A mistake is one ``ConfigError`` line naming the file and the key, raised at load, before any
test runs. ``console`` as a power or rf kind means the firmware's ``test`` hooks.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shlex
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from hil.boards import BOARDS, BoardFamily, FlasherKind
from hil.configfile import STRICT, read_yaml, validate
from hil.drivers.contract import COMMANDS, EVENTS
from hil.onenet.codes import is_valid_version

Positive = Annotated[float, Field(gt=0)]


class Identity(BaseModel):
    model_config = STRICT

    product_id: Annotated[str, Field(min_length=1)]
    dev_id: Annotated[str, Field(min_length=1)]
    access_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "HIL_ACCESS_KEY"
    device_name: str | None = None   # for device-level tokens; defaults to dev_id


def _compile(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{pattern!r} is not a regular expression: {error}") from None


def _known_keys(given: dict[str, str], known: dict[str, str], what: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; known: {', '.join(known)}")


class Console(BaseModel):
    """Where the firmware's test shell is, and how it speaks (every pattern overridable).

    A host build (``command``) is a program hil runs as the board (``hil.rig.providers.process``):
    its stdout and stderr are the console, its stdin the shell. Relative paths in ``command``
    and ``build`` are taken from the directory hil runs in (the project's root). ``build`` runs
    before the program starts (``make`` decides whether anything is to do); in its arguments
    ``{out}`` is the program's path and ``{defines}`` the ``-DDEFECT_<NAME>`` flags of
    ``defects``, the defects compiled in. ``known_defects`` are those the source can be built
    with (``hil defects`` builds each). ``state_dir`` is the program's flash
    (``HIL_STATE_DIR``), kept across restarts; default ``<tmp>/hil-proc/<name>``."""

    model_config = STRICT

    port: str | None = None
    url: str | None = None
    serial_number: str | None = None
    command: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    build: tuple[str, ...] | None = None
    env: dict[str, str] = {}
    state_dir: Path | None = None
    defects: tuple[str, ...] = ()
    known_defects: tuple[str, ...] = ()
    baudrate: Annotated[int, Field(gt=0, strict=True)] = 115200
    # "contract": the firmware's test shell (DESIGN.md); "none": firmware as it ships, whose
    # console is a read-only log. An attempt then starts with ``ota.trigger`` and is read at
    # the service; ``events.boot``, when given, is its boot-log line.
    shell: Literal["contract", "none"] = "contract"
    ok: str = r"^OK$"
    err: str = r"^ERR (?P<reason>.*)$"
    # Contract commands and event patterns a firmware with another shell renames (DESIGN.md).
    commands: dict[str, str] = {}
    events: dict[str, str] = {}

    @model_validator(mode="after")
    def _one_way_to_the_port(self) -> Console:
        given = [key for key in ("port", "url", "serial_number", "command")
                 if getattr(self, key)]
        # None given: a labgrid place's console (its NetworkSerialPort); the rig checks that
        # it has a place (Rig._a_console).
        if len(given) > 1:
            raise ValueError("give exactly one of port, url or serial_number"
                             + (f" (got {', '.join(given)})" if given
                                else " (or command, for a host build)"))
        if self.command is None:
            process_only = [key for key in ("build", "env", "state_dir", "defects",
                                            "known_defects") if getattr(self, key)]
            if process_only:
                raise ValueError(f"{process_only[0]}: only for a host build (console.command)")
        unknown = sorted(set(self.defects) - set(self.known_defects))
        if unknown:
            raise ValueError(f"defects: {unknown[0]!r} is not in known_defects "
                             f"({', '.join(self.known_defects) or 'none'})")
        return self

    @field_validator("defects", "known_defects")
    @classmethod
    def _known_defect_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if value:     # the names are hil.sim.defects' (a lab rig never imports hil.sim)
            from hil.sim.defects import Defect

            Defect.parse(value)
        return value

    @field_validator("ok", "err")
    @classmethod
    def _a_regex(cls, value: str) -> str:
        _compile(value)
        return value

    @field_validator("commands")
    @classmethod
    def _known_commands(cls, value: dict[str, str]) -> dict[str, str]:
        _known_keys(value, COMMANDS, "command")
        return value

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: dict[str, str]) -> dict[str, str]:
        _known_keys(value, EVENTS, "event")
        for pattern in value.values():
            _compile(pattern)
        return value

    @property
    def address(self) -> str:
        """What the console is opened by, for messages."""
        if self.command is not None:
            return f"the program {' '.join(self.command)}"
        return self.port or self.url or f"serial number {self.serial_number}"


class SwdFlasher(BaseModel):
    model_config = STRICT

    kind: Literal["swd"]
    # The probe's unique id (pyocd list), or remote:HOST:PORT (a `pyocd server`); a labgrid
    # place's rig leaves it out: its probe is the place's (hil.rig.providers.labgrid).
    probe: Annotated[str, Field(min_length=1)] | None = None
    target: str | None = None                    # pyocd target; default from the board
    pack: Path | None = None                     # a CMSIS pack for targets pyocd lacks
    frequency: Annotated[int, Field(gt=0, strict=True)] = 4_000_000


class EspFlasher(BaseModel):
    model_config = STRICT

    kind: Literal["esp"]
    port: str | None = None      # default: the console's port (the same USB serial bridge)
    baudrate: Annotated[int, Field(gt=0, strict=True)] = 460800
    # Where the partition table puts the OTA data partition (erased by each restore); default:
    # the two-OTA table's 0xd000.
    otadata: Annotated[int, Field(ge=0, multiple_of=0x1000, strict=True)] | None = None


class ProcessFlasher(BaseModel):
    """A host build's "flash": its state directory (``primary.bin``)."""

    model_config = STRICT

    kind: Literal["process"]


class NoFlasher(BaseModel):
    model_config = STRICT

    kind: Literal["none"]


class ScpiPower(BaseModel):
    model_config = STRICT

    kind: Literal["scpi"]
    url: Annotated[str, Field(min_length=1)]   # a serial device path or socket://host:port
    channel: Annotated[int, Field(ge=1, strict=True)] = 1
    current_limit: Positive = 1.0
    empty_volts: Positive = 3.3    # the battery level 0 % maps to this voltage ...
    full_volts: Positive = 4.2     # ... and 100 % to this one

    @model_validator(mode="after")
    def _empty_below_full(self) -> ScpiPower:
        if self.empty_volts >= self.full_volts:
            raise ValueError(f"empty_volts: {self.empty_volts} V is not below full_volts "
                             f"({self.full_volts} V)")
        return self


def _argv(value: Any) -> Any:
    """A command as a rig file gives it: a list of arguments, or one string split into them as
    a shell would (``shlex``). Either way it is run without a shell: no pipes, no variables."""
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as error:
            raise ValueError(f"{value!r} is not a command line ({error})") from None
        value = tuple(words)
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError("an empty command")
    return value


Command = Annotated[tuple[Annotated[str, Field(min_length=1)], ...], BeforeValidator(_argv),
                    Field(min_length=1)]


class UsbHubPower(BaseModel):
    """The USB hub port the board is powered from, switched by uhubctl (Debian's package).

    Off is a real cut where the hub switches VBUS port by port (uhubctl's list of compatible
    hubs; its status says ``ppps``; a ``ganged`` hub cuts all its ports together). ``hub`` is
    uhubctl's location (``-l``, as ``uhubctl`` with no options lists it), ``port`` the port
    number on that hub. ``uhubctl`` is how to run it: another path, or ``sudo -n uhubctl``
    where the hub needs root and no udev rule gives this user access."""

    model_config = STRICT

    kind: Literal["usb-hub"]
    # bus-port[.port...]: "1-1.4" is port 4 of the hub on port 1 of bus 1's root hub
    hub: str
    port: Annotated[int, Field(ge=1, le=14, strict=True)]   # uhubctl's MAX_HUB_PORTS
    off_s: Positive = 2.0         # how long a power cycle keeps the port off (uhubctl -d)
    uhubctl: Command = ("uhubctl",)
    timeout: Positive = 10.0      # seconds for one uhubctl run (a cycle: plus off_s)

    @field_validator("hub")
    @classmethod
    def _a_location(cls, value: str) -> str:
        if not re.fullmatch(r"\d+(-\d+(\.\d+)*)?", value):
            raise ValueError(f"{value!r} is not a hub location as uhubctl lists it "
                             "(bus-port[.port...], e.g. 1-1.4)")
        return value


class CommandPower(BaseModel):
    """Any relay or PDU with a command line: ``on`` and ``off`` switch the board's power, each
    an argument list or a string split as a shell would (run without a shell). ``cycle``
    (optional) is one command for off-then-on (a PDU's own reboot); without it a cycle is
    ``off``, ``off_s`` seconds, ``on``. ``status`` (optional) is what ``hil rigs check`` runs
    to see the switch answers without switching it (its first line of output is shown).
    A command fails when it exits non-zero or outlasts ``timeout`` seconds."""

    model_config = STRICT

    kind: Literal["command"]
    on: Command
    off: Command
    cycle: Command | None = None
    status: Command | None = None
    off_s: Positive = 2.0
    timeout: Positive = 10.0

    @model_validator(mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `on:` or `off:` key as the boolean true or false.
        if isinstance(value, dict) and (True in value or False in value):
            value = {{True: "on", False: "off"}.get(key, key) if isinstance(key, bool) else key:
                     item for key, item in value.items()}
        return value


class HookPower(BaseModel):
    model_config = STRICT

    kind: Literal["console"]


class ProcessPower(BaseModel):
    """A host build's power: off is SIGKILL, on starts the program."""

    model_config = STRICT

    kind: Literal["process"]


class NoPower(BaseModel):
    model_config = STRICT

    kind: Literal["none"]


class LabgridPower(BaseModel):
    """The labgrid place's power port (a NetworkPowerPort, a PDU...), switched by labgrid's own
    power driver through ``labgrid-client power`` (hil.rig.providers.labgrid)."""

    model_config = STRICT

    kind: Literal["labgrid"]
    off_s: Positive = 2.0        # seconds dark in a power cycle
    timeout: Positive = 30.0     # one labgrid-client power command


# labgrid's own tag syntax (labgrid.remote.common.TAG_KEY, TAG_VAL): the coordinator refuses others
LABGRID_TAG_KEY = r"^[a-z][a-z0-9_]+$"
LABGRID_TAG_VALUE = r"^[a-z0-9_]*$"
LABGRID_PLACE = r"^[A-Za-z0-9_.+-]{1,64}$"


class Labgrid(BaseModel):
    """A rig that is a labgrid place (``hil.rig.providers.labgrid``): hil reserves it through
    the coordinator (by ``place`` name, or by ``tags``: any free place carrying them), waits in
    the coordinator's queue up to ``wait`` seconds, acquires it and builds the console and
    power from its resources; released when the rig closes (and, should the process die, by
    the guard process hil leaves beside it)."""

    model_config = STRICT

    place: Annotated[str, Field(pattern=LABGRID_PLACE)] | None = None
    tags: dict[Annotated[str, Field(pattern=LABGRID_TAG_KEY)],
               Annotated[str, Field(pattern=LABGRID_TAG_VALUE)]] = {}
    coordinator: str | None = None    # host[:port]; default: $LG_COORDINATOR, then labgrid's
    wait: Positive = 3600.0           # seconds in the coordinator's queue before giving up
    # run: held from the first test to the process's end (a pytest run, an xdist worker);
    # test: released after each test, so runs share the place test by test.
    hold: Literal["run", "test"] = "run"

    @model_validator(mode="after")
    def _place_or_tags(self) -> Labgrid:
        if (self.place is None) == (not self.tags):
            raise ValueError("give exactly one of place (a name) or tags (key: value)")
        return self

    @property
    def filters(self) -> tuple[str, ...]:
        """The reservation's filter: ``name=bench-07``, or the tags as ``key=value``."""
        if self.place is not None:
            return (f"name={self.place}",)
        return tuple(f"{key}={value}" for key, value in sorted(self.tags.items()))


class AttenuatorRf(BaseModel):
    model_config = STRICT

    kind: Literal["attenuator"]
    url: Annotated[str, Field(min_length=1)]
    dialect: Literal["scpi", "minicircuits"] = "scpi"
    max_db: Positive = 95.0
    step_db: Positive = 0.25
    signal_at_0db: int = 31        # the signal level the board reports with no attenuation
    db_per_level: Positive = 2.0

    @model_validator(mode="after")
    def _step_within_range(self) -> AttenuatorRf:
        if self.step_db > self.max_db:
            raise ValueError(f"step_db: {self.step_db} dB is more than max_db ({self.max_db} dB)")
        return self


class HookRf(BaseModel):
    model_config = STRICT

    kind: Literal["console"]


class NoRf(BaseModel):
    model_config = STRICT

    kind: Literal["none"]


Port = Annotated[int, Field(ge=0, le=65535, strict=True)]
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_and_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``"192.168.1.10:53"`` (``"[::1]:53"``) -> (host, port); the host an IP address. Without a
    port, ``default_port`` if there is one. ValueError says what is wrong."""
    text = value.strip()
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None
    if not _is_ip(host):
        raise ValueError(f"{value!r}: {host!r} is not an IP address")
    if port is None:
        if default_port is None:
            raise ValueError(f"{value!r}: give host:port")
        return host, default_port
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r}: {port!r} is not a port (0..65535)")
    return host, int(port)


class OtaDns(BaseModel):
    """hil's DNS server for a board with a hard-coded host (``hil.gateway.dns``)."""

    model_config = STRICT

    enabled: bool = True    # ``dns: false`` in the file: the lab's own DNS answers the host
    # Where it answers, host:port; default <gateway_host>:53. Port 0 picks a free port
    # (a simulated board, which is told the port).
    listen: str | None = None
    # A resolver (host[:port], port 53 by default) other names are forwarded to; without one
    # they are answered REFUSED (enough for a router that asks hil only for the OneNET host).
    forward: str | None = None
    ttl: Annotated[int, Field(ge=1, le=86400, strict=True)] = 5   # seconds, of its answers

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str | None) -> str | None:
        if value is not None:
            host_and_port(value)
        return value

    @field_validator("forward")
    @classmethod
    def _forward_address(cls, value: str | None) -> str | None:
        if value is not None and host_and_port(value, 53)[1] == 0:
            raise ValueError(f"{value!r}: port 0 is no resolver's port")
        return value

    def listen_address(self, gateway_host: str) -> tuple[str, int]:
        return host_and_port(self.listen) if self.listen else (gateway_host, 53)

    @property
    def forward_address(self) -> tuple[str, int] | None:
        return host_and_port(self.forward, 53) if self.forward else None


class Ota(BaseModel):
    """Where the board's OTA client goes and how hil serves it there.

    A board told the gateway's URL (a test shell's ``ota server``) needs only ``service`` and
    ``gateway_host``. Firmware as it ships talks to the host its build names: ``host`` (and
    ``port``, 80 by default) say which; the gateway listens on ``gateway_host:port`` and hil's
    DNS (``dns``, on by default with ``host``; ``dns: false`` where the lab's own DNS answers)
    gives ``host`` the gateway's address.
    """

    model_config = STRICT

    service: str = "mock"            # "mock" or the base URL of a OneNET OTA service
    gateway_host: str | None = None  # the address the board reaches this host at
    # How long the board's firmware waits for an HTTP answer before it gives up: stall faults
    # must outlast it, and a scenario's deadline counts it. A simulated rig's is sim.http_timeout.
    device_timeout: Positive | None = None
    # A board without a shell (console.shell: none) starts an attempt when it is reset through
    # its flasher, power-cycled through its supply, or on its own timer every check_period s.
    trigger: Literal["reset", "power-cycle", "wait"] | None = None
    check_period: Positive | None = None
    host: str | None = None          # the OneNET host the firmware's build talks to
    port: Port | None = None         # the firmware's port; the gateway's (0: a free one)
    dns: OtaDns | None = None

    @field_validator("dns", mode="before")
    @classmethod
    def _dns_off(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("service")
    @classmethod
    def _mock_or_url(cls, value: str) -> str:
        if value != "mock" and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be mock or an http(s):// base URL")
        return value

    @field_validator("host")
    @classmethod
    def _a_dns_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if _is_ip(value):
            raise ValueError(f"{value!r} is an IP address; the firmware's host name goes here "
                             "(a board with a hard-coded address reaches gateway_host)")
        name = value.rstrip(".").lower()
        labels = name.split(".")
        if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
            raise ValueError(f"{value!r} is not a DNS name (labels of a-z, 0-9 and -)")
        if labels[-1].isdigit():   # no top-level domain is a number; a C resolver reads an address
            raise ValueError(f"{value!r} is not a DNS name (it ends in a number)")
        return name

    @model_validator(mode="after")
    def _dns_for_a_host(self) -> Ota:
        if self.dns is not None and self.dns.enabled and self.host is None:
            raise ValueError("dns: hil's DNS answers for ota.host; give the host the firmware's "
                             "build talks to")
        if self.serves_dns and self.gateway_host is not None:
            try:
                address = ipaddress.IPv4Address(self.gateway_host)
            except ValueError:
                raise ValueError(f"gateway_host: {self.gateway_host!r}: hil's DNS gives the "
                                 f"board this address for {self.host}; give an IPv4 "
                                 "address") from None
            if address.is_unspecified:
                raise ValueError(f"gateway_host: {self.gateway_host} is no address a board "
                                 "can reach; give the hil host's address on the rig's network")
        return self

    @property
    def serves_dns(self) -> bool:
        """hil answers ``host`` with the gateway's address (``host`` given, ``dns`` not false)."""
        return self.host is not None and (self.dns is None or self.dns.enabled)

    @property
    def dns_config(self) -> OtaDns | None:
        """The DNS settings when hil serves DNS (defaults when ``dns`` is not given)."""
        if not self.serves_dns:
            return None
        return self.dns or OtaDns()

    @property
    def gateway_port(self) -> int:
        """The port the gateway listens on: ``port``; 80 for a ``host`` without one (what an
        http:// client uses); else a free one."""
        if self.port is not None:
            return self.port
        return 80 if self.host is not None else 0


SIM_ROOT = Path(tempfile.gettempdir()) / "hil-sim"
PROCESS_ROOT = Path(tempfile.gettempdir()) / "hil-proc"
# Written in a rig file's values, ``${HIL_SIM_ROOT}`` is where its simulated board keeps its
# state (``sim_root``): rigs/sim-*.yaml put their boards' flash, settings, ptys and instruments
# there.
SIM_ROOT_VARIABLE = "HIL_SIM_ROOT"


def sim_root(rigs_dir: Path) -> Path:
    """Where the simulated rigs of the rig files in ``rigs_dir`` keep their boards: the
    ``$HIL_SIM_ROOT`` directory when it is set, else one of their own under SIM_ROOT, named
    after ``rigs_dir``. Every command of one checkout finds the same boards (``hil console``
    beside a running suite), and two checkouts on one machine (two CI jobs on a shared runner,
    two branches under test) never share a board's flash and settings: a simulated ESP32 is
    one chip per process over its state directory's files, and a test of one checkout met what
    another checkout's firmware model had left there."""
    given = os.environ.get(SIM_ROOT_VARIABLE)
    if given:
        return Path(given)
    return SIM_ROOT / hashlib.sha256(str(rigs_dir.resolve()).encode()).hexdigest()[:12]


def _with_sim_root(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(f"${{{SIM_ROOT_VARIABLE}}}", root)
    if isinstance(value, dict):
        return {key: _with_sim_root(item, root) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_sim_root(item, root) for item in value]
    return value


class Sim(BaseModel):
    """A simulated rig (``hil.sim.bench``): hil starts the board, its console and instruments
    with the rig and stops them with it. The other sections address them as they would real
    ones (the console's pty, the probe's id, the instruments' ptys under ``state_dir``)."""

    model_config = STRICT

    state_dir: Path | None = None     # the board's flash and settings; default SIM_ROOT/<name>
    factory_version: str = "1.0.0"    # the image a board with empty flash is given
    defects: tuple[str, ...] = ()     # hil.sim.defects.Defect names
    http_timeout: Positive = 5.0      # the firmware's HTTP timeout, seconds
    chunk_size: Annotated[int, Field(gt=0, strict=True)] = 4096
    # The firmware as it ships (hil.sim.firmware): no shell, a check for an update at every
    # boot (and every ota.check_period seconds when set), built to reach ota.host:ota.port,
    # which it resolves through hil's DNS (ota.dns) at each attempt.
    shipped: bool = False

    @field_validator("defects")
    @classmethod
    def _known_defects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from hil.sim.defects import Defect

        Defect.parse(value)
        return value

    @field_validator("factory_version")
    @classmethod
    def _a_version(cls, value: str) -> str:
        if not is_valid_version(value):
            raise ValueError(f"{value!r} is not a OneNET version ([a-zA-Z0-9_.-], 1..20)")
        return value


def _kind(value: Any) -> str | None:
    """The tag of a part's union: ``kind=swd``. A tag, not the bare value, so that an error's
    location can be told from a key and dropped from messages (``flasher.probe``)."""
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"kind={kind}" if isinstance(kind, str) else None


def _choice(kinds: str) -> Discriminator:
    return Discriminator(_kind, custom_error_type="kind",
                         custom_error_message=f"kind must be one of {kinds}")


FlasherSpec = Annotated[
    Annotated[SwdFlasher, Tag("kind=swd")] | Annotated[EspFlasher, Tag("kind=esp")]
    | Annotated[ProcessFlasher, Tag("kind=process")]
    | Annotated[NoFlasher, Tag("kind=none")], _choice("swd, esp, process, none")]
PowerSpec = Annotated[
    Annotated[ScpiPower, Tag("kind=scpi")] | Annotated[UsbHubPower, Tag("kind=usb-hub")]
    | Annotated[CommandPower, Tag("kind=command")] | Annotated[HookPower, Tag("kind=console")]
    | Annotated[ProcessPower, Tag("kind=process")]
    | Annotated[LabgridPower, Tag("kind=labgrid")]
    | Annotated[NoPower, Tag("kind=none")],
    _choice("scpi, usb-hub, command, console, process, labgrid, none")]
# Power kinds that switch the board's power but set no level (no battery voltage to lower).
SWITCHED_POWER = ("usb-hub", "command", "labgrid")
RfSpec = Annotated[
    Annotated[AttenuatorRf, Tag("kind=attenuator")] | Annotated[HookRf, Tag("kind=console")]
    | Annotated[NoRf, Tag("kind=none")], _choice("attenuator, console, none")]


class Rig(BaseModel):
    model_config = STRICT

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    board: str
    chip: str | None = None
    identity: Identity
    console: Console = Console()     # a labgrid place's needs no address
    flasher: FlasherSpec = NoFlasher(kind="none")
    power: PowerSpec = NoPower(kind="none")
    rf: RfSpec = NoRf(kind="none")
    ota: Ota = Ota()
    sim: Sim | None = None
    labgrid: Labgrid | None = None
    tags: tuple[str, ...] = ()

    @field_validator("board")
    @classmethod
    def _known_board(cls, value: str) -> str:
        if value not in BOARDS:
            raise ValueError(f"unknown board {value!r}; known: {', '.join(BOARDS)}")
        return value

    @model_validator(mode="after")
    def _fits_the_board(self) -> Rig:
        family = BOARDS[self.board]
        if self.chip is not None and self.chip not in family.chips:
            raise ValueError(f"chip: {self.chip!r} is not a {self.board} part "
                             f"({', '.join(family.chips)})")
        for part in ("flasher", "power"):
            if getattr(self, part).kind == "process" and self.console.command is None:
                raise ValueError(f"{part}.kind: process is a host build's; give "
                                 "console.command")
        if self.power.kind in SWITCHED_POWER and self.sim is not None:
            raise ValueError(f"power.kind: {self.power.kind} switches a real board's power; a "
                             "simulated board runs on its bench's supply (power.kind: scpi)")
        if self.console.command is not None and self.sim is not None:
            raise ValueError("sim: a host build (console.command) is not a simulated board")
        kind = self.flasher.kind
        if kind == "swd" and family.flasher is not FlasherKind.SWD:
            raise ValueError(f"flasher.kind: {self.board} has no SWD port; "
                             f"use kind: {family.flasher.value}")
        if kind == "esp" and family.flasher is not FlasherKind.ESP:
            raise ValueError(f"flasher.kind: esp is the ESP32 serial bootloader; "
                             f"a {self.board} is flashed with kind: {family.flasher.value}")
        return self._a_console()

    def _a_console(self) -> Rig:
        """A console from the rig file, or a labgrid place's; a place is no local bench."""
        console = self.console
        local = [key for key in ("port", "url", "serial_number", "command")
                 if getattr(console, key)]
        if self.labgrid is None:
            if not local:
                raise ValueError("console: give exactly one of port, url or serial_number (or "
                                 "command, for a host build; or a labgrid place)")
            if self.power.kind == "labgrid":
                raise ValueError("power.kind: labgrid is a labgrid place's power port; give "
                                 "labgrid: {place: NAME}")
            if self.flasher.kind == "swd" and self.flasher.probe is None:
                raise ValueError("flasher.probe: Field required")
            return self
        if local:
            raise ValueError(f"console.{local[0]}: a labgrid place's console is its "
                             "NetworkSerialPort; leave the console's address out")
        if self.sim is not None:
            raise ValueError("labgrid: a simulated rig runs on this host (sim:), not on a place")
        # An SWD probe is the place's pyocd server unless flasher.probe names one; an ESP32's
        # bootloader is reached through the place's serial port (rfc2217 carries DTR/RTS; a
        # raw port, which does not, is refused once the place is known).
        return self

    @model_validator(mode="after")
    def _a_way_to_start_an_attempt(self) -> Rig:
        """A board without a shell needs a trigger the rig can pull; hooks need a shell."""
        if self.console.shell == "contract":
            if self.ota.trigger is not None:
                raise ValueError("ota.trigger: only a board without a test shell (console.shell:"
                                 " none) is triggered so; a shell starts an attempt itself")
            if self.sim is not None and self.sim.shipped:
                raise ValueError("sim.shipped: firmware as it ships has no test shell; set "
                                 "console.shell: none")
            return self
        if self.sim is not None and self.sim.shipped:
            # The simulated network has no DNS but hil's: the firmware's host resolves there.
            if self.ota.host is None:
                raise ValueError("sim.shipped: the firmware is built to reach ota.host; give it "
                                 "(ota: {host: ota.heclouds.com, port: 0, dns: {listen: "
                                 "'127.0.0.1:0'}})")
            if not self.ota.serves_dns:
                raise ValueError("ota.dns: false: a simulated network has no DNS but hil's, "
                                 f"and the shipped firmware could not resolve {self.ota.host}")
            dns = self.ota.dns_config
            if dns is not None and dns.listen is None:
                raise ValueError("ota.dns.listen: give one on a simulated rig, '127.0.0.1:0' (a "
                                 "free port: the bench asks hil's DNS where it listens; the "
                                 "default, port 53, needs root)")
        for part in ("power", "rf"):
            if getattr(self, part).kind == "console":
                raise ValueError(f"{part}.kind: console is the firmware's test hook, and this "
                                 "board has no shell (console.shell: none)")
        if self.sim is not None and not self.sim.shipped:
            raise ValueError("console.shell: none on a simulated rig needs sim.shipped: true "
                             "(the simulated test build has a shell)")
        trigger = self.trigger
        if trigger == "reset" and self.flasher.kind == "none":
            raise ValueError("ota.trigger: reset needs a flasher to reset the board through "
                             "(flasher.kind is none); use power-cycle or wait")
        if trigger == "power-cycle" and "power_cut" not in self.capabilities:
            raise ValueError("ota.trigger: power-cycle needs power the rig can cut (power.kind:"
                             f" scpi, usb-hub or command), not power.kind: {self.power.kind}")
        if trigger == "wait" and self.ota.check_period is None:
            raise ValueError("ota.trigger: wait needs ota.check_period (the seconds between "
                             "the firmware's own checks)")
        return self

    @property
    def shell_less(self) -> bool:
        """The firmware has no test shell (``console.shell: none``)."""
        return self.console.shell == "none"

    @property
    def trigger(self) -> str:
        """How an attempt starts on a board without a shell (default: a reset)."""
        return self.ota.trigger or "reset"

    @property
    def sim_state_dir(self) -> Path | None:
        """Where a simulated rig's board keeps its state; None for a real rig."""
        if self.sim is None:
            return None
        return self.sim.state_dir or SIM_ROOT / self.name

    @property
    def process_state_dir(self) -> Path | None:
        """A host build's flash (``HIL_STATE_DIR``); None for any other rig."""
        if self.console.command is None:
            return None
        return self.console.state_dir or PROCESS_ROOT / self.name

    @property
    def device_timeout(self) -> float:
        """The firmware's HTTP timeout, seconds: ``ota.device_timeout``, a simulated board's
        ``sim.http_timeout``, else 30 s (longer than any OTA client in the field waits)."""
        if self.ota.device_timeout is not None:
            return self.ota.device_timeout
        return self.sim.http_timeout if self.sim is not None else 30.0

    @property
    def family(self) -> BoardFamily:
        return BOARDS[self.board]

    @property
    def part_number(self) -> str:
        return self.chip or self.family.default_chip

    @property
    def capabilities(self) -> frozenset[str]:
        """What tests may need (``@pytest.mark.needs``): flasher, power, power_cut, rf, space."""
        caps = {"console"}
        if not self.shell_less:
            caps.add("space")        # the shell's `test space` hook
        if self.flasher.kind != "none":
            caps.add("flasher")
        # "power": a battery level can be set: by a supply, or by the firmware's `test power`
        # hook (a switch sets none; beside one, a board with a shell still has its hook).
        # A host build has no battery to set.
        if self.power.kind in ("scpi", "console") or (
                self.power.kind in SWITCHED_POWER and not self.shell_less):
            caps.add("power")
        # "power_cut": the power really goes (a process's power cut is SIGKILL).
        if self.power.kind in ("scpi", "process", *SWITCHED_POWER):
            caps.add("power_cut")
        if self.rf.kind != "none":
            caps.add("rf")
        return frozenset(caps)


def load_rig(path: Path) -> Rig:
    document = read_yaml(path, what="rig file")
    return validate(Rig, _with_sim_root(document, str(sim_root(path.parent))), str(path))


def rig_of_test(test_id: str, names: Iterable[str]) -> str | None:
    """The rig a parametrized test runs on, read from its id (``test_x[sim-esp32-stall]``):
    the longest of ``names`` that is a whole dash-separated part of the parameters."""
    words = f"-{test_id.rpartition('[')[2].rstrip(']')}-"
    return next((name for name in sorted(names, key=len, reverse=True)
                 if f"-{name}-" in words), None)


def find_rig(name_or_path: str, rigs_dir: Path) -> Path:
    """``bench-01`` -> rigs_dir/bench-01.yaml; a path is taken as it is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists() or "/" in name_or_path:
        return candidate
    return rigs_dir / f"{name_or_path}.yaml"
