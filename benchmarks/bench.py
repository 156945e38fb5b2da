"""Benchmark the tunnel against the same app served directly; see benchmarks/README.rst.

Usage: ``python benchmarks/bench.py [--quick] [...]`` or ``nox -s bench -- --quick``.

Starts, as separate processes on loopback: the local service (``_service.py raw``),
the same app under Hypercorn (``_service.py hypercorn``), a tunnel server
(``python -m tunnel server``) and an agent (``python -m tunnel http``) that
forwards ``bench.localhost`` to the local service. Then, side by side in one run:
small GETs at several concurrencies against the three targets, large downloads
and uploads, and the CPU each process used per request; then 1,000 and 10,000 slow requests
in flight at once on the one agent, and the server's memory with 1 and with 1,000
idle agents (on a server of their own); an HTTP/2 (h2c) download by curl from
Hypercorn and through the tunnel; and the tunnel with 1 and 2 server workers.
Prints the tables, issue 14's side-by-side table and its goals, and writes JSON to
``benchmarks/results/latest.json`` and a chart to ``latest.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _chart
import _cluster
import _grpc
import _idle
import _inflight
import _load
import _procs
import _profile
import _report
import _steps
import _transfer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "bench.localhost"
TOKEN = "bench-token"
TARGETS = _report.TARGETS
#: The processes whose CPU is charged to each target's requests.
WATCHED = {
    "direct": ("local",),
    "hypercorn": ("hypercorn",),
    "tunnel": ("server", "agent", "local"),
}
MIB = _transfer.MIB
#: The in-flight phase's server waits this long for response headers (see Bench.inflight).
INFLIGHT_RESPONSE_TIMEOUT = 300


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--levels", help="concurrency levels, comma-separated")
    parser.add_argument("--duration", type=int, help="seconds per load phase")
    parser.add_argument("--repeat", type=int, help="rounds of every phase; medians are reported")
    parser.add_argument(
        "--cluster-levels",
        help="concurrency levels of the cluster phase (two nodes on one Redis), "
        "comma-separated; 0 skips it (default: 1,50)",
    )
    parser.add_argument("--transfer-mib", type=int, help="size of the download and upload")
    parser.add_argument(
        "--inflight",
        help="requests held in flight at once on one agent, comma-separated "
        "(default 1000,10000; --quick 200; 0 skips)",
    )
    parser.add_argument(
        "--inflight-hold-ms",
        type=int,
        default=1500,
        help="how long the local service holds the in-flight requests once all "
        "arrived (default 1500)",
    )
    parser.add_argument(
        "--grpc-levels",
        help="concurrency levels of the gRPC phase, comma-separated "
        "(default 1,10,50; --quick 1,20; 0 skips; needs grpcio)",
    )
    parser.add_argument(
        "--idle-agents",
        type=int,
        help="idle agents for the server-memory phase (default 1000; --quick 20; 0 skips)",
    )
    parser.add_argument(
        "--server-workers",
        help="also run the tunnel with these server worker counts side by side "
        "(default 1,2; 0 skips; needs 'tunnel server --workers')",
    )
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator for small GETs (auto: wrk if installed)",
    )
    parser.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for 'tunnel http' (repeat; e.g. --agent-arg=--no-inspector)",
    )
    parser.add_argument(
        "--no-count-steps",
        action="store_true",
        help="leave trio's task-switch counter off (it adds about 3 %% to every process's CPU)",
    )
    parser.add_argument(
        "--compare-generators",
        action="store_true",
        help="only run wrk and the Python fallback side by side against each target",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only profile the tunnel server and agent with py-spy under load (see _profile.py)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON output (default: results/latest.json, or generators.json, profile.json)",
    )
    return parser


class Bench:
    """The running processes and the measurements taken against them."""

    def __init__(
        self, procs: _procs.Processes, agent_args: list[str], *, counting: bool = False
    ) -> None:
        self.procs = procs
        #: Whether the children count trio task switches (TUNNEL_COUNT_SCHEDULING).
        self.counting = counting
        local, hypercorn, server, inspector = _procs.free_ports(4)
        self.ports = {"direct": local, "hypercorn": hypercorn, "tunnel": server}
        python = sys.executable
        service = str(HERE / "_service.py")
        self.processes = {
            "local": procs.start("local", [python, service, "raw", str(local)]),
            "hypercorn": procs.start("hypercorn", [python, service, "hypercorn", str(hypercorn)]),
            "server": procs.start(
                "server",
                [
                    *(python, "-m", "tunnel", "server"),
                    *("--address", f"127.0.0.1:{server}", "--token", TOKEN),
                ],
            ),
        }
        self.processes["local"].wait_until(local, HOST)
        self.processes["hypercorn"].wait_until(hypercorn, HOST)
        _wait_for_port(self.processes["server"], server)
        agent = [
            *(python, "-m", "tunnel", "http", str(local)),
            *("--server", f"127.0.0.1:{server}", "--token", TOKEN, "--host", HOST),
        ]
        if _agent_has_inspector() and not any(a.endswith("inspector") for a in agent_args):
            # The agent's default traffic inspector stays on, as a user gets it,
            # but on a free port rather than 4040.
            agent += ["--inspector", f"127.0.0.1:{inspector}"]
        self.agent_argv = [*agent, *agent_args]
        self.processes["agent"] = procs.start("agent", self.agent_argv)
        self.processes["agent"].wait_until(server, HOST)

    def check_alive(self) -> None:
        for process in self.processes.values():
            process.check_alive()

    def cpu(self) -> dict[str, float]:
        return {name: process.cpu_seconds() for name, process in self.processes.items()}

    def steps(self, names: tuple[str, ...]) -> dict[str, dict[str, int] | None]:
        """Trio task switches so far in each of ``names`` (see _steps.py)."""
        if not self.counting:
            return {}
        return {
            name: _steps.read(self.procs.log_dir, self.processes[name].trio_pids())
            for name in names
            if name != "local"
        }

    def small_get(self, target: str, connections: int, seconds: int, generator: str) -> dict:
        """One load phase of small GETs, with the CPU of the processes behind ``target``."""
        self.check_alive()
        port = self.ports[target]
        marks: list[dict[str, float]] = []
        counts: list[dict[str, dict[str, int] | None]] = []

        def start() -> None:
            counts.append(self.steps(WATCHED[target]))
            marks.append(self.cpu())

        def end() -> None:
            marks.append(self.cpu())
            counts.append(self.steps(WATCHED[target]))

        if generator == "wrk":
            start()
            result = _load.wrk_load(port, HOST, connections, seconds)
            end()
        else:
            result = _load.python_load(
                port, HOST, connections, seconds, warmup=1.0, on_start=start, on_end=end
            )
        self.check_alive()
        before, after = marks
        cpu = {name: after[name] - before[name] for name in WATCHED[target]}
        steps = {name: _steps.difference(counts[0][name], counts[1][name]) for name in counts[0]}
        return {
            "target": target,
            "concurrency": connections,
            "generator": result.generator,
            "seconds": round(result.seconds, 3),
            "requests": result.requests,
            "errors": result.errors,
            "rps": round(result.rps, 1),
            "p50_ms": round(result.p50_ms, 4),
            "p99_ms": round(result.p99_ms, 4),
            "cpu_s": {name: round(value, 3) for name, value in cpu.items()},
            "generator_cpu_s": round(result.generator_cpu_s, 3),
            "task_counts": steps,
        }

    def profile(
        self, target: str, level: int, seconds: int, generator: str, directory: Path
    ) -> dict:
        """A load phase on ``target`` with py-spy recording the processes behind it."""
        directory.mkdir(parents=True, exist_ok=True)
        names = [name for name in WATCHED[target] if name != "local"]
        paths = {name: directory / f"profile-{name}.txt" for name in names}
        recorders = {
            name: _profile.record(self.processes[name].pid, seconds, paths[name]) for name in names
        }
        # The load outlasts the recording, which starts a moment later.
        result = self.small_get(target, level, seconds + 2, generator)
        summaries = {}
        for name, recorder in recorders.items():
            _, stderr = recorder.communicate(timeout=30)
            if recorder.returncode != 0:
                raise RuntimeError(
                    f"py-spy failed on the {name}: {stderr.decode(errors='replace')}"
                )
            summaries[name] = _profile.summarize(paths[name], name)
        per_request = {name: result["cpu_s"][name] / result["requests"] * 1e6 for name in names}
        return {"load": result, "cpu_us_per_request": per_request, "profiles": summaries}

    def transfer(self, target: str, direction: str, size: int) -> dict:
        self.check_alive()
        run = _transfer.download if direction == "download" else _transfer.upload
        before = self.cpu()
        result = run(self.ports[target], HOST, size)
        after = self.cpu()
        return {
            "target": target,
            "direction": direction,
            "bytes": size,
            "seconds": round(result.seconds, 4),
            "mib_per_s": round(result.mib_per_s, 1),
            "cpu_ms_per_mib": {
                name: round((after[name] - before[name]) * 1000 / (size / MIB), 2)
                for name in WATCHED[target]
            },
        }

    def holders(self) -> tuple[int, int]:
        """(running now, most at once since the last reset) of the local ``/hold``."""
        with socket.create_connection(("127.0.0.1", self.ports["direct"]), timeout=5) as sock:
            sock.sendall(b"GET /holders?reset=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        current, peak = answer.rsplit(b"\r\n\r\n", 1)[1].split()
        return int(current), int(peak)

    def inflight(self, count: int, hold_ms: int) -> dict:
        """``count`` requests in flight at once through a tunnel of their own.

        A fresh server and agent for each phase, so that one phase's memory is not
        the next one's baseline. Two settings differ from the defaults, both in
        the config files a user would write: the agent lets the server open
        ``count`` streams at once (``max_concurrent_streams``, 1000 by default),
        and the server waits up to 300 s for response headers
        (``response_timeout``, 60 s) because opening 10,000 connections takes
        most of a minute on this machine, and the first request must outlast it.
        """
        self.check_alive()
        procs = self.procs
        python = sys.executable
        port, inspector = _procs.free_ports(2)
        server_toml = procs.log_dir / f"inflight-{count}-server.toml"
        server_toml.write_text(f"response_timeout = {INFLIGHT_RESPONSE_TIMEOUT}\n")
        agent_toml = procs.log_dir / f"inflight-{count}-agent.toml"
        agent_toml.write_text(f"max_concurrent_streams = {max(count, 1000)}\n")
        server = procs.start(
            f"inflight-{count}-server",
            [
                *(python, "-m", "tunnel", "server", "--config", str(server_toml)),
                *("--address", f"127.0.0.1:{port}", "--token", TOKEN),
            ],
        )
        _wait_for_port(server, port)
        argv = [
            *(python, "-m", "tunnel", "http", str(self.ports["direct"]), "--config"),
            *(str(agent_toml), "--server", f"127.0.0.1:{port}", "--token", TOKEN),
            *("--host", HOST),
        ]
        if _agent_has_inspector():
            argv += ["--inspector", f"127.0.0.1:{inspector}"]
        agent = procs.start(f"inflight-{count}-agent", argv)
        agent.wait_until(port, HOST)
        self.holders()  # resets the peak
        watched = {"server": server, "agent": agent}
        before = {name: process.cpu_seconds() for name, process in watched.items()}
        with _RssSampler({name: process.pid for name, process in watched.items()}) as rss:
            result = _inflight.hold(port, self.ports["direct"], HOST, count, hold_ms=hold_ms)
        after = {name: process.cpu_seconds() for name, process in watched.items()}
        _, peak = self.holders()
        for process in (agent, server):
            process.check_alive()
            process.stop()
        # The logs live in a temporary directory: keep what explains a failure.
        logs = (
            {name: process.log_tail(10) for name, process in watched.items()}
            if result.error_count
            else None
        )
        self.check_alive()
        out = result.to_dict()
        out["local_peak_in_flight"] = peak
        out["rss_kib"] = rss.summary()
        out["cpu_us_per_request"] = {
            name: round((after[name] - before[name]) / count * 1e6, 1) for name in watched
        }
        out["server_settings"] = {"response_timeout": INFLIGHT_RESPONSE_TIMEOUT}
        out["agent_settings"] = {"max_concurrent_streams": max(count, 1000)}
        if logs:
            out["log_tails"] = logs
        return out


class _RssSampler:
    """RSS of some processes every 50 ms in a thread: the value before, and the peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: _procs.rss_kib(pid) for name, pid in pids.items()}
        self.peak = dict(self.before)
        self.after: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], _procs.rss_kib(pid))

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.after = {name: _procs.rss_kib(pid) for name, pid in self.pids.items()}

    def summary(self) -> dict[str, dict[str, int]]:
        return {
            name: {"before": self.before[name], "peak": self.peak[name], "after": self.after[name]}
            for name in self.pids
        }


