"""``compile``: align several models into one target's basis and average them.

    models ─analyze─▶ spaces ─plan(cost, solver)─▶ alignments ─emit─▶ aligned models ─check─▶ average

Every input model is moved into the target's basis (the target itself by the
identity). With hard maps each aligned copy must compute what its original
computes on the example inputs (relative error ≤ ``CHECK_TOL``), else a rule is
wrong and the error names the space and the ops it passes through; with soft
maps the drift is reported. The fused model is ``Σ_m w_m · aligned_m`` loaded
into a copy of the target (``load_state_dict(strict=True)``).
"""
from __future__ import annotations

import fnmatch
import functools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .activations import activation_cost
from .calibration import Calibration, CalibrationError, samples
from .calibration import calibration_batches as batches_of
from .depth import DepthMap, Relayered, depth_map, find_block_lists, relayer, writer_params
from .distributed import WorkerDone, all_reduce_sums, shard, world
from .emit import average_states, build_module
from .errors import FxfuseError
from .groups import MODES as GROUP_MODES, NAMES as GROUP_NAMES
from .lazy import aligned_tensors, averaged_tensors, compute_dtype, in_memory, run_streamed
from .plan import Alignment, WeightCost, align
from .progress import bar
from .recipe import BY_NAME as OPTIONS, accepts_recipe
from .rules import RuleSet, load_rules
from .spaces import Analysis, analyze, expr_leaves
from .verify import CHECK_TOL, check_outputs, compare_outputs, output_tensors, relative_error

# allowed values, as the recipe schema declares them
COSTS, SOLVERS, METHODS = OPTIONS["cost"].choices, OPTIONS["solver"].choices, OPTIONS["method"].choices
DEPTH_COSTS, HEADS = OPTIONS["depth_cost"].choices, OPTIONS["heads"].choices


class FusionError(FxfuseError):
    """Inputs that cannot be fused, or an alignment that changed a model's function."""


@dataclass(frozen=True)
class FusionResult:
    module: nn.Module
    aligned: tuple[nn.Module, ...]
    report: dict
    alignments: tuple[Alignment | None, ...] = field(default_factory=tuple)
    analysis: Analysis | None = None
    state: Mapping[str, torch.Tensor] | None = None  # out of core: the fused weights, made per tensor on access


def _main_input(args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | int, torch.Tensor]:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return i, a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return k, v
    raise FusionError("the example inputs hold no tensor")


def calibration_batches(calib: Calibration, args: tuple, kwargs: Mapping[str, Any], seed: int = 0,
                        forward: nn.Module | None = None) -> list[tuple[tuple, dict]]:
    """Batches of every batched input (``fxfuse.calibration``); bad data raises ``FusionError``."""
    try:
        return batches_of(calib, args, kwargs, seed, forward)
    except CalibrationError as exc:
        raise FusionError(str(exc)) from None


def _dropped_note(calib: Calibration, batches: list[tuple[tuple, dict]]) -> str | None:
    """A note when whole batches leave calibration inputs out (the graphs run at one batch shape)."""
    total = samples(calib)
    size = _main_input(*batches[0])[1].shape[0]
    used = size * len(batches)
    if used == total:
        return None
    return (f"calibration used {used} of {total} inputs (whole batches of {size}); give a multiple of {size} "
            "to use them all")


def canonical_analysis(model: nn.Module, args: tuple, kwargs: Mapping[str, Any], rules: RuleSet, strict: bool,
                       untie: bool = False):
    """Fold norm scales (``fxfuse.canonicalize``), then analyse the folded model; ``(analysis, Canonical)``."""
    from .canonicalize import canonicalize
    from .spaces import analyze_traced
    from .trace import trace

    traced = trace(model, args, kwargs)
    folded = canonicalize(traced, untie)
    if folded.folds:  # the graph is the same; its parameters changed
        traced = trace(folded.module, args, kwargs)
    return analyze_traced(traced, rules, strict), folded


def _check_same_class(models: Sequence[nn.Module]) -> None:
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(models[0]):
            raise FusionError(f"model {i} is a {type(m).__name__}, model 0 a {type(models[0]).__name__}")


