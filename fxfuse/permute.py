"""Apply permutations of spaces to a model's parameters.

A permutation ``p`` of a space (a ``LongTensor`` of its size) acts on every
member axis by gathering, ``W'[j] = W[p[j]]``; structured axes are unfolded
into one dim per space first (``fxfuse.layout``). A space nested under a
parent (inside-head dims under heads) gets one permutation per parent index.

``permute`` checks the permuted copy (``fxfuse.verify.check_moved``) and
refuses to return one that computes something else.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from .layout import permute_tensor
from .rules import RuleSet, load_rules
from .spaces import Analysis, analyze
from .verify import check_moved

Permutations = Mapping[int, torch.Tensor]


def random_permutations(analysis: Analysis, seed: int = 0) -> dict[int, torch.Tensor]:
    """One uniformly random permutation for each free space of size > 1, drawn in space order."""
    g = torch.Generator().manual_seed(int(seed))
    perms: dict[int, torch.Tensor] = {}
    for s in analysis.spaces:
        if not (s.free and s.size > 1):
            continue
        if s.parent is None:
            perms[s.id] = torch.randperm(s.size, generator=g)
        else:
            rows = analysis.spaces[s.parent].size
            perms[s.id] = torch.stack([torch.randperm(s.size, generator=g) for _ in range(rows)])
    return perms


def permute_state_dict(analysis: Analysis, state: Mapping[str, torch.Tensor],
                       perms: Permutations) -> dict[str, torch.Tensor]:
    """A new state dict with every laid-out tensor gathered along its axes; others copied as they are."""
    out = dict(state)
    parents = analysis.parents
    for name, layout in analysis.layouts.items():
        t = permute_tensor(state[name], layout.axes, perms, parents)
        for key in (name,) + layout.aliases:
            if key in out:
                out[key] = t
    return out


def apply_permutations(analysis: Analysis, perms: Permutations) -> nn.Module:
    """A deep copy of the analysed model with ``perms`` applied to its weights."""
    model = analysis.traced.module
    state = permute_state_dict(analysis, model.state_dict(), perms)
    clone = copy.deepcopy(model)
    clone.load_state_dict(state, strict=True)
    return clone


def checked_permutation(analysis: Analysis, perms: Permutations, rules: RuleSet) -> tuple[nn.Module, float]:
    """``apply_permutations``, then the self-check on the traced example inputs: ``(copy, relative error)``.

    Raises ``UnsoundError`` naming the space at fault and the ops (and rule files) it passes through.
    """
    model, traced = analysis.traced.module, analysis.traced
    moved = apply_permutations(analysis, perms)
    err = check_moved(model, moved, traced.args, traced.kwargs, analysis=analysis, rules=rules, spaces=perms,
                      move_one=lambda s: apply_permutations(analysis, {s: perms[s]}),
                      what=f"permuting {type(model).__name__}")
    return moved, err


def permute(model: nn.Module, example_args: tuple, seed: int = 0, rules: RuleSet | None = None,
            example_kwargs=None) -> nn.Module:
    """A copy of ``model`` with weights permuted along every free space; it computes the same function
    (checked: ``UnsoundError`` if it does not, naming the space and the rules at fault)."""
    rules = rules if rules is not None else load_rules()
    analysis = analyze(model, example_args, rules=rules, example_kwargs=example_kwargs)
    return checked_permutation(analysis, random_permutations(analysis, seed), rules)[0]
