"""Pass 3, ``plan``: one alignment per source model, into the target's basis (``fxfuse.plan.align``).

    Analysed ──plan──▶ Planned   (an Alignment per model, None for the target)

The cost is weight matching (``fxfuse.plan.WeightCost``, iterated to a fixed
point) or activation statistics on the calibration batches
(``fxfuse.activations``; with several workers each collects its shard, the
sums are reduced, and worker 0 alone goes on: the others stop with
``WorkerDone``). Spaces pinned by the user, and spaces whose every member
lies in an identity block added by ``relayer``, stay at the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from ..activations import activation_cost
from ..distributed import WorkerDone, all_reduce_sums, shard, world
from ..plan import Alignment, WeightCost, align
from .analyse import Analysed
from .inputs import Inputs, Options, Progress, quiet
from .relayer import SameDepth


@dataclass(frozen=True)
class Planned:
    """``alignments[i]``: model ``i``'s maps into the target's basis (``None`` for the target, and for every
    model with ``method="vanilla"``)."""

    alignments: tuple[Alignment | None, ...]


def plan(inputs: Inputs, same_depth: SameDepth, analysed: Analysed, options: Options,
         progress: Progress | None = None) -> Planned:
    """Solve every source model's alignment to the target (see the module's docstring)."""
    say = progress or quiet
    target, ref, states = options.target, analysed.ref, analysed.states
    alignments: list[Alignment | None] = []
    for i, (analysis, state) in enumerate(zip(analysed.analyses, states)):
        if i == target or options.method == "vanilla":
            alignments.append(None)
            continue
        # identity blocks take the target's weights after alignment: they take no part in it
        skip = same_depth.skipped(i, state)
        keep = set(analysed.fixed) | {s.id for s in ref.spaces if s.members and all(m.param in skip for m in s.members)}
        if options.cost == "weights":
            say(f"weight matching model {i} -> {target}")
            # uniform scales stay where they are under group maps: they carry no signal
            cost_model = WeightCost(ref, states[target], state, source=analysis,
                                    skip=skip | (ref.scales if analysed.levels else frozenset()))
        else:
            rank, size = world()
            mine = shard(list(inputs.batches), rank, size) if size > 1 else list(inputs.batches)
            say(f"collecting activations of models {target} and {i} on {len(mine)} batches"
                + (f" (worker {rank} of {size})" if size > 1 else ""))
            cost_model = activation_cost(ref, analysis, mine, keep, progress=progress, levels=analysed.levels,
                                         reduce=all_reduce_sums if size > 1 else None)
            if rank != 0:  # rank 0 solves, checks and writes
                continue
        say(f"solving {len(ref.free_spaces)} spaces ({options.solver})")
        alignment = align(ref, cost_model, solver=options.solver, reg=options.reg, fixed=keep, seed=options.seed,
                          iterative=options.cost == "weights", max_passes=options.max_passes, cost_name=options.cost,
                          levels=analysed.levels, progress=progress)
        alignments.append(alignment)
    if options.by_activations and world()[0] != 0:
        raise WorkerDone()
    return Planned(tuple(alignments))
