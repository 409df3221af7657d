"""Statistics repair out of core: ``fxfuse.backend.repair`` on fused weights that are made per tensor on access.

The graph runs op by op with each weight read by the op that uses it
(``fxfuse.backend.repair.run_graph`` on a state that is no dict), so peak memory is
one op's weights plus the activations. The corrections are kept as vectors,
not as weights: ``RepairedTensors`` holds, per repaired weight and bias, the
``(scale, shift)`` of each fold and applies them when the tensor is made,
with the arithmetic of the in-memory fold (float64, rounded once per fold to
the tensor's dtype), then casts to the output dtype: the same bits as
repairing in memory and converting after. Batch-norm running statistics are
small and are kept as set.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .lazy import TensorMap
from .repair import RepairPoint, repair_state, trace_for


class RepairedTensors(TensorMap):
    """``fused`` with repair folds (``fold``) and set tensors (item assignment) applied on access, in
    ``dtype`` (default: each tensor's own)."""

    def __init__(self, fused: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None):
        self.fused, self.dtype = fused, dtype
        self.folds: dict[str, list[tuple[str, int, torch.Tensor, torch.Tensor]]] = {}
        self.set: dict[str, torch.Tensor] = {}
        super().__init__(fused.keys(), self._make, getattr(fused, "aliases", {}))
        self.like = getattr(fused, "like", fused)  # shapes and dtypes without making the tensors

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.set[self.aliases.get(key, key)] = value

    def fold(self, point: RepairPoint, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """``fxfuse.backend.repair._fold``: the point's weight rows times ``scale``, its bias ``scale·b + shift``."""
        self.folds.setdefault(self.aliases.get(point.weight, point.weight), []).append(
            ("weight", point.weight_dim, scale, shift))
        if point.bias is not None:
            self.folds.setdefault(self.aliases.get(point.bias, point.bias), []).append(("bias", 0, scale, shift))

    def _make(self, key: str) -> torch.Tensor:
        t = self.set[key] if key in self.set else self.fused[key]
        for role, dim, scale, shift in self.folds.get(key, ()):
            if role == "weight":
                shape = [1] * t.dim()
                shape[dim] = -1
                t = (t.double() * scale.view(shape)).to(t.dtype)
            else:
                t = (t.double() * scale + shift).to(t.dtype)
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t


def repair_streamed(skeleton: nn.Module, fused: Mapping[str, torch.Tensor],
                    aligned: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], batches,
                    dtype: torch.dtype | None = None, say: Callable[[str], None] | None = None
                    ) -> tuple[RepairedTensors, dict]:
    """``fxfuse.backend.repair.repair_state`` of ``fused`` (the average, in the target's dtype) against ``aligned``, the
    ``meta`` ``skeleton`` traced at the calibration batch shape; ``(repaired weights in dtype, report)``."""
    if say is not None:
        say("repairing unit statistics on the calibration inputs (weights streamed)")
    state = RepairedTensors(fused)  # measured in the target's dtype, as in memory
    result = repair_state(trace_for(skeleton, batches), state, list(aligned), weights, batches)
    state.dtype = dtype  # then written in the output's
    return state, result.report
