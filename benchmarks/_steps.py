"""Trio task switches per request, read from the processes under test.

Every child starts with ``TUNNEL_COUNT_SCHEDULING`` set to a directory (see
``tunnel/_scheduling.py``): the tunnel server, its worker processes, the agent
and the Hypercorn service count trio's ``task_scheduled`` and
``before_task_step`` calls, and write their counts so far to
``<directory>/<pid>.json`` on ``SIGUSR1``. A phase reads them before and after;
the difference over its requests is "task steps / request".

Only processes that installed the handler may be signalled: for any other,
``SIGUSR1`` is fatal.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

__all__ = ["ENVIRONMENT", "difference", "read"]

ENVIRONMENT = "TUNNEL_COUNT_SCHEDULING"


def read(directory: Path, pids: list[int], timeout: float = 2.0) -> dict[str, int] | None:
    """The summed counts of ``pids`` now, or None if one did not answer in time."""
    for pid in pids:
        (directory / f"{pid}.json").unlink(missing_ok=True)
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return None
    total = {"task_scheduled": 0, "task_steps": 0}
    deadline = time.monotonic() + timeout
    for pid in pids:
        path = directory / f"{pid}.json"
        while not path.exists():
            if time.monotonic() > deadline:
                return None
            time.sleep(0.002)
        counts = json.loads(path.read_text())
        for key in total:
            total[key] += counts[key]
    return total


def difference(
    before: dict[str, int] | None, after: dict[str, int] | None
) -> dict[str, int] | None:
    """The counts between two readings (None if either is missing)."""
    if before is None or after is None:
        return None
    return {key: after[key] - before[key] for key in before}
