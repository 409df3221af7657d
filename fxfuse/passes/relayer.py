"""Pass 1, ``relayer``: bring every model to the target's depth (cross-layer alignment, ``fxfuse.planner.depth``).

    Inputs ──relayer──▶ SameDepth   (models with the target's block lists, one DepthPlan per relayered model)

A source whose list of repeated blocks has another length has its blocks
matched to the target's by the dynamic program of ``fxfuse.planner.depth.depth_map``
on block outputs; unmatched source blocks are left out, unmatched target
blocks get identity blocks (writers at zero).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..frontend.verify import compare_outputs
from ..planner.depth import DepthMap, Relayered, depth_map, find_block_lists, relayer as relayer_blocks, writer_params
from .inputs import FusionError, Inputs, Options, Progress, quiet


@dataclass(frozen=True)
class DepthPlan:
    """How one source model was brought to the target's depth (``fxfuse.planner.depth``)."""

    maps: tuple[DepthMap, ...]
    relayered: Relayered
    drift: float  # relative output change of the relayered source (0 when only identity blocks were added)

    def as_dict(self, model: int) -> list[dict]:
        out = []
        for d in self.maps:
            out.append({"model": model, "path": d.path, "target_blocks": d.target_size,
                        "source_blocks": d.source_size, "source_of": list(d.source_of),
                        "identity": [i for i, s in enumerate(d.source_of) if s is None],
                        "dropped": list(d.dropped), "cost": d.cost, "matched_costs": list(d.matched_costs()),
                        "costs": [list(r) for r in d.costs], "drift": self.drift})
        return out


@dataclass(frozen=True)
class SameDepth:
    """The models to align, each at the target's depth; ``plans[i]`` is ``None`` where model ``i`` kept its own."""

    models: tuple[nn.Module, ...]
    plans: tuple[DepthPlan | None, ...]

    def skipped(self, i: int, names) -> frozenset[str]:
        """Parameters of model ``i``'s identity blocks (they take the target's weights, not an alignment)."""
        identity = self.plans[i].relayered.identity_blocks if self.plans[i] else ()
        return frozenset(n for n in names if any(n.startswith(b + ".") for b in identity))


def relayer(inputs: Inputs, options: Options, progress: Progress | None = None) -> SameDepth:
    """``SameDepth`` of ``inputs.models`` (block outputs compared on the calibration inputs by ``depth_cost``)."""
    models, target = inputs.models, options.target
    lists = [[] if i == target else depth_lists(models[target], m, i) for i, m in enumerate(models)]
    if not any(lists):
        return SameDepth(models, (None,) * len(models))
    if not inputs.held:
        raise FusionError("models of different depths are fused in memory only")
    if options.method == "vanilla":
        raise FusionError("plain averaging needs models of equal depth (use the default method, ot)")
    batches = functools.lru_cache(None)(lambda: inputs.calibration(options.seed, models[target]))
    work, plans = match_depths(models, target, lists, batches, inputs.args, inputs.kwargs, options.depth_cost,
                               progress)
    return SameDepth(tuple(work), tuple(plans))


def depth_lists(target: nn.Module, source: nn.Module, i: int) -> list[str]:
    """Paths of the block lists whose lengths differ; ``[]`` when the parameters already agree."""
    names_t, names_s = set(target.state_dict()), set(source.state_dict())
    if names_t == names_s:
        return []
    lists_t = {b.path: b.size for b in find_block_lists(target)}
    lists_s = {b.path: b.size for b in find_block_lists(source)}
    differ = sorted(p for p in lists_t if p in lists_s and lists_t[p] != lists_s[p])
    if not differ:
        missing, extra = sorted(names_t - names_s), sorted(names_s - names_t)
        what = f"has no parameter {missing[0]}" if missing else f"has an extra parameter {extra[0]}"
        raise FusionError(f"architectures differ: model {i} {what}, and no list of repeated blocks "
                          "(a ModuleList or Sequential of identical blocks) of another length explains it: "
                          "cannot align their depths")
    return differ


def match_depths(models: Sequence[nn.Module], target: int, lists: Sequence[Sequence[str]],
                 batches: Callable[[], list], args: tuple, kwargs: Mapping[str, Any], cost: str = "cka",
                 progress: Progress | None = None) -> tuple[list[nn.Module], list[DepthPlan | None]]:
    """Bring every model to the target's depth; the models to align and, per model, its ``DepthPlan`` or ``None``.

    ``lists[i]``: the paths of model ``i``'s block lists whose lengths differ from the target's (``depth_lists``);
    ``batches()`` gives the calibration batches (called only where depths differ).
    """
    say = progress or quiet
    work, plans = list(models), [None] * len(models)
    for i, (m, paths) in enumerate(zip(models, lists)):
        if not paths:
            continue
        maps = []
        for path in paths:
            say(f"matching the blocks of {path}: model {i} -> {target} ({cost})")
            maps.append(depth_map(models[target], m, path, batches(), cost))
        writers = {d.path: writer_params(m, d.path, args, kwargs, pre_norm_only=False)
                   for d in maps if None in d.source_of}
        relayered = relayer_blocks(m, maps, writers)
        drift = compare_outputs(m, relayered.module, args, kwargs)
        work[i], plans[i] = relayered.module, DepthPlan(tuple(maps), relayered, drift)
    return work, plans


def identity_blocks_in_target_basis(state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor],
                                    plan: DepthPlan) -> dict:
    """Identity blocks take the target's own weights except their zeroed writers.

    Writers at zero make the block an identity whatever its other weights; with
    the target's weights the fused block is the target's block with its
    residual branches scaled by the target's fusion weight.
    """
    out = dict(state)
    zeroed = set(plan.relayered.zeroed)
    for block in plan.relayered.identity_blocks:
        for name in out:
            if name.startswith(block + ".") and name not in zeroed and out[name].is_floating_point():
                out[name] = target_state[name].clone()
    return out
