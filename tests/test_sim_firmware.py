"""The simulated boards' firmware, as a test sees it through the real drivers: the reference OTA
agent (ONENET.md) step by step, the console contract, persistence across power cuts and restarts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sim_board import Answer, SimSetup


@pytest.fixture
def setup(tmp_path, monkeypatch) -> Iterator[SimSetup]:
    with SimSetup(tmp_path, monkeypatch) as setup:
        yield setup


def test_a_whole_update_through_the_proxy(setup):
    sim = setup.board()
    setup.task(sim, "1.1.0")
    events = setup.update(sim)
    assert events[0] == "ota phase=detect errno=0 target=1.1.0 size=66088"
    assert setup.codes(sim) == [101, 201]
    assert sim.board.version() == "1.1.0"
