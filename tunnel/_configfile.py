"""Configuration files: TOML with the same names as the config classes' fields.

``tunnel server --config server.toml`` and ``tunnel http --config agent.toml``
read them; a flag given on the command line wins over the file. In code,
:func:`load_server_config` and :func:`load_client_config` do the same.

Example server file::

    address = ":8000"
    domain = "tunnel.example.com"
    tokens_file = "/etc/tunnel/tokens"
    tcp_ports = "20000-20099"
    max_request_body = 104857600
    reserved_hosts = { "shop.tunnel.example.com" = "sha256:1ec1…" }

    [visitor_rate_limit]
    requests_per_second = 20
    burst = 40
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from ._config import ClientConfig, ServerConfig
from ._exceptions import ConfigError
from ._protocol.limits import RateLimit
from ._settings import client_setting

__all__ = ["load_client_config", "load_server_config", "parse_port_range"]

# Fields that hold code (hooks, channels), which a file cannot express.
_CODE_ONLY = frozenset({"auth", "callbacks", "observer", "state"})


def parse_port_range(text: str) -> range | None:
    """``"FIRST-LAST"`` (or one port) as a range; None unless ports from 1 to 65535."""
    first, _, last = text.partition("-")
    first, last = first.strip(), (last or first).strip()
    if not first.isdigit() or not last.isdigit():
        return None
    return _checked_ports(int(first), int(last))


def _checked_ports(first: int, last: int) -> range | None:
    return range(first, last + 1) if 1 <= first <= last <= 65535 else None


def _port_range(value: Any) -> range:
    # Overrides (the command line's --tcp-ports, a caller's keyword) are ranges already.
    if isinstance(value, range):
        return value
    ports = None
    if isinstance(value, str):
        ports = parse_port_range(value)
    elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        ports = _checked_ports(value[0], value[1])
    if ports is None:
        raise ConfigError(
            f'tcp_ports = {value!r}: write ports from 1 to 65535 as "20000-20099" or [20000, 20099]'
        )
    return ports


def _rate_limit(key: str, value: Any) -> RateLimit:
    if not isinstance(value, dict):
        raise ConfigError(f"{key} is a table, such as {{ requests_per_second = 10 }}")
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float) or not number > 0:
            raise ConfigError(f"{key}.{name} = {number!r}: give a positive number")
    try:
        return RateLimit(**value)
    except TypeError:
        names = ", ".join(field.name for field in dataclasses.fields(RateLimit))
        raise ConfigError(f"{key} holds {', '.join(value)}; its settings are {names}") from None


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "tokens": frozenset,
    "tcp_ports": _port_range,
    "tunnel_rate_limit": partial(_rate_limit, "tunnel_rate_limit"),
    "visitor_rate_limit": partial(_rate_limit, "visitor_rate_limit"),
    "allow_ips": tuple,
    "deny_ips": tuple,
}


def _load(
    cls: type[ServerConfig] | type[ClientConfig],
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                settings = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"cannot read {os.fspath(path)!r}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{os.fspath(path)!r} is not valid TOML: {exc}") from None
    fields = {field.name for field in dataclasses.fields(cls)} - _CODE_ONLY
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ConfigError(
            f"{os.fspath(path or '')!r}: unknown setting(s) {', '.join(unknown)}; "
            f"the settings are {', '.join(sorted(fields))}"
        )
    settings.update({key: value for key, value in overrides.items() if value is not None})
    for key, convert in _CONVERT.items():
        if key in settings and key in fields:
            settings[key] = convert(settings[key])
    return settings


def load_server_config(
    path: str | os.PathLike[str] | None = None, **overrides: Any
) -> ServerConfig:
    """A :class:`~tunnel.ServerConfig` from a TOML file; ``overrides`` win.

    Raises:
        ConfigError: The file cannot be read, is not TOML, names an unknown
            setting, or holds an invalid value.
    """
    settings = _load(ServerConfig, path, overrides)
    try:
        return ServerConfig(**settings)
    except TypeError as exc:
        raise ConfigError(f"server settings: {exc}") from None


def load_client_config(
    path: str | os.PathLike[str] | None = None, **overrides: Any
) -> ClientConfig:
    """A :class:`~tunnel.ClientConfig` from a TOML file; ``overrides`` win.

    Raises:
        ConfigError: As for :func:`load_server_config`, or when ``address`` or
            ``port`` is given nowhere.
    """
    settings = _load(ClientConfig, path, overrides)
    missing = [name for name in ("address", "port") if name not in settings]
    if missing:
        given = " and ".join(str(client_setting(name)) for name in missing)
        keys = " and ".join(f"'{name}'" for name in missing)
        raise ConfigError(
            f"the agent needs {' and '.join(missing)}: give {given}, or {keys} in the config file"
        )
    try:
        return ClientConfig(**settings)
    except TypeError as exc:
        raise ConfigError(f"agent settings: {exc}") from None
