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
