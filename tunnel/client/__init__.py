"""The tunnel agent: connects out to a server and forwards requests to a local service."""

from __future__ import annotations

from ._client import Client as Client
from ._client import open_tunnel as open_tunnel
from ._observe import Exchange as Exchange
from ._observe import ExchangeObserver as ExchangeObserver
from ._observe import Observer as Observer
from ._observe import Recorder as Recorder
from ._observe import RecorderStatistics as RecorderStatistics
from ._state import ClientState as ClientState
from ._state import ReconnectWait as ReconnectWait
