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

Between spaces of different sizes a map is a float matrix ``A`` (``n_t × n_s``,
``new[j] = Σ_k A[j, k] old[k]``); a space nested under such a parent has the
inner matching of every parent pair, ``(n_t, n_s, m)``, and the two move
together by ``nested_matrix``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..frontend.spaces import AxisExpr, Concat, Leaf, Product

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


def nested_matrix(A: torch.Tensor, pair_perms: torch.Tensor) -> torch.Tensor:
    """``M[(j,a),(k,b)] = A[j,k]·[b = π_jk(a)]`` for a parent map ``A`` and inner matchings ``π`` ``(n_t, n_s, m)``."""
    n_t, n_s, m = pair_perms.shape
    inner = torch.eye(m, dtype=A.dtype)[pair_perms]  # (n_t, n_s, m, m): [j, k, a, b] = [b == π_jk(a)]
    return (A[:, :, None, None] * inner).permute(0, 2, 1, 3).reshape(n_t * m, n_s * m)


def joint_matrix(A: torch.Tensor, inners: list[torch.Tensor]) -> torch.Tensor:
    """A parent and several spaces nested under it on one axis, moved together:
    ``M[(j,a₁,a₂,…),(k,b₁,b₂,…)] = A[j,k]·Π_i C_i[j,k,a_i,b_i]`` (``inners``: ``C_i``, ``(n_t, n_s, m_i, m_i)``;
    a pair perm ``π`` is ``C[j,k,a,b] = [b = π_jk(a)]``), row-major in ``(parent, child 1, child 2, …)``."""
    n_t, n_s = A.shape
    inner = inners[0]
    for C in inners[1:]:
        m1, m2 = inner.shape[-1], C.shape[-1]
        inner = (inner[:, :, :, None, :, None] * C[:, :, None, :, None, :]).reshape(n_t, n_s, m1 * m2, m1 * m2)
    m = inner.shape[-1]
    return (A[:, :, None, None] * inner).permute(0, 2, 1, 3).reshape(n_t * m, n_s * m)


def apply_matrix(t: torch.Tensor, d: int, M: torch.Tensor) -> torch.Tensor:
    """``t`` with dim ``d`` replaced by ``M @`` that dim."""
    return torch.tensordot(M.to(t.dtype), t, dims=([1], [d])).movedim(0, d)


def _apply_joint(t: torch.Tensor, e: int, dims: list[int], M: torch.Tensor) -> torch.Tensor:
    """Move parent dim ``e`` and nested dims ``dims`` jointly by ``M`` (``(n_t·m₁·m₂…) × (n_s·m₁·m₂…)``,
    ``joint_matrix`` or ``nested_matrix``)."""
    order = tuple(range(1 + len(dims)))
    x = t.movedim((e, *dims), order)
    inner, rest = x.shape[1:len(order)], x.shape[len(order):]
    y = M.to(t.dtype) @ x.reshape(x.shape[0] * inner.numel(), -1)
    return y.reshape(-1, *inner, *rest).movedim(order, (e, *dims))


def permute_piece(t: torch.Tensor, spaces: tuple[int, ...], perms: Mapping[int, torch.Tensor],
                  parents: Mapping[int, int]) -> torch.Tensor:
    """Apply ``perms`` to a piece: parents before nested children (see module doc)."""
    order = sorted(range(len(spaces)), key=lambda d: _depth(spaces[d], parents))
    done: set[int] = set()
    for d in order:
        p = perms.get(spaces[d])
        if p is None or d in done:
            continue
        if p.is_floating_point() and p.dim() == 3 and spaces[d] in parents:  # one group map per parent unit
            e = spaces.index(parents[spaces[d]])
            y = t.movedim((e, d), (0, 1))
            rest = y.shape[2:]
            y = torch.einsum("jab,jbr->jar", p.to(t.dtype), y.reshape(y.shape[0], y.shape[1], -1))
            t = y.reshape(y.shape[0], -1, *rest).movedim((0, 1), (e, d))
            continue
        if p.is_floating_point():
            children = [c for c in range(len(spaces)) if parents.get(spaces[c]) == spaces[d]
                        and perms.get(spaces[c]) is not None and perms[spaces[c]].dim() == 3]
            if not children:
                t = apply_matrix(t, d, p)
            elif len(children) == 1:
                t = _apply_joint(t, d, children, nested_matrix(p, perms[spaces[children[0]]]))
            else:  # several spaces nested under one matched parent (query groups and head dims under KV heads)
                inners = [torch.eye(perms[spaces[c]].shape[-1], dtype=p.dtype)[perms[spaces[c]]] for c in children]
                t = _apply_joint(t, d, children, joint_matrix(p, inners))
            done.update(children)
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
