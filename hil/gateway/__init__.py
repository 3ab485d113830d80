"""The recording, fault-injecting HTTP gateway between a device and any OneNET OTA service.

A board talks to ``Gateway.url``; the gateway forwards every request to its ``upstream`` (the mock
of ``hil.service`` or a real base URL such as ``http://ota.heclouds.com``), records each exchange
in a ``hil.service.timeline.Timeline`` (the same ``Exchange`` records the mock makes, plus a
``fault`` label of what the gateway did), and applies the faults armed for the current test::

    with Gateway(onenet.url, Timeline(path)) as gateway:
        armed = gateway.arm(Fault(FaultKind.TRUNCATE, phase=Endpoint.DOWNLOAD, bytes=1000))
        ...
        assert armed.hits == 1 and gateway.timeline.exchanges(phase="download")[0].fault

``faults`` holds the fault model with no I/O (kinds, targeting, how faults combine),
``upstream`` the client side, ``server`` the gateway itself.
"""

from hil.gateway.faults import AUTH_VARIANTS, Armed, Fault, FaultKind
from hil.gateway.server import Gateway

__all__ = ["AUTH_VARIANTS", "Armed", "Fault", "FaultKind", "Gateway"]
