"""Reaching the server: the byte stream, TLS, and the errors an attempt ends with.

Every error of the network, TLS or the WebSocket handshake is translated here into
tunnel's own (:class:`~tunnel.ServerUnreachableError`, a :class:`~tunnel.RejectedError`
for a refusal retrying cannot fix...), with a message that says what to do.
"""

from __future__ import annotations

import ssl

import trio

from .._config import ClientConfig
from .._config.values import ServerAddress
from .._exceptions import (
    ServerUnreachableError,
    TunnelError,
    UntrustedCertificateError,
    is_permanent,
    rejection_for_status,
)
from .._protocol.handshake import DUPLICATE_STATUS, NODES_HEADER
from .._settings import client_setting
from .._transport.handshake import HandshakeFailed, HandshakeRejected

__all__ = [
    "DuplicateWorker",
    "first_error",
    "open_server_stream",
    "server_ssl_context",
    "translate_error",
]


class DuplicateWorker(Exception):
    """The connection reached a server worker or node another connection holds already.

    Or, looking for another worker of one node, it reached another node.
    ``nodes``: how many nodes the refusing server said its cluster has, if it did.
    """

    def __init__(self, *args: object, nodes: int | None = None) -> None:
        super().__init__(*args)
        self.nodes = nodes


async def open_server_stream(
    config: ClientConfig, server: ServerAddress | None = None
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """A byte stream to ``server`` (default: the first), TLS done; errors in tunnel's words."""
    if server is None:
        server = config.server
    try:
        with trio.fail_after(config.connect_timeout):
            if server.scheme == "ws":
                return await trio.open_tcp_stream(server.host, server.port)
            stream = await trio.open_ssl_over_tcp_stream(
                server.host,
                server.port,
                ssl_context=server_ssl_context(config),
                https_compatible=True,
            )
            # Shake hands now: a bad certificate is then this attempt's
            # clear error, not a silent stall inside the WebSocket handshake.
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return stream
    except Exception as exc:
        raise translate_error(exc, config, server=server) from None


def translate_error(
    exc: BaseException,
    config: ClientConfig,
    *,
    server: ServerAddress | None = None,
    probing: bool = False,
) -> BaseException:
    """The error to raise for ``exc``: ours for the network's, others unchanged.

    ``server``: the address dialled (default: the first). ``probing``: the
    handshake named server workers or nodes this agent holds (or the one node
    it wants), so a refusal with ``DUPLICATE_STATUS`` means "not this one"
    (:class:`DuplicateWorker`).
    """
    if server is None:
        server = config.server
    where = f"{server.host}:{server.port}"
    if isinstance(exc, TunnelError | DuplicateWorker):
        return exc
    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, ssl.SSLError):
        exc = exc.__cause__
    if isinstance(exc, HandshakeRejected):
        if exc.status_code == DUPLICATE_STATUS and probing:
            told = dict(exc.headers).get(NODES_HEADER.encode(), b"")
            return DuplicateWorker(nodes=int(told) if told.isdigit() else None)
        reason = exc.body.decode("utf-8", "replace").strip() or "no reason given"
        if is_permanent(exc.status_code):
            return rejection_for_status(exc.status_code, reason)
        return ServerUnreachableError(f"{where} answered {exc.status_code}: {reason}")
    if isinstance(exc, trio.TooSlowError):
        return ServerUnreachableError(f"no answer from {where} within {config.connect_timeout:g}s")
    if isinstance(exc, ssl.SSLCertVerificationError):
        # The certificate itself is refused: every retry would be too.
        detail = exc.verify_message or exc.reason or str(exc)
        return UntrustedCertificateError(
            f"the TLS certificate of {where} is not trusted ({detail}); "
            f"if it comes from a private CA, give that CA's PEM file with "
            f"{client_setting('ca_file')} (for tests only, "
            f"{client_setting('insecure_skip_verify')} skips the check)"
        )
    if isinstance(exc, ssl.SSLError):
        return ServerUnreachableError(f"TLS with {where} failed: {exc.reason or exc}")
    if isinstance(exc, HandshakeFailed):
        said = str(exc) or "the server did not complete it"
        return ServerUnreachableError(f"the WebSocket handshake with {where} failed: {said}")
    if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ServerUnreachableError(f"cannot reach {where}: {detail or type(exc).__name__}")
    return exc


def server_ssl_context(config: ClientConfig) -> ssl.SSLContext:
    """How the agent checks the server's certificate (``ca_file``, ``insecure_skip_verify``)."""
    context = ssl.create_default_context(
        cafile=None if config.ca_file is None else str(config.ca_file)
    )
    if config.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The most telling error in ``group``: a refusal beats a broken socket."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    collect(group)
    if not leaves:
        return group
    kinds = (
        TunnelError,
        DuplicateWorker,
        HandshakeRejected,
        HandshakeFailed,
    )
    for kind in kinds:
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]
