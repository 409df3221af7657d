"""The package's shape: imports run downward only (the import contract in pyproject.toml, checked by
``lint-imports``), no import circle (function-level imports counted), and no module name twice."""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_imports_keep_the_layers_of_the_contract():
    """``lint-imports`` (import-linter, in the ``dev`` extra) keeps the contracts of pyproject.toml: the stages
    top to bottom, the planner apart from the models in and out, and the layers inside each sub-package."""
    beside = Path(sys.executable).with_name("lint-imports")
    exe = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports is not installed: pip install -c constraints.txt -e '.[dev]'"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "11 kept, 0 broken" in done.stdout


def test_no_import_circle():
    """No module reaches itself through the modules it imports, wherever in it they are imported."""
    graph = grimp.build_graph("fxfuse", cache_dir=None)
    assert "fxfuse.passes.planning" in graph.modules and "fxfuse.commands.shared" in graph.modules
    circles = []
    for a in sorted(graph.modules):
        for b in sorted(graph.find_modules_directly_imported_by(a)):
            if graph.chain_exists(importer=b, imported=a):
                circles.append(" -> ".join((a, *graph.find_shortest_chain(importer=b, imported=a))))
    assert circles == []


def test_no_module_name_twice():
    """Each module and sub-package name occurs once in the package (``plan`` is not also a pass's name)."""
    where = defaultdict(list)
    for path in sorted((ROOT / "fxfuse").rglob("*.py")):
        if path.name == "__init__.py":
            if path.parent != ROOT / "fxfuse":
                where[path.parent.name].append(str(path.parent.relative_to(ROOT)))
        elif path.name != "__main__.py":
            where[path.stem].append(str(path.relative_to(ROOT)))
    assert len(where) > 50
    assert {"core", "frontend", "planner", "backend", "models", "plan", "planning"} <= set(where)
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_the_package_reads_as_the_pipeline():
    """The package's top level holds only the sub-packages by stage (and the package's own two files)."""
    top = sorted(p.name for p in (ROOT / "fxfuse").iterdir() if p.name != "__pycache__")
    assert top == ["__init__.py", "__main__.py", "api", "backend", "commands", "core", "frontend", "models",
                   "passes", "planner", "recipes"]
