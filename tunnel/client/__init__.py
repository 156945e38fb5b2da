"""The tunnel agent: connects out to a server and forwards requests to a local service."""

from __future__ import annotations

from ._client import Client as Client
from ._client import open_tunnel as open_tunnel
from ._state import ClientState as ClientState
