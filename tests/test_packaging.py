"""The distribution: a name of its own on PyPI, and the ``tunnel`` package and command in it.

``nox -s build`` (run by ``.ci/run``) builds the sdist and wheel, checks them
with twine and runs the installed wheel's ``tunnel`` in a fresh virtualenv.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
#: Ours: free on PyPI when chosen (``pip index versions trio-tunnel`` found none).
DISTRIBUTION = "trio-tunnel"


def test_the_distribution_is_not_pypis_unrelated_tunnel() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    # `pip install tunnel` installs someone else's code.
    assert project["name"] == DISTRIBUTION
    # Extras that pull in other extras name this distribution, not that one.
    for extra, requirements in project["optional-dependencies"].items():
        for requirement in requirements:
            assert not requirement.startswith("tunnel["), (extra, requirement)
    assert f"{DISTRIBUTION}[test]" in project["optional-dependencies"]["typecheck"]
    # The import package and the command keep their name.
    assert project["scripts"] == {"tunnel": "tunnel.cli:main"}


def test_the_installed_distribution_provides_the_tunnel_command() -> None:
    distribution = importlib.metadata.distribution(DISTRIBUTION)
    scripts = [e for e in distribution.entry_points if e.group == "console_scripts"]
    assert [(e.name, e.value) for e in scripts] == [("tunnel", "tunnel.cli:main")]
    import tunnel

    assert distribution.version == tunnel.__version__
