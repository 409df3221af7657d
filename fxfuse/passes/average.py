"""Pass 7, ``average``: ``Σ_m w_m · aligned_m`` loaded into a copy of the target, repaired on request.

    Checked ──average──▶ Fused   (the fused module; out of core its weights, made per tensor on access)

Unit scales learnt by refinement (``fxfuse.backend.scales``) are folded into the
average at strength 1 (the fusion weights). With ``repair=True`` the fused units are rescaled to the interpolated
statistics of the aligned models on the calibration inputs (``fxfuse.backend.repair``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..backend.emit import average_states, build_module
from ..backend.lazy import averaged_tensors
from .analyse import Analysed
from .check import Checked
from .inputs import FusionError, Inputs, Options, Progress, quiet


@dataclass(frozen=True)
class Fused:
    """``module``: the fused model (out of core: the target's skeleton); ``state``: out of core, the fused
    weights made per tensor on access, else ``None``; ``repair``: the repair report, if repaired."""

    module: nn.Module
    state: Mapping[str, torch.Tensor] | None = None
    repair: dict | None = None


def average(inputs: Inputs, analysed: Analysed, checked: Checked, options: Options,
            progress: Progress | None = None, scales=None) -> Fused:
    """Average the aligned weights of ``checked`` with ``options.weights`` (see the module's docstring);
    ``scales``: a ``fxfuse.backend.scales.UnitScales`` folded into the average."""
    target, skeleton = options.target, analysed.models[options.target]
    if scales is not None and not inputs.held:
        raise FusionError("learnt unit scales need the models in memory")
    if not inputs.held and options.repair:  # repaired on the streamed graph; folds kept as vectors
        from ..backend.streamrepair import repair_streamed

        state, report = repair_streamed(skeleton, averaged_tensors(checked.aligned, options.weights, target),
                                        checked.aligned, options.weights, inputs.calibration(options.seed),
                                        options.out_dtype, progress)
        return Fused(skeleton, state, report)
    if not inputs.held:  # the fused weights are made tensor by tensor as they are written
        return Fused(skeleton, averaged_tensors(checked.aligned, options.weights, target, options.out_dtype))
    state = average_states(checked.aligned, options.weights, analysed.states[target])
    if options.vocab is not None:  # vocabulary rows: averaged over the models that have the token
        from ..models.vocab import per_row_average

        state = per_row_average(state, options.vocab.match, options.vocab.keys, options.weights)
    if scales is not None:
        from ..backend.scales import fold

        state = fold(state, scales)
    if not options.repair:
        return Fused(build_module(skeleton, state))
    from ..backend.repair import repair_state, trace_for

    (progress or quiet)("repairing unit statistics on the calibration inputs")
    batches = inputs.calibration(options.seed)
    repaired = repair_state(trace_for(build_module(skeleton, state), batches), state, checked.aligned,
                            options.weights, batches)
    return Fused(build_module(skeleton, repaired.state), None, repaired.report)
