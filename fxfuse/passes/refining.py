"""Pass 4 (optional), ``refine``: learn the maps further on labelled data (``fxfuse.backend.refine``).

    Planned ──refine──▶ (Planned, report)   (new exact maps)
"""
from __future__ import annotations

from .analyse import Analysed
from .inputs import Inputs, Options, Progress, quiet
from .planning import Planned
from .relayer import SameDepth


def refine(inputs: Inputs, same_depth: SameDepth, analysed: Analysed, planned: Planned, options: Options,
           progress: Progress | None = None) -> tuple[Planned, dict]:
    """Refine ``planned`` by ``options.refine`` (a ``fxfuse.backend.refine.RefineConfig``); the new plan (with the
    learnt unit scales of the fused model, ``config.scales``) and its report."""
    from ..backend.refine import refine_fusion

    say = progress or quiet
    config = options.refine
    sites = ()
    if getattr(config, "scales", False):
        from ..backend.repair import scale_sites

        target = options.target
        sites = scale_sites(analysed.analyses[target].traced, analysed.states[target])
    say(f"refining the alignment for {config.steps} steps")
    refined = refine_fusion(analysed.models, analysed.analyses, analysed.states, planned.alignments,
                            same_depth.plans, options.target, options.weights, config, inputs.args, inputs.kwargs, say,
                            analysed.levels, options.on,
                            None if options.vocab is None else (options.vocab.keys, options.vocab.match.has), sites)
    return Planned(tuple(refined.alignments), refined.scales), refined.report
