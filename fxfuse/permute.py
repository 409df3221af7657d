"""Apply permutations of spaces to a model's parameters.

A permutation ``p`` of a space (a ``LongTensor`` of its size) acts on every
member axis by gathering: ``W' = W.index_select(axis, idx)`` with
``W'[j] = W[idx[j]]``. For a structured axis the index is composed from its
parts: a product ``(a × b)`` gives ``idx[(j₁, j₂)] = p_a[j₁]·|b| + p_b[j₂]``
(row-major), a concatenation offsets each segment's index.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from .spaces import Analysis, AxisExpr, Concat, Leaf, Product, analyze

Permutations = Mapping[int, torch.Tensor]


def axis_index(expr: AxisExpr, perms: Permutations) -> torch.Tensor:
    """The gather index of one axis under ``perms`` (identity for spaces not in ``perms``)."""
    if isinstance(expr, Leaf):
        p = perms.get(expr.space)
        return p if p is not None else torch.arange(expr.size)
    parts = [axis_index(p, perms) for p in expr.parts]
    if isinstance(expr, Concat):
        out, offset = [], 0
        for part, idx in zip(expr.parts, parts):
            out.append(idx + offset)
            offset += part.size
        return torch.cat(out) if out else torch.arange(0)
    idx = torch.zeros((), dtype=torch.long)
    for part, sub in zip(expr.parts, parts):
        idx = (idx.unsqueeze(-1) * part.size + sub).reshape(-1)
    return idx.reshape(-1)


def random_permutations(analysis: Analysis, seed: int = 0) -> dict[int, torch.Tensor]:
    """One uniformly random permutation for each free space of size > 1, drawn in space order."""
    g = torch.Generator().manual_seed(int(seed))
    return {s.id: torch.randperm(s.size, generator=g) for s in analysis.spaces if s.free and s.size > 1}


def permute_state_dict(analysis: Analysis, state: Mapping[str, torch.Tensor],
                       perms: Permutations) -> dict[str, torch.Tensor]:
    """A new state dict with every laid-out tensor gathered along its axes; others copied as they are."""
    out = dict(state)
    for name, layout in analysis.layouts.items():
        t = state[name]
        for dim, expr in enumerate(layout.axes):
            idx = axis_index(expr, perms)
            if not torch.equal(idx, torch.arange(len(idx))):
                t = t.index_select(dim, idx)
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


def permute(model: nn.Module, example_args: tuple, seed: int = 0, rules=None, example_kwargs=None) -> nn.Module:
    """A copy of ``model`` with weights permuted along every free space; it computes the same function."""
    analysis = analyze(model, example_args, rules=rules, example_kwargs=example_kwargs)
    return apply_permutations(analysis, random_permutations(analysis, seed))
