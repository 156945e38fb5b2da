"""The gRPC phase: unary calls per second through the tunnel and directly, side by side.

A grpcio server (``grpc.aio``, one generic echo method on raw bytes, no generated
code) runs as its own process; a second agent exposes it with ``--local-protocol
h2c`` as ``grpc.localhost`` on the bench's tunnel server. The load generator is a
``grpc.aio`` client in a process of its own, ``concurrency`` calls in flight on
one channel for ``seconds``, against the service directly and through the tunnel;
the ratio of the two is the cost of the tunnel for gRPC.

Run as a script, this file is those two processes::

    python _grpc.py serve PORT
    python _grpc.py load HOST:PORT AUTHORITY CONCURRENCY SECONDS   (prints JSON)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GRPC_HOST = "grpc.localhost"
METHOD = "/bench.Echo/Unary"
#: The request and response message: as small as the HTTP phase's body.
MESSAGE = b"hello, world!\n"


def available() -> bool:
    """Whether grpcio is installed (``nox -s bench`` installs it)."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        return False
    return True


def _serve(port: int) -> None:
    import grpc
    import grpc.aio

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("bench.Echo", {"Unary": handler})]
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("serving", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def _load(target: str, authority: str, concurrency: int, seconds: float) -> dict[str, Any]:
    import grpc
    import grpc.aio

    async def main() -> dict[str, Any]:
        options = [("grpc.default_authority", authority)] if authority != "-" else []
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            call = channel.unary_unary(METHOD)
            await call(MESSAGE, timeout=10)  # connected and warm
            latencies: list[float] = []
            errors = 0
            deadline = time.monotonic() + seconds

            async def worker() -> None:
                nonlocal errors
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    try:
                        await call(MESSAGE, timeout=10)
                    except grpc.RpcError:
                        errors += 1
                    else:
                        latencies.append(time.monotonic() - started)

            began = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.monotonic() - began
        latencies.sort()
        return {
            "calls_per_s": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0,
            "errors": errors,
        }

    return asyncio.run(main())


def measure(target: str, authority: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """One load run in a fresh process (grpcio's threads stay out of the bench's)."""
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "_grpc.py"),
            "load",
            target,
            authority,
            str(concurrency),
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"gRPC load generator failed:\n{result.stderr[-2000:]}")
    measured: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


def run_phase(
    tunnel_port: int,
    grpc_port: int,
    levels: list[int],
    seconds: float,
    repeat: int,
    cpu: Callable[[], dict[str, float]],
) -> list[dict[str, Any]]:
    """Calls per second directly and through the tunnel at each level (medians of rounds).

    ``cpu()`` gives the CPU seconds used so far by each process behind the
    targets (the tunnel server, the gRPC agent, the gRPC service): what each
    spent per call is the steadiest figure on a shared machine.
    """
    rows = []
    targets = {
        "direct": (f"127.0.0.1:{grpc_port}", "-"),
        "tunnel": (f"127.0.0.1:{tunnel_port}", GRPC_HOST),
    }
    for level in levels:
        row: dict[str, Any] = {"concurrency": level}
        for name, (target, authority) in targets.items():
            before = cpu()
            runs = [measure(target, authority, level, seconds) for _ in range(repeat)]
            after = cpu()
            calls = sum(r["calls_per_s"] for r in runs) * seconds
            runs.sort(key=lambda r: r["calls_per_s"])
            median = dict(runs[(len(runs) - 1) // 2])
            # Includes each load process's connect and warm-up call: a bound.
            median["cpu_us_per_call"] = {
                process: round((after[process] - before[process]) / max(calls, 1) * 1e6, 1)
                for process in after
                if after[process] > before[process]
            }
            row[name] = median
            print(
                f"  grpc c{level:<4} {name:<8} {median['calls_per_s']:>8.0f} calls/s"
                f"  p50 {median['p50_ms']:.3f} ms  p99 {median['p99_ms']:.3f} ms"
                f"  errors {median['errors']}  CPU µs/call {median['cpu_us_per_call']}",
                flush=True,
            )
        row["ratio"] = row["tunnel"]["calls_per_s"] / max(row["direct"]["calls_per_s"], 1e-9)
        rows.append(row)
    return rows


def print_phase(rows: list[dict[str, Any]]) -> None:
    """The side-by-side table."""
    print("\ngRPC unary calls per second (grpc.aio client, one channel; 14-byte messages)")
    print(f"  {'concurrency':>11}  {'direct':>9}  {'tunnel':>9}  {'tunnel/direct':>13}")
    for row in rows:
        print(
            f"  {row['concurrency']:>11}  {row['direct']['calls_per_s']:>9.0f}"
            f"  {row['tunnel']['calls_per_s']:>9.0f}  {row['ratio']:>13.2f}"
        )


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "serve":
        _serve(int(sys.argv[2]))
    elif command == "load":
        target, authority, concurrency, seconds = sys.argv[2:6]
        print(json.dumps(_load(target, authority, int(concurrency), float(seconds))))
    else:
        raise SystemExit(f"unknown command {command!r}")
