"""Pass 3, ``plan``: one alignment per source model, into the target's basis (``fxfuse.planner.plan.align``).

    Analysed ──plan──▶ Planned   (an Alignment per model, None for the target)

The cost is weight matching (``fxfuse.planner.weight_cost.WeightCost``, iterated to a fixed
point) or activation statistics on the calibration batches
(``fxfuse.planner.activations``; with several workers each collects its shard, the
sums are reduced, and worker 0 alone goes on: the others stop with
``WorkerDone``). Spaces pinned by the user, and spaces whose every member
lies in an identity block added by ``relayer``, stay at the identity.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
from ..backend.lazy import aligned_tensors, in_memory
from ..frontend.spaces import Analysis
from ..models.distributed import WorkerDone, all_reduce_sums, shard, world
from ..planner.activations import activation_cost
from ..planner.plan import Alignment, align, blocks
from ..planner.weight_cost import WeightCost
from .analyse import Analysed
from .inputs import Inputs, Options, Progress, quiet
from .relayer import SameDepth


@dataclass(frozen=True)
class Planned:
    """``alignments[i]``: model ``i``'s maps into the target's basis (``None`` for the target, and for every
    model with ``method="vanilla"``)."""

    alignments: tuple[Alignment | None, ...]
    scales: Any = None  # learnt unit scales of the fused model (fxfuse.backend.scales.UnitScales), from refine


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
                                    skip=skip | (ref.scales if analysed.levels else frozenset()), device=options.on)
        else:
            rank, size = world()
            mine = shard(list(inputs.batches), rank, size) if size > 1 else list(inputs.batches)
            say(f"collecting activations of models {target} and {i} on {len(mine)} batches"
                + (f" (worker {rank} of {size})" if size > 1 else ""))
            cost_model = activation_cost(ref, analysis, mine, keep, progress=progress, levels=analysed.levels,
                                         reduce=all_reduce_sums if size > 1 else None,
                                         halves=_checks_halves(options, analysed.levels), device=options.on,
                                         states=tuple(None if in_memory(s) else s for s in (states[target], state)))
            if rank != 0:  # rank 0 solves, checks and writes
                continue
        silent = _weights_instead(ref, analysis, cost_model, keep, options, analysed.levels, state)
        noisy, weak = _undetermined(ref, analysis, cost_model, keep | silent, options, analysed.levels, state)
        say(f"solving {len(ref.free_spaces)} spaces ({options.solver})")
        alignment = align(ref, cost_model, solver=options.solver, reg=options.reg, fixed=keep | silent | set(noisy),
                          seed=options.seed, iterative=options.cost == "weights", max_passes=options.max_passes,
                          cost_name=options.cost, levels=analysed.levels, progress=progress,
                          embeddable=analysed.embeddable if options.width_maps == "embedding" else frozenset())
        if weak:
            note = (f"activation assignment of space(s) {_names(weak)} is not determined by its signal (the even and "
                    "the odd calibration samples map most of its units differently: the models may not correspond "
                    "there): kept")
            warnings.warn(note)
            alignment = replace(alignment, notes=alignment.notes + (note,))
        if silent or noisy:
            alignment = _matched_by_weights(ref, analysis, states[target], state, alignment, silent, skip,
                                            options, say, noisy)
        alignments.append(alignment)
    if options.by_activations and world()[0] != 0:
        raise WorkerDone()
    return Planned(tuple(alignments))


def _checks_halves(options: Options, levels) -> bool:
    """Whether the activation cost also solves each half of the samples (hard permutations only)."""
    return options.cost == "activations" and options.solver == "exact" and not levels


def _weights_instead(ref: Analysis, source: Analysis, cost_model, keep: set[int], options: Options, levels,
                     state: Mapping[str, torch.Tensor]) -> set[int]:
    """Spaces the activations say nothing about (constant on the data, or read at no node) that weight matching
    can align instead: top-level spaces without nested ones, of equal sizes, permutations only."""
    if options.cost != "activations" or options.solver != "exact" or levels:
        return set()
    return {s for s in cost_model.silent(blocks(ref, keep)) if _weights_can_match(ref, source, s)}


def _weights_can_match(ref: Analysis, source: Analysis, s: int) -> bool:
    """A top-level space without nested ones, of equal sizes in both models."""
    return (ref.spaces[s].parent is None and s not in set(ref.parents.values())
            and ref.spaces[s].size == source.spaces[s].size)


# A space whose units the two halves of the samples map differently, on fewer than this share of its units, is
# noise-driven there: the signal settles a good part of the space (the models correspond), the rest follows noise
# (units that vary by rounding only). At this share or above the whole space is weakly determined (independently
# drawn models): its activation maps are kept, and said so. Measured on permuted copies (which correspond
# everywhere): EfficientNet 25-34 %, MobileNetV1 4 % and 52 %; on independently drawn zoo pairs most spaces
# 75-100 %, a few small ones (8 units) 25-50 %.
NOISY_SHARE = 2 / 3


def _undetermined(ref: Analysis, source: Analysis, cost_model, keep: set[int], options: Options, levels,
                  state: Mapping[str, torch.Tensor]) -> tuple[dict[int, float], dict[int, float]]:
    """``(noisy, weak)``: spaces whose activation assignment the halves of the samples disagree on
    (``ActivationCost.undetermined``): below ``NOISY_SHARE`` of the units and matchable by weights (noisy,
    matched by weights), or the others (weak, kept)."""
    if not _checks_halves(options, levels) or getattr(cost_model, "halves", None) is None:
        return {}, {}
    found = cost_model.undetermined(blocks(ref, keep))
    noisy = {s: v for s, v in found.items()
             if v < NOISY_SHARE and _weights_can_match(ref, source, s)}
    return noisy, {s: v for s, v in found.items() if s not in noisy}


def _names(spaces) -> str:
    return ", ".join(f"s{s}" for s in sorted(spaces))


def _matched_by_weights(ref: Analysis, source: Analysis, target_state, state, alignment: Alignment, silent: set[int],
                        skip: frozenset[str], options: Options, say: Progress,
                        noisy: Mapping[int, float] | None = None) -> Alignment:
    """``alignment`` with the ``silent`` spaces matched by weights, every other space at its map.

    The source is first moved by ``alignment`` (the silent spaces at the identity), so in its new basis every
    other space already agrees with the target; weight matching there, with only the silent spaces free, gives
    their maps directly.
    """
    noisy = dict(noisy or {})
    say(f"weight matching {len(silent) + len(noisy)} space(s) without activation signal or not determined by it")
    moved = aligned_tensors(source, state, alignment)
    others = {s.id for s in ref.spaces} - silent - set(noisy)  # the user's pins among them
    by_weights = align(ref, WeightCost(ref, target_state, moved, source=source, skip=skip),
                       solver="exact", fixed=others, seed=options.seed, iterative=True,
                       max_passes=options.max_passes, cost_name="weights")
    notes = []
    if silent:
        notes.append(f"no activation signal for space(s) {', '.join(f's{s}' for s in sorted(silent))} (constant on "
                     "the calibration data, or read at no node): matched by weights")
    if noisy:
        shares = ", ".join(f"s{s} {100 * v:.0f} %" for s, v in sorted(noisy.items()))
        notes.append(f"activation assignment of space(s) {_names(noisy)} is not determined by its signal (the even "
                     f"and the odd calibration samples map these shares of its units differently: {shares}): "
                     "matched by weights")
    for note in notes:
        warnings.warn(note)
    done = silent | set(noisy)
    return Alignment({**alignment.maps, **{s: by_weights.maps[s] for s in done if s in by_weights.maps}},
                     alignment.passes, alignment.cost, alignment.solver,
                     alignment.notes + by_weights.notes + tuple(notes), alignment.seconds)
