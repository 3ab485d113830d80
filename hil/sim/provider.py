"""A simulated rig's parts provider (``hil.rig.providers``): its bench (``SimBench``) is up
while the rig's parts are, and the ordinary drivers find the board, console and instruments
where the rig file says, as on a lab bench."""

from __future__ import annotations

from hil.rig.model import Rig
from hil.rig.providers.hardware import HardwareProvider
from hil.sim.bench import SimBench


class SimProvider(HardwareProvider):
    def __init__(self, rig: Rig) -> None:
        super().__init__(rig)
        self.bench: SimBench | None = None    # while it runs

    def start(self) -> None:
        if self.bench is None:
            self.bench = SimBench(self.rig).start()

    def stop(self) -> None:
        bench, self.bench = self.bench, None
        if bench is not None:
            bench.stop()
