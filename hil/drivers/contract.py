"""The console contract of ../shared/DESIGN.md: default commands and event patterns.

A rig file overrides any of them (``console.commands``, ``console.events``), so a firmware with
another test shell is driven without code changes. Commands are ``str.format`` templates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

COMMANDS: dict[str, str] = {
    "server": "ota server {url}",      # point the OTA client at a base URL (the gateway)
    "check": "ota check",              # one whole OTA attempt
    "version": "sys version",          # answered by version=<V> before OK
    "reboot": "sys reboot",            # the device reboots and prints its boot line
    "power": "test power {percent}",   # fault hooks, for rigs without bench instruments
    "signal": "test signal {value}",
    "space": "test space {bytes}",
    "factory": "test factory",         # back to the factory image, OTA state erased
}

EVENTS: dict[str, str] = {
    "version": r"^version=(?P<version>\S+)$",
    "boot": r"^boot version=(?P<version>\S+)",
    "phase": r"^ota phase=(?P<phase>\w+)",
    "end": r"^ota end$",
}


@dataclass(frozen=True)
class Contract:
    """The commands and event patterns one board speaks."""

    commands: Mapping[str, str] = field(default_factory=lambda: dict(COMMANDS))
    events: Mapping[str, re.Pattern[str]] = field(
        default_factory=lambda: {name: re.compile(p) for name, p in EVENTS.items()})

    @classmethod
    def with_overrides(cls, commands: Mapping[str, str], events: Mapping[str, str]) -> Contract:
        return cls({**COMMANDS, **commands},
                   {name: re.compile(p) for name, p in {**EVENTS, **events}.items()})

    def command(self, name: str, **values: object) -> str:
        return self.commands[name].format(**values)


@dataclass(frozen=True, slots=True)
class Event:
    """A contract event: ``ota phase=download offset=4096 status=206`` is tag ``ota`` and its
    fields; ``ota end`` is tag ``ota end`` with none."""

    tag: str
    fields: dict[str, str]


# Tag: lower-case words; then key=value pairs. Lower case keeps shell answers (``OK``,
# ``ERR <reason>``) and ordinary log lines (``I (312) wifi: connected``) from passing as events.
_EVENT = re.compile(
    r"(?P<tag>[a-z][a-z0-9_]*(?: +[a-z][a-z0-9_]*)*)(?P<fields>(?: +[^\s=]+=\S*)*)")


def parse_event(line: str) -> Event | None:
    """The event a console line carries, or None when the line is not one."""
    match = _EVENT.fullmatch(line.strip())
    if match is None:
        return None
    fields = dict(pair.split("=", 1) for pair in match["fields"].split())
    return Event(match["tag"], fields)
