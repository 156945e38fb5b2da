"""Dialling another node of the cluster: TCP or TLS, then a WebSocket with both sides proven.

The dialling node signs its dial with the cluster secret and the node dialled
answers with a signature of its own (``_protocol/peer.py``); every error of the
network, TLS or the handshake becomes a :class:`PeerError` whose message says
what went wrong, for the log.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import time
from typing import Final

import trio

from .._config import ServerConfig
from .._config.values import split_host_port
from .._exceptions import ConfigError
from .._protocol.peer import (
    PEER_NODE_HEADER,
    PEER_NONCE_HEADER,
    PEER_PATH_SUFFIX,
    PEER_SIGNATURE_HEADER,
    PEER_SUBPROTOCOL,
    PEER_TIME_HEADER,
    accept_signature,
    dial_signature,
    signatures_match,
)
from .._transport.handshake import ClientHandshake, HandshakeRejected, open_client_websocket
from ..link import MAX_MESSAGE

__all__ = ["PeerDialer", "PeerError", "describe"]

logger = logging.getLogger("tunnel.server")

#: As the agent's: large enough for a peer's largest message, with a margin.
MAX_MESSAGE_SIZE: Final = 4 * MAX_MESSAGE


class PeerError(Exception):
    """A dial to another node failed; the message says why, for the log."""


def describe(error: BaseException) -> str:
    """What went wrong with a link to another node, in words."""
    if isinstance(error, HandshakeRejected):
        reason = error.body.decode("utf-8", "replace").strip()
        return f"refused with {error.status_code}: {reason or 'no reason given'}"
    return str(error) or type(error).__name__


class PeerDialer:
    """Opens links to other nodes for the node ``node_id`` with ``config``'s secret and TLS."""

    def __init__(self, config: ServerConfig, node_id: str) -> None:
        self.config = config
        self.node_id = node_id
        self._ssl_context: ssl.SSLContext | None = None

    async def dial(self, address: str) -> tuple[ClientHandshake, trio.abc.Stream]:
        """Open the WebSocket to the node at ``address``, both sides proven.

        Raises:
            PeerError: The node is unreachable, refused us, or did not prove
                it knows the cluster secret.
        """
        config = self.config
        secret = config.cluster_secret
        assert secret is not None
        try:
            host, port = split_host_port(address, what="peer address")
        except ConfigError as exc:
            raise PeerError(str(exc)) from None
        if port is None:
            raise PeerError(f"peer address {address!r} has no port")
        stream: trio.abc.Stream
        try:
            with trio.fail_after(config.handshake_timeout):
                if config.tls:
                    tls = await trio.open_ssl_over_tcp_stream(
                        host, port, ssl_context=self._tls(), https_compatible=True
                    )
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tls)
                        raise
                    stream = tls
                else:
                    stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise PeerError(f"no answer within {config.handshake_timeout:g}s") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise PeerError(
                    f"its TLS certificate is not trusted ({cause.verify_message}): it must "
                    f"name {host} and chain to a CA the system trusts or to a certificate "
                    "of this node's own chain file"
                ) from None
            raise PeerError(f"cannot connect: {cause or exc}") from None
        nonce = secrets.token_hex(16)
        timestamp = int(time.time())
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        headers = [
            (PEER_NODE_HEADER.encode(), self.node_id.encode()),
            (PEER_TIME_HEADER.encode(), str(timestamp).encode()),
            (PEER_NONCE_HEADER.encode(), nonce.encode()),
            (
                PEER_SIGNATURE_HEADER.encode(),
                dial_signature(secret, self.node_id, authority, timestamp, nonce).encode(),
            ),
        ]
        try:
            with trio.fail_after(config.handshake_timeout):
                ws = await open_client_websocket(
                    stream,
                    authority=authority,
                    path=config.control_path + PEER_PATH_SUFFIX,
                    subprotocols=[PEER_SUBPROTOCOL],
                    headers=headers,
                    max_message=MAX_MESSAGE_SIZE,
                    where=address,
                    peer="node",
                )
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            if isinstance(exc, HandshakeRejected):
                raise PeerError(describe(exc)) from None
            if isinstance(exc, trio.TooSlowError):
                raise PeerError(f"no handshake within {config.handshake_timeout:g}s") from None
            if isinstance(exc, Exception):
                raise PeerError(f"the WebSocket handshake failed: {exc}") from None
            raise
        answer = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ws.headers}
        node = answer.get(PEER_NODE_HEADER, "")
        proof = answer.get(PEER_SIGNATURE_HEADER, "")
        if not signatures_match(proof, accept_signature(secret, node, nonce)):
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            raise PeerError("the node did not prove it knows the cluster secret")
        return ws, stream

    def _tls(self) -> ssl.SSLContext:
        """How another node's certificate is checked.

        It must name the address this node dials (``node_address``) and chain
        to a CA the system trusts, or to a certificate of this node's own
        chain file: the nodes of a cluster often share one certificate, or a
        private CA whose certificate the chain file carries. (The cluster
        secret proves the node itself; TLS keeps what the link carries private.)
        """
        if self._ssl_context is None:
            context = ssl.create_default_context()
            if self.config.certificate is not None:
                # Any certificate of our chain is an anchor, the leaf included:
                # without this flag OpenSSL would insist on a self-signed root.
                context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
                try:
                    context.load_verify_locations(cafile=str(self.config.certificate))
                except (OSError, ssl.SSLError) as exc:
                    logger.warning(
                        "this node's certificate cannot be trusted for its peers (%s): only "
                        "the system's CAs are",
                        exc,
                    )
            self._ssl_context = context
        return self._ssl_context
