"""Norm scales folded out of core: ``fxfuse.frontend.canonicalize`` on weights that stay in their files.

The folds are decided on the traced graph (``fxfuse.frontend.canonicalize.plan_folds``;
a scale is read only where a shift without biases to take it must be divided
by it). The folded weights are a mapping that makes each tensor on access
from the checkpoint's, with the arithmetic of the in-memory fold, so they are
the same bits:

* a reader weight ``W`` (``d_out × d``): ``W·diag(γ)`` (linear) or ``diag(γ)·W``
  (addmm), in float64, rounded once to ``W``'s dtype;
* a reader bias: ``b + W β`` with the unscaled ``W`` (where every reader has one);
* ``γ``: ones; ``β``: zeros where folded, else ``β / γ``.

Each tensor is changed by at most one fold (a scale with a tied or shared
reader is refused unless untied, and untying is done in memory only). The
fold is checked as in memory: both skeletons run streamed on the example
inputs, the original weights against the folded ones.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..frontend.canonicalize import Canonical, FoldStep, plan_folds
from ..core.errors import FxfuseError
from .lazy import TensorMap, compute_dtype, run_streamed
from ..frontend.rules import RuleSet
from ..frontend.verify import CHECK_TOL, output_tensors, relative_error


class FoldedTensors(TensorMap):
    """``state`` with ``steps`` folded in, per tensor on access; shapes and dtypes are ``state``'s."""

    def __init__(self, state: Mapping[str, torch.Tensor], steps: list[FoldStep]):
        self.state = state
        super().__init__(state.keys(), self._make, getattr(state, "aliases", {}))
        self.role: dict[str, tuple[str, FoldStep, Any]] = {}  # stored name -> what the fold makes of it
        for step in steps:
            self.role[self._stored(step.fold.scale)] = ("scale", step, None)
            if step.beta is not None:
                self.role[self._stored(step.beta)] = ("shift", step, None)
            for kind, w, b in step.readers:
                self.role[self._stored(w)] = ("weight", step, kind)
                if step.fold_shift:
                    self.role[self._stored(b)] = ("bias", step, (kind, w))
        for attr in ("dtype_of", "shape_of"):
            if hasattr(state, attr):
                setattr(self, attr, getattr(state, attr))

    def _stored(self, name: str) -> str:
        return self.aliases.get(name, name)

    def _make(self, key: str) -> torch.Tensor:
        t = self.state[key]
        found = self.role.get(key)
        if found is None:
            return t
        role, step, extra = found
        if role == "scale":
            return torch.ones_like(t)
        if role == "shift":
            if step.fold_shift:
                return torch.zeros_like(t)
            return (t.double() / self.state[step.fold.scale].double()).to(t.dtype)
        if role == "weight":
            g = self.state[step.fold.scale].double()
            return (t.double() * (g[None, :] if extra == "linear" else g[:, None])).to(t.dtype)
        kind, w = extra  # a reader's bias takes W β (W unscaled)
        W, shift = self.state[w].double(), self.state[step.beta].double()
        add = W @ shift if kind == "linear" else shift @ W
        return (t.double() + add).to(t.dtype)


def canonical_analysis_streamed(model: nn.Module, state: Mapping[str, torch.Tensor], args: tuple,
                                kwargs: Mapping[str, Any], rules: RuleSet, strict: bool, untie: bool = False):
    """``fxfuse.passes.analyse.canonical_analysis`` for a ``meta`` skeleton whose weights are ``state``:
    ``(analysis, Canonical with the skeleton itself, the folded weights)``."""
    from ..frontend.spaces import analyze_traced
    from ..frontend.trace import trace

    traced = trace(model, args, kwargs)
    steps, refused, untie_done = plan_folds(traced, untie, lambda name: state[name])
    if untie_done:
        raise FxfuseError("untying a weight to fold a norm scale into it is done in memory only")
    if not steps:
        return analyze_traced(traced, rules, strict, values=state, rotary=True), Canonical(model, (), tuple(refused), 0.0), state
    folded = FoldedTensors(state, steps)
    dtype = compute_dtype(state)
    before = output_tensors(run_streamed(model, state, traced.args, traced.kwargs, dtype))
    after = output_tensors(run_streamed(model, folded, traced.args, traced.kwargs, dtype))
    err = relative_error(before, after)
    folds = tuple(step.fold for step in steps)
    if not err <= CHECK_TOL:
        raise FxfuseError(f"folding norm scales into their readers changed {type(model).__name__}'s function "
                          f"(relative error {err:.2e}); first fold: {folds[0].scale} into {', '.join(folds[0].readers)}")
    analysis = analyze_traced(traced, rules, strict, values=folded, rotary=True)
    return analysis, Canonical(model, folds, tuple(refused), err), folded
