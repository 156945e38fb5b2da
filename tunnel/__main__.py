"""``python -m tunnel``: the same as the ``tunnel`` command."""

from __future__ import annotations

import sys

from ._cli import main

# Guarded: the server's worker processes (multiprocessing's spawn method) import
# the main module again, and must not run the command a second time.
if __name__ == "__main__":
    sys.exit(main())
