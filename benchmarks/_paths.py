"""``import _paths`` before ``import zoo`` / ``import digits``: the model zoo (``tests/zoo.py``) and the digits
example (``examples/digits.py``) live outside the library package, in these folders of the repository."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT / "tests", ROOT / "examples"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
