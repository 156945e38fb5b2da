"""The ASGI types, once: what the server's app, its parts and the agent's inspector pass around.

Plain mappings rather than Hypercorn's TypedDicts: the app reads and writes only the
keys the ASGI specification names, and passes on what it does not know. Also here: the three
extensions the server's app and its Hypercorn (``tunnel/server/hypercorn/``) agree on, so
that the app needs nothing from Hypercorn's side to use them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, TypeAlias

__all__ = [
    "BODY_FOLLOWS",
    "RESET_CODE",
    "ASGIApp",
    "Message",
    "NotifyingReceive",
    "Receive",
    "Scope",
    "Send",
]

#: A connection's scope (``type``, ``path``, ``headers``...).
Scope: TypeAlias = MutableMapping[str, Any]
#: An event received from, or sent to, the server.
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
#: An ASGI 3 application.
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The scope key an app sets to the HTTP/2 error code that its unfinished response is
#: reset with (see ``tunnel/server/hypercorn/_patches/h2_responses.py``).
RESET_CODE: Final = "tunnel.reset_code"

#: A key an app sets (true) in ``http.response.start`` when it sends the first
#: ``http.response.body`` at once, with nothing to wait for in between: the server may
#: then hold the head to write it with the body, in one system call (see
#: ``tunnel/server/hypercorn/_patches/response_head.py``). A server that does not know
#: the key ignores it, as ASGI servers do with keys they do not know.
BODY_FOLLOWS: Final = "tunnel.body_follows"


class NotifyingReceive:
    """The ``receive`` of one HTTP request, which also tells of the visitor leaving.

    Hypercorn hands this out instead of a plain ``receive`` where its disconnect
    notice is on (``tunnel/server/hypercorn/_patches/disconnect_notice.py``). Set
    :attr:`on_disconnect` to a function (synchronous, must not raise) and it is called
    when the visitor's connection or stream closes, even if no task waits in
    ``receive()``. Set it back to None when done: Hypercorn also closes the stream after
    a complete response.
    """

    __slots__ = ("_receive", "gone", "on_disconnect")

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self.on_disconnect: Any = None
        #: Whether ``http.disconnect`` has been queued (perhaps before
        #: :attr:`on_disconnect` was set).
        self.gone = False

    async def __call__(self) -> Any:
        return await self._receive()
