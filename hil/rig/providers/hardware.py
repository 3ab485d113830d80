"""A lab bench's parts: nothing to start; every driver is built as the rig file says."""

from __future__ import annotations

from pathlib import Path

from hil.drivers.base import ConsoleProtocol, FlasherProtocol, PowerProtocol
from hil.rig.model import Rig


class HardwareProvider:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def console(self, log_path: Path | None) -> ConsoleProtocol | None:
        return None

    def flasher(self) -> FlasherProtocol | None:
        return None

    def power(self) -> PowerProtocol | None:
        return None

    def point_at(self, url: str) -> bool:
        return False    # the board is told through its shell (or finds the host by DNS)
