"""The agent's HTTP/2 connection to the local service: opened on first use, shared, replaced.

The connection is opened on first use, shared until it goes away (GOAWAY, a lost
socket), then replaced by the next request that needs one. New streams wait while
the local service's ``MAX_CONCURRENT_STREAMS`` is reached. What goes over it, request
by request, is ``_upstream_h2.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
from collections.abc import Sequence
from typing import Final

import trio

from .._protocol.headers import Headers
from .._settings import client_setting
from .._transport import ABNORMAL_CLOSURE, TransportClosed
from ..link import Link, Stream, StreamError
from ._upstream import LocalFailure, has_bytes_waiting, tls_failure

__all__ = ["LocalH2", "local_ssl_context"]

logger = logging.getLogger("tunnel.client")

#: What one read from the local service's socket may return.
RECEIVE_SIZE: Final = 256 << 10
#: Streams the local service may open towards us: none (it is the server), but
#: h2 needs a number, and 0 would be taken as "no streams at all" by some peers.
PEER_STREAMS: Final = 100
#: Scheduler passes a request waits, at most, for the reader of an idle
#: connection with bytes waiting to take them in (its end, most often).
_SETTLE_PASSES: Final = 3


class _SocketTransport:
    """A byte stream (TCP or TLS) as the link's :class:`MessageTransport`.

    HTTP/2 frames need no message boundaries, so each "message" is simply
    whatever one read returned.
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed(f"the local service's connection broke: {exc}") from None

    async def receive(self) -> bytes:
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed(f"the local service's connection broke: {exc}") from None
        if not data:
            raise TransportClosed("the local service closed the connection")
        return bytes(data)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if code == ABNORMAL_CLOSURE:
            await trio.aclose_forcefully(self._stream)
            return
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._stream)


