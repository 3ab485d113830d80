"""Where a rig's parts come from: a pluggable provider with an explicit lifecycle.

``RigParts`` asks the rig's provider for the drivers that differ from the rig file's plain
reading (console, flasher, power) and builds the rest itself. A provider is started before the
first part opens and stopped after the last one closes::

    class PartsProvider(Protocol):
        def start(self) -> None                  # bring up what the parts need (a bench, a process)
        def stop(self) -> None                   # take it all down: nothing outlives it
        def console(self, log_path) -> ConsoleProtocol | None     # None: as the rig file says
        def flasher(self) -> FlasherProtocol | None
        def power(self) -> PowerProtocol | None
        def point_at(self, url: str) -> bool      # True: the provider tells the board its OTA URL

The kinds, chosen from the rig file (``provider_kind``):

- ``hardware``: a lab bench; nothing to start, every driver as the rig file says;
- ``sim``: a simulated rig (``sim:``); its bench (``hil.sim.bench.SimBench``) is started, and
  the ordinary drivers find the board where the rig file says (``hil.sim.provider``);
- ``process``: a host build run as the board (``console.command``,
  ``hil.rig.providers.process``);
- ``labgrid``: a labgrid place reserved through the coordinator (``labgrid:``,
  ``hil.rig.providers.labgrid``).

Providers are found by name: those above in ``PROVIDERS`` (imported only when a rig needs one,
so ``hil.rig`` does not import ``hil.sim``), others through the ``hil.rig_providers`` entry
point group, each a callable taking the ``Rig``.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from hil.drivers.base import ConsoleProtocol, FlasherProtocol, PowerProtocol
from hil.errors import RigFault
from hil.rig.model import Rig

ENTRY_POINT_GROUP = "hil.rig_providers"
PROVIDERS = {
    "hardware": "hil.rig.providers.hardware:HardwareProvider",
    "sim": "hil.sim.provider:SimProvider",
    "process": "hil.rig.providers.process:ProcessProvider",
    "labgrid": "hil.rig.providers.labgrid:LabgridProvider",
}


class PartsProvider(Protocol):
    """Where a rig's parts come from (see the module docstring)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def console(self, log_path: Path | None) -> ConsoleProtocol | None: ...

    def flasher(self) -> FlasherProtocol | None: ...

    def power(self) -> PowerProtocol | None: ...

    def point_at(self, url: str) -> bool: ...


def provider_kind(rig: Rig) -> str:
    if rig.labgrid is not None:
        return "labgrid"
    if rig.sim is not None:
        return "sim"
    if rig.console.command is not None:
        return "process"
    return "hardware"


def provider_for(rig: Rig, kind: str | None = None) -> PartsProvider:
    """The provider of ``rig``'s parts (constructing it does no I/O)."""
    kind = kind or provider_kind(rig)
    target = PROVIDERS.get(kind)
    if target is not None:
        module, _, attribute = target.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
    else:
        found = entry_points(group=ENTRY_POINT_GROUP, name=kind)
        if not found:
            raise RigFault("provider", f"no parts provider {kind!r}; known: "
                           f"{', '.join(PROVIDERS)} and the {ENTRY_POINT_GROUP} entry points",
                           rig.name)
        factory = next(iter(found)).load()
    provider: PartsProvider = factory(rig)
    return provider


def fresh_access_key(rig: Rig) -> None:
    """A rig hil runs itself (simulated, or a host build) signs with the key in its
    ``identity.access_key_env`` variable, set to a fresh key for this process when unset; the
    mock service reads the same variable. A lab rig's key is the operator's: left alone."""
    if provider_kind(rig) in ("sim", "process"):
        from hil.service.server import new_access_key

        os.environ.setdefault(rig.identity.access_key_env, new_access_key())
