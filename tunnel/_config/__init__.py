"""Configuration: the server's and the agent's settings, frozen dataclasses that validate.

- ``server.py``: :class:`~tunnel.ServerConfig`; ``hooks.py``: what its auth hook and
  callbacks receive (:class:`~tunnel.ConnectRequest`, :class:`~tunnel.TunnelInfo`...).
- ``client.py``: :class:`~tunnel.ClientConfig`.
- ``values.py``: addresses and durations, read and checked the same way for both.

Nothing here imports the server or the agent: they import this.
"""

from __future__ import annotations

from .client import ClientConfig as ClientConfig
from .server import ServerConfig as ServerConfig
from .values import ServerAddress as ServerAddress
from .values import parse_listen_address as parse_listen_address
from .values import parse_server_address as parse_server_address
