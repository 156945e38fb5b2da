"""Each setting's two names: the field a program sets and the flag a ``tunnel`` user passes.

Every message that names a setting (errors, warnings, hints) names it through a
:class:`Setting`, never as literal text, so one message reads right for both
audiences: formatted inside the ``tunnel`` command (:func:`cli_messages`) a
setting reads ``--ca-file``, anywhere else ``ClientConfig.ca_file``. A setting
without a flag reads as the key of a ``--config`` file, which is its field name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CLIENT_FLAGS",
    "SERVER_FLAGS",
    "Setting",
    "cli_messages",
    "client_setting",
    "for_cli",
    "server_setting",
]

#: Set in the environment of the ``tunnel`` command's own child processes
#: (server workers), which format messages for the same user.
_ENVIRONMENT = "TUNNEL_CLI_MESSAGES"

_for_cli: ContextVar[bool] = ContextVar(
    "tunnel_cli_messages", default=os.environ.get(_ENVIRONMENT) == "1"
)

#: ``ServerConfig`` field → the ``tunnel server`` flag that sets it.
SERVER_FLAGS: dict[str, str] = {
    "address": "--address",
    "domain": "--domain",
    "certificate": "--certificate",
    "key": "--key",
    "tokens": "--token",
    "control_path": "--control-path",
    "tokens_file": "--tokens-file",
    "authorized_keys_file": "--authorized-keys",
    "reserved_hosts": "--reserve",
    "max_tunnels_per_identity": "--max-tunnels",
    "tcp_ports": "--tcp-ports",
    "max_request_body": "--max-request-body",
    "tunnel_rate_limit": "--tunnel-rps",
    "visitor_rate_limit": "--visitor-rps",
    "admin_token": "--admin-token",
    "admin_host": "--admin-host",
    "metrics_address": "--metrics-address",
    "access_log": "--access-log",
    "workers": "--workers",
    "max_websocket_message": "--max-websocket-message",
    "max_websocket_buffer": "--max-websocket-buffer",
    "max_tcp_connections": "--max-tcp-connections",
    "header_timeout": "--header-timeout",
    "min_request_body_rate": "--min-request-body-rate",
    "store": "--store",
    "node_id": "--node-id",
    "node_address": "--node-address",
    "cluster_secret": "--cluster-secret-file",
}

#: ``ClientConfig`` field → the ``tunnel http`` / ``tunnel tcp`` flag that sets it.
CLIENT_FLAGS: dict[str, str] = {
    "address": "--server",
    "port": "PORT",
    "token": "--token",
    "key_file": "--key",
    "local_host": "--local-host",
    "ca_file": "--ca-file",
    "insecure_skip_verify": "--insecure-skip-verify",
    "control_path": "--control-path",
    "basic_auth": "--basic-auth",
    "allow_ips": "--allow-ip",
    "deny_ips": "--deny-ip",
    "host": "--host",
    "inspector": "--inspector",
    "pool": "--pool",
    "remote_port": "--remote-port",
    "tcp": "'tunnel tcp'",
    "local_protocol": "--local-protocol",
    "local_tls": "--local-tls",
    "local_ca_file": "--local-ca-file",
    "local_insecure_skip_verify": "--local-insecure-skip-verify",
    "ha_connections": "--ha-connections",
}

_FLAGS = {"ServerConfig": SERVER_FLAGS, "ClientConfig": CLIENT_FLAGS}


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, named for whoever reads the message it appears in."""

    owner: Literal["ServerConfig", "ClientConfig"]
    name: str

    @property
    def field(self) -> str:
        """The name a program uses, such as ``ClientConfig.ca_file``."""
        return f"{self.owner}.{self.name}"

    @property
    def flag(self) -> str | None:
        """The command-line flag, such as ``--ca-file``; None for a file-only setting."""
        return _FLAGS[self.owner].get(self.name)

    @property
    def for_cli(self) -> str:
        """The name a ``tunnel`` user knows: the flag, else the config file's key."""
        return self.flag or f"{self.name} (in the --config file)"

    def __str__(self) -> str:
        return self.for_cli if _for_cli.get() else self.field

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def server_setting(name: str) -> Setting:
    """The :class:`~tunnel.ServerConfig` setting ``name``."""
    return Setting("ServerConfig", name)


def client_setting(name: str) -> Setting:
    """The :class:`~tunnel.ClientConfig` setting ``name``."""
    return Setting("ClientConfig", name)


def for_cli() -> bool:
    """Whether messages formatted now are for a ``tunnel`` command's user."""
    return _for_cli.get()


@contextmanager
def cli_messages() -> Iterator[None]:
    """Within this block (and its trio tasks), settings read as command-line flags."""
    token = _for_cli.set(True)
    previous = os.environ.get(_ENVIRONMENT)
    os.environ[_ENVIRONMENT] = "1"
    try:
        yield
    finally:
        _for_cli.reset(token)
        if previous is None:
            del os.environ[_ENVIRONMENT]
        else:
            os.environ[_ENVIRONMENT] = previous
