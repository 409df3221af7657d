"""Pass 2, ``analyse``: trace → canonicalise → analyse each model into spaces (``fxfuse.frontend.spaces``).

    SameDepth ──analyse──▶ Analysed   (one Analysis per model, the spaces pinned by the user, group levels)

With ``groups="full"`` norm scales are first folded into their linear readers
(``fxfuse.frontend.canonicalize``) and the folded models are analysed. With a weights
cost and permutations only, a model of the same class and config as one
already traced shares its analysis (only the graph's structure is read).
The analyses must agree: the same spaces, sizes differing only where a space
is free (a width).
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..frontend.groups import IDENTITY, INVERTIBLE, PERM, meet_level
from ..frontend.rules import RuleSet
from ..frontend.spaces import Analysis, analyze, expr_leaves
from .inputs import FusionError, Inputs, Options, Progress, quiet
from .relayer import SameDepth


@dataclass(frozen=True)
class Analysed:
    """Each model's analysis, on the models as they will be aligned.

    ``models``: the relayered models, canonicalised with ``groups="full"``;
    ``states``: their weights; ``canonical``: one ``fxfuse.frontend.canonicalize.Canonical``
    per model with ``groups="full"``, else empty; ``levels``: space id → the
    largest group level allowed in every model (empty without ``groups="full"``);
    ``fixed``: space id → why the user pinned it.
    """

    models: tuple[nn.Module, ...]
    analyses: tuple[Analysis, ...]
    states: tuple[Mapping[str, torch.Tensor], ...]
    canonical: tuple = ()
    levels: Mapping[int, int] | None = None
    fixed: Mapping[int, str] | None = None
    target: int = 0

    @property
    def embeddable(self) -> frozenset[int]:
        """Spaces with a group beyond the permutations that no model's ops keep only as a sum over the axis: where
        their widths differ they move by a stretched orthonormal embedding (``fxfuse.planner.procrustes``)."""
        return frozenset(s for s, level in (self.levels or {}).items()
                         if PERM < level <= INVERTIBLE and not any(s in a.summed for a in self.analyses))

    @property
    def ref(self) -> Analysis:
        """The target's analysis: the spaces every other model is aligned to."""
        return self.analyses[self.target]


def analyse(inputs: Inputs, same_depth: SameDepth, options: Options, progress: Progress | None = None) -> Analysed:
    """Trace and analyse every model of ``same_depth`` against ``inputs.rules``; check they can be fused."""
    say = progress or quiet
    target = options.target
    models = list(same_depth.models)
    check_same_parameters(models, target)
    analyses: list[Analysis] = []
    canonical = []
    states = list(inputs.states or ())
    for i, m in enumerate(models):
        twin = next((a for a in analyses if options.structure_only and same_architecture(a.traced.module, m)), None)
        if twin is not None:
            analyses.append(twin)
            continue
        say(f"tracing model {i} ({type(m).__name__})")
        if options.full_groups and not inputs.held:  # out of core: the folded weights are made on access
            from ..backend.streamfold import canonical_analysis_streamed

            a, c, states[i] = canonical_analysis_streamed(m, states[i], inputs.args, inputs.kwargs, inputs.rules,
                                                          options.strict, options.untie)
            canonical.append(c)
            analyses.append(a)
        elif options.full_groups:
            a, c = canonical_analysis(m, inputs.args, inputs.kwargs, inputs.rules, options.strict, options.untie)
            models[i] = c.module
            canonical.append(c)
            analyses.append(a)
        else:
            analyses.append(analyze(m, inputs.args, rules=inputs.rules, strict=options.strict,
                                    example_kwargs=inputs.kwargs))
    levels = ({s.id: functools.reduce(meet_level, (a.group(s.id).level for a in analyses))
               for s in analyses[target].spaces} if canonical else {})
    fixed = resolve_pins(analyses[target], options.pin)
    for sid, level in levels.items():  # rotary dims limited further by another op: only the identity is left
        if level == IDENTITY and sid not in fixed:
            fixed[sid] = "its group is the identity alone: " + analyses[target].group(sid).limited_by
    check_compatible(analyses, target, fixed)  # head sizes are compared on the nested structure
    if options.heads == "flat":
        analyses = [replace(a, spaces=tuple(replace(s, parent=None) for s in a.spaces)) for a in analyses]
    ref = analyses[target]
    if options.method == "vanilla" and any(s.size != r.size for a in analyses for s, r in zip(a.spaces, ref.spaces)):
        raise FusionError("plain averaging needs models of equal widths (use the default method, ot)")
    states = states or tuple(m.state_dict() for m in models)
    return Analysed(tuple(models), tuple(analyses), tuple(states), tuple(canonical), levels, fixed, target)


