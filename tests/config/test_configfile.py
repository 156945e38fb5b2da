"""TOML configuration files for server and agent."""

from __future__ import annotations

from pathlib import Path

import pytest

import tunnel
from tunnel._configfile import load_client_config, load_server_config
from tunnel._protocol.limits import RateLimit


def test_server_file_maps_every_kind_of_setting(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("sha256:" + "ab" * 32 + "\n")
    path = tmp_path / "server.toml"
    path.write_text(
        f"""
        address = ":9000"
        domain = "Tunnel.Example.com"
        tokens = ["a", "b"]
        tokens_file = "{tokens}"
        tcp_ports = "20000-20009"
        max_request_body = 1000
        reserved_hosts = {{ "shop.tunnel.example.com" = "a" }}
        max_websocket_message = 65536
        max_websocket_buffer = 262144
        max_tcp_connections = 10
        header_timeout = 30
        min_request_body_rate = 100

        [visitor_rate_limit]
        requests_per_second = 5
        burst = 7
        """
    )
    config = load_server_config(path)
    assert config.address == ":9000"
    assert config.domain == "tunnel.example.com"
    assert config.tokens == frozenset({"a", "b"})
    assert config.tcp_ports == range(20000, 20010)
    assert config.max_request_body == 1000
    assert dict(config.reserved_hosts) == {"shop.tunnel.example.com": "a"}
    assert (config.max_websocket_message, config.max_websocket_buffer) == (65536, 262144)
    assert (config.max_tcp_connections, config.header_timeout) == (10, 30)
    assert config.min_request_body_rate == 100
    assert config.visitor_rate_limit == RateLimit(requests_per_second=5, burst=7)


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('address = ":9000"\ngrace_period = 2.5\n')
    config = load_server_config(path, address="127.0.0.1:1234", domain=None)
    assert config.address == "127.0.0.1:1234"
    assert config.grace_period == 2.5


def test_a_port_range_given_as_a_range_is_taken_as_it_is(tmp_path: Path) -> None:
    # What `tunnel server --tcp-ports 20000-20099` passes: its parser makes the range.
    path = tmp_path / "server.toml"
    path.write_text('tcp_ports = "30000-30009"\n')
    config = load_server_config(path, tcp_ports=range(20000, 20100))
    assert config.tcp_ports == range(20000, 20100)
    assert load_server_config(tcp_ports=range(5, 6)).tcp_ports == range(5, 6)


def test_agent_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'address = "https://tunnel.example.com"\ntoken = "t"\nport = 8080\n'
        'basic_auth = "u:p"\nallow_ips = ["10.0.0.0/8"]\ntcp = false\n'
    )
    config = load_client_config(path)
    assert config.server.scheme == "wss"
    assert config.port == 8080
    assert config.allow_ips == ("10.0.0.0/8",)
    assert load_client_config(path, port=9090).port == 9090


def test_agent_file_with_several_servers(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'address = ["node-a.example.com:443", "node-b.example.com:443"]\n'
        'token = "t"\nport = 8080\nha_connections = 3\n'
    )
    config = load_client_config(path)
    assert config.addresses == ("node-a.example.com:443", "node-b.example.com:443")
    assert config.ha_connections == 3
    # `tunnel http --server x` replaces the file's list; the file's count stays.
    config = load_client_config(path, address="x.example.com:443")
    assert config.addresses == ("x.example.com:443",)
    assert config.ha_connections == 3
    path.write_text('address = "a:1"\ntoken = "t"\nport = 8080\nha_connections = "two"\n')
    with pytest.raises(tunnel.ConfigError, match=r"ClientConfig\.ha_connections 'two'"):
        load_client_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adress = ':1'", r"unknown setting\(s\) adress"),
        ("address = ", "not valid TOML"),
        ("tcp_ports = 'many'", "20000-20099"),
        ("auth = 'x'", r"unknown setting\(s\) auth"),
        ("[tunnel_rate_limit]\nspeed = 1", "tunnel_rate_limit holds speed; its settings are"),
        ("[tunnel_rate_limit]\nburst = 0", r"tunnel_rate_limit\.burst = 0: give a positive"),
        ("keepalive_interval = -1", "keepalive_interval must be a positive number"),
    ],
)
def test_bad_server_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(tunnel.ConfigError, match=message):
        load_server_config(path)


def test_agent_needs_address_and_port(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('token = "t"\n')
    with pytest.raises(tunnel.ConfigError, match="needs address and port"):
        load_client_config(path)
    with pytest.raises(tunnel.ConfigError, match="cannot read"):
        load_client_config(tmp_path / "missing.toml")
