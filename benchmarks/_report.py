"""The summary of a run: the targets of issue 14, and the tables printed at the end."""

from __future__ import annotations

__all__ = [
    "print_h2",
    "print_idle",
    "print_inflight",
    "print_side_by_side",
    "print_small",
    "print_targets",
    "print_transfers",
    "print_workers",
    "targets",
]

TARGETS = ("direct", "hypercorn", "tunnel")
MIB = 1 << 20


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _worker_row(workers: list[dict], count: int, level: int) -> dict | None:
    return next((r for r in workers if r["workers"] == count and r["concurrency"] == level), None)


def _worker_transfer(moved: list[dict], count: int, direction: str) -> dict | None:
    return next((r for r in moved if r["workers"] == count and r["direction"] == direction), None)


def _cpu(run: dict | None, name: str) -> float | None:
    """CPU µs per request of ``name`` ("server", "agent", "hypercorn") in a small-GET run."""
    if run is None:
        return None
    if "cpu_us_per_request" in run:
        return run["cpu_us_per_request"].get(name)
    return run.get(f"{name}_cpu_us_per_request")  # a --server-workers row


def targets(
    small: dict[tuple[str, int], dict],
    transfers: dict[tuple[str, str], dict],
    inflight: list[dict] | None = None,
    idle: dict | None = None,
    workers: list[dict] | None = None,
    workers_transfers: list[dict] | None = None,
    h2: dict | None = None,
) -> list[dict]:
    """Issue 14's goals, each with its measured value, limit and verdict."""
    found: list[dict] = []
    workers = workers or []

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

    # 1. Server CPU per request against Hypercorn serving the app itself.
    for level, limit in ((50, 1.10), (1, 1.3)):
        hyper = _cpu(small.get(("hypercorn", level)), "hypercorn")
        columns = (
            ("1 worker", small.get(("tunnel", level))),
            ("--workers 2", _worker_row(workers, 2, level)),
        )
        for label, run in columns:
            add(
                f"server CPU/req c{level}, {label} ÷ Hypercorn's",
                _ratio(_cpu(run, "server"), hyper),
                limit,
                "x",
                False,
            )
    # 2. Agent CPU per request, against the same Hypercorn figure.
    for level, limit in ((50, 0.35), (1, 0.6)):
        add(
            f"agent CPU/req c{level}, 1 worker ÷ Hypercorn's",
            _ratio(
                _cpu(small.get(("tunnel", level)), "agent"),
                _cpu(small.get(("hypercorn", level)), "hypercorn"),
            ),
            limit,
            "x",
            False,
        )
    # 3. Latency at c1 added over Hypercorn-direct.
    tunnel1, hyper1 = small.get(("tunnel", 1)), small.get(("hypercorn", 1))
    add(
        "c1 p50 over Hypercorn-direct's",
        tunnel1["p50_ms"] - hyper1["p50_ms"] if tunnel1 and hyper1 else None,
        0.6,
        "ms",
        False,
    )
    # 4. Large transfers over HTTP/1.1.
    for direction in ("download", "upload"):
        moved = transfers.get(("tunnel", direction))
        add(
            f"{direction} through the tunnel",
            moved["mib_per_s"] if moved else None,
            650,
            "MiB/s",
            True,
        )
    # 5. HTTP/2 visitors' download against Hypercorn's own HTTP/2.
    add(
        "h2c download, tunnel ÷ Hypercorn",
        _ratio(h2["tunnel"]["mib_per_s"], h2["hypercorn"]["mib_per_s"]) if h2 else None,
        0.9,
        "x",
        True,
    )
    # 6. No regressions. The largest in-flight phase run; 10,000 in a full run.
    # Held only if all of them reached the local service together.
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
        f" {'gen CPU':>8}  CPU µs/request; trio task steps/request"
    )
    for level in levels:
        for target in TARGETS:
            run = small.get((target, level))
            if run is None:
                continue
            cpu = ", ".join(
                f"{name} {value:.0f}" for name, value in run["cpu_us_per_request"].items()
            )
            steps = _steps_text(run)
            if steps:
                cpu += f"; task steps/request: {steps}"
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


def _steps_text(run: dict) -> str:
    """Trio task steps per request of each counted process, as "server 12.0, agent 9.0"."""
    counted = run.get("task_steps_per_request") or {}
    return ", ".join(
        f"{name} {value:.1f}" if value is not None else f"{name} ?"
        for name, value in counted.items()
    )


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
    print("targets (issue 14)")
    for item in verdicts:
        if item["measured"] is None:
            print(f"  {item['target']:<46} not measured in this run")
            continue
        verdict = "met" if item["met"] else "MISSED"
        print(
            f"  {item['target']:<46} {item['measured']:>9.3f} {item['unit']:<5}"
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
            + (f"; task steps/request: {_steps_text(r)}" if _steps_text(r) else "")
        )


