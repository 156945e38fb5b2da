"""The ASGI types, once: what the server's app, its parts and the agent's inspector pass around.

Plain mappings rather than Hypercorn's TypedDicts: the app reads and writes only the
keys the ASGI specification names, and passes on what it does not know.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send"]

#: A connection's scope (``type``, ``path``, ``headers``...).
Scope: TypeAlias = MutableMapping[str, Any]
#: An event received from, or sent to, the server.
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
#: An ASGI 3 application.
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
