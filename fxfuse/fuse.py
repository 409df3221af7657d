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
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .activations import activation_cost
from .emit import aligned_state, average_states, build_module
from .errors import FxfuseError
from .plan import Alignment, WeightCost, align
from .rules import RuleSet, load_rules
from .spaces import Analysis, analyze, expr_leaves
from .verify import compare_outputs

CHECK_TOL = 1e-4
CALIB_BATCH = 16  # calibration batch size: the models are traced once more at this shape
COSTS, SOLVERS, METHODS = ("weights", "activations"), ("exact", "sinkhorn"), ("ot", "vanilla")


class FusionError(FxfuseError):
    """Inputs that cannot be fused, or an alignment that changed a model's function."""


@dataclass(frozen=True)
class FusionResult:
    module: nn.Module
    aligned: tuple[nn.Module, ...]
    report: dict
    alignments: tuple[Alignment | None, ...] = field(default_factory=tuple)
    analysis: Analysis | None = None


def _main_input(args: tuple, kwargs: Mapping[str, Any]) -> tuple[str | int, torch.Tensor]:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return i, a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return k, v
    raise FusionError("the example inputs hold no tensor")


def _with_input(args: tuple, kwargs: Mapping[str, Any], key, value: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    if isinstance(key, int):
        args[key] = value
    else:
        kwargs[key] = value
    return tuple(args), kwargs


def calibration_batches(calib: torch.Tensor | int | None, args: tuple, kwargs: Mapping[str, Any],
                        seed: int = 0) -> list[tuple[tuple, dict]]:
    """Batches shaped like the example input: from a tensor ``(N, …)``, or ``N`` random samples."""
    key, example = _main_input(args, kwargs)
    batch = max(example.shape[0], CALIB_BATCH)
    if calib is None or isinstance(calib, int):
        n = 256 if calib is None else int(calib)
        if n < 1:
            raise FusionError(f"--calib-random {n}: need at least one sample")
        g = torch.Generator().manual_seed(seed)
        shape = (n,) + tuple(example.shape[1:])
        if example.is_floating_point():
            data = torch.randn(shape, generator=g, dtype=example.dtype)
        else:
            lo, hi = int(example.min()), int(example.max()) + 1
            data = torch.randint(lo, max(hi, lo + 1), shape, generator=g, dtype=example.dtype)
    else:
        data = calib
        if not isinstance(data, torch.Tensor):
            raise FusionError("calibration data must be a tensor")
        if tuple(data.shape[1:]) != tuple(example.shape[1:]):
            raise FusionError(f"calibration data has shape {tuple(data.shape)}; the models take "
                              f"(N, {', '.join(map(str, example.shape[1:]))})")
        if data.is_floating_point() != example.is_floating_point():
            raise FusionError(f"calibration data has dtype {data.dtype}; the models take {example.dtype}")
        data = data.to(example.dtype)
    if data.is_floating_point() and not torch.isfinite(data).all():
        raise FusionError("calibration data holds NaN or inf")
    batch = min(batch, data.shape[0])
    n_batches = data.shape[0] // batch
    return [_with_input(args, kwargs, key, data[i * batch:(i + 1) * batch]) for i in range(n_batches)]


def _check_same_architecture(models: Sequence[nn.Module]) -> None:
    ref = models[0].state_dict()
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(models[0]):
            raise FusionError(f"model {i} is a {type(m).__name__}, model 0 a {type(models[0]).__name__}")
        state = m.state_dict()
        for key in ref:
            if key not in state:
                raise FusionError(f"architectures differ: model {i} has no parameter {key}")
            if tuple(state[key].shape) != tuple(ref[key].shape):
                raise FusionError(f"architectures differ: {key} has shape {tuple(ref[key].shape)} in model 0 "
                                  f"and {tuple(state[key].shape)} in model {i}")
        extra = [k for k in state if k not in ref]
        if extra:
            raise FusionError(f"architectures differ: model {i} has an extra parameter {extra[0]}")


def _check_finite(models: Sequence[nn.Module]) -> None:
    for i, m in enumerate(models):
        for key, t in m.state_dict().items():
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


def _blame(analysis: Analysis, rules: RuleSet, space: int) -> str:
    ops = []
    graph_nodes = {n.name: n for n in analysis.traced.graph.nodes}
    for name, exprs in analysis.node_axes.items():
        node = graph_nodes.get(name)
        if node is None or node.op != "call_function" or not exprs or not isinstance(exprs, tuple):
            continue
        try:
            leaves = [leaf.space for e in exprs if e is not None for leaf in expr_leaves(e)]
        except AttributeError:
            continue
        if space in leaves:
            op = str(node.target)
            rule = rules.lookup(op)
            entry = f"{op} ({rule.source})" if rule else op
            if entry not in ops:
                ops.append(entry)
    return ", ".join(ops[:6]) + (" …" if len(ops) > 6 else "")


def _self_check(i: int, model: nn.Module, aligned: nn.Module, alignment: Alignment, analysis: Analysis,
                rules: RuleSet, state, args, kwargs) -> float:
    err = compare_outputs(model, aligned, args, kwargs)
    if err <= CHECK_TOL:
        return err
    culprit = None
    for sid in sorted(alignment.maps):
        single = Alignment({sid: alignment.maps[sid]}, 0, alignment.cost, alignment.solver)
        one = build_module(model, aligned_state(analysis, state, single))
        if compare_outputs(model, one, args, kwargs) > CHECK_TOL:
            culprit = sid
            break
    if culprit is None:
        raise FusionError(f"aligning model {i} changed its function (relative error {err:.2e})")
    s = analysis.spaces[culprit]
    raise FusionError(f"aligning model {i} changed its function (relative error {err:.2e}): space s{culprit} "
                      f"({s.name}, size {s.size}) is moved unsoundly; it passes through {_blame(analysis, rules, culprit)}"
                      "; one of these rules is wrong")


def compile(models: Sequence[nn.Module], example_args: tuple = (), *, example_kwargs: Mapping[str, Any] | None = None,
            target: int = 0, cost: str = "weights", calib: torch.Tensor | int | None = None, solver: str = "exact",
            reg: float | None = None, weights: Sequence[float] | None = None, pin: Sequence[str] = (),
            method: str = "ot", rules: RuleSet | None = None, seed: int = 0, max_passes: int = 50,
            strict: bool = False, heads: str = "nested", progress: Callable[[str], None] | None = None
            ) -> FusionResult:
    """Fuse ``models`` into the basis and class of ``models[target]``.

    ``cost``: ``"weights"`` (weight matching, no data) or ``"activations"`` (needs
    ``calib``: a tensor of inputs ``(N, …)`` or an int, that many random inputs);
    ``solver``: ``"exact"`` (assignment / exact OT) or ``"sinkhorn"`` (soft, ``reg``);
    ``weights``: fusion weights (default uniform); ``pin``: spaces kept unpermuted;
    ``method="vanilla"``: plain averaging, for comparison; ``heads="flat"``: match
    inside-head dims with one permutation shared by all heads, instead of one per
    head solved per head pair (``"nested"``, the default).
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
    if heads not in ("nested", "flat"):
        raise FusionError(f"unknown heads mode {heads!r} (nested, flat)")
    if method not in METHODS:
        raise FusionError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
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
    _check_same_architecture(models)
    _check_finite(models)
    rules = rules if rules is not None else load_rules()

    batches = None
    args = tuple(example_args)
    if method == "ot" and cost == "activations":
        batches = calibration_batches(calib, args, kwargs, seed)
        args, kwargs = batches[0]
    t = time.perf_counter()
    analyses = []
    for i, m in enumerate(models):
        say(f"tracing model {i} ({type(m).__name__})")
        a = analyze(m, args, rules=rules, strict=strict, example_kwargs=kwargs)
        if heads == "flat":
            a = replace(a, spaces=tuple(replace(s, parent=None) for s in a.spaces))
        analyses.append(a)
    timings["trace_analyze_s"] = time.perf_counter() - t
    ref = analyses[target]
    for i, a in enumerate(analyses):
        if [(s.size, s.free, s.parent) for s in a.spaces] != [(s.size, s.free, s.parent) for s in ref.spaces]:
            raise FusionError(f"model {i} and the target have different permutation structure")
    fixed = resolve_pins(ref, pin)

    states = [m.state_dict() for m in models]
    alignments: list[Alignment | None] = []
    aligned_states = []
    t = time.perf_counter()
    for i, m in enumerate(models):
        if i == target or method == "vanilla":
            alignments.append(None)
            aligned_states.append(states[i])
            continue
        if cost == "weights":
            say(f"weight matching model {i} -> {target}")
            cost_model = WeightCost(ref, states[target], states[i])
        else:
            say(f"collecting activations of models {target} and {i} on {len(batches)} batches")
            cost_model = activation_cost(ref, analyses[i], batches, set(fixed), progress=say)
        say(f"solving {len(ref.free_spaces)} spaces ({solver})")
        alignment = align(ref, cost_model, solver=solver, reg=reg, fixed=set(fixed), seed=seed,
                          iterative=cost == "weights", max_passes=max_passes, cost_name=cost)
        alignments.append(alignment)
        aligned_states.append(aligned_state(analyses[i], states[i], alignment))
    timings["align_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("checking aligned models")
    aligned_modules = []
    checks = []
    for i, (m, st, al) in enumerate(zip(models, aligned_states, alignments)):
        aligned_m = m if al is None else build_module(m, st)
        aligned_modules.append(aligned_m)
        if al is None:
            checks.append({"model": i, "hard": True, "error": 0.0})
        elif al.hard:
            err = _self_check(i, m, aligned_m, al, analyses[i], rules, states[i], args, kwargs)
            checks.append({"model": i, "hard": True, "error": err})
        else:
            checks.append({"model": i, "hard": False, "drift": compare_outputs(m, aligned_m, args, kwargs)})
    timings["check_s"] = time.perf_counter() - t
    fused_state = average_states(aligned_states, weights, states[target])
    fused = build_module(models[target], fused_state)
    timings["total_s"] = time.perf_counter() - t_start
    report = _report(ref, alignments, fixed, checks, weights, target, cost, solver, reg, method, timings)
    say(f"fused {len(models)} models in {timings['total_s']:.1f}s")
    return FusionResult(fused, tuple(aligned_modules), report, tuple(alignments), ref)


def _report(ref: Analysis, alignments, fixed, checks, weights, target, cost, solver, reg, method, timings) -> dict:
    spaces = []
    for s in ref.spaces:
        if s.size <= 1:
            continue
        entry = {"id": s.id, "name": s.name, "size": s.size, "free": s.free and s.id not in fixed,
                 "reason": fixed.get(s.id) or s.reason, "parent": s.parent, "roles": list(s.roles),
                 "members": len(s.members), "models": []}
        for i, al in enumerate(alignments):
            if al is None or s.id not in al.maps:
                continue
            m = al.maps[s.id]
            moved = None
            if m.perm is not None:
                ident = torch.arange(m.perm.shape[-1])
                moved = int((m.perm != ident).sum())
            entry["models"].append({"model": i, "hard": m.hard, "units_moved": moved,
                                    "similarity_identity": m.similarity_identity,
                                    "similarity_aligned": m.similarity_aligned})
        spaces.append(entry)
    return {
        "method": method, "cost": cost, "solver": solver, "reg": reg, "target": target,
        "weights": weights, "coverage": ref.coverage,
        "passes": {i: al.passes for i, al in enumerate(alignments) if al is not None},
        "notes": sorted({n for al in alignments if al is not None for n in al.notes}),
        "self_check": checks, "spaces": spaces, "timings": timings,
        "unruled_ops": [{"op": u.op, "node": u.node, "module": u.module} for u in ref.unruled],
    }
