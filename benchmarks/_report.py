"""The summary of a run: the targets of issue 7, and the tables printed at the end."""

from __future__ import annotations

__all__ = [
    "print_idle",
    "print_inflight",
    "print_small",
    "print_targets",
    "print_transfers",
    "print_workers",
    "targets",
]

TARGETS = ("direct", "hypercorn", "tunnel")
MIB = 1 << 20


def targets(
    small: dict[tuple[str, int], dict],
    transfers: dict[tuple[str, str], dict],
    inflight: list[dict] | None = None,
    idle: dict | None = None,
) -> list[dict]:
    found: list[dict] = []

    def add(name: str, measured: float | None, limit: float, unit: str, higher: bool) -> None:
        if measured is None:
            found.append({"target": name, "measured": None, "limit": limit, "met": None})
            return
        met = measured >= limit if higher else measured <= limit
        found.append(
            {
                "target": name,
                "measured": round(measured, 3),
                "limit": limit,
                "unit": unit,
                "met": met,
                "higher_is_better": higher,
                "margin": round(measured / limit, 3) if limit else None,
            }
        )

    tunnel50, hyper50 = small.get(("tunnel", 50)), small.get(("hypercorn", 50))
    add(
        "tunnel req/s at c50 ÷ Hypercorn-direct",
        tunnel50["rps"] / hyper50["rps"] if tunnel50 and hyper50 else None,
        0.8,
        "ratio",
        True,
    )
    tunnel1, direct1 = small.get(("tunnel", 1)), small.get(("direct", 1))
    add(
        "p50 added latency at c1 over direct",
        tunnel1["p50_ms"] - direct1["p50_ms"] if tunnel1 and direct1 else None,
        0.5,
        "ms",
        False,
    )
    down, up = transfers.get(("tunnel", "download")), transfers.get(("tunnel", "upload"))
    add("download through the tunnel", down["mib_per_s"] if down else None, 300, "MiB/s", True)
    add("upload through the tunnel", up["mib_per_s"] if up else None, 200, "MiB/s", True)
    # The largest in-flight phase run; 10,000 in a full run. Held only if all
    # of them reached the local service together.
    largest = max(inflight or [], key=lambda r: r["requests"], default=None)
    if largest is not None:
        failed = largest["error_count"] + max(
            0, largest["requests"] - largest["local_peak_in_flight"]
        )
        add(f"errors, {largest['requests']:,} in flight on one agent", failed, 0, "", False)
    else:
        add("errors, 10,000 in flight on one agent", None, 0, "", False)
    add(
        "server KiB per extra idle agent",
        idle["kib_per_extra_agent"] if idle else None,
        50,
        "KiB",
        False,
    )
    return found


def print_small(small: dict[tuple[str, int], dict], levels: list[int]) -> None:
    print()
    print("small GET: requests/s, latency, CPU per request (median of rounds)")
    print(
        f"{'conc':>5} {'target':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        f" {'gen CPU':>8}  CPU µs/request"
    )
    for level in levels:
        for target in TARGETS:
            run = small.get((target, level))
            if run is None:
                continue
            cpu = ", ".join(
                f"{name} {value:.0f}" for name, value in run["cpu_us_per_request"].items()
            )
            print(
                f"{level:>5} {target:<10} {run['rps']:>9.0f} {run['p50_ms']:>8.3f}"
                f" {run['p99_ms']:>8.3f} {run['errors']:>6} {run['generator_cpu_percent']:>7.0f}%"
                f"  {cpu}"
            )
        tunnel, hyper, direct = (small.get((t, level)) for t in ("tunnel", "hypercorn", "direct"))
        notes = []
        if tunnel and hyper:
            notes.append(f"tunnel ÷ hypercorn: req/s {tunnel['rps'] / hyper['rps']:.2f}")
            extra = (
                tunnel["cpu_us_per_request"]["server"] - hyper["cpu_us_per_request"]["hypercorn"]
            )
            notes.append(f"server CPU over Hypercorn's: {extra:+.0f} µs")
        if tunnel and direct:
            notes.append(f"tunnel ÷ direct: {tunnel['rps'] / direct['rps']:.2f}")
            notes.append(f"added p50: {tunnel['p50_ms'] - direct['p50_ms']:+.3f} ms")
        if notes:
            print(f"{'':>5} {'':<10} " + "; ".join(notes))


