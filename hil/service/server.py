"""The mock OneNET service running on a loopback port: ``OtaService`` behind a ``BackgroundServer``.

    with MockOneNet() as onenet:
        onenet.service.create_task("527776559", "1.1.0", package_bytes)
        requests.get(f"{onenet.url}/ota/south/check?...",
                     headers={"Authorization": onenet.authorization()})
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

from hil.onenet.auth import Authorization, SignMethod, device_res, product_res
from hil.service.http import BackgroundServer
from hil.service.mock import OtaService
from hil.service.timeline import Timeline

DEMO_PRODUCT_ID = "245528"   # the seed's product


def new_access_key() -> str:
    """A fresh random access key, shaped like OneNET's (base64 of 32 bytes)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


class MockOneNet:
    """A running mock service with its product credentials. A context manager."""

    def __init__(self, product_id: str = DEMO_PRODUCT_ID, access_key: str | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, timeline_path: Path | None = None,
                 keep_timeline: bool = True, **service_options: Any) -> None:
        self.product_id = product_id
        self._access_key = access_key or new_access_key()
        self.service = OtaService(product_id, self._access_key,
                                  timeline=Timeline(timeline_path, keep_timeline),
                                  **service_options)
        self.server = BackgroundServer(self.service.handle, host, port)

    def __repr__(self) -> str:   # never the key
        return f"MockOneNet(product_id={self.product_id!r}, url={self.url!r})"

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def timeline(self) -> Timeline:
        return self.service.timeline

    def authorization(self, *, device: str | None = None, expires_in: float = 3600,
                      et: int | None = None, method: SignMethod = SignMethod.SHA1,
                      encoded: bool = True) -> str:
        """A valid Authorization value for this product (device-level with ``device``)."""
        res = device_res(self.product_id, device) if device else product_res(self.product_id)
        expiry = et if et is not None else int(self.service.clock() + expires_in)
        return Authorization.build(self._access_key, res, expiry, method).header(encoded=encoded)

    def start(self) -> MockOneNet:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        self.service.timeline.close()

    def __enter__(self) -> MockOneNet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