def print_h2(h2: dict | None, size: int) -> None:
    if not h2:
        return
    hyper, tunnel = h2["hypercorn"]["mib_per_s"], h2["tunnel"]["mib_per_s"]
    print()
    print(f"HTTP/2 visitors (curl --http2-prior-knowledge, h2c): download of {size // MIB} MiB")
    print(
        f"  Hypercorn {hyper:.0f} MiB/s, tunnel {tunnel:.0f} MiB/s;"
        f" tunnel ÷ Hypercorn {tunnel / hyper:.2f}"
    )


def _cell(value: float | None, digits: int, base: float | None = None, diff: bool = False) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    if base:
        text += f" ({value - base:+.3f})" if diff else f" (x{value / base:.2f})"
    return text


def print_side_by_side(
    small: dict[tuple[str, int], dict],
    transfers: dict[tuple[str, str], dict],
    workers: list[dict],
    workers_transfers: list[dict],
    h2: dict | None,
) -> None:
    """Issue 14's table: Hypercorn direct, ours with 1 worker and with 2, from this run.

    In brackets: the ratio to Hypercorn-direct (the difference, for p50 latency).
    The 1-worker column is the main tunnel, interleaved with Hypercorn; the
    2-worker column comes from the ``--server-workers`` phase.
    """
    columns = ("Hypercorn direct", "ours, 1 worker", "ours, --workers 2")
    rows: list[tuple[str, list[str]]] = []
    for level, key, label, digits in (
        (1, "rps", "c1 req/s", 0),
        (1, "p50_ms", "c1 p50 ms", 3),
        (50, "rps", "c50 req/s", 0),
        (50, "p99_ms", "c50 p99 ms", 3),
    ):
        hyper = small.get(("hypercorn", level))
        base = hyper[key] if hyper else None
        runs = (small.get(("tunnel", level)), _worker_row(workers, 2, level))
        rows.append(
            (
                label,
                [_cell(base, digits)]
                + [
                    _cell(run.get(key) if run else None, digits, base, key == "p50_ms")
                    for run in runs
                ],
            )
        )
    for name in ("server", "agent"):
        for level in (50, 1):
            hyper = _cpu(small.get(("hypercorn", level)), "hypercorn")
            runs = (small.get(("tunnel", level)), _worker_row(workers, 2, level))
            rows.append(
                (
                    f"{name} CPU µs/req c{level}",
                    [_cell(hyper, 0) if name == "server" else "—"]
                    + [_cell(_cpu(run, name), 0, hyper) for run in runs],
                )
            )
    for name in ("server", "agent"):
        for level in (1, 50):
            runs = (
                small.get(("hypercorn", level)),
                small.get(("tunnel", level)),
                _worker_row(workers, 2, level),
            )
            steps = [
                (run or {})
                .get("task_steps_per_request", {})
                .get("hypercorn" if i == 0 and name == "server" else name)
                for i, run in enumerate(runs)
            ]
            if any(step is not None for step in steps):
                rows.append((f"{name} task steps/req c{level}", [_cell(step, 1) for step in steps]))
    for direction in ("download", "upload"):
        hyper_move = transfers.get(("hypercorn", direction))
        base = hyper_move["mib_per_s"] if hyper_move else None
        ours = transfers.get(("tunnel", direction))
        two = _worker_transfer(workers_transfers, 2, direction)
        rows.append(
            (
                f"{direction} MiB/s",
                [
                    _cell(base, 0),
                    _cell(ours["mib_per_s"] if ours else None, 0, base),
                    _cell(two["mib_per_s"] if two else None, 0, base),
                ],
            )
        )
    if h2:
        base = h2["hypercorn"]["mib_per_s"]
        rows.append(
            ("h2c download MiB/s", [_cell(base, 0), _cell(h2["tunnel"]["mib_per_s"], 0, base), "—"])
        )
    print()
    print("issue 14, side by side (in brackets: x Hypercorn direct, or + ms for p50)")
    print(f"{'':<22}" + "".join(f"{c:>22}" for c in columns))
    for label, cells in rows:
        print(f"{label:<22}" + "".join(f"{c:>22}" for c in cells))
