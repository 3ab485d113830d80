"""hil's pytest plugin (registered through the ``pytest11`` entry point).

Thin over the library: the fixtures build, yield and tear down; the work is in ``hil.service``.

Fixtures:
- ``mock_onenet``: the mock OneNET service on a loopback port, shared by the session and reset
  before each test. A handler crash on the server thread fails the test that caused it.

Options (``hil`` group; each has a pytest.ini twin):
- ``--hil-timeline-dir DIR`` (ini ``hil_timeline_dir``): where each session's timeline JSON-lines
  file is written (default: pytest's basetemp).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.service.server import MockOneNet


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hil: hardware-in-the-loop OTA testing")
    group.addoption("--hil-timeline-dir", dest="hil_timeline_dir", default=None,
                    help="directory for the mock service's timeline (JSON lines)")
    parser.addini("hil_timeline_dir", "directory for the mock service's timeline (JSON lines)")


def _timeline_dir(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    chosen = config.getoption("hil_timeline_dir") or config.getini("hil_timeline_dir")
    return Path(chosen) if chosen else factory.getbasetemp()


@pytest.fixture(scope="session")
def _mock_onenet_session(pytestconfig: pytest.Config,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockOneNet]:
    path = _timeline_dir(pytestconfig, tmp_path_factory) / "mock-onenet.timeline.jsonl"
    with MockOneNet(timeline_path=path) as onenet:
        yield onenet


@pytest.fixture
def mock_onenet(_mock_onenet_session: MockOneNet) -> Iterator[MockOneNet]:
    """The mock OneNET service, empty (no devices, no tasks, empty timeline) for this test."""
    _mock_onenet_session.service.reset()
    yield _mock_onenet_session
    _mock_onenet_session.service.raise_crashes()
