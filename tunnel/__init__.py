"""tunnel: expose a local service through a public server you run yourself.

A self-hostable alternative to ngrok for Trio programs. The server is an ASGI
app under Hypercorn; agents connect to it over one WebSocket each and receive
visitors' requests as HTTP/2 streams.
"""

from __future__ import annotations

from ._config import ClientConfig as ClientConfig
from ._config import ServerConfig as ServerConfig
from ._configfile import load_client_config as load_client_config
from ._configfile import load_server_config as load_server_config
from ._exceptions import AuthenticationError as AuthenticationError
from ._exceptions import ConfigError as ConfigError
from ._exceptions import ConnectionLostError as ConnectionLostError
from ._exceptions import HostInUseError as HostInUseError
from ._exceptions import HostRejectedError as HostRejectedError
from ._exceptions import ProtocolVersionError as ProtocolVersionError
from ._exceptions import RejectedError as RejectedError
from ._exceptions import ServerUnreachableError as ServerUnreachableError
from ._exceptions import StoreUnavailableError as StoreUnavailableError
from ._exceptions import TunnelError as TunnelError
from ._exceptions import UntrustedCertificateError as UntrustedCertificateError
from ._protocol.limits import RateLimit as RateLimit
from .client import Client as Client
from .client import ClientState as ClientState
from .client import Exchange as Exchange
from .client import ExchangeObserver as ExchangeObserver
from .client import Observer as Observer
from .client import ReconnectWait as ReconnectWait
from .client import Recorder as Recorder
from .client import RecorderStatistics as RecorderStatistics
from .client import open_tunnel as open_tunnel
from .server import Callbacks as Callbacks
from .server import ConnectRequest as ConnectRequest
from .server import RequestInfo as RequestInfo
from .server import TunnelApp as TunnelApp
from .server import TunnelInfo as TunnelInfo
from .server import TunnelStatistics as TunnelStatistics
from .server import hypercorn_config as hypercorn_config
from .server import serve as serve

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Callbacks",
    "Client",
    "ClientConfig",
    "ClientState",
    "ConfigError",
    "ConnectRequest",
    "ConnectionLostError",
    "Exchange",
    "ExchangeObserver",
    "HostInUseError",
    "HostRejectedError",
    "Observer",
    "ProtocolVersionError",
    "RateLimit",
    "ReconnectWait",
    "Recorder",
    "RecorderStatistics",
    "RejectedError",
    "RequestInfo",
    "ServerConfig",
    "ServerUnreachableError",
    "StoreUnavailableError",
    "TunnelApp",
    "TunnelError",
    "TunnelInfo",
    "TunnelStatistics",
    "UntrustedCertificateError",
    "__version__",
    "hypercorn_config",
    "load_client_config",
    "load_server_config",
    "open_tunnel",
    "serve",
]
