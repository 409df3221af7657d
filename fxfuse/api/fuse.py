"""``compile``: align several models into one target's basis and average them.

    prepare ─▶ relayer ─▶ analyse ─▶ plan ─▶ (refine) ─▶ emit ─▶ check ─▶ average ─▶ report

Each step is a pass of ``fxfuse.passes`` over frozen data. Every input model
is moved into the target's basis (the target itself by the identity). With
exact maps each aligned copy must compute what its original computes on the
example inputs (relative error ≤ ``CHECK_TOL``), else a rule is wrong and the
error names the space and the ops it passes through; with soft maps the drift
is reported. The fused model is ``Σ_m w_m · aligned_m`` loaded into a copy of
the target (``load_state_dict(strict=True)``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .. import passes
from ..frontend.correspond import CorrespondenceError
from ..frontend.rules import RuleSet
from ..frontend.spaces import Analysis
from ..models.calibration import Calibration
from ..passes import FusionError, calibration_batches  # noqa: F401  (public names, used with compile)
from ..planner.plan import Alignment
from ..recipes.recipe import accepts_recipe


class ArchitecturesDiffer(FusionError, CorrespondenceError):
    """Models of different classes whose graphs do not match (``match="auto"``): a fusion error, said as
    the correspondence found it."""


@dataclass(frozen=True)
class FusionResult:
    module: nn.Module
    aligned: tuple[nn.Module, ...]
    report: dict
    alignments: tuple[Alignment | None, ...] = field(default_factory=tuple)
    analysis: Analysis | None = None
    state: Mapping[str, torch.Tensor] | None = None  # out of core: the fused weights, made per tensor on access
    scales: Any = None  # unit scales learnt by refinement, folded into ``module`` (fxfuse.backend.scales)


@contextmanager
def _timed(timings: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


@accepts_recipe
def compile(models: Sequence[nn.Module], example_args: tuple = (), *, example_kwargs: Mapping[str, Any] | None = None,
            target: int = 0, cost: str = "weights", calib: Calibration = None, solver: str = "exact",
            reg: float | None = None, weights: Sequence[float] | None = None, pin: Sequence[str] = (),
            method: str = "ot", rules: RuleSet | None = None, seed: int = 0, max_passes: int = 50,
            strict: bool = False, heads: str = "nested", depth_cost: str = "cka", groups: str = "perm",
            untie: bool = False, width_maps: str = "embedding", progress: Callable[[str], None] | None = None,
            repair: bool = False,
            refine: Any = None, states: Sequence[Mapping[str, torch.Tensor]] | None = None,
            out_dtype: torch.dtype | None = None, device: str = "cpu", quality: str | None = None,
            vocab: Any = None, vocabularies: Sequence[Any] | None = None,
            match: str = "auto", model_inputs: Sequence[tuple] | None = None) -> FusionResult:
    """Fuse ``models`` into the basis and class of ``models[target]``.

    The options may come as one ``fxfuse.Recipe`` instead: ``compile(recipe)``
    loads its model specs, ``compile(models, args, recipe=recipe)`` fuses the
    given modules with its options (see ``fxfuse.recipes.recipe.accepts_recipe``).

    ``cost``: ``"weights"`` (weight matching, no data) or ``"activations"`` (needs
    ``calib``: a tensor of inputs ``(N, …)``, a mapping of named inputs (several
    inputs, ``fxfuse.models.calibration``) or an int, that many random inputs);
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
    the aligned models on ``calib`` (``fxfuse.backend.repair``); ``refine``: a
    ``fxfuse.backend.refine.RefineConfig``, learn the maps further on labelled data.

    ``groups="full"``: fold norm scales into their linear readers first
    (``fxfuse.frontend.canonicalize``; the models keep their class and function), then
    move every space by its whole symmetry group (``fxfuse.frontend.groups``):
    orthogonal residual streams and in-head maps by Procrustes
    (``fxfuse.planner.procrustes``), permutations elsewhere. ``"perm"``: permutations only.
    ``untie``: a norm scale whose reader is a tied weight (a tied LM head) may be
    folded into an untied copy of it (reported under ``canonicalize``).
    ``width_maps``: with ``groups="full"``, a space whose widths differ moves by a stretched orthonormal
    embedding (``"embedding"``: exact into a wider target) or by a hard matching (``"matching"``).

    Out of core (``states``: each model's weights as a mapping that reads them
    on access, ``fxfuse.backend.lazy.CheckpointTensors``; the modules may hold ``meta``
    tensors): costs read the tensors a block needs, the self-check runs one
    submodule's weights at a time, and ``FusionResult.state`` gives the fused
    weights tensor by tensor, in ``out_dtype`` (default: the target's), to be
    written shard by shard (``FusionResult.module`` is then the target's
    skeleton and ``aligned`` is empty). Half-precision weights are checked in
    float32.

    ``quality="best"``: ``cost``, ``groups`` and ``repair`` are chosen here, and
    refinement (``refine``'s data and budget) kept only where it helps: each
    candidate is scored on held-out samples of ``refine``'s labelled data, else
    of ``calib`` (``fxfuse.backend.stages``; the choice is under ``quality`` in the
    report). ``"fast"`` or ``None``: the options as given.

    ``vocab="target"`` or ``"union"``: language models with different
    vocabularies (``vocabularies``: each model's token strings by id, or its
    directory holding ``tokenizer.json``) are re-indexed into the target's or
    the union vocabulary first; shared rows are averaged, a row one model has
    is taken from it, moved into the target's basis (``fxfuse.models.vocab``; the
    counts under ``vocab`` in the report).

    ``match``: how a source's weights find the target's (``fxfuse.frontend.convert``):
    ``"names"`` as they are named, ``"graph"`` by matching the two exported
    graphs (other names, layouts, fused projections; the source is moved into
    the target's class first and checked), ``"auto"`` by graph for a source of
    another class than the target. ``model_inputs``: each model's example
    ``(args, kwargs)`` where the classes take different inputs (default: the
    target's for all).
    """
    from ..frontend.convert import noted, to_target

    models = list(models)
    each = list(model_inputs or [(tuple(example_args), dict(example_kwargs or {}))] * len(models))
    try:
        models, matched = to_target(models, each, target if -len(models) <= target < len(models) else 0, match,
                                    progress=progress)
    except CorrespondenceError as exc:
        if match != "auto":
            raise
        raise ArchitecturesDiffer(str(exc)) from None
    if isinstance(vocab, str):
        from ..models.vocab import prepare_models

        vocab = prepare_models(models, vocabularies, target, vocab, example_args, example_kwargs, calib)
        models, example_args, example_kwargs = list(vocab.models), vocab.args, vocab.kwargs
    if quality == "best":
        from ..backend.stages import fuse_best

        return noted(fuse_best(compile, models, example_args, dict(
            example_kwargs=example_kwargs, target=target, cost=cost, calib=calib, solver=solver, reg=reg,
            weights=weights, pin=pin, method=method, rules=rules, seed=seed, max_passes=max_passes, strict=strict,
            heads=heads, depth_cost=depth_cost, groups=groups, untie=untie, width_maps=width_maps,
            progress=progress, repair=repair,
            refine=refine, states=states, out_dtype=out_dtype, device=device, vocab=vocab)), matched)
    if quality not in (None, "fast"):
        raise FusionError(f"unknown quality {quality!r} (fast, best)")
    start, timings = time.perf_counter(), {}
    say = progress or passes.inputs.quiet
    options = passes.Options.of(len(models), target=target, weights=weights, calib=calib, cost=cost, solver=solver,
                                reg=reg, pin=tuple(pin), method=method, seed=seed, max_passes=max_passes,
                                strict=strict, heads=heads, depth_cost=depth_cost, groups=groups, untie=untie,
                                width_maps=width_maps,
                                repair=repair, refine=refine, out_dtype=out_dtype, device=device, vocab=vocab)
    inputs = passes.prepare(models, example_args, example_kwargs, options, calib, rules, states, progress)
    with _timed(timings, "depth_s"):
        same_depth = passes.relayer(inputs, options, progress)
    with _timed(timings, "trace_analyze_s"):
        analysed = passes.analyse(inputs, same_depth, options, progress)
    with _timed(timings, "align_s"):
        planned = passes.plan(inputs, same_depth, analysed, options, progress)
    refined = None
    if options.refine is not None:
        planned, refined = passes.refine(inputs, same_depth, analysed, planned, options, progress)
        timings["refine_s"] = refined["seconds"]
    with _timed(timings, "emit_s"):
        emitted = passes.emit(analysed, planned)
    with _timed(timings, "check_s"):
        checked = passes.check(inputs, same_depth, analysed, planned, emitted, progress)
    with _timed(timings, "repair_s" if options.repair else "average_s"):
        fused = passes.average(inputs, analysed, checked, options, progress, planned.scales)
    timings["total_s"] = time.perf_counter() - start
    report = passes.report(options, inputs, same_depth, analysed, planned, checked, fused, timings, refined)
    say(f"fused {len(models)} models in {timings['total_s']:.1f}s")
    return noted(FusionResult(fused.module, checked.modules, report, planned.alignments, analysed.ref, fused.state,
                              planned.scales), matched)
