"""HTTP/2 to the local service and gRPC's rules: settings, flags and sans-IO helpers."""

from __future__ import annotations

from pathlib import Path

import h2.errors
import pytest

import tunnel
from tunnel._configfile import load_client_config
from tunnel._protocol.grpc import (
    GrpcStatus,
    split_trailers_only,
    status_for_reset,
    status_trailers,
)
from tunnel.cli._commands import _parser
from tunnel.client._upstream_h2 import local_h2_request_headers, needs_h2

ADDRESS = "127.0.0.1:8000"


def test_auto_is_the_default_and_every_protocol_is_accepted() -> None:
    assert tunnel.ClientConfig(address=ADDRESS, token="t", port=1).local_protocol == "auto"
    for name in ("http1", "h2c", "h2", "auto"):
        config = tunnel.ClientConfig(address=ADDRESS, token="t", port=1, local_protocol=name)  # type: ignore[arg-type]
        assert config.local_protocol == name


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"local_protocol": "http2"}, "give one of 'http1', 'h2c', 'h2', 'auto'"),
        (
            {"local_protocol": "h2c", "local_tls": True},
            "for HTTP/2 over TLS give ClientConfig.local_protocol 'h2'",
        ),
        ({"tcp": True, "local_tls": True}, "a TCP tunnel carries the local service's bytes"),
        ({"local_ca_file": "/nonexistent/ca.pem"}, "local_ca_file: no file"),
    ],
)
def test_bad_local_settings_say_what_is_wrong(settings: dict, message: str) -> None:
    with pytest.raises(tunnel.ConfigError, match=message):
        tunnel.ClientConfig(address=ADDRESS, token="t", port=1, **settings)


def test_the_config_file_and_the_flags(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'address = "{ADDRESS}"\ntoken = "t"\nport = 50051\nlocal_protocol = "h2c"\n')
    assert load_client_config(path).local_protocol == "h2c"
    args = _parser().parse_args(
        ["http", "8443", "--local-protocol", "h2", "--local-insecure-skip-verify"]
    )
    assert (args.local_protocol, args.local_insecure_skip_verify) == ("h2", True)
    assert _parser().parse_args(["http", "80", "--local-tls"]).local_tls is True
    with pytest.raises(SystemExit):
        _parser().parse_args(["http", "80", "--local-protocol", "spdy"])


def test_which_requests_need_http2_under_auto() -> None:
    assert needs_h2([(b"content-type", b"application/grpc")])
    assert needs_h2([(b"content-type", b"application/grpc+proto")])
    assert needs_h2([(b"te", b"trailers")])
    assert not needs_h2([(b"content-type", b"application/json")])
    # gRPC-Web is made for browsers over HTTP/1.1: its trailers are in the body.
    assert not needs_h2([(b"content-type", b"application/grpc-web+proto")])
    assert not needs_h2([(b"te", b"gzip")])


def test_request_headers_for_the_local_service() -> None:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"app.example.com"),
        (b":path", b"/pkg.Svc/Call"),
        (b"te", b"trailers"),
        (b"connection", b"x-drop"),
        (b"x-drop", b"1"),
        (b"grpc-timeout", b"1S"),
    ]
    assert local_h2_request_headers(headers, b"http") == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"app.example.com"),
        (b":path", b"/pkg.Svc/Call"),
        (b"te", b"trailers"),
        (b"grpc-timeout", b"1S"),
    ]


def test_a_trailers_only_answer_splits_into_headers_and_trailers() -> None:
    leading, trailing = split_trailers_only(
        [
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"5"),
            (b"grpc-message", b"no such thing"),
            (b"x-why", b"testing"),
        ]
    )
    assert leading == [(b"content-type", b"application/grpc")]
    assert trailing == [
        (b"grpc-status", b"5"),
        (b"grpc-message", b"no such thing"),
        (b"x-why", b"testing"),
    ]


def test_resets_map_to_the_status_a_grpc_client_would_derive() -> None:
    codes = h2.errors.ErrorCodes
    assert status_for_reset(codes.CANCEL, connection_lost=False) is GrpcStatus.CANCELLED
    assert status_for_reset(codes.REFUSED_STREAM, connection_lost=False) is GrpcStatus.UNAVAILABLE
    assert status_for_reset(codes.INTERNAL_ERROR, connection_lost=False) is GrpcStatus.INTERNAL
    assert status_for_reset(codes.INTERNAL_ERROR, connection_lost=True) is GrpcStatus.UNAVAILABLE
    assert status_for_reset(codes.ENHANCE_YOUR_CALM, connection_lost=False) is (
        GrpcStatus.RESOURCE_EXHAUSTED
    )


def test_status_messages_are_percent_encoded() -> None:
    assert status_trailers(14, "gone: 100% → away") == [
        (b"grpc-status", b"14"),
        (b"grpc-message", b"gone: 100%25 %E2%86%92 away"),
    ]


def test_the_command_line_names_the_flags() -> None:
    from tunnel._settings import cli_messages

    with cli_messages(), pytest.raises(tunnel.ConfigError, match="--local-protocol 'h2'"):
        tunnel.ClientConfig(
            address=ADDRESS, token="t", port=1, local_protocol="h2c", local_tls=True
        )
