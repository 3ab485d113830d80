"""Report: a report whose answer is lost on the way back (the service accepted it, the board
could not know) is sent again; the service's codes stay 101 then 201, once each."""

from __future__ import annotations

import pytest

from hil.onenet.messages import Endpoint


@pytest.mark.parametrize("fault", ["reset", "drop"])
def test_a_lost_answer_to_the_101_is_healed_and_the_update_finishes(ota, fault):
    ota.inject(fault, phase=Endpoint.REPORT)     # the first report: the 101
    ota.update()      # a board may give the attempt up here, or report again within it
    ota.update()      # the next attempt resumes, or finds the task done (errno 11)
    ota.expect("success", repeats_allowed=True)


def test_a_lost_answer_to_the_201_is_not_a_second_update(ota):
    ota.inject("reset", phase=Endpoint.REPORT, index=2)    # the second report: the 201
    ota.update()
    again = ota.update()
    assert again.requests(Endpoint.DOWNLOAD) == [], \
        "report phase: the board downloaded the package again after it had booted it"
    ota.expect("success", repeats_allowed=True)
