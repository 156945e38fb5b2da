"""Huge bodies through the tunnel: SIZE down and SIZE up, sha256-checked, memory watched.

Run::

    python benchmarks/huge.py --size 1GiB     # what `nox -s huge` runs
    python benchmarks/huge.py --size 64MiB    # what tests/e2e/test_huge.py runs

Four processes on 127.0.0.1: this script (the visitor), the local service (this
script again, with ``--serve-local``), the tunnel server (``python -m tunnel
server``) and an agent (``python -m tunnel http``). The visitor downloads SIZE
bytes and then uploads SIZE bytes through the tunnel, while the RSS of the
server and the agent is read from ``/proc/PID/status`` about ten times a second.

Rule of this file: nothing outside the tunnel ever holds a body. The service
generates the download chunk by chunk and hashes the upload as it arrives; the
visitor hashes the download as it arrives and generates the upload chunk by
chunk; both speak HTTP/1.1 with h11 over plain trio sockets. Whatever memory
grows is the tunnel's.

On a terminal, each transfer shows its progress on standard error (bytes so
far, percentage, rate and time left), redrawn a few times a second; piped, the
output is only the report.

Exit status: 0 when both hashes match and neither the server's nor the agent's
RSS grew by more than ``--max-growth`` (64 MiB); 1 on any failure, with the
reason on the last lines; 143 when stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TextIO
from urllib.parse import parse_qs

import h11
import trio

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
TOKEN = "huge-token"
HOST = "big.localhost"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
#: Piece size for generating, sending and receiving bodies.
CHUNK = 256 * KiB

#: Seconds each child may take to say it is ready.
STARTUP_TIMEOUT = 30.0
#: A transfer that moves no byte for this long has hung.
STALL_TIMEOUT = 30.0
#: A transfer slower than this on average fails (its deadline is derived from it).
MIN_RATE = 2 * MiB
#: How often the RSS of the processes is read.
SAMPLE_INTERVAL = 0.1
#: How long a killed child may take to be reaped.
REAP_TIMEOUT = 5.0
#: The fastest redraw of the progress line on a terminal (seconds).
PROGRESS_REDRAW = 0.2


class HugeFailure(Exception):
    """The run failed; the message says how."""


#: What a transfer through a broken tunnel may raise; each becomes a HugeFailure.
_TRANSFER_ERRORS = (
    HugeFailure,
    trio.TooSlowError,
    OSError,
    trio.BrokenResourceError,
    h11.ProtocolError,
)


# --- sizes and bodies ----------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?", re.IGNORECASE)
_UNITS = {"b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def parse_size(text: str) -> int:
    """``"1GiB"`` → 1073741824; plain numbers are bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 64MiB or 1GiB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


