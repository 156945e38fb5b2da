"""``python -m tunnel``: the same as the ``tunnel`` command."""

from __future__ import annotations

import sys

from .cli import main

# Guarded, as a module run with -m should be: importing it (a tool that imports
# every module, say) must not run the command.
if __name__ == "__main__":
    sys.exit(main())
