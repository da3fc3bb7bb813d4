"""``python -m experiments``: see :mod:`experiments._runner`."""

from __future__ import annotations

import sys

from experiments._runner import main

if __name__ == "__main__":
    sys.exit(main())
