"""Move a source model into the target's class and names through the correspondence of their graphs.

    source, target ──trace──▶ graphs ──correspond──▶ pieces ──assemble──▶ the source in the target's class

The copy is checked before any alignment: on the example inputs and on random
inputs of their shapes (integers drawn in the example's range) it must compute
what the source computes (relative error ≤ ``CHECK_TOL``), else the matching is
refused in one line. ``match``: ``names`` (as the models are: one class, one
set of names), ``graph`` (every source through its graph), ``auto`` (graph for
a source of another class than the target, names otherwise).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .correspond import Correspondence, CorrespondenceError, correspond
from .relayout import LayoutError, assemble
from .trace import trace
from .verify import CHECK_TOL, relative_error, run

MATCHES = ("auto", "names", "graph")
Inputs = tuple  # (args, kwargs)


@dataclass(frozen=True)
class Converted:
    """``module``: the source's weights in a copy of the target (its class and names); ``error``: the largest
    relative error of its outputs against the source's, over the checked inputs."""

    module: nn.Module
    correspondence: Correspondence
    error: float


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under each of its names (tied ones under all)."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def convert(source: nn.Module, source_inputs: Inputs, target: nn.Module, target_inputs: Inputs,
            labels: tuple[str, str] = ("source", "target"), seed: int = 0) -> Converted:
    """``source`` moved into a copy of ``target`` (see module doc); ``CorrespondenceError`` in one line."""
    held = _tensors(source)
    meta = next((n for n, t in held.items() if t.is_meta), None)
    if meta is not None:
        raise CorrespondenceError(f"{labels[0]}: {meta} is not in memory; matching by graph needs the weights loaded")
    corr = correspond(trace(source, *source_inputs), trace(target, *target_inputs), labels)
    module = copy.deepcopy(target)
    into = _tensors(module)
    try:
        values = assemble(corr.pieces, held, into, labels)
    except LayoutError as exc:
        raise CorrespondenceError(str(exc)) from None
    with torch.no_grad():
        for name, value in values.items():
            into[name].copy_(value)
    error = check(source, source_inputs, module, target_inputs, labels, seed)
    return Converted(module.eval(), corr, error)