def _check_same_parameters(models: Sequence[nn.Module], target: int) -> None:
    ref = models[target].state_dict()
    for i, m in enumerate(models):
        state = m.state_dict()
        for key in ref:
            if key not in state:
                raise FusionError(f"architectures differ: model {i} has no parameter {key}")
        extra = [k for k in state if k not in ref]
        if extra:
            raise FusionError(f"architectures differ: model {i} has an extra parameter {extra[0]}")


def _check_compatible(analyses: Sequence[Analysis], target: int, fixed: Mapping[int, str]) -> None:
    """Same spaces in every model; sizes may differ only where a space is free (a width).

    A differing size anywhere else (a vocabulary, a number of classes, a patch
    size: axes that are pinned) or inside a head is refused, naming the first
    parameter where it shows.
    """
    ref = analyses[target]
    for i, a in enumerate(analyses):
        if i == target:
            continue
        if len(a.spaces) != len(ref.spaces):
            raise FusionError(f"model {i} and the target have different permutation structure "
                              f"({len(a.spaces)} spaces against {len(ref.spaces)})")
        for name, lt in ref.layouts.items():
            ls = a.layouts.get(name)
            if ls is None:
                raise FusionError(f"architectures differ: model {i} has no parameter {name}")
            if len(ls.shape) != len(lt.shape):
                raise FusionError(f"architectures differ: {name} has shape {lt.shape} in model {target} "
                                  f"and {ls.shape} in model {i}")
            for d, (et, es) in enumerate(zip(lt.axes, ls.axes)):
                if et.size == es.size:
                    continue
                leaves_t, leaves_s = expr_leaves(et), expr_leaves(es)
                if [leaf.space for leaf in leaves_t] != [leaf.space for leaf in leaves_s]:
                    raise FusionError(f"model {i} and the target have different permutation structure at {name} "
                                      f"axis {d}")
                for lt_leaf, ls_leaf in zip(leaves_t, leaves_s):
                    if lt_leaf.size == ls_leaf.size:
                        continue
                    sp = ref.spaces[lt_leaf.space]
                    where = (f"architectures differ: {name} has shape {lt.shape} in model {target} and {ls.shape} "
                             f"in model {i}")
                    if not sp.free or sp.id in fixed:
                        raise FusionError(f"{where}; axis {d} cannot be aligned ({fixed.get(sp.id) or sp.reason})")
                    if sp.parent is not None:
                        raise FusionError(f"{where}; the size inside each head differs ({lt_leaf.size} against "
                                          f"{ls_leaf.size}, space s{sp.id}): heads must have equal sizes "
                                          "(their number may differ)")
        for st, ss in zip(ref.spaces, a.spaces):
            if (st.free, st.parent) != (ss.free, ss.parent):
                raise FusionError(f"model {i} and the target have different permutation structure at space "
                                  f"s{st.id} ({st.name})")


@dataclass(frozen=True)
class DepthPlan:
    """How one source model was brought to the target's depth (``fxfuse.depth``)."""

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


def _depth_lists(target: nn.Module, source: nn.Module, i: int) -> list[str]:
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


def match_depths(models: Sequence[nn.Module], target: int, batches, args: tuple, kwargs: Mapping[str, Any],
                 cost: str = "cka", progress: Callable[[str], None] | None = None
                 ) -> tuple[list[nn.Module], list[DepthPlan | None]]:
    """Bring every model to the target's depth (cross-layer alignment), see ``fxfuse.depth``.

    Returns the models to align (sources relayered where their block lists
    differ in length) and, per model, its ``DepthPlan`` or ``None``.
    """
    say = progress or (lambda _msg: None)
    work, plans = list(models), [None] * len(models)
    for i, m in enumerate(models):
        if i == target:
            continue
        paths = _depth_lists(models[target], m, i)
        if not paths:
            continue
        maps = []
        for path in paths:
            say(f"matching the blocks of {path}: model {i} -> {target} ({cost})")
            maps.append(depth_map(models[target], m, path, batches(), cost))
        writers = {d.path: writer_params(m, d.path, args, kwargs, pre_norm_only=False)
                   for d in maps if None in d.source_of}
        relayered = relayer(m, maps, writers)
        drift = compare_outputs(m, relayered.module, args, kwargs)
        work[i], plans[i] = relayered.module, DepthPlan(tuple(maps), relayered, drift)
    return work, plans


