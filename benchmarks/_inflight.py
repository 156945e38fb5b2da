"""Many requests in flight at once: N visitor connections, one slow request on each.

The generator runs in a child process of its own (its descriptors and CPU apart
from the benchmark's) as one bare ``selectors`` (epoll) loop. It opens N
connections and sends ``GET /hold?n=N&ms=S`` on each as soon as it is open
(Hypercorn closes a connection that sends nothing for 5 s, and opening 10,000
takes longer than that here).

The ramp is paced: at most ``window`` requests are on their way at once, opening
or sent but not yet arrived at the local service (whose count of held requests
the generator reads every 50 ms). Unpaced, the generator outruns the server:
connections pile up accepted but unread, and Hypercorn closes those that wait
over its 5 s keep-alive timeout before their request is parsed. That is how an
overloaded server sheds load, not what this phase measures: whether one agent
holds N requests at once.

The local service holds every such request until N of them are held at once,
then S milliseconds more, and answers them all (see ``_service.py``). So the N
are in flight together by construction, and the benchmark checks it: it reads
the local service's peak count (``GET /holders``) after the phase. A response
that is cut short, is not 2xx, or has not ended by the deadline is an error.
If some request never arrives (it failed on the way, and is counted), the hold
would last its full limit; instead the generator ends it (``GET /release``) once
no more have arrived for ``STALL`` seconds after the last was sent.

Reported: the ramp (first connect to last request sent), the time from the
last request sent to the last response complete (S plus what the tunnel needs
to answer N at once), and the latency of each request.
"""

from __future__ import annotations

import errno
import multiprocessing
import selectors
import socket
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection

import _load
import _procs

__all__ = ["InflightResult", "hold"]

#: Seconds without one more request arriving at the local service, after the
#: last was sent, before the generator ends the hold for those that did arrive.
STALL = 10.0


@dataclass
class InflightResult:
    """What one in-flight phase saw, from the visitors' side."""

    requests: int
    hold_s: float
    connected: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: From the first connect to the last request sent.
    connect_s: float = 0.0
    #: From the last request sent to the last response complete.
    complete_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    generator_cpu_s: float = 0.0
    #: The hold was ended early: fewer than N arrived, none for STALL seconds.
    released: bool = False

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["error_count"] = self.error_count
        return out


