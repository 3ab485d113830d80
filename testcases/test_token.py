"""Token check: a token that ended (expired, task finished, task cancelled) ends the attempt with
no report at all, and no download."""

from __future__ import annotations

import pytest

from hil.onenet.codes import Errno
from hil.onenet.messages import Endpoint


@pytest.mark.parametrize(("fault", "errno"), [
    ("token-expired", Errno.TOKEN_EXPIRED),
    ("task-finished", Errno.TASK_FINISHED),
    ("cancel", Errno.TASK_CANCELLED),
], ids=["expired", "finished", "cancelled"])
def test_an_ended_token_ends_the_attempt_without_a_report(ota, fault, errno):
    ota.inject(fault)
    attempt = ota.update()
    checks = attempt.requests(Endpoint.TOKEN_CHECK)
    assert [check.errno for check in checks] == [errno], \
        f"token phase: expected one token check answered {int(errno)}, got " \
        f"{[check.errno for check in checks]}"
    ota.expect("token-ended")
    ota.expect_nothing_requested(Endpoint.DOWNLOAD, Endpoint.REPORT)
