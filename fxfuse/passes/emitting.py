"""Pass 5, ``emit``: every model's weights moved into the target's basis by its alignment (``fxfuse.backend.emit``).

    Planned ──emit──▶ Emitted   (aligned weights per model; the target's and unaligned models' as they are)

Out of core the aligned weights are a mapping that moves each tensor when it
is read (``fxfuse.backend.lazy.aligned_tensors``), so no aligned copy is held.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..backend.lazy import aligned_tensors
from .analyse import Analysed
from .planning import Planned


@dataclass(frozen=True)
class Emitted:
    """``aligned[i]``: model ``i``'s weights in the target's basis (its own where it has no alignment)."""

    aligned: tuple[Mapping[str, torch.Tensor], ...]


def emit(analysed: Analysed, planned: Planned) -> Emitted:
    """Apply ``planned``'s maps to the weights of ``analysed``'s models."""
    return Emitted(tuple(state if al is None else aligned_tensors(analysis, state, al)
                         for analysis, state, al in zip(analysed.analyses, analysed.states, planned.alignments)))