def random_inputs(inputs: Inputs, seed: int = 0) -> list[torch.Tensor]:
    """Random tensors in the shapes of ``inputs``' tensor leaves: integers in the range the example spans,
    booleans as they are, floats standard normal."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for leaf in pytree.tree_leaves(inputs):
        if not isinstance(leaf, torch.Tensor):
            continue
        if leaf.is_floating_point():
            out.append(torch.randn(leaf.shape, generator=g).to(leaf.dtype))
        elif leaf.dtype == torch.bool or leaf.numel() == 0:
            out.append(leaf.clone())
        else:
            lo, hi = int(leaf.min()), int(leaf.max())
            out.append(torch.randint(lo, hi + 1, leaf.shape, generator=g).to(leaf.dtype))
    return out


def _with(inputs: Inputs, tensors: list[torch.Tensor], label: str) -> Inputs:
    """``inputs`` with their tensor leaves replaced by ``tensors``, in order."""
    leaves, spec = pytree.tree_flatten(inputs)
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    if len(slots) != len(tensors) or any(leaves[i].shape != t.shape for i, t in zip(slots, tensors)):
        raise CorrespondenceError(f"{label} takes other inputs than the model it is matched to "
                                  f"({len(slots)} tensors of shapes {[tuple(leaves[i].shape) for i in slots]})")
    for i, t in zip(slots, tensors):
        leaves[i] = t
    return pytree.tree_unflatten(leaves, spec)


def check(source: nn.Module, source_inputs: Inputs, moved: nn.Module, target_inputs: Inputs,
          labels: tuple[str, str], seed: int = 0) -> float:
    """The relative error of ``moved`` against ``source`` on the source's example inputs and on random ones;
    ``CorrespondenceError`` above ``CHECK_TOL``."""
    worst = 0.0
    examples = [t for t in pytree.tree_leaves(source_inputs) if isinstance(t, torch.Tensor)]
    for tensors in (examples, random_inputs(source_inputs, seed)):
        s_args, s_kwargs = _with(source_inputs, tensors, labels[0])
        t_args, t_kwargs = _with(target_inputs, tensors, labels[1])
        error = relative_error(run(source, s_args, s_kwargs), run(moved, t_args, t_kwargs))
        worst = max(worst, error)
        if not error <= CHECK_TOL:
            raise CorrespondenceError(f"{labels[0]} moved into the class and names of {labels[1]} computes something "
                                      f"else (relative error {error:.1e} > {CHECK_TOL:g}): the graphs match but an op "
                                      "that reads no weight (a mask, a scale, an index) differs between them")
    return worst


def needs_graph(models: Sequence[nn.Module], target: int, match: str) -> bool:
    """Whether ``match`` (``MATCHES``) moves the sources through their graphs."""
    if match not in MATCHES:
        raise CorrespondenceError(f"unknown match {match!r} ({', '.join(MATCHES)})")
    if match == "graph":
        return True
    return match == "auto" and any(type(m) is not type(models[target]) for m in models)


def to_target(models: Sequence[nn.Module], inputs: Sequence[Inputs], target: int, match: str = "auto",
              labels: Sequence[str] | None = None, progress: Callable[[str], None] | None = None
              ) -> tuple[list[nn.Module], dict[int, Converted]]:
    """``(models, {source index: Converted})``: every source moved into the target's class and names where
    ``match`` asks for it (the target itself as it is); ``inputs``: each model's ``(args, kwargs)``."""
    models = list(models)
    if len(models) < 2 or not needs_graph(models, target % len(models), match):
        return models, {}
    target %= len(models)
    labels = list(labels or [f"model {i}" for i in range(len(models))])
    say = progress or (lambda _msg: None)
    done = {}
    for i, m in enumerate(models):
        if i == target or (match == "auto" and type(m) is type(models[target])):
            continue
        say(f"matching {labels[i]} to {labels[target]} by graph")
        try:
            done[i] = convert(m, inputs[i], models[target], inputs[target], (labels[i], labels[target]))
        except CorrespondenceError as exc:
            if match != "auto":
                raise
            raise CorrespondenceError(f"{labels[i]} is a {type(m).__name__}, {labels[target]} a "
                                      f"{type(models[target]).__name__}, and matching their weights by graph "
                                      f"failed: {exc}") from None
        models[i] = done[i].module
    return models, done


def loaded_to_target(loaded: Sequence, target: int, match: str, progress: Callable[[str], None] | None = None
                     ) -> tuple[list, dict[int, Converted]]:
    """``to_target`` on ``fxfuse.models.io.LoadedModel`` s, each source with its own example inputs; a moved source takes
    the target's module class and inputs (and keeps its spec)."""
    loaded = list(loaded)
    tgt = loaded[target]
    modules, done = to_target([m.module for m in loaded], [(m.args, m.kwargs) for m in loaded], target, match,
                              [m.spec for m in loaded], progress)
    for i in done:
        loaded[i] = replace(loaded[i], module=modules[i], args=tgt.args, kwargs=tgt.kwargs)
    return loaded, done


def report_entry(done: Mapping[int, Converted], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``correspondence`` entry of a fusion report: per source, its rows (source, target, transform) and
    the conversion's self-check error."""
    out = {}
    for i, c in sorted(done.items()):
        out[str(i)] = {"model": labels[i] if labels else i, "error": c.error,
                       "rows": [list(r) for r in c.correspondence.rows()]}
    return out


def noted(result, done: Mapping[int, Converted], labels: Sequence[str] | None = None):
    """``result`` (a ``FusionResult``) with its report saying which sources were matched by graph."""
    if not done:
        return result
    return replace(result, report=dict(result.report, correspondence=report_entry(done, labels)))


def table(done: Converted) -> str:
    """The correspondence as text: one row per tensor or slice, ``source -> target  transform``."""
    rows = done.correspondence.rows()
    labels = done.correspondence.labels
    width = max([len(r[0]) for r in rows] + [len(labels[0])])
    twidth = max([len(r[1]) for r in rows] + [len(labels[1])])
    lines = [f"{labels[0]:<{width}}    {labels[1]:<{twidth}}  transform"]
    lines += [f"{s:<{width}} -> {t:<{twidth}}  {k}" for s, t, k in rows]
    lines.append(f"{len(rows)} rows; the moved copy computes what {labels[0]} computes (relative error "
                 f"{done.error:.1e} on the example and random inputs)")
    return "\n".join(lines) + "\n"