def _settled_rss(pid: int, samples: int = 5, pause: float = 0.2) -> int:
    """The median of a few RSS readings, once a process has had a moment to settle."""
    readings = []
    for _ in range(samples):
        time.sleep(pause)
        readings.append(_procs.rss_kib(pid))
    return int(statistics.median(readings))


def _wait_for_line(process: _procs.Process, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.log_tail(5):
        process.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name}: no {text!r} after {timeout:g} s")
        time.sleep(0.1)


def grpc_phase(
    procs: _procs.Processes, bench: Bench, levels: list[int], seconds: int, repeat: int
) -> list[dict]:
    """A grpcio server behind a second agent (h2c), loaded directly and through the tunnel."""
    (port,) = _procs.free_ports(1)
    python = sys.executable
    service = procs.start("grpc", [python, str(HERE / "_grpc.py"), "serve", str(port)])
    _wait_for_line(service, "serving", 20)
    agent = procs.start(
        "grpc-agent",
        [
            *(python, "-m", "tunnel", "http", str(port), "--local-protocol", "h2c"),
            *("--server", f"127.0.0.1:{bench.ports['tunnel']}", "--token", TOKEN),
            *("--host", _grpc.GRPC_HOST, "--no-inspector"),
        ],
    )
    _wait_for_line(agent, "connected", 20)
    try:
        watched = {"server": bench.processes["server"], "agent": agent, "grpc service": service}
        return _grpc.run_phase(
            bench.ports["tunnel"],
            port,
            levels,
            seconds,
            repeat,
            lambda: {name: process.cpu_seconds() for name, process in watched.items()},
        )
    finally:
        agent.stop()
        service.stop()


