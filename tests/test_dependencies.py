"""Every package the project declares for its library is imported by the library."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"pot": "ot", "pyyaml": "yaml"}  # distributions whose module has another name


def _declared() -> set[str]:
    """Distribution names of ``dependencies`` and of the ``hf`` and ``plot`` extras in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    blocks = re.findall(r"^(?:dependencies|hf|plot) = \[(.*?)\]", text, flags=re.S | re.M)
    assert len(blocks) == 3
    return {re.match(r"[A-Za-z0-9_.-]+", s).group(0).lower() for b in blocks for s in re.findall(r'"([^"]+)"', b)}


def _imported(relative: bool = False) -> set[str]:
    """Top-level names the library imports, or (``relative``) the names of its own modules it imports."""
    names = set()
    for path in (ROOT / "fxfuse").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and not relative:
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.level > 0) == relative:
                if node.module:
                    names.add(node.module.split(".")[0])
                elif relative:  # from . import name
                    names |= {a.name for a in node.names}
    return names


def test_every_declared_dependency_is_imported():
    declared = _declared()
    assert {"torch", "networkx", "pot", "pyyaml"} <= declared
    missing = sorted(d for d in declared if IMPORT_NAMES.get(d, d) not in _imported())
    assert missing == []


@pytest.mark.parametrize("name", ["zoo", "digits"])
def test_the_library_holds_no_test_material(name):
    """The model zoo (tests/zoo.py) and the digits example (examples/digits.py) live outside the package."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"fxfuse.{name}")
    assert name not in _imported() | _imported(relative=True)
    where = Path(importlib.import_module(name).__file__).resolve()  # the tests reach it by its own name
    assert where.parent in {ROOT / "tests", ROOT / "examples"}
