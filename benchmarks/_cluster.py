"""The cluster phase: a request forwarded from one node to another, beside a local one.

Two ``tunnel server`` nodes share a ``redis-server`` of the phase's own (Debian's
``redis-server``; the phase is skipped without it). One agent holds a connection
to node one only (``--ha-connections 1``), so a visitor of node one is served
locally and a visitor of node two is carried to node one over the nodes' link.
The same small GET is sent to each, alternately, at each concurrency level; the
CPU of both nodes and of the agent is read from /proc, so the cost of forwarding
is the difference of two columns measured side by side.
"""

from __future__ import annotations

import secrets
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import _load
import _procs

__all__ = ["available", "cluster_phase", "print_phase"]

#: The nodes' keepalive (and so heartbeat) interval: short, so the phase starts fast.
KEEPALIVE = 1.0


def available() -> bool:
    """Whether ``redis-server`` is installed."""
    return shutil.which("redis-server") is not None


def cluster_phase(
    procs: _procs.Processes,
    local_port: int,
    host: str,
    token: str,
    levels: list[int],
    seconds: int,
    repeat: int,
    generator: str,
) -> list[dict[str, Any]]:
    """Small GETs through node one (local) and node two (forwarded), interleaved."""
    python = sys.executable
    redis_port, one_port, two_port = _procs.free_ports(3)
    redis = procs.start(
        "redis",
        [
            *("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(procs.log_dir)),
        ],
    )
    _wait_for_redis(redis, redis_port)
    secret = procs.log_dir / "cluster-secret"
    secret.write_text(secrets.token_urlsafe() + "\n")
    settings = procs.log_dir / "node.toml"
    settings.write_text(f"keepalive_interval = {KEEPALIVE}\n")
    nodes = {}
    for name, port in (("one", one_port), ("two", two_port)):
        nodes[name] = procs.start(
            f"node-{name}",
            [
                *(python, "-m", "tunnel", "server", "--config", str(settings)),
                *("--address", f"127.0.0.1:{port}", "--token", token),
                *("--store", f"redis://127.0.0.1:{redis_port}/0"),
                *("--cluster-secret-file", str(secret), "--node-id", name),
            ],
        )
    agent = procs.start(
        "agent-cluster",
        [
            *(python, "-m", "tunnel", "http", str(local_port), "--no-inspector"),
            *("--server", f"127.0.0.1:{one_port}", "--ha-connections", "1"),
            *("--token", token, "--host", host),
        ],
    )
    agent.wait_until(one_port, host)
    # Node two learns where the host is from the store, at its next heartbeat.
    nodes["two"].wait_until(two_port, host, timeout=5 * KEEPALIVE + 20)
    ports = {"local": one_port, "forwarded": two_port}
    for port in ports.values():  # warm: the nodes' link, the agent's pool
        _run_load(port, host, max(levels), 1, generator)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for level in levels:
        for _ in range(repeat):
            for path, port in ports.items():
                before = {name: p.cpu_seconds() for name, p in (*nodes.items(), ("agent", agent))}
                result = _run_load(port, host, level, seconds, generator)
                after = {name: p.cpu_seconds() for name, p in (*nodes.items(), ("agent", agent))}
                runs.setdefault((path, level), []).append(
                    {
                        "path": path,
                        "concurrency": level,
                        "rps": round(result.rps, 1),
                        "p50_ms": round(result.p50_ms, 4),
                        "p99_ms": round(result.p99_ms, 4),
                        "errors": result.errors,
                        "requests": result.requests,
                        "cpu_s": {name: after[name] - before[name] for name in after},
                    }
                )
    rows = []
    for value in runs.values():
        chosen = dict(sorted(value, key=lambda r: r["rps"])[(len(value) - 1) // 2])
        requests = sum(r["requests"] for r in value) or 1
        chosen["cpu_us_per_request"] = {
            name: round(sum(r["cpu_s"][name] for r in value) / requests * 1e6, 1)
            for name in ("one", "two", "agent")
        }
        chosen["cpu_us_per_request"]["nodes"] = round(
            chosen["cpu_us_per_request"]["one"] + chosen["cpu_us_per_request"]["two"], 1
        )
        chosen["errors"] = sum(r["errors"] for r in value)
        chosen["rounds_rps"] = [r["rps"] for r in value]
        chosen["p50_ms"] = round(statistics.median(r["p50_ms"] for r in value), 4)
        del chosen["cpu_s"]
        rows.append(chosen)
    agent.stop()
    for node in nodes.values():
        node.stop()
    redis.stop()
    return rows


def print_phase(rows: list[dict[str, Any]]) -> None:
    """The forwarded-against-local table."""
    print("\nCluster: node two's visitors carried to the agent's node one, beside node one's own")
    print(
        f"  {'level':<6} {'path':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'node1 µs':>9} {'node2 µs':>9} {'nodes µs':>9} {'agent µs':>9} {'errors':>6}"
    )
    by_level: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_level.setdefault(row["concurrency"], {})[row["path"]] = row
    for level, paths in sorted(by_level.items()):
        for path in ("local", "forwarded"):
            row = paths.get(path)
            if row is None:
                continue
            cpu = row["cpu_us_per_request"]
            print(
                f"  c{level:<5} {path:<10} {row['rps']:>8.0f} {row['p50_ms']:>8.3f}"
                f" {row['p99_ms']:>8.3f} {cpu['one']:>9.0f} {cpu['two']:>9.0f}"
                f" {cpu['nodes']:>9.0f} {cpu['agent']:>9.0f} {row['errors']:>6}"
            )
        if "local" in paths and "forwarded" in paths:
            local, forwarded = paths["local"], paths["forwarded"]
            extra_cpu = (
                forwarded["cpu_us_per_request"]["nodes"] - local["cpu_us_per_request"]["nodes"]
            )
            ratio = forwarded["cpu_us_per_request"]["nodes"] / max(
                local["cpu_us_per_request"]["nodes"], 1
            )
            later = forwarded["p50_ms"] - local["p50_ms"]
            print(
                f"  c{level:<5} forwarding adds {extra_cpu:.0f} µs of the nodes' CPU per request"
                f" ({ratio:.2f} x) and {later:+.3f} ms at the median"
            )


def _run_load(port: int, host: str, level: int, seconds: int, generator: str) -> _load.LoadResult:
    if generator == "wrk":
        return _load.wrk_load(port, host, level, seconds)
    return _load.python_load(port, host, level, seconds, warmup=0.5)


def _wait_for_redis(process: _procs.Process, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        done = subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=False
        )
        if done.stdout.strip() == "PONG":
            return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server not ready after {timeout:g} s:\n{process.log_tail()}")
