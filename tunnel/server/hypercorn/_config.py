"""The Hypercorn settings a tunnel server runs with."""

from __future__ import annotations

import logging
import os

import hypercorn.config

from ..._config import ServerConfig, parse_listen_address
from ...link import MAX_MESSAGE
from ._patches.websocket_queue import set_websocket_buffer

__all__ = ["hypercorn_config"]


def hypercorn_config(config: ServerConfig) -> hypercorn.config.Config:
    """The Hypercorn settings :func:`serve` uses for ``config``.

    Start from these when embedding :class:`TunnelApp` in your own Hypercorn
    deployment: they lift the limits that hurt a busy tunnel. (:func:`serve`
    also turns Hypercorn's ``Date`` header off and dates the responses that
    have none itself, so a tunnelled response carries only its origin's.)
    """
    host, port = parse_listen_address(config.address)
    hc = hypercorn.config.Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if config.certificate is not None and config.key is not None:
        hc.certfile = os.fspath(config.certificate)
        hc.keyfile = os.fspath(config.key)
    # A visitor's keep-alive connection may carry any number of requests; the
    # default of 1000 makes busy clients reconnect for nothing.
    hc.keep_alive_max_requests = 2**31
    # Hypercorn listens with a backlog of 100: a burst of new visitors beyond it
    # (thousands of requests in flight through one tunnel, each on its own
    # connection) overflows the accept queue, and the kernel drops their SYNs
    # (a 1 s retransmit each) or the connections they thought were open. The
    # kernel caps this at net.core.somaxconn (4096 by default since Linux 5.4).
    hc.backlog = 4096
    hc.graceful_timeout = config.graceful_timeout
    hc.include_server_header = False
    hc.accesslog = None
    hc.errorlog = logging.getLogger("tunnel.server")
    # Agents' messages (at most MAX_MESSAGE) pass the same check as visitors',
    # which the tunnel enforces itself (see _ingress_ws.py). The margin lets an
    # agent's frame over HTTP/2's limit be refused by the link, with that reason,
    # rather than by Hypercorn with a bare 1009.
    hc.websocket_max_message_size = max(config.max_websocket_message, 2 * MAX_MESSAGE)
    set_websocket_buffer(hc, config.max_websocket_buffer)
    # Hypercorn's idle timer runs from a connection's start, or the end of a
    # response, until the next request's headers are complete.
    hc.keep_alive_timeout = config.header_timeout
    # Above our own header limit, so visitors get its clear 431 rather than
    # Hypercorn's bare 400.
    hc.h11_max_incomplete_size = max(64 << 10, 2 * config.max_header_bytes)
    return hc
