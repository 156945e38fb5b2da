"""Load generators for the small-GET phases: ``wrk`` when installed, else our own.

Both are closed-loop: each connection sends one request (keep-alive, no
pipelining), waits for the whole response, and sends the next at once. Both
report requests per second over the measured window, the 50th and 99th
percentile latency, errors (connection failures and non-2xx answers) and the
CPU time the generator itself used, so a reader can see whether it was the
bottleneck.

The fallback is a few processes, each running a bare ``selectors`` (epoll) loop
over raw non-blocking sockets: no HTTP library, no asyncio, parsing only the
status code, Content-Length and the end of a chunked body. It has a warm-up
period before the measured window, which wrk lacks; the benchmark gives wrk a
separate short warm-up run instead.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import selectors
import shutil
import socket
import subprocess
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

__all__ = ["LoadResult", "python_load", "wrk_load", "wrk_path"]


@dataclass(frozen=True)
class LoadResult:
    """One load phase: what the generator measured."""

    generator: str
    connections: int
    seconds: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    generator_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- wrk -----------------------------------------------------------------------------

_WRK_SCRIPT = """
wrk.headers["Host"] = "%(host)s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "p50_us": %%.1f, "p99_us": %%.1f, '
    .. '"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_load(
    port: int, host: str, connections: int, seconds: int, *, threads: int = 1
) -> LoadResult:
    """Run wrk against ``http://127.0.0.1:port/`` with ``Host: host``."""
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % {"host": host})
    try:
        before = _children_cpu()
        completed = subprocess.run(
            [
                wrk,
                f"-t{min(threads, connections)}",
                f"-c{connections}",
                f"-d{seconds}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}/",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        )
        cpu = _children_cpu() - before
    finally:
        os.unlink(script.name)
    line = next(
        (line for line in completed.stdout.splitlines() if line.startswith("WRKJSON ")), None
    )
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{completed.stdout}\n{completed.stderr}")
    summary = json.loads(line.removeprefix("WRKJSON "))
    errors = sum(summary[k] for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        generator="wrk",
        connections=connections,
        seconds=summary["duration_us"] / 1e6,
        requests=summary["requests"],
        errors=errors,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        generator_cpu_s=cpu,
    )


# --- the fallback ----------------------------------------------------------------------


class _Conn:
    __slots__ = ("buffer", "need", "sent_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.need = -1  # bytes that make up the whole response; -1: head not seen yet
        self.sent_at = 0


def _response_length(buffer: bytearray) -> tuple[int, bool]:
    """(total length of the response at the front of ``buffer``, or -1; status is 2xx)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return -1, True
    head = bytes(buffer[:end]).lower()
    ok = head[9:10] == b"2"
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        return end + 4 + int(head[at + 17 : stop if stop >= 0 else None]), ok
    if b"chunked" in head:
        # Small bodies only: the response ends with the zero-size chunk.
        terminator = buffer.find(b"\r\n0\r\n\r\n", end)
        return (terminator + 7 if terminator >= 0 else -1), ok
    return end + 4, ok


def _worker(
    port: int,
    request: bytes,
    connections: int,
    start_at: float,
    end_at: float,
    results: Connection,
) -> None:
    try:
        outcome: object = _run_worker(port, request, connections, start_at, end_at)
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    results.send(outcome)
    results.close()


def _run_worker(
    port: int,
    request: bytes,
    connections: int,
    start_at: float,
    end_at: float,
) -> tuple[int, int, bytes, float]:
    selector = selectors.DefaultSelector()
    latencies = array("q")
    count = errors = 0
    cpu_start = cpu_end = 0.0
    now_ns = time.monotonic_ns
    start_ns, end_ns = int(start_at * 1e9), int(end_at * 1e9)

    def connect() -> _Conn:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        selector.register(sock, selectors.EVENT_READ, conn)
        conn.sent_at = now_ns()
        sock.send(request)
        return conn

    for _ in range(connections):
        connect()
    started = False
    while True:
        now = now_ns()
        if not started and now >= start_ns:
            started = True
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu_start = usage.ru_utime + usage.ru_stime
        if now >= end_ns:
            break
        for key, _ in selector.select(min(0.1, (end_ns - now) / 1e9)):
            conn: _Conn = key.data
            try:
                data = conn.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                errors += 1
                selector.unregister(conn.sock)
                conn.sock.close()
                connect()
                continue
            conn.buffer += data
            if conn.need < 0:
                conn.need, ok = _response_length(conn.buffer)
                if not ok:
                    errors += 1
                if conn.need < 0:
                    continue
            if len(conn.buffer) < conn.need:
                continue
            done = now_ns()
            if done >= start_ns:
                latencies.append(done - conn.sent_at)
                count += 1
            del conn.buffer[: conn.need]
            conn.need = -1
            conn.sent_at = done
            conn.sock.send(request)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_end = usage.ru_utime + usage.ru_stime
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return count, errors, latencies.tobytes(), cpu_end - cpu_start


def _percentile(ordered: list[int], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e6


def python_load(
    port: int,
    host: str,
    connections: int,
    seconds: float,
    *,
    warmup: float = 0.5,
    processes: int | None = None,
    on_start: Callable[[], object] | None = None,
    on_end: Callable[[], object] | None = None,
) -> LoadResult:
    """Run the fallback generator; ``on_start``/``on_end`` are called at the window's edges."""
    processes = max(1, min(connections, processes or os.cpu_count() or 1))
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    context = multiprocessing.get_context("fork")
    start_at = time.monotonic() + 0.2 + warmup
    end_at = start_at + seconds
    workers = []
    for index in range(processes):
        share = connections // processes + (index < connections % processes)
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker, args=(port, request, share, start_at, end_at, sender), daemon=True
        )
        process.start()
        sender.close()
        workers.append((process, receiver))
    try:
        time.sleep(max(0.0, start_at - time.monotonic()))
        if on_start is not None:
            on_start()
        time.sleep(max(0.0, end_at - time.monotonic()))
        if on_end is not None:
            on_end()
        count = errors = 0
        cpu = 0.0
        merged: list[int] = []
        for process, receiver in workers:
            if not receiver.poll(15):
                raise RuntimeError("a load-generator process did not report back")
            outcome = receiver.recv()
            if isinstance(outcome, str):
                raise RuntimeError(f"a load-generator process failed: {outcome}")
            part_count, part_errors, raw, part_cpu = outcome
            count += part_count
            errors += part_errors
            cpu += part_cpu
            latencies = array("q")
            latencies.frombytes(raw)
            merged.extend(latencies)
            process.join(5)
    finally:
        for process, _ in workers:
            if process.is_alive():
                process.kill()
                process.join(5)
    merged.sort()
    return LoadResult(
        generator="python",
        connections=connections,
        seconds=seconds,
        requests=count,
        errors=errors,
        p50_ms=_percentile(merged, 0.50),
        p99_ms=_percentile(merged, 0.99),
        generator_cpu_s=cpu,
    )
