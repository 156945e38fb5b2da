"""Prometheus metrics of one :class:`~tunnel.TunnelApp`.

The rule of this module: a request costs a dict lookup, a bisection and a few
integer additions, with no lock and no ``await``; everything else (agents,
bytes, streams, round-trip times) is read from the registry of agents when
Prometheus scrapes. Plain integers suffice because a server runs in one trio
thread; :class:`_Collector` turns them into metric families on demand.

Per-tunnel series (``host`` label) exist while the tunnel's agent is connected
and are dropped, after one last scrape, when it has gone, so the number of
series follows the number of agents and not every host ever seen. A tunnel
whose agent reconnects keeps its counters; one that comes back after its series
were dropped starts again from zero, which ``rate()`` treats as a reset.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .._asgi import Receive, Scope, Send
from .._protocol.headers import header_value
from ._registry import Registry

__all__ = [
    "LATENCY_BUCKETS",
    "OTHER_HOST",
    "MetricsEndpoint",
    "ServerMetrics",
    "render",
]


#: Upper bounds (seconds) of the time-to-response-headers histogram. The last
#: finite bound is ``ServerConfig.response_timeout``'s default.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: The ``host`` label of requests no tunnel served (unknown hosts, the
#: fallback app, refusals before routing). No host name contains ``_``.
OTHER_HOST: Final = "_other"
#: The ``status`` label values: responses are counted by class, not by code.
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
#: Per-host counters of departed agents are dropped at the next scrape, or,
#: when nobody scrapes, once there are this many.
PRUNE_AT: Final = 1024

_BUCKET_LABELS: Final = (*(repr(float(bound)) for bound in LATENCY_BUCKETS), "+Inf")


class ServerMetrics:
    """The counters of one server and the Prometheus registry that exposes them.

    Args:
        registry: The server's registry of agents, read at scrape time.
    """

    def __init__(self, registry: Registry, node: str | None = None) -> None:
        self.registry = registry
        #: The node id every sample is labelled with (``node``), in a cluster.
        self.node = node
        #: The Prometheus registry of this server alone (not the global default
        #: one, so that several servers in one process never clash).
        self.collectors = CollectorRegistry()
        self._hosts: dict[str, list[int]] = {}
        self._other = [0] * len(STATUS_CLASSES)
        self._prune_at = PRUNE_AT
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self.agent_connections = 0
        self.handshakes_refused: dict[int, int] = {}
        self.collectors.register(_Collector(self))

    def response(self, host: str, status: int, seconds: float) -> None:
        """Count a response to a visitor of ``host``, sent ``seconds`` after the request came."""
        counts = self._hosts.get(host)
        if counts is None:
            counts = self._counts_for(host)
        index = status // 100 - 1
        counts[index if 0 <= index < 5 else 4] += 1
        if counts is not self._other:
            self._latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self._latency_sum += seconds

    def handshake(self, status: int) -> None:
        """Count an agent's handshake: 101 accepted, anything else refused."""
        if status == 101:
            self.agent_connections += 1
        else:
            self.handshakes_refused[status] = self.handshakes_refused.get(status, 0) + 1

    def _counts_for(self, host: str) -> list[int]:
        if not self.registry.holds(host):
            return self._other
        if len(self._hosts) >= self._prune_at:
            self.prune()
            self._prune_at = max(PRUNE_AT, 2 * len(self._hosts))
        counts = self._hosts[host] = [0] * len(STATUS_CLASSES)
        return counts

    def prune(self) -> None:
        """Forget the counters of hosts no agent holds now."""
        held = self.registry.holds
        for host in [host for host in self._hosts if not held(host)]:
            del self._hosts[host]

    def collect(self) -> Iterator[Metric]:
        """The metric families, as a scrape sees them; then drop departed hosts."""
        sessions = self.registry.sessions()
        for session in sessions:
            if session.info.tcp_port is None and session.key not in self._hosts:
                # Zeros from the start, so rate() sees a tunnel's first requests.
                self._hosts[session.key] = [0] * len(STATUS_CLASSES)

        agents = GaugeMetricFamily(
            "tunnel_agents_connected", "Agents connected now (one per tunnel)."
        )
        agents.add_metric([], len(sessions))
        yield agents
        yield CounterMetricFamily(
            "tunnel_agent_connections",
            "Agent handshakes accepted (reconnects included).",
            value=self.agent_connections,
        )
        refused = CounterMetricFamily(
            "tunnel_handshakes_refused",
            "Agent handshakes refused, by the HTTP status the agent was given.",
            labels=["status"],
        )
        for status, count in sorted(self.handshakes_refused.items()):
            refused.add_metric([str(status)], count)
        yield refused

        requests = CounterMetricFamily(
            "tunnel_requests",
            f"Visitor requests answered, by tunnel host ({OTHER_HOST}: no tunnel) "
            "and status class; WebSocket upgrades count as 1xx.",
            labels=["host", "status"],
        )
        for host, counts in [*sorted(self._hosts.items()), (OTHER_HOST, self._other)]:
            for status_class, count in zip(STATUS_CLASSES, counts, strict=True):
                requests.add_metric([host, status_class], count)
        yield requests

        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for label, count in zip(_BUCKET_LABELS, self._latency, strict=True):
            cumulative += count
            buckets.append((label, float(cumulative)))
        yield HistogramMetricFamily(
            "tunnel_response_seconds",
            "Seconds from a visitor's request to its response headers, for requests "
            "that reached a tunnel.",
            buckets=buckets,
            sum_value=self._latency_sum,
        )

        traffic = CounterMetricFamily(
            "tunnel_bytes",
            "Bytes on each agent's connection (HTTP/2 frames of every stream), by "
            "tunnel and direction.",
            labels=["host", "direction"],
        )
        streams = GaugeMetricFamily(
            "tunnel_streams_open", "Requests and connections in flight, by tunnel.", labels=["host"]
        )
        rtt = GaugeMetricFamily(
            "tunnel_agent_rtt_seconds",
            "The last keepalive round-trip time to each agent.",
            labels=["host"],
        )
        for session in sorted(sessions, key=lambda s: s.key):
            link = session.link
            traffic.add_metric([session.key, "to_agent"], link.bytes_sent)
            traffic.add_metric([session.key, "from_agent"], link.bytes_received)
            streams.add_metric([session.key], link.open_streams)
            if link.rtt is not None:
                rtt.add_metric([session.key], link.rtt)
        yield traffic
        yield streams
        yield rtt
        # After the families above were built: the last values of a departed
        # host are scraped once, then its series end.
        self.prune()


