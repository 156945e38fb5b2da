"""Sphinx configuration: the API reference is built from the package's docstrings."""

from __future__ import annotations

import tunnel

project = "tunnel"
author = "The tunnel authors"
copyright = "The tunnel authors"
release = tunnel.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# Docstrings are Google style (STYLE.md); NumPy style is never used.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become one entry per attribute, each a link target.
napoleon_use_ivar = False

autodoc_member_order = "bysource"
# Signatures stay readable; the types are listed with each parameter instead.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True}

# Every reference must resolve (`nox -s docs` runs with -n -W). The builders
# have no network, so there is no intersphinx: names from other projects and
# the standard library cannot be linked, and are accepted as plain text.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(trio|trio_websocket|hypercorn|h2|h11|wsproto|ssl|os|pathlib|collections)\..*"),
    ("py:.*", r"(prometheus_client|cryptography|asyncio|typing|types|datetime|enum)\..*"),
    ("py:class", r"(Path|Awaitable|Callable|Mapping|Sequence|Iterator|AsyncIterator|TextIO)"),
    # Type aliases of callables; the parameters' descriptions say what is called.
    ("py:class", r"(AuthHook|ASGIApp|Locate)"),
    # The parsed form of ClientConfig.address (its ``server`` and ``servers``):
    # a private class, described by those properties' docstrings.
    ("py:class", r"tunnel\._config\.values\.ServerAddress"),
]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"tunnel {release}"
