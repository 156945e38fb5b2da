"""Configuration validation: bad values fail at creation, naming the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import tunnel
from tunnel._config import ServerAddress, parse_listen_address


def client_config(**overrides: Any) -> tunnel.ClientConfig:
    settings: dict[str, Any] = {
        "address": "tunnel.example.com:443",
        "token": "s3cret",
        "port": 8080,
    }
    settings.update(overrides)
    return tunnel.ClientConfig(**settings)


# -- server --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        (":8000", ("0.0.0.0", 8000)),
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("[::1]:80", ("::1", 80)),
        ("[::]:0", ("::", 0)),
        (" localhost:65535 ", ("localhost", 65535)),
    ],
)
def test_listen_address(address: str, parsed: tuple[str, int]) -> None:
    assert parse_listen_address(address) == parsed
    tunnel.ServerConfig(address=address)


@pytest.mark.parametrize("address", ["127.0.0.1", "localhost:", "::1", "[::1]"])
def test_listen_address_without_port(address: str) -> None:
    with pytest.raises(tunnel.ConfigError, match=r"ServerConfig\.address .* has no port"):
        tunnel.ServerConfig(address=address)


@pytest.mark.parametrize("address", ["host:http", "host:65536", "host:-1", "[::1]8000", "[::1:80"])
def test_listen_address_bad(address: str) -> None:
    with pytest.raises(tunnel.ConfigError, match=r"ServerConfig\.address"):
        tunnel.ServerConfig(address=address)


@pytest.mark.parametrize(
    "field",
    [
        "response_timeout",
        "grace_period",
        "handshake_timeout",
        "keepalive_interval",
        "keepalive_timeout",
        "graceful_timeout",
        "header_timeout",
    ],
)
@pytest.mark.parametrize("value", [0, -1.5, float("nan")])
def test_server_timeouts_must_be_positive(field: str, value: float) -> None:
    settings: dict[str, Any] = {field: value}
    with pytest.raises(tunnel.ConfigError, match=rf"ServerConfig\.{field} must be a positive"):
        tunnel.ServerConfig(**settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_websocket_message": 0}, r"ServerConfig\.max_websocket_message 0: give a whole"),
        ({"max_websocket_message": 1.5}, r"ServerConfig\.max_websocket_message 1\.5: give"),
        (
            {"max_websocket_message": 2 << 20, "max_websocket_buffer": 1 << 20},
            r"ServerConfig\.max_websocket_buffer 1048576 is smaller than "
            r"ServerConfig\.max_websocket_message",
        ),
        ({"max_tcp_connections": 0}, r"ServerConfig\.max_tcp_connections 0: give a whole"),
        ({"min_request_body_rate": 0}, r"ServerConfig\.min_request_body_rate 0: give bytes"),
    ],
)
def test_server_visitor_limits_name_the_field(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(tunnel.ConfigError, match=message):
        tunnel.ServerConfig(**settings)


def test_server_visitor_limits_defaults() -> None:
    config = tunnel.ServerConfig(min_request_body_rate=None)
    assert config.min_request_body_rate is None
    assert config.max_websocket_message <= config.max_websocket_buffer


def test_certificate_needs_key(tmp_path: Path) -> None:
    pem = tmp_path / "cert.pem"
    pem.write_text("not checked here")
    both = r"both ServerConfig\.certificate and ServerConfig\.key"
    with pytest.raises(tunnel.ConfigError, match=both):
        tunnel.ServerConfig(certificate=pem)
    with pytest.raises(tunnel.ConfigError, match=both):
        tunnel.ServerConfig(key=pem)
    with pytest.raises(tunnel.ConfigError, match=r"ServerConfig\.key: no file at"):
        tunnel.ServerConfig(certificate=pem, key=tmp_path / "missing.pem")
    assert tunnel.ServerConfig(certificate=pem, key=pem).tls
    assert not tunnel.ServerConfig().tls


def test_server_tokens_and_domain() -> None:
    config = tunnel.ServerConfig(tokens={"a", "b"}, domain="Example.COM.")  # type: ignore[arg-type]
    assert config.tokens == frozenset({"a", "b"})
    assert config.domain == "example.com"
    with pytest.raises(tunnel.ConfigError, match=r"ServerConfig\.tokens"):
        tunnel.ServerConfig(tokens=frozenset({""}))
    with pytest.raises(tunnel.ConfigError, match="domain 'bad_domain' is not a valid host"):
        tunnel.ServerConfig(domain="bad_domain")
    with pytest.raises(tunnel.ConfigError, match=r"ServerConfig\.control_path"):
        tunnel.ServerConfig(control_path="/")


# -- client: address -----------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "server"),
    [
        ("https://tunnel.example.com", ServerAddress("wss", "tunnel.example.com", 443)),
        ("wss://tunnel.example.com", ServerAddress("wss", "tunnel.example.com", 443)),
        ("HTTP://Tunnel.Example.com", ServerAddress("ws", "tunnel.example.com", 80)),
        ("ws://tunnel.example.com:8000/", ServerAddress("ws", "tunnel.example.com", 8000)),
        ("https://tunnel.example.com:8443/x", ServerAddress("wss", "tunnel.example.com", 8443)),
        ("tunnel.example.com:443", ServerAddress("wss", "tunnel.example.com", 443)),
        ("tunnel.example.com:8000", ServerAddress("ws", "tunnel.example.com", 8000)),
        ("[::1]:8000", ServerAddress("ws", "::1", 8000)),
        ("http://[::1]", ServerAddress("ws", "::1", 80)),
    ],
)
def test_client_address(address: str, server: ServerAddress) -> None:
    assert client_config(address=address).server == server


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("ftp://tunnel.example.com", "unknown scheme 'ftp'; use http, https, ws or wss"),
        ("tunnel.example.com", "has no port"),
        ("https://", "has no host name"),
        (":8000", "has no host name"),
        ("tunnel.example.com:0", "port 0 cannot be dialled"),
        ("tunnel.example.com:99999", "the port must be a number"),
    ],
)
def test_client_address_bad(address: str, message: str) -> None:
    with pytest.raises(tunnel.ConfigError, match=r"ClientConfig\.address") as info:
        client_config(address=address)
    assert message in str(info.value)


def test_client_address_may_be_several_servers() -> None:
    config = client_config(address=["a.example.com:443", "http://b.example.com:8000"])
    # Kept as a tuple: the config stays frozen and hashable all the way down.
    assert config.address == ("a.example.com:443", "http://b.example.com:8000")
    assert config.addresses == config.address
    assert config.servers == (
        ServerAddress("wss", "a.example.com", 443),
        ServerAddress("ws", "b.example.com", 8000),
    )
    # The first is the one the public URL and the default host come from.
    assert config.server == config.servers[0]
    assert config.claimed_host == "a.example.com"


def test_client_address_as_one_string_is_as_before() -> None:
    config = client_config(address="tunnel.example.com:443")
    assert config.address == "tunnel.example.com:443"
    assert config.addresses == ("tunnel.example.com:443",)
    assert config.servers == (config.server,)
    assert client_config(address=("tunnel.example.com:443",)).servers == config.servers


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ([], "ClientConfig.address is empty: give at least one server"),
        (["a.example.com:443", 8000], "ClientConfig.address holds 8000: give each server"),
        (8000, "ClientConfig.address 8000: give the server as 'host:port' or a URL"),
        (
            ["a.example.com:443", "https://a.example.com"],
            "ClientConfig.address names a.example.com:443 twice; give each server once",
        ),
        # A bad one among several is named, with the fix, as a single one is.
        (["a.example.com:443", "b.example.com"], "ClientConfig.address 'b.example.com' has no"),
        (["a.example.com:443", "ftp://b"], "unknown scheme 'ftp'; use http, https, ws or wss"),
    ],
)
def test_client_addresses_bad(address: object, message: str) -> None:
    with pytest.raises(tunnel.ConfigError) as info:
        client_config(address=address)
    assert message in str(info.value)


def test_client_ha_connections() -> None:
    assert client_config().ha_connections == 2
    assert client_config(ha_connections=1).ha_connections == 1
    assert client_config(ha_connections=16).ha_connections == 16


@pytest.mark.parametrize("count", [0, -1, 17, True, "2", 2.0, None])
def test_client_ha_connections_bad(count: object) -> None:
    with pytest.raises(
        tunnel.ConfigError, match=r"ClientConfig\.ha_connections .*: give how many nodes .* 1 to 16"
    ):
        client_config(ha_connections=count)


# -- client: other fields ------------------------------------------------------


def test_client_port_as_string() -> None:
    assert client_config(port="8080").port == 8080


@pytest.mark.parametrize("port", [0, 65536, -1, "http", "", 80.0, None])
def test_client_port_bad(port: object) -> None:
    with pytest.raises(tunnel.ConfigError, match=r"ClientConfig\.port .*1 to 65535"):
        client_config(port=port)


@pytest.mark.parametrize("token", ["", None])
def test_client_token_required(token: object) -> None:
    with pytest.raises(tunnel.ConfigError, match=r"give a token with ClientConfig\.token"):
        client_config(token=token)


@pytest.mark.parametrize(
    "field",
    [
        "connect_timeout",
        "backoff_initial",
        "backoff_max",
        "keepalive_interval",
        "keepalive_timeout",
        "local_connect_timeout",
        "drain_timeout",
    ],
)
@pytest.mark.parametrize("value", [0, -0.1, float("nan")])
def test_client_timeouts_must_be_positive(field: str, value: float) -> None:
    with pytest.raises(tunnel.ConfigError, match=rf"ClientConfig\.{field} must be a positive"):
        client_config(**{field: value})


def test_client_timeout_of_wrong_type_names_the_field() -> None:
    # Read from an environment variable or a config file, a timeout arrives as
    # a string; the error must say which field, not "'>' not supported".
    with pytest.raises(tunnel.ConfigError, match=r"ClientConfig\.connect_timeout"):
        client_config(connect_timeout="soon")


def test_client_other_limits() -> None:
    with pytest.raises(tunnel.ConfigError, match=r"ClientConfig\.max_concurrent_streams"):
        client_config(max_concurrent_streams=0)
    with pytest.raises(tunnel.ConfigError, match=r"ClientConfig\.local_pool_size"):
        client_config(local_pool_size=-1)
    with pytest.raises(tunnel.ConfigError, match=r"ClientConfig\.control_path"):
        client_config(control_path="_tunnel")
    with pytest.raises(tunnel.ConfigError, match=r"ClientConfig\.ca_file: no file at"):
        client_config(ca_file="/nonexistent/ca.pem")


def test_client_host_defaults_to_address_host() -> None:
    assert client_config(address="Sub.Example.com:443").host == "sub.example.com"
    assert client_config(address="https://sub.example.com/").claimed_host == "sub.example.com"
    assert client_config(address="[::1]:8000").host == "::1"
    assert client_config(host="Other.Example.com.").host == "other.example.com"
    with pytest.raises(tunnel.ConfigError, match=re.escape("ClientConfig.host 'my_app'")):
        client_config(host="my_app")


def test_config_is_frozen() -> None:
    config = client_config()
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


# -- the public URL ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "url"),
    [
        ({"address": "https://tunnel.example.com"}, "https://tunnel.example.com"),
        ({"address": "tunnel.example.com:443"}, "https://tunnel.example.com"),
        ({"address": "http://tunnel.example.com"}, "http://tunnel.example.com"),
        ({"address": "tunnel.example.com:8000"}, "http://tunnel.example.com:8000"),
        ({"address": "wss://tunnel.example.com:8443"}, "https://tunnel.example.com:8443"),
        ({"address": "[::1]:8000"}, "http://[::1]:8000"),
        (
            {"address": "tunnel.example.com:8000", "host": "myapp.example.com"},
            "http://myapp.example.com:8000",
        ),
    ],
)
def test_client_url(overrides: dict[str, Any], url: str) -> None:
    assert tunnel.Client(client_config(**overrides)).url == url


# The same mistakes as tests/e2e/test_cli.py's, made by a program: the message
# names the field (and says how to fix it), never a command-line flag.
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: client_config(port=70000), "ClientConfig.port 70000: give the local"),
        (lambda: tunnel.ServerConfig(workers=0), "ServerConfig.workers 0: give a number"),
        (
            lambda: tunnel.ServerConfig(certificate="missing.pem"),
            "give both ServerConfig.certificate and ServerConfig.key",
        ),
        (lambda: client_config(ca_file="missing.pem"), "ClientConfig.ca_file: no file at"),
        (lambda: client_config(basic_auth="nopass"), "ClientConfig.basic_auth must be"),
        (lambda: client_config(allow_ips=["nonsense"]), "ClientConfig.allow_ips: 'nonsense'"),
        (lambda: client_config(token=None), "give a token with ClientConfig.token (or a key"),
        (lambda: tunnel.ServerConfig(address="nowhere"), "ServerConfig.address 'nowhere' has"),
        (lambda: tunnel.ServerConfig(keepalive_interval=-1), "ServerConfig.keepalive_interval"),
        (
            lambda: tunnel.load_client_config(port=8080, token="t"),
            "give ClientConfig.address, or 'address' in the config file",
        ),
        (
            lambda: tunnel.load_server_config(tcp_ports="70000-70001"),
            "write ports from 1 to 65535",
        ),
    ],
)
def test_a_program_is_told_the_field_and_the_fix(make: Any, message: str) -> None:
    with pytest.raises(tunnel.ConfigError) as caught:
        make()
    assert message in str(caught.value)
    assert "--" not in str(caught.value)


def test_every_flag_of_the_settings_table_is_a_field_and_a_flag() -> None:
    import dataclasses

    from tunnel._settings import CLIENT_FLAGS, SERVER_FLAGS
    from tunnel.cli._commands import _parser

    commands = next(action for action in _parser()._actions if action.dest == "command").choices  # type: ignore[union-attr]
    for config, table, command in (
        (tunnel.ServerConfig, SERVER_FLAGS, "server"),
        (
            tunnel.ClientConfig,
            {k: v for k, v in CLIENT_FLAGS.items() if k != "remote_port"},
            "http",
        ),
        (tunnel.ClientConfig, {"remote_port": CLIENT_FLAGS["remote_port"]}, "tcp"),
    ):
        fields = {field.name for field in dataclasses.fields(config)}
        assert set(table) <= fields, set(table) - fields
        options = {
            option for action in commands[command]._actions for option in action.option_strings
        }
        flags = {flag for flag in table.values() if flag.startswith("--")}
        assert flags <= options, flags - options