def h2_download(bench: Bench, size: int, repeat: int) -> dict:
    """``size`` bytes by curl over cleartext HTTP/2 (prior knowledge), Hypercorn vs tunnel.

    Both Hypercorn and the tunnel server accept h2c with prior knowledge; the
    rounds alternate the two, and the median of each is kept.
    """
    rounds: dict[str, list[float]] = {"hypercorn": [], "tunnel": []}
    for _ in range(repeat):
        for target in rounds:
            bench.check_alive()
            rounds[target].append(_curl_h2_download(bench.ports[target], size))
    return {
        target: {
            "bytes": size,
            "mib_per_s": round(statistics.median(values), 1),
            "rounds_mib_per_s": [round(v, 1) for v in values],
        }
        for target, values in rounds.items()
    }


def _curl_h2_download(port: int, size: int) -> float:
    """MiB/s of one ``GET /download`` by ``curl --http2-prior-knowledge``."""
    out = subprocess.run(
        [
            *("curl", "--silent", "--show-error", "--http2-prior-knowledge"),
            *("--max-time", "120", "-o", "/dev/null", "-H", f"Host: {HOST}"),
            *("-w", "%{http_version} %{http_code} %{size_download} %{time_total}"),
            f"http://127.0.0.1:{port}/download?bytes={size}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    fields = out.stdout.split()
    if out.returncode != 0 or len(fields) != 4 or fields[:2] != ["2", "200"]:
        raise RuntimeError(f"curl h2c download on :{port} failed: {out.stdout} {out.stderr}")
    if int(fields[2]) != size:
        raise RuntimeError(f"curl h2c download on :{port}: {fields[2]} of {size} bytes")
    return size / MIB / float(fields[3])


def idle_agents(procs: _procs.Processes, local_port: int, count: int) -> dict:
    """Server RSS with no agent, 1 and ``count`` idle agents, on a server of its own.

    A fresh server, so that nothing the other phases allocated (and Python kept
    for reuse) hides or inflates what the agents cost.
    """
    (port,) = _procs.free_ports(1)
    python = sys.executable
    server = procs.start(
        "idle-server",
        [
            *(python, "-m", "tunnel", "server"),
            *("--address", f"127.0.0.1:{port}", "--token", TOKEN),
        ],
    )
    _wait_for_port(server, port)
    script = str(HERE / "_idle.py")
    rss = {"0": _settled_rss(server.pid)}
    first = procs.start("idle-1", [python, script, str(port), TOKEN, str(local_port), "0", "1"])
    _wait_for_line(first, "connected 1", 30)
    # The agents route: a request through the first reaches the local service.
    first_ok = _procs.get(port, _idle.host(0)) == 200
    rss["1"] = _settled_rss(server.pid)
    rest = procs.start(
        "idle-rest",
        [python, script, str(port), TOKEN, str(local_port), "1", str(count - 1)],
    )
    started = time.monotonic()
    _wait_for_line(rest, f"connected {count - 1}", _idle.CONNECT_WITHIN + 10)
    connect_s = time.monotonic() - started
    last_ok = _procs.get(port, _idle.host(count - 1)) == 200
    # Past the handshakes' garbage and the agents' first PINGs.
    time.sleep(2)
    rss[str(count)] = _settled_rss(server.pid, samples=10)
    agents_rss = _procs.rss_kib(first.pid) + _procs.rss_kib(rest.pid)
    server.check_alive()
    for process in (rest, first, server):
        process.stop()
    per_agent = (rss[str(count)] - rss["1"]) / (count - 1)
    return {
        "agents": count,
        "server_rss_kib": rss,
        "kib_per_extra_agent": round(per_agent, 1),
        "connect_s": round(connect_s, 2),
        "routed": first_ok and last_ok,
        "agent_processes_rss_kib": agents_rss,
    }


def _worker_counts(text: str | None) -> list[int]:
    """The ``--server-workers`` counts; exits if this tunnel has no ``--workers``."""
    if text is None:
        text = "1,2"
    counts = [int(n) for n in text.split(",") if int(n)]
    if not counts:
        return []
    if any(n < 1 for n in counts) or len(set(counts)) < 2:
        raise SystemExit("bench: --server-workers takes two or more counts, such as 1,2")
    usage = subprocess.run(
        [sys.executable, "-m", "tunnel", "server", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),
    ).stdout
    if "--workers" not in usage:
        raise SystemExit(
            "bench: --server-workers needs 'tunnel server --workers', which this tunnel lacks"
        )
    return counts


def _compare_workers(
    procs: _procs.Processes,
    bench: Bench,
    counts: list[int],
    levels: list[int],
    seconds: int,
    repeat: int,
    generator: str,
    size: int,
) -> tuple[list[dict], list[dict]]:
    """Small GETs, then one download and upload of ``size`` bytes, through tunnels
    whose servers run ``counts`` workers, interleaved."""
    python = sys.executable
    tunnels = {}
    for count in counts:
        port, inspector = _procs.free_ports(2)
        server = procs.start(
            f"server-w{count}",
            [
                *(python, "-m", "tunnel", "server", "--workers", str(count)),
                *("--address", f"127.0.0.1:{port}", "--token", TOKEN),
            ],
        )
        _wait_for_port(server, port)
        agent = [
            *(python, "-m", "tunnel", "http", str(bench.ports["direct"])),
            *("--server", f"127.0.0.1:{port}", "--token", TOKEN, "--host", HOST),
        ]
        if _agent_has_inspector():
            agent += ["--inspector", f"127.0.0.1:{inspector}"]
        process = procs.start(f"agent-w{count}", agent)
        process.wait_until(port, HOST)
        # The agent opens one connection per worker; give it time to reach all.
        time.sleep(2)
        tunnels[count] = (port, server, process)
    runs: dict[tuple[int, int], list[dict]] = {}
    for level in levels:
        for _ in range(repeat):
            for count, (port, server, agent) in tunnels.items():
                watched = {"server": server, "agent": agent} if bench.counting else {}
                steps_before = {
                    name: _steps.read(procs.log_dir, process.trio_pids())
                    for name, process in watched.items()
                }
                before = (server.tree_cpu_seconds(), agent.cpu_seconds())
                if generator == "wrk":
                    result = _load.wrk_load(port, HOST, level, seconds)
                else:
                    result = _load.python_load(port, HOST, level, seconds, warmup=1.0)
                after = (server.tree_cpu_seconds(), agent.cpu_seconds())
                counted = {
                    name: _steps.difference(
                        steps_before[name], _steps.read(procs.log_dir, process.trio_pids())
                    )
                    for name, process in watched.items()
                }
                runs.setdefault((count, level), []).append(
                    {
                        "workers": count,
                        "concurrency": level,
                        "rps": round(result.rps, 1),
                        "p50_ms": round(result.p50_ms, 4),
                        "p99_ms": round(result.p99_ms, 4),
                        "errors": result.errors,
                        "requests": result.requests,
                        "server_cpu_s": after[0] - before[0],
                        "agent_cpu_s": after[1] - before[1],
                        "task_counts": counted,
                    }
                )
    rows = []
    base = counts[0]
    for level in levels:
        medians = {}
        for count in counts:
            value = runs[(count, level)]
            chosen = dict(sorted(value, key=lambda r: r["rps"])[(len(value) - 1) // 2])
            requests = sum(r["requests"] for r in value) or 1
            chosen["server_cpu_us_per_request"] = round(
                sum(r["server_cpu_s"] for r in value) / requests * 1e6, 1
            )
            chosen["agent_cpu_us_per_request"] = round(
                sum(r["agent_cpu_s"] for r in value) / requests * 1e6, 1
            )
            chosen["errors"] = sum(r["errors"] for r in value)
            chosen["rounds_rps"] = [r["rps"] for r in value]
            for key in ("task_steps", "task_scheduled"):
                chosen[f"{key}_per_request"] = {
                    name: _per_request([r["task_counts"][name] for r in value], key, requests)
                    for name in chosen["task_counts"]
                }
            del chosen["server_cpu_s"], chosen["agent_cpu_s"], chosen["task_counts"]
            medians[count] = chosen
        for count in counts:
            medians[count]["gain_over_first"] = round(
                medians[count]["rps"] / medians[base]["rps"], 3
            )
            rows.append(medians[count])
    moved = []
    for direction in ("download", "upload"):
        transfer = _transfer.download if direction == "download" else _transfer.upload
        for count, (port, server, agent) in tunnels.items():
            before = (server.tree_cpu_seconds(), agent.cpu_seconds())
            done = transfer(port, HOST, size)
            after = (server.tree_cpu_seconds(), agent.cpu_seconds())
            moved.append(
                {
                    "workers": count,
                    "direction": direction,
                    "bytes": size,
                    "seconds": round(done.seconds, 4),
                    "mib_per_s": round(done.mib_per_s, 1),
                    "cpu_ms_per_mib": {
                        "server": round((after[0] - before[0]) * 1000 / (size / MIB), 2),
                        "agent": round((after[1] - before[1]) * 1000 / (size / MIB), 2),
                    },
                }
            )
    for _, server, agent in tunnels.values():
        agent.stop()
        server.stop()
    return rows, moved


def _tunnel_counts_scheduling() -> bool:
    """Whether this tunnel's processes can count trio task switches (tunnel/_scheduling.py)."""
    found = subprocess.run(
        [sys.executable, "-c", "import tunnel._scheduling"],
        capture_output=True,
        check=False,
        cwd=tempfile.gettempdir(),
    )
    return found.returncode == 0


def _agent_has_inspector() -> bool:
    """Whether this tunnel's ``http`` command serves a traffic inspector by default."""
    usage = subprocess.run(
        [sys.executable, "-m", "tunnel", "http", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),
    ).stdout
    return "--inspector" in usage


def _wait_for_port(process: _procs.Process, port: int, timeout: float = 20.0) -> None:
    """Wait until something answers HTTP on ``port`` (any status)."""
    deadline = time.monotonic() + timeout
    while _procs.get(port, "not-a-tunnel.localhost", timeout=1.0) == 0:
        process.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} not listening after {timeout:g} s")
        time.sleep(0.05)


# --- summaries -----------------------------------------------------------------------


def _median_run(runs: list[dict]) -> dict:
    """The run with the median requests/s, with CPU per request over all runs."""
    ordered = sorted(runs, key=lambda run: run["rps"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    requests = sum(run["requests"] for run in runs)
    seconds = sum(run["seconds"] for run in runs)
    chosen["cpu_us_per_request"] = {
        name: round(sum(run["cpu_s"][name] for run in runs) / requests * 1e6, 1)
        if requests
        else None
        for name in chosen["cpu_s"]
    }
    chosen["generator_cpu_percent"] = round(
        100 * sum(run["generator_cpu_s"] for run in runs) / seconds, 1
    )
    chosen["rounds_rps"] = [run["rps"] for run in runs]
    chosen["errors"] = sum(run["errors"] for run in runs)
    for key in ("task_steps", "task_scheduled"):
        chosen[f"{key}_per_request"] = {
            name: _per_request([run["task_counts"][name] for run in runs], key, requests)
            for name in chosen["task_counts"]
        }
    del chosen["cpu_s"], chosen["generator_cpu_s"], chosen["task_counts"]
    return chosen


def _per_request(counts: list[dict[str, int] | None], key: str, requests: int) -> float | None:
    """``key`` summed over rounds, per request; None if a round was not counted."""
    if not requests or any(count is None for count in counts):
        return None
    return round(sum(count[key] for count in counts if count) / requests, 2)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("trio", "hypercorn", "h2", "h11", "wsproto", "trio-websocket", "tunnel"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "?"
    wrk = _load.wrk_path()
    if wrk:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
        versions["wrk"] = (
            (out.stdout or out.stderr).split()[1] if (out.stdout or out.stderr) else "?"
        )
    return versions


def _tunnel_source() -> str:
    """Which tunnel package the child processes import, and its git state if it is ours."""
    found = subprocess.run(
        [sys.executable, "-c", "import tunnel; print(tunnel.__file__)"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),
    ).stdout.strip()
    package = Path(found).parent if found else None
    if package is None or package.parent != ROOT:
        return f"tunnel from {package}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "tunnel"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"tunnel from {package}"
    return f"tunnel at {commit}" + (" with uncommitted changes in tunnel/" if dirty else "")


# --- the run -------------------------------------------------------------------------


def _compare_generators(bench: Bench, levels: list[int], seconds: int, repeat: int) -> list:
    """wrk and the fallback against every target, interleaved, medians of ``repeat`` rounds."""
    runs: dict[tuple[str, int, str], list[dict]] = {}
    for level in levels:
        for _ in range(repeat):
            for target in TARGETS:
                for generator in ("wrk", "python"):
                    result = bench.small_get(target, level, seconds, generator)
                    runs.setdefault((target, level, generator), []).append(result)
    rows = []
    print()
    print("load generators side by side: wrk vs the Python fallback (medians)")
    print(
        f"{'conc':>5} {'target':<10} {'wrk req/s':>10} {'py req/s':>10} {'py÷wrk':>7}"
        f" {'wrk p50':>8} {'py p50':>8} {'wrk p99':>8} {'py p99':>8} {'wrk CPU':>8} {'py CPU':>8}"
    )
    for level in levels:
        for target in TARGETS:
            wrk = _median_run(runs[(target, level, "wrk")])
            py = _median_run(runs[(target, level, "python")])
            rows.append({"wrk": wrk, "python": py})
            print(
                f"{level:>5} {target:<10} {wrk['rps']:>10.0f} {py['rps']:>10.0f}"
                f" {py['rps'] / wrk['rps']:>7.2f} {wrk['p50_ms']:>8.3f} {py['p50_ms']:>8.3f}"
                f" {wrk['p99_ms']:>8.3f} {py['p99_ms']:>8.3f}"
                f" {wrk['generator_cpu_percent']:>7.0f}% {py['generator_cpu_percent']:>7.0f}%"
            )
    return rows


def _run_profile(
    bench: Bench, args: argparse.Namespace, levels: list[int], seconds: int, generator: str
) -> dict[str, Any]:
    level = 50 if 50 in levels or not args.levels else max(levels)
    seconds = max(seconds, 10)
    outcomes = {}
    for target in ("hypercorn", "tunnel"):
        bench.small_get(target, level, 1, generator)
        print(f"\nprofiling {target} at c{level} for {seconds} s with py-spy", flush=True)
        outcome = bench.profile(target, level, seconds, generator, args.output.parent)
        load = outcome["load"]
        print(f"(under py-spy: {load['rps']:.0f} req/s, p50 {load['p50_ms']:.2f} ms)")
        for name, summary in outcome["profiles"].items():
            print()
            print(_profile.format_summary(name, summary, outcome["cpu_us_per_request"][name]))
        outcomes[target] = outcome
    return {"profile": outcomes}


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    levels = (
        [int(level) for level in args.levels.split(",")]
        if args.levels
        else ([1, 50] if quick else [1, 10, 50, 200])
    )
    seconds = args.duration or (2 if quick else 4)
    repeat = args.repeat or (1 if quick else 3)
    size = (args.transfer_mib or (16 if quick else 100)) * MIB
    inflight_levels = [
        int(n) for n in (args.inflight or ("200" if quick else "1000,10000")).split(",") if int(n)
    ]
    idle_count = args.idle_agents if args.idle_agents is not None else (20 if quick else 1000)
    grpc_levels = [
        int(n) for n in (args.grpc_levels or ("1,20" if quick else "1,10,50")).split(",") if int(n)
    ]
    if grpc_levels and not _grpc.available():
        print("note: grpcio is not installed; the gRPC phase is skipped", flush=True)
        grpc_levels = []
    cluster_levels = [int(n) for n in (args.cluster_levels or "1,50").split(",") if int(n)]
    if cluster_levels and not _cluster.available():
        print("note: redis-server is not installed; the cluster phase is skipped", flush=True)
        cluster_levels = []
    worker_counts = _worker_counts(args.server_workers)
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if _load.wrk_path() else "python"
    if generator == "wrk" and not _load.wrk_path():
        raise SystemExit("bench: --generator wrk, but wrk is not installed")

    if args.profile and _profile.py_spy_path() is None:
        raise SystemExit("bench: --profile needs py-spy (pip install py-spy)")
    versions = _versions()
    source = _tunnel_source()
    described = (
        f"wrk {versions.get('wrk', '?')} (1 thread)"
        if generator == "wrk"
        else f"Python fallback (benchmarks/_load.py, up to {os.cpu_count()} processes)"
    )
    print(f"{source}; load generator: {described}")
    load_before = os.getloadavg()[0]
    print(
        f"levels {levels}, {seconds} s per phase, {repeat} round(s); "
        f"transfers of {size // MIB} MiB; {os.cpu_count()} CPUs; loadavg {load_before:.2f}",
        flush=True,
    )
    if load_before > 0.75 * (os.cpu_count() or 1):
        print("note: the machine is busy; absolute figures will be low and noisy", flush=True)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="tunnel-bench-") as logs,
        _procs.Processes(Path(logs)) as procs,
    ):
        # Every child counts trio's task switches, reported into the log
        # directory on SIGUSR1 (see _steps.py), if this tunnel can. Without it,
        # SIGUSR1 would kill them, so none is sent.
        # The counter is a trio instrument, called on every task step: about 3 %
        # of each process's CPU, Hypercorn-direct's included, so the ratios
        # hold; --no-count-steps for the absolute figures.
        counting = not args.no_count_steps and _tunnel_counts_scheduling()
        if counting:
            os.environ[_steps.ENVIRONMENT] = logs
        bench = Bench(procs, args.agent_arg, counting=counting)
        print(
            "started: local service (raw trio) :{direct}, Hypercorn (trio worker) :{hypercorn}, "
            "tunnel server :{tunnel}".format(**bench.ports),
            flush=True,
        )
        print("agent: " + " ".join(bench.agent_argv[2:]), flush=True)
        if args.compare_generators:
            if not _load.wrk_path():
                raise SystemExit("bench: --compare-generators needs wrk installed")
            rows = _compare_generators(bench, levels, seconds, repeat)
            return {"generator_comparison": rows, "versions": versions}

        if args.profile:
            return _run_profile(bench, args, levels, seconds, generator)

        # Warm every target once (connections, the agent's pool, caches).
        for target in TARGETS:
            bench.small_get(target, max(levels), 1, generator)

        runs: dict[tuple[str, int], list[dict]] = {}
        for level in levels:
            for round_ in range(repeat):
                for target in TARGETS:
                    result = bench.small_get(target, level, seconds, generator)
                    runs.setdefault((target, level), []).append(result)
                    print(
                        f"  c{level:<4} round {round_ + 1} {target:<10}"
                        f" {result['rps']:>8.0f} req/s  p50 {result['p50_ms']:.3f} ms"
                        f"  p99 {result['p99_ms']:.3f} ms  errors {result['errors']}",
                        flush=True,
                    )
        small = {key: _median_run(value) for key, value in runs.items()}

        transfer_runs: dict[tuple[str, str], list[dict]] = {}
        for round_ in range(repeat):
            for direction in ("download", "upload"):
                for target in TARGETS:
                    result = bench.transfer(target, direction, size)
                    transfer_runs.setdefault((target, direction), []).append(result)
                    print(
                        f"  {direction:<8} round {round_ + 1} {target:<10}"
                        f" {result['mib_per_s']:>8.0f} MiB/s",
                        flush=True,
                    )
        transfers = {}
        for key, value in transfer_runs.items():
            median = dict(sorted(value, key=lambda r: r["mib_per_s"])[(len(value) - 1) // 2])
            median["rounds_mib_per_s"] = [r["mib_per_s"] for r in value]
            median["cpu_ms_per_mib"] = {
                name: round(statistics.median(r["cpu_ms_per_mib"][name] for r in value), 2)
                for name in median["cpu_ms_per_mib"]
            }
            transfers[key] = median
        bench.check_alive()

        inflight = []
        for count in inflight_levels:
            result = bench.inflight(count, args.inflight_hold_ms)
            inflight.append(result)
            print(
                f"  in flight {count:>6}: {result['ok']} ok, {result['error_count']} errors,"
                f" {result['local_peak_in_flight']} at once at the local service;"
                f" sent in {result['connect_s']:.2f} s, all answered"
                f" {result['complete_s']:.2f} s after the last (hold {result['hold_s']:g} s)",
                flush=True,
            )
        grpc_rows = grpc_phase(procs, bench, grpc_levels, seconds, repeat) if grpc_levels else None
        idle = None
        if idle_count >= 2:
            idle = idle_agents(procs, bench.ports["direct"], idle_count)
            print(
                f"  idle agents: server RSS {idle['server_rss_kib']} KiB;"
                f" {idle['kib_per_extra_agent']:.1f} KiB per extra agent",
                flush=True,
            )
        h2 = h2_download(bench, size, repeat) if shutil.which("curl") else None
        if h2:
            print(
                f"  h2c download: Hypercorn {h2['hypercorn']['mib_per_s']:.0f} MiB/s,"
                f" tunnel {h2['tunnel']['mib_per_s']:.0f} MiB/s",
                flush=True,
            )
        cluster = (
            _cluster.cluster_phase(
                procs,
                bench.ports["direct"],
                HOST,
                TOKEN,
                *(cluster_levels, seconds, repeat),
                generator,
            )
            if cluster_levels
            else None
        )
        workers, workers_transfers = (
            _compare_workers(procs, bench, worker_counts, levels, seconds, repeat, generator, size)
            if worker_counts
            else (None, None)
        )

    targets = _report.targets(
        small, transfers, inflight, idle, workers or [], workers_transfers or [], h2
    )
    _report.print_small(small, levels)
    _report.print_transfers(transfers, size)
    _report.print_inflight(inflight)
    _report.print_idle(idle)
    if grpc_rows:
        _grpc.print_phase(grpc_rows)
    if workers:
        _report.print_workers(workers)
    _report.print_h2(h2, size)
    if cluster:
        _cluster.print_phase(cluster)
    _report.print_side_by_side(small, transfers, workers or [], workers_transfers or [], h2)
    _report.print_targets(targets)
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()[0]
    print(f"\n{elapsed:.0f} s; loadavg {load_before:.2f} before, {load_after:.2f} after")
    return {
        "meta": {
            "generator": described,
            "quick": quick,
            "levels": levels,
            "seconds_per_phase": seconds,
            "rounds": repeat,
            "transfer_bytes": size,
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "versions": versions,
            "tunnel_source": source,
            "agent_command": " ".join(bench.agent_argv[1:]),
            "elapsed_s": round(elapsed, 1),
            "loadavg_1min": [round(load_before, 2), round(load_after, 2)],
            "small_get_body_bytes": 14,
            "inflight_hold_ms": args.inflight_hold_ms,
        },
        "small_get": list(small.values()),
        "transfers": list(transfers.values()),
        "inflight": inflight,
        "idle_agents": idle,
        "grpc_unary": grpc_rows,
        "server_workers": workers,
        "server_workers_transfers": workers_transfers,
        "h2_download": h2,
        "cluster": cluster,
        "targets": targets,
    }


def main() -> int:
    args = _parser().parse_args()

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    if args.output is None:
        name = (
            "generators.json"
            if args.compare_generators
            else "profile.json"
            if args.profile
            else "latest.json"
        )
        args.output = HERE / "results" / name
    results = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {args.output}")
    if "small_get" in results:
        chart = args.output.with_suffix(".png")
        if _chart.draw(results, chart):
            print(f"chart: {chart}")
        else:
            print("chart: not drawn (matplotlib is not installed; nox -s bench installs it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