def print_transfers(transfers: dict[tuple[str, str], dict], size: int) -> None:
    print()
    print(f"transfers of {size // MIB} MiB over one connection (median of rounds)")
    print(
        f"{'direction':<10} "
        + " ".join(f"{t + ' MiB/s':>15}" for t in TARGETS)
        + f" {'t÷direct':>9}  CPU ms/MiB through the tunnel"
    )
    for direction in ("download", "upload"):
        cells = [transfers.get((t, direction)) for t in TARGETS]
        line = " ".join(f"{c['mib_per_s']:>15.0f}" if c else f"{'-':>15}" for c in cells)
        ratio = cells[2]["mib_per_s"] / cells[0]["mib_per_s"] if cells[0] and cells[2] else None
        cpu = (
            ", ".join(f"{name} {value:.1f}" for name, value in cells[2]["cpu_ms_per_mib"].items())
            if cells[2]
            else ""
        )
        print(
            f"{direction:<10} {line} {ratio:>9.2f}  {cpu}" if ratio else f"{direction:<10} {line}"
        )


def print_targets(verdicts: list[dict]) -> None:
    print()
    print("targets (issue 7)")
    for item in verdicts:
        if item["measured"] is None:
            print(f"  {item['target']:<42} not measured in this run")
            continue
        verdict = "met" if item["met"] else "MISSED"
        print(
            f"  {item['target']:<42} {item['measured']:>9.3f} {item['unit']:<5}"
            f" (target {'≥' if item['higher_is_better'] else '≤'} {item['limit']:g})  {verdict}"
        )


def print_inflight(results: list[dict]) -> None:
    if not results:
        return
    print()
    print(
        "requests in flight at once on one agent (the local service holds them all, then answers)"
    )
    print(
        f"{'requests':>9} {'ok':>7} {'errors':>6} {'at once':>8} {'ramp s':>9}"
        f" {'done s':>7} {'p50 s':>7} {'max s':>7}  RSS peak MiB (before), CPU µs/request"
    )
    for r in results:
        rss = ", ".join(
            f"{name} {v['peak'] / 1024:.0f} ({v['before'] / 1024:.0f})"
            for name, v in r["rss_kib"].items()
        )
        cpu = ", ".join(f"{name} {v:.0f}" for name, v in r["cpu_us_per_request"].items())
        print(
            f"{r['requests']:>9} {r['ok']:>7} {r['error_count']:>6}"
            f" {r['local_peak_in_flight']:>8} {r['connect_s']:>9.2f} {r['complete_s']:>7.2f}"
            f" {r['p50_ms'] / 1000:>7.1f} {r['max_ms'] / 1000:>7.1f}  {rss}; {cpu}"
        )
        if r.get("released"):
            print(f"{'':>9} the hold was ended early: no more arrived for 10 s after the last")
        if r["errors"]:
            print(f"{'':>9} errors: {r['errors']}")
            for name, tail in r.get("log_tails", {}).items():
                lines = tail.splitlines()[-3:]
                print(f"{'':>9} {name} log: " + f"\n{'':>9} {name} log: ".join(lines))


def print_idle(idle: dict | None) -> None:
    if not idle:
        return
    rss = idle["server_rss_kib"]
    print()
    print(f"idle agents on a fresh server (connected in {idle['connect_s']:.1f} s)")
    print("  server RSS: " + ", ".join(f"{n} agents {v / 1024:.1f} MiB" for n, v in rss.items()))
    print(
        f"  {idle['kib_per_extra_agent']:.1f} KiB per extra idle agent;"
        f" requests routed through the first and last: {'yes' if idle['routed'] else 'NO'}"
    )


def print_workers(rows: list[dict]) -> None:
    print()
    print("tunnel server workers side by side (small GETs, median of rounds)")
    print(
        f"{'conc':>5} {'workers':>7} {'req/s':>9} {'p50 ms':>8} {'errors':>6} {'gain':>6}"
        "  CPU µs/request (server, all workers; agent)"
    )
    for r in rows:
        print(
            f"{r['concurrency']:>5} {r['workers']:>7} {r['rps']:>9.0f} {r['p50_ms']:>8.3f}"
            f" {r['errors']:>6} {r['gain_over_first']:>6.2f}"
            f"  {r['server_cpu_us_per_request']:.0f}; {r['agent_cpu_us_per_request']:.0f}"
        )