def _identity_blocks_in_target_basis(state: dict, target_state: Mapping[str, torch.Tensor], plan: DepthPlan) -> dict:
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


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """Two Hugging Face models of one class and one config (so one graph), with equal parameter shapes."""
    ca, cb = getattr(a, "config", None), getattr(b, "config", None)
    if type(a) is not type(b) or not hasattr(ca, "to_dict") or not hasattr(cb, "to_dict"):
        return False
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("_name_or_path", "name_or_path")}  # noqa: E731
    if strip(ca) != strip(cb):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype for k in sa)


def _check_finite(states: Sequence[Mapping[str, torch.Tensor]], progress=None) -> None:
    with bar(progress, "checking weights", sum(len(s) for s in states)) as b:
        for i, state in enumerate(states):
            for key in state:
                b.update()
                _check_finite_tensor(i, key, state[key])


def _check_finite_tensor(i: int, key: str, t: torch.Tensor) -> None:
    # a sum is finite unless some element is not (or it overflows: then look closer)
    if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise FusionError(f"model {i}: {key} holds NaN or inf")


def resolve_pins(analysis: Analysis, patterns: Sequence[str]) -> dict[int, str]:
    """Spaces to keep unpermuted: ``sID``, or ``NAME[:AXIS]`` globs over member parameter axes."""
    fixed: dict[int, str] = {}
    for pat in patterns:
        hit = False
        if pat.startswith("s") and pat[1:].isdigit():
            sid = int(pat[1:])
            if sid >= len(analysis.spaces):
                raise FusionError(f"--pin {pat}: no such space (the model has {len(analysis.spaces)})")
            fixed[sid] = f"pinned by the user ({pat})"
            continue
        name, _, axis = pat.partition(":")
        for s in analysis.spaces:
            for m in s.members:
                if fnmatch.fnmatchcase(m.param, name) and (not axis or axis == str(m.axis)):
                    fixed[s.id] = f"pinned by the user ({pat})"
                    hit = True
        if not hit:
            raise FusionError(f"--pin {pat}: matches no parameter axis")
    return fixed


def _outputs(module: nn.Module, state: Mapping[str, torch.Tensor], args, kwargs,
             dtype: torch.dtype | None, progress=None) -> list[torch.Tensor]:
    """``module``'s outputs with its weights read from ``state`` one submodule at a time (cast to ``dtype``)."""
    return output_tensors(run_streamed(module, state, args, kwargs, dtype, progress))


def _self_check(i: int, model: nn.Module, skeleton: nn.Module, aligned: Mapping[str, torch.Tensor],
                alignment: Alignment, analysis: Analysis, rules: RuleSet, state, args, kwargs,
                dtype: torch.dtype | None, progress=None) -> float:
    """Relative output error of the aligned weights (run in ``skeleton``) against ``state`` (run in ``model``);
    ``FusionError`` naming the space at fault and the ops it passes through where it exceeds ``CHECK_TOL``."""
    def run_one(sid: int) -> list[torch.Tensor]:
        single = Alignment({sid: alignment.maps[sid]}, 0, alignment.cost, alignment.solver)
        return _outputs(model, aligned_tensors(analysis, state, single), args, kwargs, dtype)

    return check_outputs(_outputs(model, state, args, kwargs, dtype, progress),
                         _outputs(skeleton, aligned, args, kwargs, dtype, progress), run_one=run_one,
                         analysis=analysis, rules=rules, spaces=alignment.maps, what=f"aligning model {i}",
                         error=FusionError)


