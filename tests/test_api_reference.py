"""docs/api.rst documents exactly what ``tunnel`` exports: no export goes undocumented."""

from __future__ import annotations

import re
from pathlib import Path

import tunnel

API_RST = Path(__file__).resolve().parents[1] / "docs" / "api.rst"


def test_the_api_reference_lists_every_export_and_nothing_else() -> None:
    documented = re.findall(r"^\.\. (?:auto\w+|data):: (\w+)$", API_RST.read_text(), re.MULTILINE)
    assert len(documented) == len(set(documented)), "a name is documented twice"
    assert sorted(documented) == sorted(tunnel.__all__)
