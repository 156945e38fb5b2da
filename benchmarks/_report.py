"""The summary of a run: the targets of issue 7, and the tables printed at the end."""

from __future__ import annotations

__all__ = ["print_small", "print_targets", "print_transfers", "targets"]

TARGETS = ("direct", "hypercorn", "tunnel")
MIB = 1 << 20


def targets(
    small: dict[tuple[str, int], dict], transfers: dict[tuple[str, str], dict]
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