@accepts_recipe
def compile(models: Sequence[nn.Module], example_args: tuple = (), *, example_kwargs: Mapping[str, Any] | None = None,
            target: int = 0, cost: str = "weights", calib: Calibration = None, solver: str = "exact",
            reg: float | None = None, weights: Sequence[float] | None = None, pin: Sequence[str] = (),
            method: str = "ot", rules: RuleSet | None = None, seed: int = 0, max_passes: int = 50,
            strict: bool = False, heads: str = "nested", depth_cost: str = "cka", groups: str = "perm",
            untie: bool = False, progress: Callable[[str], None] | None = None, repair: bool = False,
            refine: Any = None, states: Sequence[Mapping[str, torch.Tensor]] | None = None,
            out_dtype: torch.dtype | None = None) -> FusionResult:
    """Fuse ``models`` into the basis and class of ``models[target]``.

    The options may come as one ``fxfuse.Recipe`` instead: ``compile(recipe)``
    loads its model specs, ``compile(models, args, recipe=recipe)`` fuses the
    given modules with its options (see ``fxfuse.recipe.accepts_recipe``).

    ``cost``: ``"weights"`` (weight matching, no data) or ``"activations"`` (needs
    ``calib``: a tensor of inputs ``(N, …)``, a mapping of named inputs (several
    inputs, ``fxfuse.calibration``) or an int, that many random inputs);
    ``solver``: ``"exact"`` (assignment / exact OT) or ``"sinkhorn"`` (soft, ``reg``);
    ``weights``: fusion weights (default uniform); ``pin``: spaces kept unpermuted;
    ``method="vanilla"``: plain averaging, for comparison; ``heads="flat"``: match
    inside-head dims with one permutation shared by all heads, instead of one per
    head solved per head pair (``"nested"``, the default).

    Models may differ in width (spaces of different sizes are matched many to
    one, or softly with sinkhorn; the result has the target's widths) and in
    depth: where a list of repeated blocks has another length in a source,
    its blocks are matched to the target's by the cross-layer dynamic program
    on ``depth_cost`` (``"cka"``: 1 − linear CKA of block outputs, ``"ot"``: OT
    cost between their units, on the calibration inputs); unmatched source
    blocks are left out, unmatched target blocks get identity blocks.

    ``repair=True``: rescale the fused units to the interpolated statistics of
    the aligned models on ``calib`` (``fxfuse.repair``); ``refine``: a
    ``fxfuse.refine.RefineConfig``, learn the maps further on labelled data.

    ``groups="full"``: fold norm scales into their linear readers first
    (``fxfuse.canonicalize``; the models keep their class and function), then
    move every space by its whole symmetry group (``fxfuse.groups``):
    orthogonal residual streams and in-head maps by Procrustes
    (``fxfuse.procrustes``), permutations elsewhere. ``"perm"``: permutations only.
    ``untie``: a norm scale whose reader is a tied weight (a tied LM head) may be
    folded into an untied copy of it (reported under ``canonicalize``).

    Out of core (``states``: each model's weights as a mapping that reads them
    on access, ``fxfuse.lazy.CheckpointTensors``; the modules may hold ``meta``
    tensors): costs read the tensors a block needs, the self-check runs one
    submodule's weights at a time, and ``FusionResult.state`` gives the fused
    weights tensor by tensor, in ``out_dtype`` (default: the target's), to be
    written shard by shard (``FusionResult.module`` is then the target's
    skeleton and ``aligned`` is empty). Half-precision weights are checked in
    float32.
    """
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    models = list(models)
    kwargs = dict(example_kwargs or {})
    if len(models) < 2:
        raise FusionError("need at least two models to fuse")
    if not -len(models) <= target < len(models):
        raise FusionError(f"--target {target} is out of range for {len(models)} models")
    target %= len(models)
    if cost not in COSTS:
        raise FusionError(f"unknown cost {cost!r} (one of {', '.join(COSTS)})")
    if solver not in SOLVERS:
        raise FusionError(f"unknown solver {solver!r} (one of {', '.join(SOLVERS)})")
    if heads not in HEADS:
        raise FusionError(f"unknown heads mode {heads!r} ({', '.join(HEADS)})")
    if method not in METHODS:
        raise FusionError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    if depth_cost not in DEPTH_COSTS:
        raise FusionError(f"unknown depth cost {depth_cost!r} (one of {', '.join(DEPTH_COSTS)})")
    if groups not in GROUP_MODES:
        raise FusionError(f"unknown groups {groups!r} (one of {', '.join(GROUP_MODES)})")
    if reg is not None and not (reg > 0 and math.isfinite(reg)):
        raise FusionError(f"--reg must be a positive number, got {reg}")
    if weights is None:
        weights = [1.0 / len(models)] * len(models)
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
        raise FusionError(f"{len(weights)} fusion weights for {len(models)} models")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise FusionError(f"fusion weights must be non-negative with a positive sum, got {weights}")
    weights = [w / sum(weights) for w in weights]
    if repair and calib is None:
        raise FusionError("--repair needs calibration inputs: pass --calib FILE (or --calib-random N)")
    if refine is not None and (method == "vanilla" or solver != "exact"):
        raise FusionError("--refine needs exact maps (the ot method with the exact solver): soft maps and plain "
                          "averaging are no group elements")
    _check_same_class(models)
    held = states is None or all(in_memory(s) for s in states)
    if states is not None and len(states) != len(models):
        raise FusionError(f"{len(states)} weight mappings for {len(models)} models")
    if not held and (cost != "weights" or method != "ot" or groups != "perm" or repair or refine is not None):
        raise FusionError("out-of-core fusion supports the weights cost with the ot method and permutations "
                          "(no repair or refinement); load the models in memory")
    _check_finite(states or [m.state_dict() for m in models], progress)
    rules = rules if rules is not None else load_rules()

    batches, dropped = None, None
    args = tuple(example_args)
    if method == "ot" and cost == "activations":
        batches = calibration_batches(calib, args, kwargs, seed, models[target])
        args, kwargs = batches[0]
        dropped = _dropped_note(calib, batches)
    originals = models
    t = time.perf_counter()
    depth_batches = functools.lru_cache(None)(lambda: batches or calibration_batches(calib, args, kwargs, seed,
                                                                                          models[target]))
    if not held and any(_depth_lists(originals[target], m, i) for i, m in enumerate(originals) if i != target):
        raise FusionError("models of different depths are fused in memory only")
    models, depth_plans = match_depths(originals, target, depth_batches, args, kwargs, depth_cost, say)
    if method == "vanilla" and any(depth_plans):
        raise FusionError("plain averaging needs models of equal depth (use the default method, ot)")
    timings["depth_s"] = time.perf_counter() - t
    _check_same_parameters(models, target)
    t = time.perf_counter()
    analyses: list[Analysis] = []
    canonical = []
    plain_weights = cost == "weights" and groups == "perm" and refine is None and not repair
    for i, m in enumerate(models):
        # weight costs read only the graph's structure: a twin of a traced model shares its analysis
        twin = next((a for a in analyses if plain_weights and _same_architecture(a.traced.module, m)), None)
        if twin is not None:
            analyses.append(twin)
            continue
        say(f"tracing model {i} ({type(m).__name__})")
        if groups == "full" and method == "ot":
            a, c = canonical_analysis(m, args, kwargs, rules, strict, untie)
            models[i] = c.module
            canonical.append(c)
            analyses.append(a)
        else:
            analyses.append(analyze(m, args, rules=rules, strict=strict, example_kwargs=kwargs))
    levels = ({s.id: min(a.group(s.id).level for a in analyses) for s in analyses[target].spaces}
              if canonical else {})
    timings["trace_analyze_s"] = time.perf_counter() - t
    fixed = resolve_pins(analyses[target], pin)
    _check_compatible(analyses, target, fixed)  # head sizes are compared on the nested structure
    if heads == "flat":
        analyses = [replace(a, spaces=tuple(replace(s, parent=None) for s in a.spaces)) for a in analyses]
    ref = analyses[target]
    if method == "vanilla" and any(s.size != r.size for a in analyses for s, r in zip(a.spaces, ref.spaces)):
        raise FusionError("plain averaging needs models of equal widths (use the default method, ot)")

    if states is None:
        states = [m.state_dict() for m in models]
    check_dtype = compute_dtype(states[target])
    alignments: list[Alignment | None] = []
    aligned_states = []
    t = time.perf_counter()
    for i, m in enumerate(models):
        if i == target or method == "vanilla":
            alignments.append(None)
            aligned_states.append(states[i])
            continue
        # identity blocks take the target's weights after alignment: they take no part in it
        identity = depth_plans[i].relayered.identity_blocks if depth_plans[i] else ()
        skip = frozenset(n for n in states[i] if any(n.startswith(b + ".") for b in identity))
        keep = set(fixed) | {s.id for s in ref.spaces if s.members and all(m.param in skip for m in s.members)}
        if cost == "weights":
            say(f"weight matching model {i} -> {target}")
            # uniform scales stay where they are under group maps: they carry no signal
            cost_model = WeightCost(ref, states[target], states[i], source=analyses[i],
                                    skip=skip | (ref.scales if levels else frozenset()))
        else:
            rank, size = world()
            mine = shard(batches, rank, size) if size > 1 else batches
            say(f"collecting activations of models {target} and {i} on {len(mine)} batches"
                + (f" (worker {rank} of {size})" if size > 1 else ""))
            cost_model = activation_cost(ref, analyses[i], mine, keep, progress=progress, levels=levels,
                                         reduce=all_reduce_sums if size > 1 else None)
            if rank != 0:  # rank 0 solves, checks and writes
                continue
        say(f"solving {len(ref.free_spaces)} spaces ({solver})")
        alignment = align(ref, cost_model, solver=solver, reg=reg, fixed=keep, seed=seed,
                          iterative=cost == "weights", max_passes=max_passes, cost_name=cost, levels=levels,
                          progress=progress)
        alignments.append(alignment)
        aligned_states.append(aligned_tensors(analyses[i], states[i], alignment))
    timings["align_s"] = time.perf_counter() - t
    if cost == "activations" and method == "ot" and world()[0] != 0:
        raise WorkerDone()
    refined = None
    if refine is not None:
        from .refine import refine_fusion

        say(f"refining the alignment for {refine.steps} steps")
        refined = refine_fusion(models, analyses, states, alignments, depth_plans, target, weights, refine, args,
                                kwargs, say)
        alignments = list(refined.alignments)
        aligned_states = [st if al is None else aligned_tensors(analyses[i], states[i], al)
                          for i, (st, al) in enumerate(zip(aligned_states, alignments))]
        timings["refine_s"] = refined.report["seconds"]

    t = time.perf_counter()
    say("checking aligned models")
    aligned_modules = []
    checks = []
    for i, (m, st, al) in enumerate(zip(models, aligned_states, alignments)):
        check: dict[str, Any] = {"model": i, "hard": al is None or al.hard}
        if al is None:
            check["error"] = 0.0
        elif al.hard:  # permutations: the aligned copy must compute what the (relayered) source computes
            check["error"] = _self_check(i, m, models[target], st, al, analyses[i], rules, states[i], args, kwargs,
                                         check_dtype, progress)
        plan = depth_plans[i]
        if plan is not None and al is not None:
            aligned_states[i] = st = _identity_blocks_in_target_basis(st, states[target], plan)
        if plan is not None or (al is not None and not al.hard):  # against the model as given
            given = states[i] if originals[i] is models[i] else originals[i].state_dict()  # out of core: the files
            check["drift"] = relative_error(_outputs(originals[i], given, args, kwargs, check_dtype),
                                            _outputs(models[target], st, args, kwargs, check_dtype))
        if plan is not None:
            check["depth_drift"] = plan.drift
        checks.append(check)
        if held:
            aligned_modules.append(m if al is None else build_module(models[target], st))
    timings["check_s"] = time.perf_counter() - t
    if held:
        fused_state = average_states(aligned_states, weights, states[target])
        repaired = None
        if repair:
            from .repair import repair_state, trace_for

            t = time.perf_counter()
            say("repairing unit statistics on the calibration inputs")
            calib_batches = batches or calibration_batches(calib, args, kwargs, seed)
            repaired = repair_state(trace_for(build_module(models[target], fused_state), calib_batches),
                                    fused_state, aligned_states, weights, calib_batches)
            fused_state = repaired.state
            timings["repair_s"] = time.perf_counter() - t
        fused, fused_state = build_module(models[target], fused_state), None
    else:  # out of core: the fused weights are made tensor by tensor as they are written
        repaired = None
        fused_state = averaged_tensors(aligned_states, weights, target, out_dtype)
        fused = models[target]
    timings["total_s"] = time.perf_counter() - t_start
    report = _report(ref, analyses, alignments, fixed, checks, weights, target, cost, solver, reg, method, timings)
    report["depth_cost"] = depth_cost
    if dropped:
        report["notes"].append(dropped)
    if refined is not None:
        report["refine"] = refined.report
    if repaired is not None:
        report["repair"] = repaired.report
        report["notes"] += repaired.report["notes"]
    report["groups"] = groups
    for entry in report["spaces"]:
        level = levels.get(entry["id"], 0)
        entry["group"] = GROUP_NAMES[level]
        limiting = [a.group(entry["id"]).limited_by for a in analyses if a.group(entry["id"]).level == level]
        entry["group_limited_by"] = limiting[0] if canonical and limiting else "permutations only (groups=perm)"
    report["canonicalize"] = [dict(c.report(), model=i) for i, c in enumerate(canonical)]
    report["depth_maps"] = [e for i, p in enumerate(depth_plans) if p is not None for e in p.as_dict(i)]
    for i, p in enumerate(depth_plans):
        for d in p.maps if p is not None else ():
            if d.dropped:
                report["notes"].append(f"model {i}: blocks {', '.join(f'{d.path}.{k}' for k in d.dropped)} have no "
                                       "counterpart in the target and are left out of its aligned copy")
            if p.drift > CHECK_TOL and None in d.source_of:
                report["notes"].append(f"model {i}: its identity blocks in {d.path} are not exact (output change "
                                       f"{p.drift:.1e}; a norm after the residual add, as in post-norm blocks)")
    say(f"fused {len(models)} models in {timings['total_s']:.1f}s")
    return FusionResult(fused, tuple(aligned_modules), report, tuple(alignments), ref, fused_state)


