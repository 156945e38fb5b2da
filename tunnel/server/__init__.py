"""The tunnel server: the ASGI app, its registry of agents, and :func:`serve`."""

from __future__ import annotations

from .._config.hooks import Callbacks as Callbacks
from .._config.hooks import ConnectRequest as ConnectRequest
from .._config.hooks import RequestInfo as RequestInfo
from .._config.hooks import TunnelInfo as TunnelInfo
from ._app import TunnelApp as TunnelApp
from ._registry import TunnelStatistics as TunnelStatistics
from .hypercorn._config import hypercorn_config as hypercorn_config
from .hypercorn._serve import serve as serve
