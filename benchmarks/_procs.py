"""The processes under test: start them on free loopback ports, read their CPU, stop them.

Every child gets ``PR_SET_PDEATHSIG`` (Linux), so it dies with the benchmark even
when the benchmark itself is killed hard; :class:`Processes` stops the rest on
any exit from its ``with`` block. Every child also starts with its soft limit on
open files raised to the hard limit, as a server operator would set it: the
in-flight phase holds 10,000 connections in each process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

__all__ = ["Process", "Processes", "free_ports", "get", "raise_fd_limit", "rss_kib"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def raise_fd_limit() -> int:
    """Lift this process's soft limit on open files to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    """The resident set size of ``pid`` in KiB (``VmRSS``), or 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _child_setup() -> None:
    raise_fd_limit()
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def get(port: int, host: str, path: str = "/", timeout: float = 2.0) -> int:
    """The status of a GET, or 0 if there was no HTTP answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            head = sock.recv(4096)
    except OSError:
        return 0
    if not head.startswith(b"HTTP/1.1 "):
        return 0
    return int(head[9:12])


class Process:
    """One child process, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Not the checkout: `python -m tunnel` must import the installed package.
                cwd=log_dir,
                preexec_fn=_child_setup,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far (Linux ``/proc``)."""
        with open(f"/proc/{self.pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        # Fields 14 and 15 of proc(5); the split starts at field 3.
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def tree_pids(self) -> list[int]:
        """This process and its live descendants (worker processes).

        Children are listed per thread: trio starts processes from a worker
        thread, so every thread's list is read.
        """
        found: list[int] = []
        pids = [self.pid]
        while pids and len(found) < 1000:
            pid = pids.pop()
            if pid in found:
                continue
            try:
                threads = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            found.append(pid)
            for thread in threads:
                with (
                    contextlib.suppress(OSError),
                    open(f"/proc/{pid}/task/{thread}/children", "rb") as children,
                ):
                    pids.extend(int(child) for child in children.read().split())
        return found

    def trio_pids(self) -> list[int]:
        """This process and its worker processes: the trio processes of its tree.

        A server with workers has one more child, the watchdog of its ledger (a
        plain Python process), which counts no task steps.
        """
        found = [self.pid]
        for pid in self.tree_pids()[1:]:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"tunnel.server.hypercorn._worker" in cmdline.read():
                    found.append(pid)
        return found

    def tree_cpu_seconds(self) -> float:
        """CPU time of this process and its live descendants (worker processes)."""
        total = 0.0
        for pid in self.tree_pids():
            try:
                with open(f"/proc/{pid}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        return total

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.popen.returncode}:\n{self.log_tail()}"
            )

    def wait_until(self, port: int, host: str, timeout: float = 20.0) -> None:
        """Wait until ``GET /`` with ``Host: host`` on ``port`` answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if get(port, host, timeout=1.0) == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def terminate(self) -> None:
        # SIGTERM, not SIGINT: a child started from a background job inherits
        # SIGINT ignored, and nothing here needs a graceful shutdown.
        if self.popen.poll() is None:
            self.popen.terminate()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate now and wait for the end (killing it after ``timeout``)."""
        self.terminate()
        self.kill_after(time.monotonic() + timeout)

    def kill_after(self, deadline: float) -> None:
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


class Processes:
    """Owns the children: every one started is stopped when the block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Process] = []

    def start(self, name: str, argv: list[str]) -> Process:
        process = Process(name, argv, self.log_dir)
        self.started.append(process)
        return process

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for process in reversed(self.started):
            process.terminate()
        deadline = time.monotonic() + 2
        for process in reversed(self.started):
            process.kill_after(deadline)
