"""Old module paths (before the sub-packages by stage) keep working for one release: the same module object,
with a DeprecationWarning that names the new path; no file stands at an old path."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fxfuse
from fxfuse.core.old_paths import MOVED

ROOT = Path(__file__).resolve().parents[1]


def _forget(old: str) -> None:
    sys.modules.pop(old, None)
    fxfuse.__dict__.pop(old.rpartition(".")[2], None)


@pytest.mark.parametrize("name", sorted(MOVED))
def test_an_old_path_gives_the_new_module_with_a_warning(name):
    old, new = f"fxfuse.{name}", f"fxfuse.{MOVED[name]}"
    _forget(old)
    with pytest.warns(DeprecationWarning, match=rf"^{old} moved to {new};"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__name__ == module.__spec__.name == new
    assert not (ROOT / "fxfuse" / f"{name}.py").exists()


def test_old_import_forms():
    """``import fxfuse.plan``, ``from fxfuse import spaces``, ``from fxfuse.plan import X``: each warns once."""
    for name in ("plan", "spaces", "rules"):
        _forget(f"fxfuse.{name}")
    with pytest.warns(DeprecationWarning, match="fxfuse.plan moved to fxfuse.planner.plan"):
        import fxfuse.plan
    with pytest.warns(DeprecationWarning, match="fxfuse.spaces moved to fxfuse.frontend.spaces"):
        from fxfuse import spaces
    with pytest.warns(DeprecationWarning, match="fxfuse.rules moved to fxfuse.frontend.rules"):
        from fxfuse.rules import RuleSet
    from fxfuse.frontend import spaces as new_spaces
    from fxfuse.planner import plan as new_plan
    assert fxfuse.plan is new_plan and spaces is new_spaces and RuleSet is fxfuse.RuleSet


def test_the_public_functions_stay_functions():
    """``fxfuse.permute``, ``fxfuse.barrier`` and ``fxfuse.trace`` name both a function and an old module path;
    importing the old module does not replace the function."""
    for name in ("permute", "barrier", "trace"):
        _forget(f"fxfuse.{name}")
        with pytest.warns(DeprecationWarning):
            importlib.import_module(f"fxfuse.{name}")
        assert callable(getattr(fxfuse, name)) and not isinstance(getattr(fxfuse, name), type(fxfuse))


def test_the_repository_imports_no_old_path():
    """The package, its tests, benchmarks and examples use the new paths: importing every module of the package
    with DeprecationWarnings as errors passes, and no source names an old module path (in an import, a
    monkeypatch target, a ``-m`` run or a docstring)."""
    code = ("import pkgutil, importlib, warnings; warnings.simplefilter('error', DeprecationWarning); import fxfuse;"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(fxfuse.__path__, 'fxfuse.')"
            " if not m.name.endswith('__main__')]")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    public = {"permute", "barrier", "trace"}  # also functions: ``fxfuse.trace(...)`` is the function, not a path
    old = re.compile(r"(?<![\w.])fxfuse\.(%s)(?:(?=\.\w)|(?![\w.]))" % "|".join(MOVED))
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for d in ("fxfuse", "tests", "benchmarks", "examples")
             for p in sorted((ROOT / d).rglob("*.py")) for m in old.finditer(p.read_text())
             if m.group(1) not in public or p.read_text()[m.end():m.end() + 1] == "."
             or p.read_text()[:m.start()].rstrip(" ").endswith("import")]
    assert [f for f in found if not f.startswith(("fxfuse/core/old_paths.py", "tests/test_old_paths.py"))] == []
