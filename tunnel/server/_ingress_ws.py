"""Public WebSockets: a visitor's WebSocket becomes an extended CONNECT stream (RFC 8441).

Hypercorn terminates the visitor's WebSocket and hands us whole messages; here
they are framed again (with wsproto, as a WebSocket client) into the stream,
whose bytes the agent copies to a WebSocket it opened to the local service.
Close codes and reasons travel both ways; pings from the local service are
answered here, and Hypercorn answers the visitor's.
"""

from __future__ import annotations

import logging
from typing import Final

import h2.errors
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from .._asgi import Receive, Scope, Send
from .._config import ServerConfig
from .._protocol.headers import header_value, tunnel_request_headers, websocket_connect_headers
from ..link import Stream, StreamError
from ._pages import refuse_websocket
from ._registry import Session

__all__ = ["forward_visitor_websocket"]

logger = logging.getLogger("tunnel.server")


#: The close reason of a message over ``ServerConfig.max_websocket_message``.
TOO_BIG: Final = "message too big for the tunnel"
#: How much of a refusal's body from the local service is shown to the visitor.
MAX_REFUSAL_BODY: Final = 64 << 10
#: How long the other side gets to answer a close before the stream is reset.
CLOSE_TIMEOUT: Final = 2.0
#: Codes that may not be sent in a close frame (RFC 6455 section 7.4.1).
_RESERVED_CODES: Final = frozenset({1005, 1006, 1015})


async def forward_visitor_websocket(
    config: ServerConfig, session: Session, scope: Scope, receive: Receive, send: Send
) -> None:
    """Join one visitor WebSocket to the local service through ``session``."""
    if (await receive())["type"] != "websocket.connect":
        return
    client = scope.get("client")
    headers = websocket_connect_headers(
        tunnel_request_headers(
            method="GET",
            scheme="https" if scope.get("scheme") == "wss" else "http",
            path=scope.get("raw_path") or scope["path"].encode("utf-8"),
            query_string=scope.get("query_string", b""),
            headers=scope["headers"],
            client=client[0] if client else None,
            trust_forwarded=config.trust_forwarded_headers,
        )
    )
    host = session.host
    try:
        with trio.fail_after(config.grace_period):
            stream = await session.link.open_stream(headers, end_stream=False)
    except trio.TooSlowError:
        await refuse_websocket(scope, send, 503, f"The agent for {host} is at its limit.")
        return
    except StreamError as exc:
        await refuse_websocket(scope, send, 502, f"The agent for {host} is unavailable: {exc}")
        return
    session.requests_served += 1
    try:
        with trio.fail_after(config.response_timeout):
            response = await stream.receive_headers()
    except trio.TooSlowError:
        stream.cancel(h2.errors.ErrorCodes.CANCEL)
        await refuse_websocket(
            scope,
            send,
            504,
            f"The service behind {host} did not answer within {config.response_timeout:g}s.",
        )
        return
    except StreamError as exc:
        await refuse_websocket(scope, send, 502, f"The agent for {host} could not answer: {exc}")
        return
    status = int(header_value(response, b":status") or b"502")
    if status != 200:
        # The local service (or the agent) refused the upgrade: the visitor
        # gets that refusal, its status and its explanation.
        reason = f"The service behind {host} refused the WebSocket ({status})."
        with trio.move_on_after(config.response_timeout):
            reason = await _read_refusal(stream) or reason
        if not stream.done:
            stream.cancel(h2.errors.ErrorCodes.NO_ERROR)
        await refuse_websocket(scope, send, status, reason)
        return

    subprotocol = header_value(response, b"sec-websocket-protocol")
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": subprotocol.decode("ascii") if subprotocol else None,
        }
    )
    relay = _Relay(stream, receive, send, config.max_websocket_message)
    try:
        await relay.run()
    finally:
        if not stream.done:
            stream.cancel(h2.errors.ErrorCodes.CANCEL)


async def _read_refusal(stream: Stream) -> str:
    body = bytearray()
    try:
        while len(body) < MAX_REFUSAL_BODY:
            data = await stream.receive_data()
            if not data:
                break
            body += data
            stream.acknowledge()
    except StreamError:
        pass
    return body[:MAX_REFUSAL_BODY].decode("utf-8", "replace")