class LocalH2:
    """HTTP/2 to the local service: one shared connection, replaced when it goes away.

    Run :meth:`serve` in a nursery first; it owns the connection's tasks.

    Args:
        host: Where the local service listens.
        port: Its port.
        ssl_context: TLS with ALPN ``h2`` (``local_protocol="h2"``), or None for
            cleartext with prior knowledge (``h2c``).
        connect_timeout: Seconds a connection (TCP, TLS, the peer's SETTINGS)
            may take.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        #: Whether the local service speaks HTTP/2: None until a connection
        #: attempt got an answer either way (what ``auto`` remembers).
        self.supported: bool | None = None
        self._link: Link | None = None
        #: The socket under ``_link``.
        self._socket: trio.abc.Stream | None = None
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    @property
    def label(self) -> str:
        """``host:port``, for messages."""
        return f"{self.host}:{self.port}"

    @property
    def scheme(self) -> bytes:
        """The ``:scheme`` of requests to the local service."""
        return b"http" if self.ssl_context is None else b"https"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connections' tasks until cancelled; never returns."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._link = None

    async def open_stream(self, headers: Headers, *, end_stream: bool) -> Stream:
        """Open a stream to the local service, connecting first if needed.

        Raises:
            LocalFailure: The local service cannot be reached over HTTP/2.
        """
        for attempt in range(2):
            link = await self._connection()
            try:
                return await link.open_stream(headers, end_stream=end_stream)
            except StreamError as exc:
                # The connection went away between the check and the stream
                # (GOAWAY, a lost socket): nothing reached the service, so a
                # new connection may take the request.
                if attempt:
                    raise LocalFailure(
                        502, f"The local service at {self.label} refused the request: {exc}"
                    ) from None
        raise AssertionError("unreachable")

    async def probe(self) -> bool:
        """Whether the local service speaks HTTP/2; asked once, then remembered."""
        if self.supported is None:
            with contextlib.suppress(LocalFailure):
                await self._connection()
        return bool(self.supported)

    async def _connection(self) -> Link:
        link = self._link
        if link is not None and link.accepting and link.open_streams == 0:
            # An idle connection's socket with something to read most likely
            # holds its end (the service restarted, a proxy dropped it), not
            # yet seen by the link's reader: let the reader run before a
            # request is written into a dead connection and lost with it.
            # Only when idle, so a busy connection pays nothing.
            for _ in range(_SETTLE_PASSES):
                if not (link.accepting and self._socket is not None and _waiting(self._socket)):
                    break
                await trio.lowlevel.checkpoint()
        if link is not None and link.accepting:
            return link
        async with self._lock:
            link = self._link
            if link is not None and link.accepting:
                return link
            if self._nursery is None:
                raise LocalFailure(502, "The agent is shutting down.")
            started: Link = await self._nursery.start(self._run_connection)
            self._link = started
            return started

    async def _run_connection(self, task_status: trio.TaskStatus[Link]) -> None:
        socket = await self._connect()
        self._socket = socket
        link = Link.opener(
            _SocketTransport(socket),
            # No PINGs: gRPC servers count a PING more often than every five
            # minutes as abuse and send GOAWAY (too_many_pings) after two, which
            # would end long calls. A local service that dies closes its socket.
            keepalive_interval=math.inf,
            keepalive_timeout=math.inf,
            max_concurrent_streams=PEER_STREAMS,
            # A peer the agent's user runs, so trusted more: gRPC servers send
            # a PING to estimate bandwidth (BDP) after bursts of DATA, which
            # under load passes the flood limit meant for hostile peers and
            # would drop every call on the connection; and connection
            # WINDOW_UPDATEs as they tune their windows, not to make us work.
            trusted_peer_frames=True,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_link, link)
            with trio.move_on_after(self.connect_timeout):
                if await link.wait_peer_settings():
                    self.supported = True
                    task_status.started(link)
                    return  # the nursery keeps the connection until it ends
            # An HTTP/1.1-only service answers the preface with an error (or
            # nothing): it does not speak HTTP/2, and ``auto`` remembers that.
            reason = link.closed_reason or "no HTTP/2 SETTINGS in time"
            link.close(reason, ABNORMAL_CLOSURE)
        if self.supported is None:
            self.supported = False
        raise LocalFailure(
            502, f"The local service at {self.label} does not speak HTTP/2 ({reason})."
        )

    async def _run_link(self, link: Link) -> None:
        reason = await link.run()
        logger.debug("HTTP/2 connection to the local service %s ended: %s", self.label, reason)
        if self._link is link:
            self._link = None

    async def _connect(self) -> trio.abc.Stream:
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
                if self.ssl_context is None:
                    return tcp
                tls = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.host)
                try:
                    await tls.do_handshake()
                except (OSError, trio.BrokenResourceError) as exc:
                    await trio.aclose_forcefully(tcp)
                    raise tls_failure(self.label, exc) from None
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
        except trio.TooSlowError:
            raise LocalFailure(
                502, f"The local service at {self.label} did not accept a connection in time."
            ) from None
        except (OSError, trio.BrokenResourceError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise LocalFailure(
                502,
                f"The tunnel's agent could not reach the local service at {self.label}: "
                f"{detail or type(exc).__name__}.",
            ) from None
        if tls.selected_alpn_protocol() != "h2":
            await trio.aclose_forcefully(tls)
            self.supported = False
            raise LocalFailure(
                502,
                f"The local service at {self.label} did not agree to HTTP/2 over TLS (ALPN); "
                f"for HTTP/1.1 over TLS set {client_setting('local_protocol')} 'http1' "
                f"and {client_setting('local_tls')}.",
            )
        return tls


def _waiting(stream: trio.abc.Stream) -> bool:
    try:
        return has_bytes_waiting(stream)
    except (OSError, ValueError):
        return False  # closed: the link's reader reports it


def local_ssl_context(
    ca_file: str | os.PathLike[str] | None, insecure_skip_verify: bool, alpn: Sequence[str]
) -> ssl.SSLContext:
    """A TLS context for the local service, offering ``alpn`` (``"h2"``, ``"http/1.1"``)."""
    context = ssl.create_default_context(cafile=None if ca_file is None else os.fspath(ca_file))
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(list(alpn))
    return context
