"""Every rule kind: ``fxfuse.frontend.kinds.KINDS`` once the modules that define kinds have registered theirs.

``fxfuse.frontend.kinds`` holds the registry (``kind(name, doc)`` registers a
function) and the kinds of single tensor ops; ``fxfuse.frontend.layer_kinds`` adds the
composite ops (einsum equations, recurrent layers, ...) and ``fxfuse.frontend.experts``
the routed-experts pattern. Readers of the registry (rule parsing, the
analyser) import it from here, so that it is complete.
"""
from __future__ import annotations

from . import layer_kinds  # noqa: F401  (registers the composite-op kinds)
from . import experts  # noqa: F401  (registers the routed-experts pattern kind)
from .kinds import KINDS

__all__ = ["KINDS"]
