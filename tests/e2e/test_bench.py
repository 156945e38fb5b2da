"""``nox -s bench -- --quick`` runs: the benchmark script, as it is, in its own processes.

Benchmarks are not timed tests: this checks that the run completes and writes
every section of its JSON, never how fast anything was.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from helpers import stop_politely

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


async def test_quick_benchmark_runs_and_writes_every_section(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    # --quick with 1 s phases: c1 and c50, 16 MiB transfers (HTTP/1.1 and h2c),
    # 200 requests in flight, 20 idle agents, gRPC at c1 and c20, and the tunnel
    # with 1 and 2 server workers, and two nodes of a cluster.
    argv = [sys.executable, str(SCRIPT), "--quick", "--duration", "1", "--output", str(output)]
    with trio.fail_after(200):
        result = await trio.run_process(
            argv,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            deliver_cancel=stop_politely,
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"{out}\n{err}"
    results = json.loads(output.read_text())
    assert set(results) >= {
        *("meta", "small_get", "transfers", "inflight", "idle_agents", "targets"),
        *("server_workers", "server_workers_transfers", "h2_download"),
    }
    assert {(r["target"], r["concurrency"]) for r in results["small_get"]} == {
        (target, level) for target in ("direct", "hypercorn", "tunnel") for level in (1, 50)
    }
    assert {(r["target"], r["direction"]) for r in results["transfers"]} == {
        (target, direction)
        for target in ("direct", "hypercorn", "tunnel")
        for direction in ("download", "upload")
    }
    (inflight,) = results["inflight"]
    assert inflight["requests"] == 200
    # Every request is accounted for, answered or counted as an error.
    assert inflight["ok"] + inflight["error_count"] == 200
    assert set(inflight["rss_kib"]) == {"server", "agent"}
    idle = results["idle_agents"]
    assert idle["agents"] == 20
    assert set(idle["server_rss_kib"]) == {"0", "1", "20"}
    assert isinstance(idle["kib_per_extra_agent"], float)
    # The gRPC phase: both targets at --quick's two levels, and their ratio.
    assert [row["concurrency"] for row in results["grpc_unary"]] == [1, 20]
    for row in results["grpc_unary"]:
        assert row["tunnel"]["calls_per_s"] > 0
        assert row["ratio"] == row["tunnel"]["calls_per_s"] / row["direct"]["calls_per_s"]
    assert "gRPC unary calls per second" in out
    # The tunnel with 1 and 2 server workers, small GETs then one download and upload.
    assert {(r["workers"], r["concurrency"]) for r in results["server_workers"]} == {
        (workers, level) for workers in (1, 2) for level in (1, 50)
    }
    assert {(r["workers"], r["direction"]) for r in results["server_workers_transfers"]} == {
        (workers, direction) for workers in (1, 2) for direction in ("download", "upload")
    }
    # The cluster: two nodes on one Redis, a local and a forwarded request at each level.
    assert {(r["path"], r["concurrency"]) for r in results["cluster"]} == {
        (path, level) for path in ("local", "forwarded") for level in (1, 50)
    }
    for row in results["cluster"]:
        assert row["errors"] == 0, row
        assert set(row["cpu_us_per_request"]) == {"one", "two", "nodes", "agent"}
    assert "forwarding adds" in out
    # HTTP/2 visitors: curl over h2c, to Hypercorn and through the tunnel.
    assert set(results["h2_download"]) == {"hypercorn", "tunnel"}
    assert all(row["mib_per_s"] > 0 for row in results["h2_download"].values())
    # Trio task steps per request, counted in every trio process under test.
    for row in results["small_get"]:
        counted = {"direct": set(), "hypercorn": {"hypercorn"}, "tunnel": {"server", "agent"}}
        steps = row["task_steps_per_request"]
        assert set(steps) == counted[row["target"]]
        assert all(value is not None and value > 0 for value in steps.values()), row
    for row in results["server_workers"]:
        steps = row["task_steps_per_request"]
        assert all(steps[name] is not None and steps[name] > 0 for name in ("server", "agent"))
    assert "issue 14, side by side" in out
    assert "ours, --workers 2" in out
    # Issue 14's goals, every one measured: server CPU (4), agent CPU (2), latency,
    # download and upload, h2c download, in flight, idle agents.
    measured = {target["target"]: target["measured"] for target in results["targets"]}
    assert len(measured) == 12
    assert all(value is not None for value in measured.values()), measured
    # The chart is drawn where matplotlib is installed (nox -s bench), not here.
    chart = output.with_suffix(".png")
    assert chart.exists() == ("chart: " + str(chart) in out)
