"""Where a process spends its time under load: py-spy samples, summarised.

``python benchmarks/bench.py --profile`` records the tunnel server and the agent
with ``py-spy record --format raw`` (collapsed stacks, one ``frame;frame;... count``
line per distinct stack) during a load phase, and prints for each:

- self time by package: which library's code was on top of the stack (time in
  a socket system call is charged to "socket I/O", since py-spy sees the Python
  frame that made the call);
- inclusive time of the functions that mark the stages of a tunneled request;
- the functions with the most self time.

py-spy pauses the process for each sample, so a profiled run is slower than an
unprofiled one; the shares, not the rates, are what to read.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["STAGES", "format_summary", "py_spy_path", "record", "summarize"]

#: Per process: (pattern for a function's qualified name, label). The inclusive
#: share of the matching functions shows a stage of a request; the patterns
#: allow for renames such as ``_relay_response`` → ``_Exchange.relay_response``.
STAGES = {
    "hypercorn": [
        (r"TCPServer\._read_data$", "Hypercorn: read + parse HTTP/1.1"),
        (r"ASGIWrapper\.__call__$", "ASGI app (one task per request)"),
        (r"H11Protocol\.stream_send$", "  Hypercorn: write the response (h11, send)"),
        (r"SocketStream\.send_all$", "all socket sends"),
        (r"get_events$", "epoll_wait"),
    ],
    "server": [
        (r"TCPServer\._read_data$", "Hypercorn: read + parse visitors' HTTP/1.1"),
        (r"TunnelApp\.__call__$", "ASGI app (one task per visitor request)"),
        (r"Link\.open_stream$", "  open the HTTP/2 stream (h2 send_headers)"),
        (r"relay_response$", "  relay the response"),
        (r"H11Protocol\.stream_send$", "  Hypercorn: write the response (h11, send)"),
        (r"Link\._reader$", "link reader: WebSocket in, h2 receive_data"),
        (r"Link\._writer$", "link writer: h2 data_to_send, WebSocket out"),
        (r"SocketStream\.send_all$", "all socket sends"),
        (r"get_events$", "epoll_wait"),
    ],
    "agent": [
        (r"Link\._reader$", "link reader: WebSocket in, h2 receive_data"),
        (r"^forward$", "forward one stream to the local service"),
        (r"LocalPool\.connect$", "  new connection to the local service"),
        (r"SocketStream\.aclose$", "  closing connections"),
        (r"relay_body$", "  relay the response body"),
        (r"Link\._writer$", "link writer: h2 data_to_send, WebSocket out"),
        (r"SocketStream\.send_all$", "all socket sends"),
        (r"get_events$", "epoll_wait"),
    ],
}

_PACKAGES = [
    ("socket I/O (system calls)", re.compile(r"_SocketType\.|_nonblocking_helper|/socket\.py")),
    ("trio (scheduler, cancel scopes, outcome)", re.compile(r"trio/|trio\._|outcome")),
    ("contextlib (fail_after and other context managers)", re.compile(r"contextlib")),
    ("hypercorn", re.compile(r"hypercorn/")),
    ("h11", re.compile(r"h11/")),
    ("h2, hpack, hyperframe", re.compile(r"(h2|hpack|hyperframe)/")),
    ("wsproto, trio-websocket", re.compile(r"(wsproto|trio_websocket)/")),
    ("tunnel", re.compile(r"tunnel/")),
    ("other", re.compile(r".")),
]


def py_spy_path() -> str | None:
    """py-spy on PATH, or next to this Python (a venv that is not activated)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def record(pid: int, seconds: float, output: Path, *, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on ``pid``; wait for the returned process to finish."""
    py_spy = py_spy_path()
    if py_spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return subprocess.Popen(
        [
            *(py_spy, "record", "--pid", str(pid), "--duration", str(seconds)),
            *("--rate", str(rate), "--format", "raw", "--output", str(output)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _function(frame: str) -> str:
    """``name (path:line)`` to ``name``."""
    return frame.split(" (", 1)[0]


def _short(frame: str) -> str:
    match = re.match(r"(.*) \((.*?):\d+\)", frame)
    if not match:
        return frame
    name, path = match.groups()
    path = re.sub(r".*/site-packages/", "", path)
    path = re.sub(r".*/lib/python3\.\d+/", "", path)
    path = re.sub(r".*/(tunnel|benchmarks)/", r"\1/", path)
    return f"{name} ({path})"


def summarize(raw: Path, process: str, *, top: int = 12) -> dict:
    """Shares (in percent of samples) from a py-spy raw file."""
    stages = [(re.compile(pattern), label) for pattern, label in STAGES.get(process, [])]
    by_package: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    in_stage: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        package = next(name for name, pattern in _PACKAGES if pattern.search(leaf))
        by_package[package] += count
        by_function[_short(leaf)] += count
        names = {_function(frame) for frame in frames}
        for pattern, label in stages:
            if any(pattern.search(name) for name in names):
                in_stage[label] += count
    if not total:
        return {"samples": 0}

    def share(value: int) -> float:
        return round(100 * value / total, 1)

    return {
        "samples": total,
        "self_by_package": {name: share(value) for name, value in by_package.most_common()},
        "stages": {label: share(in_stage[label]) for _, label in stages if in_stage[label]},
        "top_self": {name: share(value) for name, value in by_function.most_common(top)},
    }


def format_summary(process: str, summary: dict, us_per_request: float | None) -> str:
    if not summary.get("samples"):
        return f"{process}: no samples"
    scale = f" ≈ µs/request at {us_per_request:.0f} µs/request" if us_per_request else ""
    lines = [f"{process}: {summary['samples']} samples; % of samples{scale}"]

    def row(label: str, percent: float) -> str:
        cost = f" {percent * us_per_request / 100:>6.0f}" if us_per_request else ""
        return f"  {percent:>5.1f}%{cost}  {label}"

    lines.append(" self time by package")
    lines += [row(name, value) for name, value in summary["self_by_package"].items()]
    lines.append(" stages (inclusive; they overlap)")
    lines += [row(name, value) for name, value in summary["stages"].items()]
    lines.append(" top functions by self time")
    lines += [row(name, value) for name, value in summary["top_self"].items()]
    return "\n".join(lines)