def canonical_analysis(model: nn.Module, args: tuple, kwargs: Mapping[str, Any], rules: RuleSet, strict: bool,
                       untie: bool = False):
    """Fold norm scales (``fxfuse.frontend.canonicalize``), then analyse the folded model; ``(analysis, Canonical)``."""
    from ..frontend.canonicalize import canonicalize
    from ..frontend.spaces import analyze_traced
    from ..frontend.trace import trace

    traced = trace(model, args, kwargs)
    folded = canonicalize(traced, untie)
    if folded.folds:  # the graph is the same; its parameters changed
        traced = trace(folded.module, args, kwargs)
    return analyze_traced(traced, rules, strict, rotary=True), folded


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """Two Hugging Face models of one class and one config (so one graph), with equal parameter shapes."""
    ca, cb = getattr(a, "config", None), getattr(b, "config", None)
    if type(a) is not type(b) or not hasattr(ca, "to_dict") or not hasattr(cb, "to_dict"):
        return False
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("_name_or_path", "name_or_path")}  # noqa: E731
    if strip(ca) != strip(cb):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype for k in sa)


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


def check_same_parameters(models: Sequence[nn.Module], target: int) -> None:
    """``FusionError`` naming the first parameter that one model has and the target lacks, or the reverse."""
    ref = models[target].state_dict()
    for i, m in enumerate(models):
        state = m.state_dict()
        for key in ref:
            if key not in state:
                raise FusionError(f"architectures differ: model {i} has no parameter {key}")
        extra = [k for k in state if k not in ref]
        if extra:
            raise FusionError(f"architectures differ: model {i} has an extra parameter {extra[0]}")


def check_compatible(analyses: Sequence[Analysis], target: int, fixed: Mapping[int, str]) -> None:
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
                if et.size != es.size:
                    _check_axis(ref, i, target, name, d, (lt, ls), (et, es), fixed)
        for st, ss in zip(ref.spaces, a.spaces):
            if (st.free, st.parent) != (ss.free, ss.parent):
                raise FusionError(f"model {i} and the target have different permutation structure at space "
                                  f"s{st.id} ({st.name})")


def _check_axis(ref: Analysis, i: int, target: int, name: str, d: int, layouts, exprs,
                fixed: Mapping[int, str]) -> None:
    """Axis ``d`` of ``name`` differs in size between model ``i`` and the target: only free widths may."""
    (lt, ls), (et, es) = layouts, exprs
    leaves_t, leaves_s = expr_leaves(et), expr_leaves(es)
    if [leaf.space for leaf in leaves_t] != [leaf.space for leaf in leaves_s]:
        raise FusionError(f"model {i} and the target have different permutation structure at {name} axis {d}")
    for lt_leaf, ls_leaf in zip(leaves_t, leaves_s):
        if lt_leaf.size == ls_leaf.size:
            continue
        sp = ref.spaces[lt_leaf.space]
        where = f"architectures differ: {name} has shape {lt.shape} in model {target} and {ls.shape} in model {i}"
        if not sp.free or sp.id in fixed:
            raise FusionError(f"{where}; axis {d} cannot be aligned ({fixed.get(sp.id) or sp.reason})")
        if sp.parent is not None:
            raise FusionError(f"{where}; the size inside each head differs ({lt_leaf.size} against "
                              f"{ls_leaf.size}, space s{sp.id}): heads must have equal sizes "
                              "(their number may differ)")
