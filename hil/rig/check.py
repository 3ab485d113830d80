"""Does each part of a rig answer? The check ``hil rigs check`` prints, and the plugin runs once
per rig before a suite's first test on it (``--hil-check-rigs``).

One ``PartCheck`` per part the rig has: the console (the test shell answers its version
command), the flasher (pyocd lists the SWD probe; an ESP32's bootloader is checked at flash
time), the supply and the attenuator (each answers with its identity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hil.drivers.base import PowerProtocol, RfProtocol
from hil.errors import RigFault
from hil.rig.board import Board
from hil.rig.model import Rig
from hil.rig.parts import RigParts


@dataclass(frozen=True)
class PartCheck:
    part: str
    ok: bool
    detail: str          # what answered, or what is wrong


def _run(part: str, check: Callable[[], str]) -> PartCheck:
    try:
        return PartCheck(part, True, check())
    except (RigFault, OSError) as fault:
        return PartCheck(part, False, fault.message if isinstance(fault, RigFault) else str(fault))


def check_rig(rig: Rig) -> list[PartCheck]:
    with RigParts(rig) as parts:
        def console() -> str:
            return f"{rig.console.address}, firmware {Board(parts).version()}"

        def flasher() -> str:
            spec = rig.flasher
            if spec.kind == "swd":
                from hil.drivers.swd import list_probes

                probes = [probe_id for probe_id, _ in list_probes()]
                if spec.probe not in probes:
                    raise RigFault("flasher", f"SWD probe {spec.probe} not found; probes "
                                   f"connected: {', '.join(probes) or 'none'}")
                return f"SWD probe {spec.probe} listed by pyocd"
            port = spec.port if spec.kind == "esp" else None
            return f"ESP32 bootloader on {port or rig.console.address} (checked at flash)"

        def instrument(get: Callable[[], PowerProtocol | RfProtocol | None]) -> str:
            driver = get()
            assert driver is not None
            return driver.identify()

        checks = [_run("console", console)]
        if rig.flasher.kind != "none":
            checks.append(_run("flasher", flasher))
        if rig.power.kind != "none":
            checks.append(_run("power", lambda: instrument(parts.power)))
        if rig.rf.kind != "none":
            checks.append(_run("rf", lambda: instrument(parts.rf)))
    return checks
