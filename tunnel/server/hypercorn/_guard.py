"""A guard for a Hypercorn bug that lets one HTTP/2 visitor stop the whole server.

The bug (Hypercorn 0.17.0 to 0.18.0, trio worker, cleartext HTTP/2): when a
visitor sends GOAWAY and closes its connection while a response is streaming,
two tasks of that connection send on its ``trio.SocketStream`` at once.

* The task reading from the socket sees the GOAWAY, and ``TCPServer._close``
  calls ``send_eof()``, which holds the stream's send side across a checkpoint.
* At that checkpoint the HTTP/2 sending task flushes the next DATA frame:
  ``TCPServer.protocol_send`` calls ``send_all()``, which raises
  ``trio.BusyResourceError``. ``protocol_send`` treats only
  ``BrokenResourceError`` and ``ClosedResourceError`` as a gone peer, and its
  ``send_lock`` cannot help because ``_close`` does not take it.

The error leaves the connection's task group, then ``TCPServer.run``, and lands
in the nursery that runs every connection. That cancels them all and
``hypercorn.trio.serve`` raises, so every tunnel on the server goes down::

    hypercorn/protocol/h2.py: send_task -> _send_data -> _flush
    hypercorn/trio/tcp_server.py: protocol_send
        await self.stream.send_all(event.data)
    trio/_highlevel_socket.py: send_all
    trio.BusyResourceError: another task is currently sending data on this SocketStream

Browsers and curl send GOAWAY when they close a connection, so a visitor
triggers this just by leaving. TLS is not affected because ``SSLStream`` has no
``send_eof``.

The guard: a ``TCPServer`` subclass whose ``protocol_send`` treats this
``BusyResourceError`` like the errors Hypercorn already expects. With
``send_lock`` held, the only other sender is ``send_eof``, so the error means
the connection is closing and nothing has been written yet. The subclass
replaces the name ``TCPServer`` in ``hypercorn.trio.run``, where
``worker_serve`` looks it up for each call. It is installed when a
:class:`~tunnel.TunnelApp` is created (before Hypercorn's ``worker_serve``
runs, also under the ``hypercorn`` command, which imports the app first) and
when :func:`serve` starts, not at import time. Installing it a second time
does nothing.

Any other exception out of one connection (Hypercorn's
``TCPServer.run``) would end ``serve`` the same way: the late-DATA
``KeyError`` and the PRIORITY ``TooManyStreamsError`` that
``_patches/`` fixes were two. So the subclass's ``run`` also
logs such an error with its traceback and ends only that connection: one
visitor's bad bytes must never stop every tunnel, even through a Hypercorn
bug nobody has found yet.

The version pin (``HYPERCORN_GUARD`` in ``tunnel/_compat.py``, which warns
when it is off): the guard applies to 0.17 and 0.18. The crash
was reproduced on 0.17.3 and 0.18.0 (and on 0.16.0, below our minimum), and
``protocol_send`` and ``_close`` have the same source in every release from
0.17.0 to 0.18.0, the latest at the time of writing. A later release is left
alone: it may have fixed the bug or changed ``TCPServer``. Widen the pin only
after ``tests/e2e/test_hypercorn_guard.py`` fails without the guard on that
release and passes with it.
"""

from __future__ import annotations

import logging
import math
from contextvars import ContextVar
from typing import Any

import hypercorn.trio.run
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio import tcp_server
from hypercorn.trio.tcp_server import TCPServer

from ..._compat import HYPERCORN_GUARD, HYPERCORN_TAKEOVER

__all__ = ["Handover", "current_connection", "install_hypercorn_guard"]

logger = logging.getLogger("tunnel.server")


class Handover:
    """A request to stop reading a connection, so that an app can read it itself.

    The reader stops at its next step (:attr:`parked` is set then, or when it
    has ended: :attr:`reader_ended`) and waits for :attr:`done`: given back
    (:attr:`taken` False) it reads on, taken it ends the connection, as if the
    peer had closed it, once the taker is done.
    """

    __slots__ = ("done", "parked", "reader_ended", "taken")

    def __init__(self) -> None:
        self.parked = trio.Event()
        self.done = trio.Event()
        self.reader_ended = False
        self.taken = False


