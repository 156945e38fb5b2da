"""The local service as the agent reaches it: its connections, and which one serves a stream.

An HTTP request goes over HTTP/1.1 (a keep-alive pool, ``_upstream.py``) or HTTP/2
(``_upstream_h2.py``) as ``ClientConfig.local_protocol`` says; a visitor's WebSocket and a
TCP tunnel's connections get a connection of their own (``_upstream_raw.py``).
"""

from __future__ import annotations

from .._config import ClientConfig
from .._protocol.headers import header_value, is_websocket_connect
from ..link import Stream, answer_error
from ._observe import Observer
from ._upstream import LocalPool, relay_local_http
from ._upstream_h2 import needs_h2, relay_local_h2
from ._upstream_h2_conn import LocalH2, local_ssl_context
from ._upstream_raw import relay_local_tcp, relay_local_websocket

__all__ = ["local_h2", "local_pool", "relay_to_local"]


def local_pool(config: ClientConfig) -> LocalPool:
    """The pool of HTTP/1.1 connections (and raw ones) to the local service."""
    return LocalPool(
        config.local_host,
        config.port,
        max_idle=config.local_pool_size,
        connect_timeout=config.local_connect_timeout,
        ssl_context=(
            local_ssl_context(config.local_ca_file, config.local_insecure_skip_verify, ["http/1.1"])
            if config.local_tls or config.local_protocol == "h2"
            else None
        ),
    )


def local_h2(config: ClientConfig) -> LocalH2 | None:
    """HTTP/2 to the local service, unless it is only ever spoken HTTP/1.1 to."""
    if config.local_protocol == "http1" or config.tcp:
        return None
    tls = config.local_protocol == "h2" or config.local_tls
    return LocalH2(
        config.local_host,
        config.port,
        ssl_context=(
            local_ssl_context(
                config.local_ca_file,
                config.local_insecure_skip_verify,
                # auto may land on HTTP/1.1 over the same TLS; h2 must not.
                ["h2"] if config.local_protocol == "h2" else ["h2", "http/1.1"],
            )
            if tls
            else None
        ),
        connect_timeout=config.local_connect_timeout,
    )


async def relay_to_local(
    stream: Stream,
    config: ClientConfig,
    pool: LocalPool,
    local_h2: LocalH2 | None,
    observer: Observer | None,
) -> None:
    """Serve one stream from the server with the local service, whatever it carries."""
    assert stream.headers is not None
    if is_websocket_connect(stream.headers):
        await relay_local_websocket(stream, pool)
    elif header_value(stream.headers, b":method") == b"CONNECT":
        if config.tcp:
            # Whatever target the CONNECT names, only the local port is
            # ever dialled: never an open proxy.
            await relay_local_tcp(stream, pool)
        else:
            await answer_error(stream, 405, "This tunnel does not proxy CONNECT requests.")
    elif local_h2 is not None and (
        config.local_protocol != "auto" or (needs_h2(stream.headers) and await local_h2.probe())
    ):
        await relay_local_h2(stream, local_h2, observer)
    else:
        await relay_local_http(stream, pool, observer)
