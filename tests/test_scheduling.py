"""The opt-in count of trio task switches (``tunnel/_scheduling.py``)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import trio

from tunnel._scheduling import ENVIRONMENT, SchedulingCounter, instruments_from_environment


def test_the_counter_counts_each_step_and_each_wakeup() -> None:
    counter = SchedulingCounter()

    async def main() -> None:
        for _ in range(10):
            await trio.lowlevel.checkpoint()

    trio.run(main, instruments=[counter])
    # The main task's first step and ten checkpoints, plus trio's own system tasks.
    assert counter.steps >= 11
    assert counter.scheduled >= 11
    assert counter.statistics() == {
        "task_scheduled": counter.scheduled,
        "task_steps": counter.steps,
    }


def test_nothing_is_installed_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENVIRONMENT, raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    assert instruments_from_environment() == []
    assert signal.getsignal(signal.SIGUSR1) is before


def test_sigusr1_writes_the_counts_so_far(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENVIRONMENT, str(tmp_path))
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        (counter,) = instruments_from_environment()
        assert isinstance(counter, SchedulingCounter)

        async def main() -> None:
            await trio.lowlevel.checkpoint()
            os.kill(os.getpid(), signal.SIGUSR1)
            await trio.lowlevel.checkpoint()

        trio.run(main, instruments=[counter])
    finally:
        signal.signal(signal.SIGUSR1, previous)
    written = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
    assert written["pid"] == os.getpid()
    assert 0 < written["task_steps"] <= counter.steps
    assert 0 < written["task_scheduled"] <= counter.scheduled
    assert not list(tmp_path.glob("*.tmp"))
