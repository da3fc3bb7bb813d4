"""``python experiments/run.py ...``: the same as ``python -m experiments ...``."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from experiments._runner import main

    sys.exit(main())