def _report(ref: Analysis, analyses, alignments, fixed, checks, weights, target, cost, solver, reg, method,
            timings) -> dict:
    spaces, widths = [], []
    for s in ref.spaces:
        sizes = [a.spaces[s.id].size for a in analyses]
        if max(sizes) <= 1:
            continue
        entry = {"id": s.id, "name": s.name, "size": s.size, "free": s.free and s.id not in fixed,
                 "reason": fixed.get(s.id) or s.reason, "parent": s.parent, "roles": list(s.roles),
                 "members": len(s.members), "models": []}
        if len(set(sizes)) > 1:
            entry["sizes"] = sizes
            widths.append({"space": s.id, "name": s.name, "sizes": sizes, "target_size": s.size})
        for i, al in enumerate(alignments):
            if al is None or s.id not in al.maps:
                continue
            m = al.maps[s.id]
            moved = None
            if m.perm is not None:  # units whose position changed (in any head, for a nested space)
                changed = m.perm != torch.arange(m.perm.shape[-1])
                moved = int(changed.reshape(-1, changed.shape[-1]).any(0).sum())
            entry["models"].append({"model": i, "hard": m.hard, "map": m.kind, "units_moved": moved,
                                    "solver": m.solver or ("assignment" if m.hard else solver),
                                    "size": sizes[i],
                                    "similarity_identity": m.similarity_identity,
                                    "similarity_aligned": m.similarity_aligned})
        spaces.append(entry)
    return {
        "width_maps": widths,
        "method": method, "cost": cost, "solver": solver, "reg": reg, "target": target,
        "weights": weights, "coverage": ref.coverage,
        "passes": {i: al.passes for i, al in enumerate(alignments) if al is not None},
        "notes": list(ref.notes) + sorted({n for al in alignments if al is not None for n in al.notes}),
        "self_check": checks, "spaces": spaces, "timings": timings,
        "unruled_ops": [{"op": u.op, "node": u.node, "module": u.module} for u in ref.unruled],
        "unfit_rules": [{"rule": u.rule, "ops": list(u.ops), "nodes": u.nodes} for u in ref.unfit_rules],
    }