class _Visitor:
    __slots__ = ("buffer", "need", "sent_at", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.need = -1
        self.sent_at = 0.0


def _count(errors: dict[str, int], kind: str) -> None:
    errors[kind] = errors.get(kind, 0) + 1


def _held(local_port: int) -> int:
    """How many ``/hold`` requests the local service holds now (-1 if it cannot say)."""
    try:
        with socket.create_connection(("127.0.0.1", local_port), timeout=5) as sock:
            sock.sendall(b"GET /holders HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        return int(answer.rsplit(b"\r\n\r\n", 1)[1].split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _release(local_port: int) -> None:
    """Make the local service answer every held request now (``GET /release``)."""
    try:
        with socket.create_connection(("127.0.0.1", local_port), timeout=5) as sock:
            sock.sendall(b"GET /release HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while sock.recv(4096):
                pass
    except OSError:
        pass


def _run(
    port: int,
    local_port: int,
    host: str,
    count: int,
    hold_ms: int,
    window: int,
    timeout: float,
) -> InflightResult:
    limit = _procs.raise_fd_limit()
    result = InflightResult(requests=count, hold_s=hold_ms / 1000)
    if limit < count + 64:
        result.errors["fd limit"] = count
        return result
    started = time.monotonic()
    cpu_started = time.process_time()
    selector = selectors.DefaultSelector()
    errors = result.errors
    request = f"GET /hold?n={count}&ms={hold_ms} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    opening = 0
    pending = count
    waiting = 0
    deadline = started + timeout
    last_sent = started
    latencies: list[float] = []
    last_done = started

    def receive(visitor: _Visitor) -> bool:
        """Read what arrived; True once the exchange is over, well or not."""
        nonlocal last_done
        try:
            data = visitor.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            _count(errors, "closed before the response ended")
            return True
        visitor.buffer += data
        if visitor.need < 0:
            visitor.need, good = _load._response_length(visitor.buffer)
            if visitor.need >= 0 and not good:
                status = bytes(visitor.buffer[9:12]).decode(errors="replace")
                _count(errors, f"status {status}")
                return True
        if 0 <= visitor.need <= len(visitor.buffer):
            last_done = time.monotonic()
            latencies.append(last_done - visitor.sent_at)
            result.ok += 1
            return True
        return False

    held = 0
    held_at = grown_at = 0.0
    # Open, at most `window` on their way at a time, sending each request at once.
    while (pending or opening or waiting) and (now := time.monotonic()) < deadline:
        ramping = pending or opening
        if not result.released and now - held_at >= (0.05 if ramping else 0.5):
            now_held = _held(local_port)
            if now_held > held:
                held, grown_at = now_held, now
            held_at = now
            if not ramping and held < count and now - grown_at >= STALL:
                # Some request will never arrive (its error is counted): the
                # others are answered now rather than at the hold's limit.
                _release(local_port)
                result.released = True
        while pending and opening + (result.connected - held) < window:
            pending -= 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(("127.0.0.1", port))
            if code not in (0, errno.EINPROGRESS):
                _count(errors, f"connect: {errno.errorcode.get(code, code)}")
                sock.close()
                continue
            opening += 1
            selector.register(sock, selectors.EVENT_WRITE, _Visitor(sock))
        for key, events in selector.select(min(0.5, deadline - now)):
            visitor = key.data
            if events & selectors.EVENT_WRITE:
                opening -= 1
                code = visitor.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    _count(errors, f"connect: {errno.errorcode.get(code, code)}")
                    selector.unregister(visitor.sock)
                    visitor.sock.close()
                    continue
                result.connected += 1
                try:
                    visitor.sock.send(request)
                except OSError as exc:
                    _count(errors, f"send: {errno.errorcode.get(exc.errno or 0, exc)}")
                    selector.unregister(visitor.sock)
                    visitor.sock.close()
                    continue
                visitor.sent_at = last_sent = time.monotonic()
                selector.modify(visitor.sock, selectors.EVENT_READ, visitor)
                waiting += 1
            elif receive(visitor):
                waiting -= 1
                selector.unregister(visitor.sock)
                visitor.sock.close()
        if not pending and not opening and result.connect_s == 0.0:
            result.connect_s = last_sent - started
            # Every request is out: from here the deadline is the hold plus a margin.
            deadline = last_sent + hold_ms / 1000 + timeout
    if opening:
        errors["connect: timed out"] = opening
    if pending:
        errors["connect: not tried (deadline)"] = pending
    if waiting:
        errors["no response by the deadline"] = waiting
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()
    result.complete_s = max(0.0, last_done - last_sent)
    latencies.sort()
    if latencies:
        result.p50_ms = latencies[len(latencies) // 2] * 1000
        result.p99_ms = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
        result.max_ms = latencies[-1] * 1000
    result.generator_cpu_s = time.process_time() - cpu_started
    return result


def _child(
    port: int,
    local_port: int,
    host: str,
    count: int,
    hold_ms: int,
    window: int,
    timeout: float,
    out: Connection,
) -> None:
    try:
        outcome: object = _run(port, local_port, host, count, hold_ms, window, timeout)
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    out.send(outcome)
    out.close()


def hold(
    port: int,
    local_port: int,
    host: str,
    count: int,
    *,
    hold_ms: int,
    window: int = 256,
    timeout: float = 240.0,
) -> InflightResult:
    """Hold ``count`` requests in flight on ``port`` (the local service on ``local_port``).

    The ramp must end within ``timeout`` seconds, and the answers arrive within
    ``timeout`` of the hold's end.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_child,
        args=(port, local_port, host, count, hold_ms, window, timeout, sender),
        daemon=True,
    )
    process.start()
    sender.close()
    try:
        # Two steps of at most `timeout`, the hold, and a margin to report.
        if not receiver.poll(2 * timeout + hold_ms / 1000 + 15):
            raise RuntimeError("the in-flight generator did not report back")
        outcome = receiver.recv()
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
    if isinstance(outcome, str):
        raise RuntimeError(f"the in-flight generator failed: {outcome}")
    assert isinstance(outcome, InflightResult)
    return outcome
