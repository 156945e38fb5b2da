"""An opt-in count of trio's task switches, for the benchmark (``benchmarks/README.rst``).

With ``TUNNEL_COUNT_SCHEDULING`` set to a directory in its environment, the
``tunnel`` command (and every server worker process) runs trio with a
:class:`SchedulingCounter`, and on ``SIGUSR1`` writes its counts so far to
``<directory>/<pid>.json``: ``{"pid", "task_scheduled", "task_steps"}``. A
reader sends the signal, waits for the file, and subtracts two readings.

Read once, when the process starts; unset (the default), nothing is installed
and no signal handler changes. A process-wide setting, so only the command and
its workers make it, never the library.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Final

import trio

__all__ = ["ENVIRONMENT", "SchedulingCounter", "instruments_from_environment"]

#: The environment variable: the directory the counts are written to.
ENVIRONMENT: Final = "TUNNEL_COUNT_SCHEDULING"


class SchedulingCounter(trio.abc.Instrument):
    """Counts ``task_scheduled`` and ``before_task_step`` calls; nothing else."""

    def __init__(self) -> None:
        self.scheduled = 0
        self.steps = 0

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.scheduled += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def statistics(self) -> dict[str, int]:
        return {"task_scheduled": self.scheduled, "task_steps": self.steps}


def instruments_from_environment() -> list[trio.abc.Instrument]:
    """A counter that reports on ``SIGUSR1``, if ``TUNNEL_COUNT_SCHEDULING`` is set.

    Call in the main thread before ``trio.run``; pass the result as its
    ``instruments``.
    """
    directory = os.environ.get(ENVIRONMENT)
    if not directory:
        return []
    counter = SchedulingCounter()
    target = Path(directory)

    def report(signum: int, frame: FrameType | None) -> None:
        # Written aside and renamed, so a reader never sees half a file.
        pid = os.getpid()
        partial = target / f"{pid}.json.tmp"
        partial.write_text(json.dumps({"pid": pid, **counter.statistics()}))
        partial.replace(target / f"{pid}.json")

    signal.signal(signal.SIGUSR1, report)
    return [counter]
