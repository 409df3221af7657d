"""fxfuse: a declarative, graph-based model-fusion compiler.

Trace models with ``torch.export``, propagate permutations with YAML rules,
and move every model's weights into one basis before fusing them.

The names below are imported on first use, so that ``import fxfuse`` (and the
command line's ``--help`` and ``rules check``) does not import torch.
"""
from __future__ import annotations

import importlib
import sys
import types

from .errors import FxfuseError, RuleError, SpecError, StrictError, TraceError, UnsoundError

__version__ = "0.1.0"

_LAZY = {
    "apply_permutations": "permute", "permute": "permute", "random_permutations": "permute",
    "move_by_group_elements": "permute",
    "RuleSet": "rules", "load_rules": "rules",
    "Analysis": "spaces", "Space": "spaces", "analyze": "spaces", "analyze_traced": "spaces",
    "TracedModel": "trace", "trace": "trace",
    "FusionError": "fuse", "FusionResult": "fuse", "compile": "fuse",
    "Recipe": "recipe", "RecipeError": "recipe",
    "BarrierResult": "barrier", "barrier": "barrier",
}
__all__ = ["FxfuseError", "RuleError", "SpecError", "StrictError", "TraceError", "UnsoundError", *sorted(_LAZY)]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fxfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``fxfuse.permute``, ``fxfuse.trace`` and ``fxfuse.barrier`` stay the functions of those names when
    their modules are imported (the import system would bind the modules to the package's attributes)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            self.__dict__.pop(name, None)
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