class _Collector:
    """Adapts :class:`ServerMetrics` to prometheus-client's collector protocol."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        node = self._metrics.node
        if node is None:
            return self._metrics.collect()
        return _labelled(self._metrics.collect(), node)


def _labelled(families: Iterator[Metric], node: str) -> Iterator[Metric]:
    """``families`` with a ``node`` label on every sample: one scrape per node of a cluster."""
    for family in families:
        family.samples = [
            sample._replace(labels={**sample.labels, "node": node}) for sample in family.samples
        ]
        yield family


def render(collectors: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The exposition for a scraper's ``Accept`` header: body and content type."""
    encoder, content_type = choose_encoder(accept)
    return encoder(collectors), content_type


class MetricsEndpoint:
    """An ASGI app that answers ``GET /metrics`` with the metrics of ``collectors``.

    ``tunnel/server/hypercorn/_metrics.py`` serves it on its own address; anything else than
    ``GET /metrics`` gets 404 or 405.
    """

    def __init__(self, collectors: CollectorRegistry) -> None:
        self.collectors = collectors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return  # a WebSocket: returning unaccepted refuses it
        if scope["path"] != "/metrics":
            await _plain(send, 404, b"Not found: the metrics are at /metrics.\n")
        elif scope["method"] not in ("GET", "HEAD"):
            await _plain(send, 405, b"Only GET reads the metrics.\n", [(b"allow", b"GET, HEAD")])
        else:
            accept = (header_value(scope["headers"], b"accept") or b"").decode("latin-1")
            body, content_type = render(self.collectors, accept)
            await _plain(
                send,
                200,
                b"" if scope["method"] == "HEAD" else body,
                [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")],
                length=len(body),
            )


async def _plain(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    length: int | None = None,
) -> None:
    headers = headers or [(b"content-type", b"text/plain; charset=utf-8")]
    headers.append((b"content-length", str(len(body) if length is None else length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
