"""Tensors seen along their spaces: unfold a parameter into pieces whose every dim is one space.

A parameter's axis is an expression over spaces: a ``Leaf``, a row-major
``Product`` (``heads × head_dim``) or a ``Concat`` of segments. ``pieces(t,
axes)`` reshapes products into separate dims and splits concatenations, giving
views ``(view, spaces)`` with one space per dim; writing into the views writes
into ``t``.

A permutation of a space is a ``LongTensor`` ``p`` of its size (``new[j] =
old[p[j]]``); a space nested under a parent (``Space.parent``) has a
``(parent size, size)`` table: under the parent's new index ``i`` it moves by
``p[i]``. Parents move first, so ``new[i, j] = old[p_H[i], p_D[i, j]]``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .spaces import AxisExpr, Concat, Leaf, Product

Piece = tuple[torch.Tensor, tuple[int, ...]]


def pieces(t: torch.Tensor, axes: tuple[AxisExpr, ...]) -> list[Piece]:
    """Views of ``t`` with one space per dim (products split into dims, concatenations into pieces)."""
    for d, expr in enumerate(axes):
        if isinstance(expr, Product):
            shape = t.shape[:d] + tuple(p.size for p in expr.parts) + t.shape[d + 1:]
            return pieces(t.view(shape), axes[:d] + expr.parts + axes[d + 1:])
        if isinstance(expr, Concat):
            out, offset = [], 0
            for part in expr.parts:
                out += pieces(t.narrow(d, offset, part.size), axes[:d] + (part,) + axes[d + 1:])
                offset += part.size
            return out
    return [(t, tuple(e.space for e in axes))]


def permute_piece(t: torch.Tensor, spaces: tuple[int, ...], perms: Mapping[int, torch.Tensor],
                  parents: Mapping[int, int]) -> torch.Tensor:
    """Apply ``perms`` to a piece: parents before nested children (see module doc)."""
    order = sorted(range(len(spaces)), key=lambda d: _depth(spaces[d], parents))
    for d in order:
        p = perms.get(spaces[d])
        if p is None:
            continue
        if p.dim() == 1:
            t = t.index_select(d, p)
            continue
        parent = parents[spaces[d]]
        e = spaces.index(parent)  # the analysis guarantees the parent is in every tensor holding the child
        shape = [1] * t.dim()
        shape[e], shape[d] = p.shape[0], p.shape[1]
        if e > d:
            index = p.t().reshape(shape)
        else:
            index = p.reshape(shape)
        t = torch.gather(t, d, index.expand(t.shape))
    return t


def _depth(space: int, parents: Mapping[int, int]) -> int:
    depth = 0
    while space in parents:
        space = parents[space]
        depth += 1
    return depth


def _has_concat(expr: AxisExpr) -> bool:
    if isinstance(expr, Leaf):
        return False
    return isinstance(expr, Concat) or any(_has_concat(p) for p in expr.parts)


def permute_tensor(t: torch.Tensor, axes: tuple[AxisExpr, ...], perms: Mapping[int, torch.Tensor],
                   parents: Mapping[int, int]) -> torch.Tensor:
    """A permuted copy of ``t`` laid out as ``axes``."""
    if not any(_has_concat(e) for e in axes):  # one piece: permute it as a whole
        (view, spaces), = pieces(t.detach().contiguous(), axes)
        if not any(s in perms for s in spaces):
            return t.detach().clone()
        return permute_piece(view, spaces, perms, parents).reshape(t.shape)
    out = t.detach().clone().contiguous()
    for view, spaces in pieces(out, axes):
        if any(s in perms for s in spaces):
            view.copy_(permute_piece(view.clone(), spaces, perms, parents))
    return out
