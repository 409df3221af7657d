"""Pass 6, ``check``: every aligned model must compute what its original computes.

    Emitted ──check──▶ Checked   (one entry per model: self-check error of exact maps, drift of the others)

Exact maps (permutations and group elements): the aligned copy, run in the
target's class, must match the (relayered) source on the example inputs within
``fxfuse.frontend.verify.CHECK_TOL``, else ``FusionError`` names the space at fault and
the ops it passes through. Soft maps, other widths and relayered depths change
the function by design: their drift against the model as given is reported.
Weights are run one submodule at a time (``fxfuse.backend.lazy.run_streamed``), so the
check works out of core; half precision is checked in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..backend.emit import build_module
from ..backend.lazy import aligned_tensors, compute_dtype, run_streamed
from ..frontend.rules import RuleSet
from ..frontend.spaces import Analysis
from ..frontend.verify import check_outputs, output_tensors, relative_error
from ..planner.plan import Alignment
from .analyse import Analysed
from .emitting import Emitted
from .inputs import FusionError, Inputs, Progress, quiet
from .planning import Planned
from .relayer import SameDepth, identity_blocks_in_target_basis


@dataclass(frozen=True)
class Checked:
    """``entries[i]``: ``{"model", "hard", "error"?, "drift"?, "depth_drift"?}``; ``aligned[i]``: model ``i``'s
    aligned weights (identity blocks in the target's basis); ``modules[i]``: them loaded into the target's class
    (empty out of core)."""

    entries: tuple[dict, ...]
    aligned: tuple[Mapping[str, torch.Tensor], ...]
    modules: tuple[nn.Module, ...]


def check(inputs: Inputs, same_depth: SameDepth, analysed: Analysed, planned: Planned, emitted: Emitted,
          progress: Progress | None = None) -> Checked:
    """Check every model aligned by ``planned`` and emitted in ``emitted`` (see the module's docstring)."""
    (progress or quiet)("checking aligned models")
    target, models, states = analysed.target, analysed.models, analysed.states
    dtype = compute_dtype(states[target])
    args, kwargs = inputs.args, inputs.kwargs
    entries, aligned, modules = [], [], []
    for i, (m, st, al) in enumerate(zip(models, emitted.aligned, planned.alignments)):
        entry: dict[str, Any] = {"model": i, "hard": al is None or al.hard}
        if al is None:
            entry["error"] = 0.0
        elif al.hard:  # the aligned copy must compute what the (relayered) source computes
            entry["error"] = self_check(i, m, models[target], st, al, analysed.analyses[i], inputs.rules, states[i],
                                        args, kwargs, dtype, progress)
        depth = same_depth.plans[i]
        if depth is not None and al is not None:
            st = identity_blocks_in_target_basis(st, states[target], depth)
        if depth is not None or (al is not None and not al.hard):  # against the model as given
            given = inputs.models[i]
            weights = states[i] if given is m else given.state_dict()
            entry["drift"] = relative_error(outputs(given, weights, args, kwargs, dtype),
                                            outputs(models[target], st, args, kwargs, dtype))
        if depth is not None:
            entry["depth_drift"] = depth.drift
        entries.append(entry)
        aligned.append(st)
        if inputs.held:
            modules.append(m if al is None else build_module(models[target], st))
    return Checked(tuple(entries), tuple(aligned), tuple(modules))


def outputs(module: nn.Module, state: Mapping[str, torch.Tensor], args, kwargs,
            dtype: torch.dtype | None, progress: Progress | None = None) -> list[torch.Tensor]:
    """``module``'s outputs with its weights read from ``state`` one submodule at a time (cast to ``dtype``)."""
    return output_tensors(run_streamed(module, state, args, kwargs, dtype, progress))


def self_check(i: int, model: nn.Module, skeleton: nn.Module, aligned: Mapping[str, torch.Tensor],
               alignment: Alignment, analysis: Analysis, rules: RuleSet, state, args, kwargs,
               dtype: torch.dtype | None, progress: Progress | None = None) -> float:
    """Relative output error of the aligned weights (run in ``skeleton``) against ``state`` (run in ``model``);
    ``FusionError`` naming the space at fault and the ops it passes through where it exceeds ``CHECK_TOL``."""
    def run_one(sid: int) -> list[torch.Tensor]:
        single = Alignment({sid: alignment.maps[sid]}, 0, alignment.cost, alignment.solver)
        return outputs(model, aligned_tensors(analysis, state, single), args, kwargs, dtype)

    return check_outputs(outputs(model, state, args, kwargs, dtype, progress),
                         outputs(skeleton, aligned, args, kwargs, dtype, progress), run_one=run_one,
                         analysis=analysis, rules=rules, spaces=alignment.maps, what=f"aligning model {i}",
                         error=FusionError)