class _Relay:
    """Messages both ways between the visitor (ASGI) and the stream (wsproto frames)."""

    def __init__(self, stream: Stream, receive: Receive, send: Send, max_message: int) -> None:
        self.stream = stream
        self.receive = receive
        self.send = send
        #: Larger messages close the WebSocket (1009) whichever way they go.
        self.max_message = max_message
        # Towards the local service this side is the WebSocket client: its
        # frames are masked, as a server expects.
        self.ws = Connection(ConnectionType.CLIENT)
        self.visitor_closed = False

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._from_visitor, nursery.cancel_scope)
            await self._from_local()
            nursery.cancel_scope.cancel()

    async def _close_visitor(self, code: int, reason: str) -> None:
        if not self.visitor_closed:
            self.visitor_closed = True
            await self.send({"type": "websocket.close", "code": code, "reason": reason})

    async def _from_local(self) -> None:
        ws, stream = self.ws, self.stream
        parts: list[str | bytes] = []
        size = 0
        while True:
            try:
                data = await stream.receive_data()
            except StreamError:
                await self._close_visitor(1011, "the tunnel to the service was lost")
                return
            if not data:
                await self._close_visitor(1011, "the service closed the connection")
                return
            ws.receive_data(data)
            stream.acknowledge()
            for event in ws.events():
                if isinstance(event, Message):
                    size += len(event.data)
                    if size > self.max_message:
                        await self._fail(1009, TOO_BIG)
                        return
                    parts.append(event.data)
                    if event.message_finished:
                        await self._to_visitor(parts, isinstance(event, TextMessage))
                        parts, size = [], 0
                elif isinstance(event, Ping):
                    if ws.state is ConnectionState.OPEN:
                        await stream.send_data(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        await stream.send_data(ws.send(event.response()), end_stream=True)
                    elif not stream.local_ended:
                        stream.end()
                    code = event.code if event.code not in _RESERVED_CODES else 1000
                    await self._close_visitor(code, event.reason or "")
                    return

    async def _to_visitor(self, parts: list[str | bytes], text: bool) -> None:
        if text:
            await self.send({"type": "websocket.send", "text": "".join(parts)})  # type: ignore[arg-type]
        else:
            await self.send({"type": "websocket.send", "bytes": b"".join(parts)})  # type: ignore[arg-type]

    async def _fail(self, code: int, reason: str) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            if self.ws.state is ConnectionState.OPEN:
                await self.stream.send_data(self.ws.send(CloseConnection(code, reason)))
        await self._close_visitor(code, reason)

    async def _from_visitor(self, cancel_scope: trio.CancelScope) -> None:
        ws, stream = self.ws, self.stream
        try:
            while True:
                message = await self.receive()
                if message["type"] == "websocket.receive":
                    text = message.get("text")
                    event = (
                        TextMessage(data=text)
                        if text is not None
                        else BytesMessage(data=message.get("bytes") or b"")
                    )
                    if len(event.data) > self.max_message:
                        # Hypercorn's own limit is at least the agents' messages'.
                        await self._fail(1009, TOO_BIG)
                        cancel_scope.cancel()
                        return
                    if ws.state is not ConnectionState.OPEN:
                        continue  # the local side is closing; the message has nowhere to go
                    await stream.send_data(ws.send(event))
                elif message["type"] == "websocket.disconnect":
                    self.visitor_closed = True
                    code = int(message.get("code", 1000))
                    reason = str(message.get("reason") or "")
                    if code in _RESERVED_CODES:
                        code = 1001  # the visitor vanished: "going away"
                    if ws.state is ConnectionState.OPEN:
                        await stream.send_data(ws.send(CloseConnection(code, reason)))
                    # Give the local service a moment to answer the close, then
                    # end the stream whatever it did.
                    cancel_scope.deadline = min(
                        cancel_scope.deadline, trio.current_time() + CLOSE_TIMEOUT
                    )
                    return
        except StreamError:
            cancel_scope.cancel()
