"""The fixes to dependencies' private code: each is on for the versions installed,
and each that an unverified version turns off is named in a WARNING of its own."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import tunnel
from tunnel import _compat

ROOT = Path(__file__).resolve().parents[1]

NEWER = {
    "hypercorn": "0.19.0",
    "h2": "5.0.0",
    "hyperframe": "7.0.0",
    "wsproto": "1.4.0",
}


def test_every_fix_is_on_with_the_versions_installed() -> None:
    # The reminder to verify a new release (and raise its cap) before using it.
    assert [fix.what for fix in _compat.FIXES if not fix.on] == []


def test_each_fix_off_is_warned_of_once_in_a_line_of_its_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = tunnel.ServerConfig(tokens=frozenset({"s3cret"}))
    # Once with the real versions, so this process keeps its fixes for the
    # tests after this one (each is applied once per process).
    tunnel.TunnelApp(config)
    monkeypatch.setattr(_compat, "installed", NEWER.__getitem__)
    monkeypatch.setattr(_compat, "_warned", set())
    caplog.set_level(logging.WARNING, logger="tunnel")
    tunnel.TunnelApp(config)
    tunnel.Client(tunnel.ClientConfig(address="127.0.0.1:1", token="s3cret", port=1))
    lines = [r.getMessage() for r in caplog.records if r.name == "tunnel"]
    assert len(lines) == len(_compat.FIXES)  # once each, though asked twice
    for fix, line in zip(_compat.FIXES, lines, strict=True):
        assert line.startswith(f"{fix.package} {NEWER[fix.package]} was not verified")
        assert fix.what in line
    assert "hypercorn 0.19.0 was not verified with tunnel (only 0.17, 0.18)" in lines[0]


def test_each_patched_dependency_is_capped_at_the_versions_verified() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    for fix in _compat.FIXES:
        newest = fix.verified[-1].rstrip(".")
        cap = re.search(rf'"{fix.package}>=[^,"]+,<([^"]+)"', pyproject)
        assert cap is not None, f"{fix.package} has no cap in pyproject.toml"
        # The cap is the first release after the newest verified one.
        first, *rest = newest.split(".")
        assert cap[1] in (f"{int(first) + 1}", f"{first}.{int(rest[0]) + 1}" if rest else ""), (
            fix.package,
            cap[1],
        )
