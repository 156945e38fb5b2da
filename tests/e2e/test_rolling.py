"""A graceful rolling restart under GET load loses nothing (the long run: ``nox -s soak``).

An agent alone on its host is stopped with SIGTERM and started again, then a
worker of ``tunnel server --workers 2``; see ``tests/rolling.py``. Every GET
must be answered, and none with a 502.
"""

from __future__ import annotations

import trio
from rolling import rolling_restarts


async def test_rolling_restart_of_an_agent_and_a_server_worker_under_load() -> None:
    with trio.fail_after(120):
        restarts = await rolling_restarts(0, rounds=1, visitors=2, pool=False, worker_restarts=1)
    assert restarts.agent_restarts == 1
    assert restarts.worker_restarts == 1
    assert restarts.sent > 50, restarts.summary()
    assert restarts.lost == 0, restarts.summary()
    assert restarts.bad_gateway == 0, restarts.summary()
    assert restarts.unclean == [], restarts.summary()
