"""A WebSocket read and written on its byte stream directly, at either end.

The server's side: once the handshake is answered, the server's Hypercorn layer
can hand an agent's connection (plain or TLS) over to the app
(``tunnel/server/hypercorn/_takeover.py``). The agent's side: the handshake is
its own (:mod:`.handshake`). Either way this transport then frames the link's
messages itself (:mod:`.frames`), with no protocol stack, queue or task in
between: the link's reader task reads the socket, its writer task writes it.
"""

from __future__ import annotations

import contextlib

import trio

from . import ABNORMAL_CLOSURE, TransportClosed
from .frames import (
    ClientFrames,
    Close,
    FrameError,
    MaskKeys,
    Ping,
    ServerFrames,
    close_frame,
    frame,
    pong_frame,
)

__all__ = ["StreamWebSocketTransport"]

#: How long a close handshake may take before the connection is dropped anyway.
CLOSE_TIMEOUT = 2.0
#: What one read asks for: as much as Hypercorn's own reads (its
#: ``_patches/read_size.py``), so a 1 MiB message takes four.
READ_SIZE = 256 << 10


class StreamWebSocketTransport:
    """HTTP/2 bytes as WebSocket messages on a byte stream whose handshake is done.

    The transport owns ``stream`` and closes it in :meth:`aclose`.

    Args:
        stream: The connection, after the server's ``101`` (and for the
            agent, the rest of the response's head) went through.
        max_message: The largest message accepted from the peer; a larger one
            is refused with close code 1009.
        client: The agent's end: its frames are masked, the server's are not.
        received: Bytes read past the handshake, to be read first (the agent
            reads the server's ``101`` and what followed in one go).
        peer: What the other end is, for the reasons the connection ends
            with: by default the agent for the server, the server for a client.
    """

    # Slots, and no lock or exception object until needed: one per idle agent.
    __slots__ = (
        "_broken",
        "_closed",
        "_end_code",
        "_end_reason",
        "_frames",
        "_keys",
        "_peer",
        "_released",
        "_sending",
        "_sent",
        "_stream",
        "_us",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_message: int,
        client: bool = False,
        received: bytes = b"",
        peer: str | None = None,
    ) -> None:
        self._stream = stream
        self._frames = ClientFrames(max_message) if client else ServerFrames(max_message)
        if received:
            self._frames.receive_data(received)
        self._keys = MaskKeys() if client else None
        #: Who is at each end, for the reasons the connection ends with.
        self._peer = peer or ("server" if client else "agent")
        self._us = "agent" if self._peer == "server" else "server"
        # The link's writer sends; the reader sends only PONGs and the close
        # reply, and aclose the close: one writer at a time, and the rare
        # second waits for an event made only then.
        self._sending = False
        self._sent: trio.Event | None = None
        #: A close was sent or received, or the connection is gone.
        self._closed = False
        #: A write was interrupted: part of a frame may be on the wire, so
        #: nothing more may follow it, not even a close.
        self._broken = False
        self._released = False
        #: How the connection ended, told to every task that uses it after.
        self._end_reason = ""
        self._end_code: int | None = None

    def _end(self, reason: str, code: int | None = None) -> TransportClosed:
        if not self._closed:
            self._closed = True
            self._end_reason, self._end_code = reason, code
        return self._ending()

    def _ending(self) -> TransportClosed:
        return TransportClosed(self._end_reason, self._end_code)

    def _key(self) -> bytes | None:
        return None if self._keys is None else self._keys.next()

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise self._ending()
        keys = self._keys
        await self._write(frame(data, key=None if keys is None else keys.next()))

    async def _write(self, data: bytes) -> None:
        # No yield when nobody else is sending: a lock's would be one more trip
        # through the scheduler per message (benchmarks/README.rst, issue 14);
        # the send itself still yields.
        while self._sending:
            if self._sent is None:
                self._sent = trio.Event()
            await self._sent.wait()
        self._sending = True
        try:
            if self._broken:
                raise self._end(f"the {self._peer}'s connection broke mid-frame")
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._end(f"the {self._peer}'s connection broke: {exc!r}") from None
        except BaseException:
            # Cancelled: an unknown part of the frame went out.
            self._broken = True
            raise
        finally:
            self._sending = False
            if self._sent is not None:
                self._sent.set()
                self._sent = None

    async def _read(self) -> None:
        try:
            data = await self._stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._end(f"the {self._peer}'s connection broke: {exc!r}") from None
        if not data:
            raise self._end(f"the {self._peer} disconnected (1006, no close frame)")
        self._frames.receive_data(data if type(data) is bytes else bytes(data))

    async def receive(self) -> bytes:
        frames = self._frames
        while True:
            if self._closed:
                raise self._ending()
            try:
                event = frames.next_event()
            except FrameError as exc:
                raise await self._refuse(exc) from None
            if event is None:
                await self._read()
            elif type(event) is bytes:
                return event
            elif isinstance(event, Ping):
                await self._write(pong_frame(event.payload, self._key()))
            elif isinstance(event, Close):
                # The closing handshake's second half: the peer's code echoed.
                text = f"the {self._peer} disconnected ({event.code} {event.reason})"
                self._end(text.replace(" )", ")"), event.code)
                await self._reply(close_frame(event.code, key=self._key()))
                raise self._ending()
            # A PONG answers nothing we asked; it only proves the peer alive.

    async def _refuse(self, error: FrameError) -> TransportClosed:
        self._end(f"the {self._peer} broke the WebSocket protocol: {error.reason}")
        await self._reply(close_frame(error.code, error.reason, self._key()))
        return self._ending()

    async def _reply(self, data: bytes) -> None:
        """Send a close, best effort and bounded in time, whatever is cancelled."""
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            with contextlib.suppress(TransportClosed):
                await self._write(data)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if self._released:
            return
        self._released = True
        if not self._closed and code != ABNORMAL_CLOSURE:
            self._end(f"closed by the {self._us} ({code} {reason})")
            await self._reply(close_frame(code, reason, self._key()))
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await self._wait_close_reply()
        self._end(f"closed by the {self._us}")
        # The peer sees the end at once, not when Hypercorn's task gets to it.
        await trio.aclose_forcefully(self._stream)

    async def _wait_close_reply(self) -> None:
        """Read until the peer's close (or the end): closing first would reset it."""
        frames = self._frames
        while not self._broken:
            try:
                event = frames.next_event()
            except FrameError:
                return
            if isinstance(event, Close):
                return
            if event is not None:
                continue
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                return
            if not data:
                return
            frames.receive_data(bytes(data))
