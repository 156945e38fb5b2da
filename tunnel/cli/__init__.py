"""The ``tunnel`` command, on top of the library: commands, the agent's panel, the demo.

- ``_commands.py``: the argument parser and :func:`main` (``tunnel server``, ``tunnel
  http``, ``tunnel tcp``, ``tunnel demo``).
- ``_show.py``: what ``tunnel http`` shows while it runs: the live panel (``_panel.py``)
  on a terminal, plain lines (``_report.py``) elsewhere, both reading the agent through
  ``_view.py``, with the progress of large transfers from ``_progress.py``.
- ``_demo.py``: ``tunnel demo``, a server, an agent and a sample service in one process.

The library (``tunnel.client``, ``tunnel.server``) never imports this package
(``tests/test_imports.py`` checks it).
"""

from __future__ import annotations

from ._commands import main as main
