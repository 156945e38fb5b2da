"""The tunnel server: the ASGI app, its registry of agents, and :func:`serve`."""

from __future__ import annotations

from ._app import TunnelApp as TunnelApp
from ._hooks import Callbacks as Callbacks
from ._hooks import ConnectRequest as ConnectRequest
from ._hooks import RequestInfo as RequestInfo
from ._hooks import TunnelInfo as TunnelInfo
from ._registry import TunnelStatistics as TunnelStatistics
from ._serve import hypercorn_config as hypercorn_config
from ._serve import serve as serve
