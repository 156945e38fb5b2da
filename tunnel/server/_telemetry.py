"""Telemetry: the metrics and log lines of visitor requests and agent events.

The rule of this module: observing never changes what is sent. :class:`Telemetry`
wraps an ASGI ``send`` and only reads the messages going by, so what it counts
is what the visitor or agent really got, whichever part of the server answered.

Log lines are ``key=value`` pairs (logfmt) after an ``event=`` naming what
happened, one line each, values quoted and escaped when they need it, so a
value from the network can never start a line of its own::

    event=agent_connected tunnel=app.example.com peer=203.0.113.7:51234 identity="token …"
    event=agent_refused peer=203.0.113.9:40022 claimed=x.example.com status=401 reason="…"
    event=agent_disconnected tunnel=app.example.com peer=… duration=3600.125 reason="…"
    event=request client=198.51.100.4 host=app.example.com method=GET path=/ status=200
    duration=0.012 bytes=5120

(the last is one line; ``duration`` is always in seconds).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from .._asgi import ASGIApp, Message, Receive, Scope, Send
from .._config import ServerConfig
from .._protocol.handshake import HOST_HEADER
from .._protocol.headers import header_value
from .._protocol.hosts import host_from_authority
from ._metrics import ServerMetrics

__all__ = ["Telemetry", "access_logger", "claimed_host", "log_event", "logfmt", "peer_text"]


#: Where the per-request lines go (``ServerConfig.access_log``); a child of
#: ``tunnel.server``, so it can be routed or silenced on its own.
access_logger = logging.getLogger("tunnel.server.access")

_BARE = re.compile(r'[^\s"\\=]+')
#: Longest value logged; longer ones (paths, reasons) are cut.
MAX_VALUE = 300


def _value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)[:MAX_VALUE]
    if _BARE.fullmatch(text) and text.isprintable():
        return text
    # JSON escaping turns quotes, backslashes and control characters into
    # escapes, and so does the pass after it for any other character that is
    # not printable (U+2028 and its kind): a value can never end the line or
    # forge another pair.
    quoted = json.dumps(text, ensure_ascii=False)
    if quoted.isprintable():
        return quoted
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in quoted)


def logfmt(event: str, **fields: object) -> str:
    """``event=<event> key=value …``; None values are written as ``-``."""
    pairs = " ".join(f"{key}={_value(value)}" for key, value in fields.items())
    return f"event={event} {pairs}" if pairs else f"event={event}"


def log_event(
    logger: logging.Logger, event: str, level: int = logging.INFO, **fields: object
) -> None:
    """Log one logfmt line, formatted only if ``logger`` would emit it."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", logfmt(event, **fields))


def peer_text(peer: tuple[str, int] | tuple[Any, ...] | None) -> str | None:
    """``address:port`` (``[v6]:port``) of a peer, or None."""
    if not peer:
        return None
    address = str(peer[0])
    return f"[{address}]:{peer[1]}" if ":" in address else f"{address}:{peer[1]}"


def claimed_host(scope: Scope) -> str | None:
    """The host an agent's handshake claims, as sent (for logging a refusal)."""
    headers = scope["headers"]
    value = header_value(headers, HOST_HEADER.encode()) or header_value(headers, b"host")
    return value.decode("latin-1") if value else None


def _host(scope: Scope) -> str:
    return host_from_authority((header_value(scope["headers"], b"host") or b"").decode("latin-1"))


class Telemetry:
    """Counts each exchange in ``metrics`` and, if asked, logs it.

    Args:
        config: ``access_log`` and ``control_path`` are read from it.
        metrics: Where responses and handshakes are counted.
    """

    def __init__(self, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.access_log = config.access_log
        self.control_path = config.control_path

    async def http(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` for an HTTP request, watching its response go out."""
        started = time.perf_counter()
        status = 0
        sent = 0
        metrics = self.metrics

        async def watched(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status = message["status"]
                metrics.response(_host(scope), status, time.perf_counter() - started)
            await send(message)

        try:
            await app(scope, receive, watched)
        finally:
            if self.access_log:
                self._log(scope, "request", status, started, sent)

    async def websocket(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` for a WebSocket: an agent's handshake, or a visitor's."""
        started = time.perf_counter()
        status = 0
        metrics = self.metrics
        agent = scope["path"] == self.control_path

        async def watched(message: Message) -> None:
            nonlocal status
            if not status:
                kind = message["type"]
                if kind == "websocket.accept":
                    status = 101
                elif kind == "websocket.http.response.start":
                    status = message["status"]
                elif kind == "websocket.close":
                    status = 403  # closed before accepting: the server answers 403
                if status:
                    if agent:
                        metrics.handshake(status)
                    else:
                        metrics.response(_host(scope), status, time.perf_counter() - started)
            await send(message)

        try:
            await app(scope, receive, watched)
        finally:
            if self.access_log and not agent:
                self._log(scope, "websocket", status, started, None)

    def _log(self, scope: Scope, event: str, status: int, started: float, sent: int | None) -> None:
        client = scope.get("client")
        log_event(
            access_logger,
            event,
            client=client[0] if client else None,
            host=_host(scope),
            method=scope.get("method", "GET"),
            # The path without its query string, which may carry secrets.
            path=scope.get("path"),
            status=status or None,
            duration=time.perf_counter() - started,
            bytes=sent,
        )
