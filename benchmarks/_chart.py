"""A PNG of one run's results (``results/latest.png`` beside ``latest.json``).

matplotlib is the ``bench`` nox session's, not a dependency of the package: without
it :func:`draw` draws nothing and says so, and the run is otherwise the same.
``python benchmarks/_chart.py results/latest.json`` draws a saved run again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["draw"]

COLOURS = {"direct": "#7f7f7f", "hypercorn": "#1f77b4", "tunnel": "#d62728"}


def draw(results: dict, path: Path) -> bool:
    """Draw ``results`` (what ``bench.py`` writes as JSON) to ``path``; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    _small_gets(axes[0][0], axes[0][1], results["small_get"])
    _cpu(axes[0][2], results["small_get"])
    _transfers(axes[1][0], results["transfers"])
    _inflight(axes[1][1], results.get("inflight") or [])
    _idle(axes[1][2], results.get("idle_agents"))
    meta = results["meta"]
    figure.suptitle(
        f"tunnel benchmark: {meta['tunnel_source']}; {meta['generator']};"
        f" {meta['cpus']} CPUs, loadavg {meta['loadavg_1min'][0]:.1f}"
    )
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def _small_gets(rps_axis, p50_axis, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    for target, colour in COLOURS.items():
        mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["concurrency"])
        if not mine:
            continue
        levels = [r["concurrency"] for r in mine]
        rps_axis.plot(levels, [r["rps"] for r in mine], "o-", color=colour, label=target)
        p50_axis.plot(levels, [r["p50_ms"] for r in mine], "o-", color=colour, label=target)
    for axis, title, unit in (
        (rps_axis, "small GET: requests/s", "req/s"),
        (p50_axis, "small GET: p50 latency", "ms"),
    ):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("concurrent connections")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()


def _cpu(axis, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    levels = sorted({r["concurrency"] for r in rows})
    hyper = {r["concurrency"]: r for r in rows if r["target"] == "hypercorn"}
    tunnel = {r["concurrency"]: r for r in rows if r["target"] == "tunnel"}
    width = 0.38
    positions = range(len(levels))
    axis.bar(
        [p - width / 2 for p in positions],
        [hyper[c]["cpu_us_per_request"]["hypercorn"] if c in hyper else 0 for c in levels],
        width,
        color=COLOURS["hypercorn"],
        label="hypercorn",
    )
    bottom = [0.0] * len(levels)
    for name, colour in (("server", "#d62728"), ("agent", "#ff9896"), ("local", "#c7c7c7")):
        values = [
            tunnel[c]["cpu_us_per_request"].get(name, 0) if c in tunnel else 0 for c in levels
        ]
        axis.bar(
            [p + width / 2 for p in positions],
            values,
            width,
            bottom=bottom,
            color=colour,
            label=f"tunnel: {name}",
        )
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axis.set_xticks(list(positions), [f"c{c}" for c in levels])
    axis.set_ylabel("CPU µs per request")
    axis.set_title("CPU per small GET, by process")
    axis.legend(fontsize="small")
    axis.grid(True, axis="y", alpha=0.3)


def _transfers(axis, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    directions = ("download", "upload")
    width = 0.27
    for index, (target, colour) in enumerate(COLOURS.items()):
        values = [
            next(
                (r["mib_per_s"] for r in rows if r["target"] == target and r["direction"] == d),
                0,
            )
            for d in directions
        ]
        axis.bar(
            [p + (index - 1) * width for p in range(len(directions))],
            values,
            width,
            color=colour,
            label=target,
        )
    for limit, position in ((300, 0), (200, 1)):
        axis.hlines(limit, position - 0.45, position + 0.45, colors="black", linestyles="dashed")
    size = rows[0]["bytes"] >> 20 if rows else 0
    axis.set_xticks(range(len(directions)), directions)
    axis.set_yscale("log")
    axis.set_ylabel("MiB/s (dashed: target through the tunnel)")
    axis.set_title(f"one {size} MiB transfer")
    axis.legend()
    axis.grid(True, axis="y", which="both", alpha=0.3)


def _inflight(axis, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    axis.set_title("requests in flight at once on one agent")
    if not rows:
        axis.text(0.5, 0.5, "not measured", ha="center", transform=axis.transAxes)
        return
    labels = [f"{r['requests']:,}" for r in rows]
    positions = range(len(rows))
    axis.bar(positions, [r["complete_s"] for r in rows], 0.5, color=COLOURS["tunnel"])
    axis.axhline(rows[0]["hold_s"], color="black", linestyle="dashed", label="the hold")
    for p, r in zip(positions, rows, strict=True):
        rss = r["rss_kib"]
        axis.annotate(
            f"{r['error_count']} errors, {r['local_peak_in_flight']:,} at once\n"
            f"peak RSS: server {rss['server']['peak'] / 1024:.0f} MiB,"
            f" agent {rss['agent']['peak'] / 1024:.0f} MiB",
            (p, r["complete_s"]),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    axis.set_xticks(list(positions), labels)
    axis.set_xlabel("requests")
    axis.set_ylabel("s from the last request sent to the last answer")
    axis.set_ylim(0, max(r["complete_s"] for r in rows) * 1.4)
    axis.legend(loc="upper left")


def _idle(axis, idle: dict | None) -> None:  # type: ignore[no-untyped-def]
    if not idle:
        axis.set_title("server RSS with idle agents")
        axis.text(0.5, 0.5, "not measured", ha="center", transform=axis.transAxes)
        return
    rss = idle["server_rss_kib"]
    names = list(rss)
    axis.bar(range(len(names)), [rss[n] / 1024 for n in names], 0.5, color=COLOURS["tunnel"])
    axis.set_xticks(range(len(names)), [f"{n} agents" for n in names])
    axis.set_ylabel("MiB")
    axis.set_title(
        "server RSS with idle agents\n"
        f"{idle['kib_per_extra_agent']:.1f} KiB per extra agent (target ≤ 50)"
    )
    axis.grid(True, axis="y", alpha=0.3)


if __name__ == "__main__":
    source = Path(sys.argv[1])
    target = source.with_suffix(".png")
    if not draw(json.loads(source.read_text()), target):
        sys.exit("matplotlib is not installed")
    print(target)
