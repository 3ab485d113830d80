"""The ``pyocd.probe`` entry point of hil's simulated SWD boards (``hil.sim.probe``).

A module of its own, importing almost nothing, because pyocd loads its probe plugins while its
own package is being imported: whichever module imports pyocd first, hil's included, is only
half-initialized at that moment. When that module is ``hil.sim.probe`` itself, the plugin steps
aside (``should_load`` is False) and the probe module registers its class with pyocd once it is
whole (the end of ``hil.sim.probe``).
"""

from __future__ import annotations

import sys
from typing import Any

from pyocd.core.plugin import Plugin

NAME = "hilsim"
PROBE_MODULE = "hil.sim.probe"


class SimProbePlugin(Plugin):  # type: ignore[misc]   # pyocd ships no type hints
    """pyocd plugin for hil's simulated boards (state directories listed in HIL_SIM_PROBES)."""

    def should_load(self) -> bool:
        module = sys.modules.get(PROBE_MODULE)
        return module is None or hasattr(module, "SimProbe")

    def load(self) -> Any:
        from hil.sim.probe import SimProbe, register_targets

        register_targets()
        return SimProbe

    @property
    def name(self) -> str:
        return NAME

    @property
    def description(self) -> str:
        return "hil simulated SWD boards (state directories listed in HIL_SIM_PROBES)"