#: The connection a task serves: an app's task inherits it from the connection's
#: task that spawned it (trio copies the context into a new task).
current_connection: ContextVar[_GuardedTCPServer | None] = ContextVar(
    "tunnel_hypercorn_connection", default=None
)


class _GuardedTCPServer(TCPServer):
    """Hypercorn's per-connection server, in which a send racing ``send_eof`` is a close."""

    #: A read in progress, which a handover cancels (it loses no data: a
    #: socket's or TLS stream's receive cancelled has taken nothing).
    _receiving: trio.CancelScope | None = None
    #: Set by ``_takeover.py`` while an app asks for the connection or holds it.
    handover: Handover | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_timer = _IdleTimer(self)
        self.idle_task = self.idle_timer  # type: ignore[assignment]  # its two methods

    async def _read_data(self) -> None:
        try:
            await self._read_loop()
        finally:
            # The connection's task group waits for the timer's task: it must
            # end once nothing more is read (Hypercorn's idle task, cancelled
            # while a request is served, did not run then).
            self.idle_timer.end()

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            self.idle_timer.end()

    async def run(self) -> None:
        current_connection.set(self)
        try:
            await super().run()
        except* Exception as group:
            # Hypercorn's own run() has already closed the connection (its
            # ``finally``); cancellation, in a group with these or alone,
            # goes on up as it must.
            for exc in group.exceptions:
                logger.error(
                    "an HTTP connection failed inside Hypercorn; closed it, the server goes on",
                    exc_info=exc,
                )

    #: Whether ``_read_loop`` below replaces Hypercorn's ``_read_data``: it is
    #: a copy of 0.18's, and the guard also serves 0.17.
    _handover_points = HYPERCORN_TAKEOVER.on

    async def _read_loop(self) -> None:
        # Hypercorn 0.18's TCPServer._read_data (hypercorn/trio/tcp_server.py),
        # with a point where an app may take the connection over
        # (_takeover.py): the read in progress is called off, and the loop
        # waits for the app to be done with it.
        if not self._handover_points:
            await super()._read_data()
            return
        while True:
            handover = self.handover
            if handover is not None:
                handover.parked.set()
                await handover.done.wait()
                if handover.taken:
                    break
                self.handover = None
            # One cancel scope for both Hypercorn's read timeout and a
            # handover (cheaper than its fail_after: this runs for every read
            # of every visitor).
            timeout = self.config.read_timeout
            deadline = trio.current_time() + timeout if timeout else math.inf
            with trio.CancelScope(deadline=deadline) as receiving:
                self._receiving = receiving
                try:
                    data = await self.stream.receive_some(tcp_server.MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                finally:
                    self._receiving = None
            if receiving.cancelled_caught:
                if self.handover is not None:
                    continue  # a handover: nothing was read
                break  # Hypercorn's read_timeout
            # A handover cancelling after the read completed lands here with
            # the data: it is Hypercorn's to handle, then the loop parks.
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        if self.handover is not None and not self.handover.taken:
            self.handover.reader_ended = True
            self.handover.parked.set()
        await self.protocol.handle(Closed())

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if not event.data:
                # h11's end of a body framed by Content-Length: nothing to write.
                return
            if not self.send_lock.locked():
                await self._send_unlocked(event.data)
                return
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            if not isinstance(event, RawData):
                raise
            # The same handling Hypercorn gives a peer that has gone.
            await self.protocol.handle(Closed())

    async def _send_unlocked(self, data: bytes) -> None:
        """Hypercorn's send of ``RawData`` when no other task is sending, with fewer yields.

        Every yield is a trip through trio's scheduler (an ``epoll_wait`` and a
        task switch), and at one request at a time each trip is paid in full:
        ``async with send_lock`` yields even when the lock is free, and h11's
        end of a body framed by ``Content-Length`` is ``b""``, sent (and yielded
        on) like any other write. Taking a free lock without yielding and
        skipping empty writes saves two to four trips per HTTP/1.1 response and
        one per message on an agent's WebSocket (benchmarks/README.rst,
        "Trips through the scheduler (issue 14)"). The send itself still yields, so
        a task that only sends still lets the others run.
        """
        lock = self.send_lock
        lock.acquire_nowait()
        try:
            with trio.CancelScope(shield=True):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            await self.protocol.handle(Closed())
        finally:
            lock.release()


class _IdleTimer:
    """The idle timeout of one connection, in place of Hypercorn's ``TrioSingleTask``.

    Hypercorn takes a lock and starts a new task each time a connection turns
    idle (after every response), and takes the lock again and cancels that
    task when it turns busy (every request): at one request at a time, three
    to five trips through trio's scheduler per request, for a timer. Here one
    task per connection waits for a deadline that the connection moves without
    a yield. What it does is Hypercorn's: an idle connection is closed after
    ``keep_alive_timeout``, or at once when the server is stopping; a busy one
    when its response is done. Unlike Hypercorn's, it also ends as soon as the
    connection is closed, instead of lingering until the timeout.
    """

    def __init__(self, server: _GuardedTCPServer) -> None:
        self._server = server
        # When the connection is closed for idling; infinite while it is busy.
        self._deadline = math.inf
        self._waiting: trio.CancelScope | None = None
        #: The running task's scope, None while no task runs.
        self._life: trio.CancelScope | None = None
        self._ended = False
        self._turned_idle: trio.Event | None = None

    async def restart(self, task_group: Any, action: Any) -> None:
        """The connection turned idle (Hypercorn's call, with its own timeout ``action``)."""
        self._move(trio.current_time() + self._server.config.keep_alive_timeout)
        if self._turned_idle is not None:
            self._turned_idle.set()
        if self._life is None and not self._ended:
            self._life = trio.CancelScope()
            task_group._nursery.start_soon(self._watch, self._life)

    async def stop(self) -> None:
        """The connection turned busy."""
        self._move(math.inf)

    def end(self) -> None:
        """The connection is closed: nothing is left to time."""
        self._ended = True
        if self._life is not None:
            self._life.cancel()

    def _move(self, deadline: float) -> None:
        self._deadline = deadline
        if self._waiting is not None:
            self._waiting.deadline = self._wake_at()

    def _wake_at(self) -> float:
        if self._deadline == math.inf:
            # Busy: looked at again after a timeout's length, when a task
            # still waiting for a connection busy that long (a WebSocket, an
            # agent's link, a long response) ends instead of living on with
            # it; the next turn to idle starts another.
            return trio.current_time() + self._server.config.keep_alive_timeout
        return self._deadline

    async def _watch(self, life: trio.CancelScope) -> None:
        terminated = self._server.context.terminated
        try:
            with life:
                while True:
                    with trio.CancelScope(deadline=self._wake_at()) as waiting:
                        self._waiting = waiting
                        await terminated.wait()
                    self._waiting = None
                    if not waiting.cancelled_caught:
                        break  # the server is stopping
                    if self._deadline == math.inf:
                        return  # busy for a timeout's length: no task meanwhile
                    if trio.current_time() >= self._deadline:
                        break  # idle for keep_alive_timeout (else the deadline moved: wait on)
                while self._deadline == math.inf:
                    # Busy: its response first, as Hypercorn would.
                    self._turned_idle = trio.Event()
                    await self._turned_idle.wait()
                with trio.CancelScope(shield=True):
                    await self._server._initiate_server_close()
        finally:
            if self._life is life:
                self._life = None
                self._waiting = None


def install_hypercorn_guard() -> None:
    """Install the guard if the running Hypercorn has the bug; safe to call repeatedly."""
    # ``worker_serve`` reads ``TCPServer`` from its module's globals on each call.
    run_globals = vars(hypercorn.trio.run)
    if run_globals["TCPServer"] is _GuardedTCPServer:
        return
    # Someone else's replacement is left alone rather than silently discarded.
    if HYPERCORN_GUARD.on and run_globals["TCPServer"] is TCPServer:
        run_globals["TCPServer"] = _GuardedTCPServer
