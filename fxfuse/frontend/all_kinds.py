"""Every rule kind: ``fxfuse.frontend.kinds.KINDS`` once the modules that define kinds have registered theirs.

``fxfuse.frontend.kinds`` holds the registries (``kind(name, doc)`` registers a
function, ``walk(*names)`` how the analysis walks a call of those kinds) and the
kinds of single tensor ops that compute; ``fxfuse.frontend.shape_kinds`` adds the
ops that move axes (reshape, cat, split, slice, ...) and the walk of views,
``fxfuse.frontend.layer_kinds`` the composite ops (einsum equations, recurrent
layers, ...) and ``fxfuse.frontend.experts`` the routed-experts pattern and its
walk. Readers of the registries (rule parsing, the analyser) import them from
here, so that they are complete.
"""
from __future__ import annotations

from . import experts  # noqa: F401  (registers the routed-experts pattern kind and its walk)
from . import rotary  # noqa: F401  (registers the rotary-embedding pattern kind and its walk)
from . import layer_kinds  # noqa: F401  (registers the composite-op kinds)
from . import shape_kinds  # noqa: F401  (registers the kinds that move axes, and the walk of views)
from .kinds import KINDS, WALKS

__all__ = ["KINDS", "WALKS"]
