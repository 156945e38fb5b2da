"""Log lines, counters and the operator settings, without the network."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tunnel
from tunnel.server._metrics import ServerMetrics, render
from tunnel.server._registry import Registry
from tunnel.server._telemetry import logfmt


def test_logfmt_quotes_only_what_needs_it() -> None:
    line = logfmt(
        "agent_refused",
        peer="127.0.0.1:5000",
        claimed=None,
        status=401,
        ok=False,
        duration=1.23456,
        reason='no token: send "Bearer"',
        empty="",
    )
    assert line == (
        "event=agent_refused peer=127.0.0.1:5000 claimed=- status=401 ok=false "
        'duration=1.235 reason="no token: send \\"Bearer\\"" empty=""'
    )


@pytest.mark.parametrize(
    "hostile",
    [
        "a\nevent=forged x=1",
        "a\r\nb",
        "tab\there",
        "k=v",
        "back\\slash",
        "\x00\x1b[31m",
        "x\u2028y",
        "del\x7f",
    ],
)
def test_logfmt_values_from_the_network_stay_on_their_line(hostile: str) -> None:
    line = logfmt("agent_refused", claimed=hostile, status=400)
    assert "\n" not in line
    assert "\r" not in line
    assert line.isprintable()
    assert line.endswith(" status=400")
    assert line.count("=") - hostile.count("=") == 3


def test_logfmt_keeps_printable_text_readable() -> None:
    assert logfmt("x", identity="token sha256:1ec1…", name="café") == (
        'event=x identity="token sha256:1ec1…" name=café'
    )


def test_logfmt_cuts_long_values() -> None:
    assert len(logfmt("request", path="/" + "a" * 10_000)) < 400


def _samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = render(metrics.collectors)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_statuses_are_bucketed_and_unknown_hosts_share_one_series() -> None:
    metrics = ServerMetrics(Registry())
    for status in (101, 200, 204, 302, 404, 499, 500, 503, 600):
        metrics.response("stranger.example", status, 0.02)
    samples = _samples(metrics)
    other = {
        labels[1][1]: count
        for (name, labels), count in samples.items()
        if name == "tunnel_requests_total"
    }
    assert other == {"1xx": 1, "2xx": 2, "3xx": 1, "4xx": 2, "5xx": 3}
    # Hosts no agent holds do not make series, and are not in the histogram.
    assert all(("host", "stranger.example") not in labels for _, labels in samples)
    assert samples[("tunnel_response_seconds_count", ())] == 0


def test_handshakes_are_counted_by_status() -> None:
    metrics = ServerMetrics(Registry())
    for status in (101, 101, 401, 401, 409, 426):
        metrics.handshake(status)
    samples = _samples(metrics)
    assert samples[("tunnel_agent_connections_total", ())] == 2
    refused = {
        labels[0][1]: count
        for (name, labels), count in samples.items()
        if name == "tunnel_handshakes_refused_total"
    }
    assert refused == {"401": 2, "409": 1, "426": 1}


def test_operator_settings_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'admin_token = "t0k3n"\nadmin_host = "Admin.Example.NET."\n'
        'metrics_address = "127.0.0.1:9100"\naccess_log = true\n'
    )
    config = tunnel.load_server_config(path)
    assert config.admin_token == "t0k3n"
    assert config.admin_host == "admin.example.net"
    assert config.metrics_address == "127.0.0.1:9100"
    assert config.access_log is True
    # Flags win over the file.
    assert tunnel.load_server_config(path, access_log=False).access_log is False


def test_operator_settings_are_off_by_default() -> None:
    config = tunnel.ServerConfig()
    assert (config.admin_token, config.admin_host, config.metrics_address) == (None, None, None)
    assert config.access_log is False


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"admin_token": ""}, "admin_token must be a non-empty string"),
        ({"admin_token": "two words"}, "without spaces"),
        ({"admin_host": "not a host"}, "admin_host"),
        ({"metrics_address": "127.0.0.1"}, "metrics_address '127.0.0.1' has no port"),
        ({"metrics_address": "x:99999"}, "metrics_address"),
    ],
)
def test_bad_operator_settings_say_what_is_wrong(settings: dict[str, str], message: str) -> None:
    with pytest.raises(tunnel.ConfigError, match=message):
        tunnel.ServerConfig(**settings)  # type: ignore[arg-type]
