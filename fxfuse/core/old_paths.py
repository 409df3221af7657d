"""Old module paths keep working for one release: ``import fxfuse.plan`` (a module's place before the
sub-packages by stage) gives the module at its new place, ``fxfuse.planner.plan``, the same object, with a
``DeprecationWarning`` that names the new path. A finder on ``sys.meta_path`` does it; no file stands at an
old path. ``MOVED``: old name -> new name, both relative to the package.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_STAGES = {
    "core": "errors exprs axes derived progress solvers maps device guard checks schema",
    "models": "atomic checkpoint data io calibration distributed heads evaluate",
    "frontend": "trace verify canonicalize kinds groups experts layer_kinds all_kinds rules rank_check coverage "
                "spaces graph render",
    "planner": "procrustes groupmaps layout plan depth activations",
    "backend": "emit repair refine stages lazy",
    "recipes": "recipe card",
    "api": "fuse permute barrier",
    "commands": "cli",
}
MOVED = {name: f"{package}.{name}" for package, names in _STAGES.items() for name in names.split()}


def new_path(package: str, name: str) -> str | None:
    """The new full name of the old module ``package.name``, or None when ``name`` did not move."""
    new = MOVED.get(name)
    return None if new is None else f"{package}.{new}"


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``package.OLD`` and loads it as the module at its new path (imported first, so one object)."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname: str, path=None, target=None):
        head, _, name = fullname.rpartition(".")
        if head != self.package or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = new_path(self.package, spec.name.rpartition(".")[2])
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release", DeprecationWarning,
                      stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias's; put it back
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = module.__spec__.loader_state


def install(package: str) -> None:
    """Put the finder for ``package``'s old paths first on ``sys.meta_path`` (once): before the path finders, so
    that a stale copy of an old module (an older install elsewhere on the path) is not found instead."""
    if not any(isinstance(f, MovedFinder) and f.package == package for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder(package))
