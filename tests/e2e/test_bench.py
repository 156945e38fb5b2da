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
    # --quick with 1 s phases: c1 and c50, 16 MiB transfers, 200 requests in
    # flight, 20 idle agents, gRPC at c1 and c20.
    argv = [sys.executable, str(SCRIPT), "--quick", "--duration", "1", "--output", str(output)]
    with trio.fail_after(150):
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
    assert set(results) >= {"meta", "small_get", "transfers", "inflight", "idle_agents", "targets"}
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
    measured = {target["target"]: target["measured"] for target in results["targets"]}
    assert len(measured) == 6
    assert all(value is not None for value in measured.values()), measured
    # The chart is drawn where matplotlib is installed (nox -s bench), not here.
    chart = output.with_suffix(".png")
    assert chart.exists() == ("chart: " + str(chart) in out)