def format_size(size: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def body_chunks(size: int, seed: int = 0) -> Iterator[bytes]:
    """The ``size`` bytes of the test body for ``seed``, in pieces of at most CHUNK.

    Deterministic and cheap: one pseudo-random block, rotated by a different
    amount for each piece, so a lost, repeated or reordered piece changes the
    hash. Only one piece exists at a time.
    """
    block = random.Random(seed).randbytes(CHUNK)
    index = 0
    while size > 0:
        turn = (index * 40_503) % CHUNK
        piece = block[turn:] + block[:turn]
        if size < CHUNK:
            piece = piece[:size]
        size -= len(piece)
        index += 1
        yield piece


def body_digest(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for piece in body_chunks(size, seed):
        digest.update(piece)
    return digest.hexdigest()


# --- the local service ---------------------------------------------------------------


class ServiceStats:
    """What the local service did, for the report and for tests that run it in-process.

    ``sent`` counts download body bytes handed to the socket, ``received`` upload
    body bytes read from it; ``endings`` says how each /download or /upload
    handler ended: ``"complete"``, ``"send failed"`` (the connection broke under
    a download), ``"request ended early"`` (the connection ended inside an
    upload's body) or ``"cancelled"``.
    """

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.active = 0
        self.endings: list[str] = []
        self._changed = trio.Event()

    def _begin(self) -> None:
        self.active += 1

    def _end(self, how: str) -> None:
        self.active -= 1
        self.endings.append(how)
        self._touch()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_endings(self, count: int) -> None:
        """Wait until ``count`` handlers have ended in all."""
        while len(self.endings) < count:
            await self._changed.wait()

    async def wait_for_received(self, count: int) -> None:
        """Wait until the upload handlers have read ``count`` body bytes in all."""
        while self.received < count:
            await self._changed.wait()


async def serve_local(
    stats: ServiceStats,
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/download?bytes=N&seed=S``, ``POST /upload`` and ``/`` on 127.0.0.1.

    ``/download`` answers N bytes of :func:`body_chunks` with a Content-Length;
    ``/upload`` answers ``{"sha256": ..., "bytes": ...}`` of the body it read;
    anything else answers ``ok``. Reports the bound port through ``task_status``.
    """
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_serve_connection, stats), listeners)


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(CHUNK))
        elif event is h11.PAUSED:
            raise h11.LocalProtocolError("pipelined request")
        else:
            return event  # type: ignore[return-value]


async def _serve_connection(stats: ServiceStats, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request = await _next_event(conn, stream)
            if not isinstance(request, h11.Request):
                return
            path, _, query = request.target.decode("latin-1").partition("?")
            if request.method == b"POST" and path == "/upload":
                await _upload(conn, stream, stats)
            else:
                while not isinstance(await _next_event(conn, stream), h11.EndOfMessage):
                    pass
                if path == "/download":
                    params = parse_qs(query)
                    size = int(params.get("bytes", ["0"])[0])
                    seed = int(params.get("seed", ["0"])[0])
                    await _download(conn, stream, stats, size, seed)
                else:
                    await _respond(conn, stream, b"ok\n", "text/plain")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _download(
    conn: h11.Connection, stream: trio.SocketStream, stats: ServiceStats, size: int, seed: int
) -> None:
    head = h11.Response(
        status_code=200,
        headers=[("content-type", "application/octet-stream"), ("content-length", str(size))],
    )
    stats._begin()
    how = "cancelled"
    try:
        await stream.send_all(conn.send(head) or b"")
        for piece in body_chunks(size, seed):
            for data in conn.send_with_data_passthrough(h11.Data(data=piece)) or ():
                await stream.send_all(data)
            stats.sent += len(piece)
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        how = "complete"
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        how = "send failed"
        raise
    finally:
        stats._end(how)


async def _upload(conn: h11.Connection, stream: trio.SocketStream, stats: ServiceStats) -> None:
    digest = hashlib.sha256()
    count = 0
    stats._begin()
    how = "cancelled"
    try:
        while True:
            event = await _next_event(conn, stream)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                count += len(event.data)
                stats.received += len(event.data)
                stats._touch()
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                how = "request ended early"
                return
        how = "complete"
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        how = "request ended early"
        raise
    finally:
        stats._end(how)
    answer = json.dumps({"sha256": digest.hexdigest(), "bytes": count}).encode()
    await _respond(conn, stream, answer, "application/json")


async def _respond(
    conn: h11.Connection, stream: trio.SocketStream, body: bytes, content_type: str
) -> None:
    head = h11.Response(
        status_code=200,
        headers=[("content-type", content_type), ("content-length", str(len(body)))],
    )
    await stream.send_all(_encode(conn, head, h11.Data(data=body), h11.EndOfMessage()))


def _serve_local_main() -> None:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_local, ServiceStats())
            print(f"listening on {port}", flush=True)

    with suppress(KeyboardInterrupt):
        trio.run(run)


# --- progress on a terminal ----------------------------------------------------------

Progress = Callable[[int], None]


class TerminalProgress:
    """One self-overwriting line: ``download  312.0 MiB / 1.0 GiB  30%  85.2 MiB/s  8 s left``.

    Call it with the bytes moved so far as often as you like; it redraws at
    most every PROGRESS_REDRAW seconds, and :meth:`done` ends the line.
    """

    def __init__(
        self,
        name: str,
        size: int,
        out: TextIO,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.size = size
        self.out = out
        self.clock = clock
        self.started = clock()
        self._drawn_at: float | None = None
        self._width = 0
        #: The bytes moved, as last reported.
        self.last = 0

    def __call__(self, moved: int) -> None:
        self.last = moved
        now = self.clock()
        if self._drawn_at is not None and now - self._drawn_at < PROGRESS_REDRAW:
            return
        self._drawn_at = now
        self._draw(moved, now)

    def line(self, moved: int, now: float) -> str:
        elapsed = now - self.started
        rate = moved / elapsed if elapsed > 0 else 0.0
        text = f"{self.name:<9} {format_size(moved)} / {format_size(self.size)}"
        text += f"  {moved / self.size if self.size else 1.0:4.0%}"
        if rate > 0:
            text += f"  {format_size(rate)}/s  {(self.size - moved) / rate:.0f} s left"
        return text

    def done(self) -> None:
        self._draw(self.last, self.clock())
        self.out.write("\n")
        self.out.flush()

    def _draw(self, moved: int, now: float) -> None:
        text = self.line(moved, now)
        # Pad over the previous, longer line's leftovers.
        self.out.write("\r" + text.ljust(self._width))
        self.out.flush()
        self._width = len(text)


# --- the visitor ---------------------------------------------------------------------


class Transfer:
    """One finished transfer."""

    def __init__(self, size: int, seconds: float, sha256: str) -> None:
        self.size = size
        self.seconds = seconds
        self.sha256 = sha256
        #: CPU seconds each process used during the transfer. Unlike a rate,
        #: this hardly depends on what else the machine is doing.
        self.cpu: dict[str, float] = {}

    @property
    def rate(self) -> float:
        """MiB per second."""
        return self.size / MiB / self.seconds if self.seconds else 0.0


async def _visitor_event(conn: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        with trio.move_on_after(STALL_TIMEOUT) as scope:
            data = await stream.receive_some(CHUNK)
        if scope.cancelled_caught:
            raise HugeFailure(f"nothing arrived for {STALL_TIMEOUT:g} s: the transfer hung")
        conn.receive_data(data)


async def _read_error(conn: h11.Connection, stream: trio.SocketStream, status: int) -> str:
    """The status and the start of the body of an error answer, for the message."""
    body = b""
    with trio.move_on_after(5):
        while len(body) < 4 * KiB:
            event = await _visitor_event(conn, stream)
            if not isinstance(event, h11.Data):
                break
            body += event.data
    return f"{status} {body[:500].decode('utf-8', 'replace').strip()}"


def _encode(conn: h11.Connection, *events: h11.Event) -> bytes:
    return b"".join(conn.send(event) or b"" for event in events)


async def _connect(port: int) -> trio.SocketStream:
    with trio.fail_after(10):
        return await trio.open_tcp_stream("127.0.0.1", port)


async def get_small(port: int, host: str, target: str = "/") -> tuple[int, bytes]:
    """One small GET: (status, body)."""
    stream = await _connect(port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(method="GET", target=target, headers=[("host", host)])
        await stream.send_all(_encode(conn, head, h11.EndOfMessage()))
        response = await _visitor_event(conn, stream)
        if not isinstance(response, h11.Response):
            raise HugeFailure(f"GET {target} got {response!r}")
        body = b""
        while isinstance(event := await _visitor_event(conn, stream), h11.Data):
            body += event.data
        return response.status_code, body


async def download(
    port: int, host: str, size: int, seed: int = 0, *, progress: Progress | None = None
) -> Transfer:
    """GET ``size`` bytes through the tunnel, hashing them as they arrive."""
    stream = await _connect(port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="GET", target=f"/download?bytes={size}&seed={seed}", headers=[("host", host)]
        )
        started = time.perf_counter()
        await stream.send_all(_encode(conn, head, h11.EndOfMessage()))
        response = await _visitor_event(conn, stream)
        if not isinstance(response, h11.Response):
            raise HugeFailure(f"got {response!r} instead of a response")
        if response.status_code != 200:
            raise HugeFailure(await _read_error(conn, stream, response.status_code))
        digest = hashlib.sha256()
        count = 0
        while True:
            event = await _visitor_event(conn, stream)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                count += len(event.data)
                if progress is not None:
                    progress(count)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise HugeFailure(f"got {event!r} after {count} bytes")
        seconds = time.perf_counter() - started
    if count != size:
        raise HugeFailure(f"{count} bytes arrived, {size} were sent")
    return Transfer(size, seconds, digest.hexdigest())


async def upload(
    port: int, host: str, size: int, seed: int = 0, *, progress: Progress | None = None
) -> Transfer:
    """POST ``size`` bytes through the tunnel; the result's hash is the service's."""
    stream = await _connect(port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="POST",
            target="/upload",
            headers=[
                ("host", host),
                ("content-type", "application/octet-stream"),
                ("content-length", str(size)),
            ],
        )
        started = time.perf_counter()
        sent = 0
        try:
            await stream.send_all(conn.send(head) or b"")
            for piece in body_chunks(size, seed):
                for data in conn.send_with_data_passthrough(h11.Data(data=piece)) or ():
                    with trio.move_on_after(STALL_TIMEOUT) as scope:
                        await stream.send_all(data)
                    if scope.cancelled_caught:
                        raise HugeFailure(
                            f"no byte was taken for {STALL_TIMEOUT:g} s after "
                            f"{format_size(sent)}: the transfer hung"
                        )
                sent += len(piece)
                if progress is not None:
                    progress(sent)
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        except trio.BrokenResourceError:
            answer = "no answer"
            with trio.move_on_after(2), suppress(*_TRANSFER_ERRORS):
                # An early answer (an error page) explains more than the broken pipe.
                event = await _visitor_event(conn, stream)
                if isinstance(event, h11.Response):
                    answer = await _read_error(conn, stream, event.status_code)
            raise HugeFailure(
                f"the connection broke after {format_size(sent)} ({answer})"
            ) from None
        response = await _visitor_event(conn, stream)
        if not isinstance(response, h11.Response):
            raise HugeFailure(f"got {response!r} instead of a response")
        if response.status_code != 200:
            raise HugeFailure(await _read_error(conn, stream, response.status_code))
        body = b""
        while isinstance(event := await _visitor_event(conn, stream), h11.Data):
            body += event.data
        seconds = time.perf_counter() - started
    try:
        answer = json.loads(body)
    except ValueError:
        raise HugeFailure(f"the answer is not JSON: {body[:300]!r}") from None
    if answer["bytes"] != size:
        raise HugeFailure(f"the service read {answer['bytes']} bytes, {size} were sent")
    return Transfer(size, seconds, answer["sha256"])


# --- the processes and their memory ----------------------------------------------------


class Child:
    """A child process whose output (stdout and stderr together) is drained and kept."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.tail: deque[str] = deque(maxlen=40)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def watch_output(
        self, ready: re.Pattern[str], *, task_status: trio.TaskStatus[str]
    ) -> None:
        """Read lines until one matches ``ready`` (reported), then drain the rest."""
        assert self.process.stdout is not None
        buffer = b""
        waiting = True
        while True:
            data = await self.process.stdout.receive_some(64 * KiB)
            if not data:
                if waiting:
                    await self.process.wait()
                    raise HugeFailure(
                        f"{self.name} exited ({self.process.returncode}) before it was ready:\n"
                        + self.output()
                    )
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                self.tail.append(line)
                if waiting and (match := ready.search(line)):
                    waiting = False
                    task_status.started(match.group(1))

    def output(self) -> str:
        return "\n".join(f"    {self.name}| {line}" for line in self.tail)


@asynccontextmanager
async def open_child(
    nursery: trio.Nursery, name: str, argv: list[str], ready: str
) -> AsyncIterator[tuple[Child, str]]:
    """Start ``argv``; yield it and the first group of ``ready`` in its output; kill it after."""
    # The checkout's package, whether or not it is installed.
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    child = Child(name, process)
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            value = await nursery.start(child.watch_output, re.compile(ready))
        yield child, value
    except trio.TooSlowError:
        raise HugeFailure(
            f"{name} did not get ready within {STARTUP_TIMEOUT:g} s:\n{child.output()}"
        ) from None
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(REAP_TIMEOUT) as scope:
            scope.shield = True
            await process.wait()


def rss(pid: int) -> int | None:
    """The resident set size of ``pid`` in bytes, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * KiB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # After the command name in parentheses, utime and stime are the
            # 12th and 13th fields.
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Memory:
    """RSS samples of one process: ``before`` the transfers, ``peak`` during, ``after``."""

    def __init__(self, name: str, pid: int, *, limited: bool) -> None:
        self.name = name
        self.pid = pid
        self.limited = limited
        self.before = self.peak = self.after = 0
        self.samples = 0
        self.gone = False

    def take(self) -> int:
        value = rss(self.pid)
        if value is None:
            self.gone = True
            return self.peak
        self.samples += 1
        self.peak = max(self.peak, value)
        return value

    @property
    def growth(self) -> int:
        return self.peak - self.before


async def sample_memory(memories: list[Memory]) -> None:
    """Sample every process at SAMPLE_INTERVAL until cancelled."""
    while True:
        for memory in memories:
            memory.take()
        await trio.sleep(SAMPLE_INTERVAL)


# --- the run ---------------------------------------------------------------------------


class Report:
    def __init__(self, size: int, max_growth: int) -> None:
        self.size = size
        self.max_growth = max_growth
        self.expected = ""
        self.transfers: dict[str, Transfer] = {}
        self.memories: list[Memory] = []
        self.failures: list[str] = []

    def check(self) -> None:
        for name, transfer in self.transfers.items():
            if transfer.sha256 != self.expected:
                self.failures.append(
                    f"{name}: sha256 {transfer.sha256} is not the body's {self.expected}"
                )
        for memory in self.memories:
            if memory.gone:
                self.failures.append(f"{memory.name} (pid {memory.pid}) died during the run")
            elif memory.limited and memory.growth > self.max_growth:
                self.failures.append(
                    f"{memory.name}: RSS grew by {format_size(memory.growth)}, "
                    f"more than {format_size(self.max_growth)}"
                )

    def render(self) -> str:
        lines = [f"huge bodies through the tunnel: {format_size(self.size)} each way", ""]
        lines.append(f"{'transfer':<10} {'seconds':>8} {'MiB/s':>8}  sha256{'':<17}  CPU seconds")
        for name, transfer in self.transfers.items():
            verdict = "ok" if transfer.sha256 == self.expected else "MISMATCH"
            cpu = " ".join(f"{process} {used:.1f}" for process, used in transfer.cpu.items())
            lines.append(
                f"{name:<10} {transfer.seconds:>8.2f} {transfer.rate:>8.1f}  "
                f"{verdict:<8} {transfer.sha256[:12]}  {cpu}"
            )
        lines.append("")
        lines.append(f"{'RSS':<10} {'before':>11} {'peak':>11} {'after':>11} {'growth':>11}  limit")
        for memory in self.memories:
            limit = (
                ("ok" if memory.growth <= self.max_growth else "EXCEEDED")
                + f" (≤ {format_size(self.max_growth)})"
                if memory.limited
                else "(not limited)"
            )
            lines.append(
                f"{memory.name:<10} {format_size(memory.before):>11} {format_size(memory.peak):>11}"
                f" {format_size(memory.after):>11} {'+' + format_size(memory.growth):>11}  {limit}"
            )
        samples = max((memory.samples for memory in self.memories), default=0)
        lines.append(f"({samples} samples per process, every {SAMPLE_INTERVAL:g} s)")
        return "\n".join(lines)


async def _transfers(report: Report, port: int, host: str) -> None:
    """The download, then the upload, each with a deadline from MIN_RATE."""
    deadline = STALL_TIMEOUT + report.size / MIN_RATE
    runs: dict[str, Callable[..., Awaitable[Transfer]]] = {
        "download": download,
        "upload": upload,
    }
    pids = {memory.name: memory.pid for memory in report.memories}
    for name, run in runs.items():
        cpu_before = {process: cpu_seconds(pid) for process, pid in pids.items()}
        visitor_before = time.process_time()
        # Only a person watching needs it; the report stays the only output in a pipe.
        progress = TerminalProgress(name, report.size, sys.stderr) if sys.stderr.isatty() else None
        with trio.move_on_after(deadline) as scope:
            try:
                transfer = await run(port, host, report.size, progress=progress)
            except _TRANSFER_ERRORS as error:
                what = str(error) if isinstance(error, HugeFailure) else repr(error)
                raise HugeFailure(f"{name}: {what}") from None
            finally:
                if progress is not None:
                    progress.done()
        if scope.cancelled_caught:
            raise HugeFailure(
                f"{name} took longer than {deadline:.0f} s "
                f"(slower than {format_size(MIN_RATE)}/s on average)"
            )
        for process, pid in pids.items():
            transfer.cpu[process] = cpu_seconds(pid) - cpu_before[process]
        transfer.cpu["visitor"] = time.process_time() - visitor_before
        report.transfers[name] = transfer


async def measure(size: int, *, max_growth: int = 64 * MiB, host: str = HOST) -> Report:
    """Start the processes, transfer ``size`` bytes each way, and report.

    Raises:
        HugeFailure: A process failed to start, or a transfer failed or hung.
    """
    report = Report(size, max_growth)
    python = sys.executable
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        # The expected hash is computed in a thread while the processes start.
        expected: list[str] = []
        computed = trio.Event()

        async def compute_digest() -> None:
            expected.append(
                await trio.to_thread.run_sync(body_digest, size, abandon_on_cancel=True)
            )
            computed.set()

        nursery.start_soon(compute_digest)
        service, service_port = await stack.enter_async_context(
            open_child(
                nursery,
                "service",
                [python, str(SCRIPT), "--serve-local"],
                r"listening on (\d+)",
            )
        )
        server, server_port = await stack.enter_async_context(
            open_child(
                nursery,
                "server",
                [python, "-m", "tunnel", "server", "--address", "127.0.0.1:0", "--token", TOKEN],
                r"Running on http://127\.0\.0\.1:(\d+)",
            )
        )
        agent, _ = await stack.enter_async_context(
            open_child(
                nursery,
                "agent",
                [
                    *(python, "-m", "tunnel", "http", service_port),
                    *("--server", f"127.0.0.1:{server_port}", "--token", TOKEN, "--host", host),
                ],
                r"^(connected)\b",
            )
        )
        port = int(server_port)
        try:
            with trio.fail_after(10):
                status, body = await get_small(port, host)
            if status != 200:
                raise HugeFailure(f"the tunnel is not working: {status} {body[:300]!r}")
            with trio.fail_after(STARTUP_TIMEOUT + size / (20 * MiB)):
                await computed.wait()
            report.expected = expected[0]

            report.memories = [
                Memory("server", server.pid, limited=True),
                Memory("agent", agent.pid, limited=True),
                Memory("service", service.pid, limited=False),
            ]
            for memory in report.memories:
                memory.before = memory.peak = memory.take()
            failure: Exception | None = None
            async with trio.open_nursery() as sampling:
                sampling.start_soon(sample_memory, report.memories)
                try:
                    await _transfers(report, port, host)
                except _TRANSFER_ERRORS as exc:
                    failure = exc  # raised below, not wrapped in this nursery's group
                sampling.cancel_scope.cancel()
            if failure is not None:
                raise failure
            for memory in report.memories:
                memory.after = memory.take()
        except _TRANSFER_ERRORS as error:
            what = str(error) if isinstance(error, HugeFailure) else f"{error!r}"
            outputs = "\n".join(child.output() for child in (server, agent, service))
            raise HugeFailure(f"{what}\nlast output of the processes:\n{outputs}") from None
        finally:
            nursery.cancel_scope.cancel()
    report.check()
    return report


async def _main(size: int, max_growth: int, host: str) -> int:
    report: Report | None = None
    failures: list[str] = []
    terminated = False
    async with trio.open_nursery() as nursery:

        async def on_sigterm() -> None:
            # SIGTERM (a test's or CI's timeout) must still kill the children.
            nonlocal terminated
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    terminated = True
                    nursery.cancel_scope.cancel()

        nursery.start_soon(on_sigterm)
        try:
            report = await measure(size, max_growth=max_growth, host=host)
        except* HugeFailure as group:
            failures = [str(failure) for failure in group.exceptions]
        finally:
            nursery.cancel_scope.cancel()
    if terminated:
        print("FAILED: terminated by SIGTERM", file=sys.stderr)
        return 143
    if report is None:
        for failure in failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    print(report.render())
    if report.failures:
        for failure in report.failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    print("ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=GiB, help="bytes each way (1GiB)")
    parser.add_argument(
        "--max-growth",
        type=parse_size,
        default=64 * MiB,
        help="most RSS the server or the agent may gain (64MiB)",
    )
    parser.add_argument("--host", default=HOST, help=f"the tunnel's host name ({HOST})")
    parser.add_argument("--serve-local", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_local:
        _serve_local_main()
        return 0
    try:
        return trio.run(_main, args.size, args.max_growth, args.host)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # Ctrl-C inside a nursery: the children are dead already; no traceback.
        if group.split(KeyboardInterrupt)[1] is None:
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
