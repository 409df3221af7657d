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

from .core import old_paths
from .core.errors import FxfuseError, RuleError, SpecError, StrictError, TraceError, UnsoundError

__version__ = "0.1.0"

_LAZY = {
    "apply_permutations": "api.permute", "permute": "api.permute", "random_permutations": "api.permute",
    "move_by_group_elements": "api.permute",
    "RuleSet": "frontend.rules", "load_rules": "frontend.rules",
    "Analysis": "frontend.spaces", "Space": "frontend.spaces", "analyze": "frontend.spaces",
    "analyze_traced": "frontend.spaces",
    "TracedModel": "frontend.trace", "trace": "frontend.trace",
    "FusionError": "api.fuse", "FusionResult": "api.fuse", "compile": "api.fuse",
    "Recipe": "recipes.recipe", "RecipeError": "recipes.recipe",
    "BarrierResult": "api.barrier", "barrier": "api.barrier",
    "sample_sequences": "models.sampling",
}
__all__ = ["FxfuseError", "RuleError", "SpecError", "StrictError", "TraceError", "UnsoundError", *sorted(_LAZY)]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None and old_paths.new_path(__name__, name):  # an old module path: warns, gives the new one
        return importlib.import_module(f"{__name__}.{name}")
    if module is None:
        raise AttributeError(f"module 'fxfuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``fxfuse.permute``, ``fxfuse.trace`` and ``fxfuse.barrier`` stay the functions of those names when
    a module is bound under those names (an old module path imported through the alias finder)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name, "").rpartition(".")[2] == name:
            self.__dict__.pop(name, None)
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
old_paths.install(__name__)
