"""``python -m ierf``: the ``ierf`` command, for environments where the console script is not on PATH
(a notebook kernel's interpreter, ``pipx run``-less containers)."""

from __future__ import annotations

import sys

from ierf.cli import main

if __name__ == "__main__":
    sys.exit(main())
