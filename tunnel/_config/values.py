"""How a setting's single value is read and checked: addresses and durations.

Shared by the server's settings (``server.py``) and the agent's (``client.py``); a bad
value fails with a :class:`~tunnel.ConfigError` naming the setting (as the command line,
the config file or the API spells it, see ``tunnel/_settings.py``) and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from .._exceptions import ConfigError
from .._settings import Setting, client_setting, server_setting

__all__ = [
    "ServerAddress",
    "parse_listen_address",
    "parse_server_address",
    "positive_seconds",
    "split_host_port",
]


def positive_seconds(setting: Setting, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{setting} must be a positive number of seconds, got {value!r}")


def split_host_port(text: str, *, what: str) -> tuple[str, int | None]:
    """Split ``host:port``, ``[v6]:port``, ``:port`` or ``host``."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ConfigError(f"{what} {text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{what} {text!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} {text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def parse_listen_address(address: str) -> tuple[str, int]:
    """Parse a server's ``host:port``; ``:port`` listens on every interface.

    Example:
        >>> parse_listen_address(":8000")
        ('0.0.0.0', 8000)
    """
    what = server_setting("address")
    host, port = split_host_port(address.strip(), what=f"{what}")
    if port is None:
        raise ConfigError(
            f"{what} {address!r} has no port; write it as 'host:port', "
            "for example '127.0.0.1:8000', or ':8000' for every interface"
        )
    return host or "0.0.0.0", port


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where the agent dials: WebSocket scheme, host name and port."""

    scheme: Literal["ws", "wss"]
    host: str
    port: int

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.scheme == "wss" else 80)


def parse_server_address(address: str) -> ServerAddress:
    """Parse the agent's ``address``: ``host:port`` or a URL.

    ``http://`` and ``ws://`` mean plain, ``https://`` and ``wss://`` mean TLS.
    Without a scheme, port 443 means TLS and any other port plain, as in the Go
    library this API comes from (``sub.example.com:443``).
    """
    text = address.strip()
    what = client_setting("address")
    scheme: Literal["ws", "wss"] | None = None
    if "://" in text:
        given, text = text.split("://", 1)
        schemes: dict[str, Literal["ws", "wss"]] = {
            "http": "ws",
            "ws": "ws",
            "https": "wss",
            "wss": "wss",
        }
        if given.lower() not in schemes:
            raise ConfigError(
                f"{what} {address!r}: unknown scheme {given!r}; use http, https, ws or wss"
            )
        scheme = schemes[given.lower()]
        text = text.split("/", 1)[0]
    if "@" in text:
        raise ConfigError(
            f"{what} {address!r}: credentials do not belong in the address; "
            f"pass the secret as {client_setting('token')}"
        )
    host, port = split_host_port(text, what=f"{what}")
    if not host:
        raise ConfigError(f"{what} {address!r} has no host name")
    if port is None:
        if scheme is None:
            raise ConfigError(
                f"{what} {address!r} has no port; write 'host:port' "
                "or a URL such as 'https://tunnel.example.com'"
            )
        port = 443 if scheme == "wss" else 80
    if port == 0:
        raise ConfigError(f"{what} {address!r}: port 0 cannot be dialled")
    if scheme is None:
        scheme = "wss" if port == 443 else "ws"
    return ServerAddress(scheme, host.lower(), port)


def check_store_url(url: str) -> None:
    """Check a cluster store's URL: ``redis://`` or ``rediss://``, a host, a database number.

    The message never repeats the URL whole: it may hold a password.
    """
    what = server_setting("store")
    if not isinstance(url, str):
        raise ConfigError(f"{what} must be a URL such as 'redis://127.0.0.1:6379/0'")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise ConfigError(
            f"{what}: not a URL; write it as 'redis://[user:password@]host:6379/0'"
        ) from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(
            f"{what}: {parts.scheme or 'no'} scheme; the store is Redis: "
            "'redis://host:6379/0' (or 'rediss://' for TLS)"
        )
    if not parts.hostname:
        raise ConfigError(f"{what}: no host; write it as 'redis://host:6379/0'")
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ConfigError(f"{what}: the path names a database by number, such as '/0'")
