"""Emission: apply alignments to weights, average them, load the result into a copy of the target.

Permutations move tensors exactly (``fxfuse.planner.layout``). Other maps act per axis
by a matrix built from the axis expression: a leaf takes its map ``A_s`` where
the parameter writes the units and ``C_s = A_s·diag(1/1ᵀA_s)`` where it reads
them (a contraction axis; see ``fxfuse.core.solvers``), a product the Kronecker
product of its parts (a nested part under a matrix parent: the block matrix
``M[(j,a),(k,b)] = A_H[j,k]·[b = π_{jk}(a)]``), a concatenation the
block-diagonal of its segments; the tensor becomes ``Σ_k M[j,k] W[…k…]`` along
that axis. Between spaces of different sizes the result has the target's shape.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..core.derived import loaded_copy
from ..core.errors import FxfuseError
from ..core.solvers import consumer
from ..frontend.spaces import Analysis, AxisExpr, Concat, Leaf, Product
from ..planner.layout import joint_matrix, nested_matrix, permute_tensor
from ..planner.plan import Alignment


def aligned_state(analysis: Analysis, state: Mapping[str, torch.Tensor], alignment: Alignment) -> dict[str, torch.Tensor]:
    """``state`` moved into the target basis (tensors outside any space are copied).

    ``analysis`` is the source model's (its layouts give the source shapes and
    which axes read their units).
    """
    maps = alignment.maps
    grouped = any(m.q is not None for m in maps.values())
    if grouped and not any(m.embeds or m.matrix is not None for m in maps.values()):  # one width: in place
        from ..planner.groupmaps import aligned_state_groups

        return aligned_state_groups(analysis, state, alignment)
    out = dict(state)
    perms = alignment.perms()
    parents = analysis.parents
    mixed = {s: m for s, m in maps.items() if not m.hard or m.pair_perms is not None or m.q is not None}
    for name, layout in analysis.layouts.items():
        t = state[name]
        if not t.is_floating_point():
            continue
        if mixed and any(_mentions(ax, mixed) for ax in layout.axes):
            t = _apply_matrices(t, layout.axes, layout.consumed, alignment, parents,
                                uniform=grouped and name in analysis.scales)
        else:
            t = permute_tensor(t, layout.axes, perms, parents)
        for key in (name,) + layout.aliases:
            if key in out:
                out[key] = t
    return out


def _mentions(expr: AxisExpr, spaces) -> bool:
    if isinstance(expr, Leaf):
        return expr.space in spaces
    return any(_mentions(p, spaces) for p in expr.parts)


def axis_matrix(expr: AxisExpr, alignment: Alignment, parents: Mapping[int, int],
                reads: bool = False, uniform: bool = False) -> torch.Tensor:
    """The ``n_t × n_s`` matrix one axis moves by (identity for unmapped spaces); ``reads``: a contraction axis.

    A group map ``Q`` (or an embedding between widths) moves writers by ``Q`` and readers by ``(Q⁺)ᵀ``
    (``Q^{-T}``; ``(n_s/n_t)·Q`` for an embedding); ``uniform``: the axis of a uniform per-channel scale
    (``Analysis.scales``), which a group map leaves uniform: ``11ᵀ/n_s`` (the mean, at the target's width).
    """
    maps = alignment.maps
    if isinstance(expr, Leaf):
        m = maps.get(expr.space)
        if m is None:
            return torch.eye(expr.size, dtype=torch.float64)
        if m.q is not None and m.q.dim() == 2:
            Q = m.q.double()
            if uniform:
                return torch.full(Q.shape, 1.0 / Q.shape[1], dtype=torch.float64)
            if not reads:
                return Q
            return Q * (Q.shape[1] / Q.shape[0]) if m.embeds else torch.linalg.inv(Q).T
        if m.matrix is not None:
            A = m.matrix.double()
            return consumer(A) if reads else A
        if m.perm is not None and m.perm.dim() == 1:
            return torch.eye(expr.size, dtype=torch.float64)[m.perm]
        raise FxfuseError(f"space s{expr.space} is nested under a space of another axis (units moved per unit of "
                          "their parent, as in a grouped convolution or a mixture of experts): only permutations can "
                          "move it, not soft maps or maps between widths")
    if isinstance(expr, Concat):
        return torch.block_diag(*(axis_matrix(p, alignment, parents, reads, uniform) for p in expr.parts))
    parts = _factors(expr)  # a nested space follows its parent even across nested products
    mats: list[torch.Tensor] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if (isinstance(part, Leaf) and isinstance(nxt, Leaf) and parents.get(nxt.space) == part.space
                and nxt.space in maps):
            children = [nxt]  # every space nested under ``part`` that follows it on this axis
            while (i + len(children) + 1 < len(parts) and isinstance(parts[i + len(children) + 1], Leaf)
                   and parents.get(parts[i + len(children) + 1].space) == part.space
                   and parts[i + len(children) + 1].space in maps):
                children.append(parts[i + len(children) + 1])
            if len(children) == 1 and maps[nxt.space].q is None:
                mats.append(_nested(part, nxt, alignment, reads))
            else:  # several children, or in-head group maps: M[(j,a,…),(k,b,…)] = A[j,k]·Π C_c[j,k]
                A = axis_matrix(part, alignment, {}, reads, uniform)
                mats.append(joint_matrix(A, [_inner(c, alignment, reads, uniform, *A.shape) for c in children]))
            i += 1 + len(children)
            continue
        mats.append(axis_matrix(part, alignment, parents, reads, uniform))
        i += 1
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def _factors(expr: Product) -> list[AxisExpr]:
    """The factors of a product, nested products flattened (row-major products are associative)."""
    return [f for part in expr.parts for f in (_factors(part) if isinstance(part, Product) else [part])]


def _nested(parent: Leaf, child: Leaf, alignment: Alignment, reads: bool) -> torch.Tensor:
    """``M[(j,a),(k,b)] = A_H[j,k]·[b = π_{jk}(a)]`` (hard parent: ``π_{j,p(j)} = perm[j]``)."""
    A = axis_matrix(parent, alignment, {}, reads)
    cm = alignment.maps[child.space]
    if cm.pair_perms is not None:
        return nested_matrix(A, cm.pair_perms)
    n_t, n_s = A.shape
    pairs = cm.perm.unsqueeze(1).expand(n_t, n_s, child.size)  # only (j, p(j)) has weight
    return nested_matrix(A, pairs)


def _inner(child: Leaf, alignment: Alignment, reads: bool, uniform: bool, n_t: int, n_s: int) -> torch.Tensor:
    """``C[j,k,a,b]`` (``(n_t, n_s, m, m)``) of ``child`` under every pair of parent units (``joint_matrix``): its pair
    perm, its in-head group map ``Q_j`` (``Q_j^{-T}`` where the axis reads; the mean for a uniform scale), or its
    perm under a hard parent (only ``(j, p(j))`` has weight)."""
    cm, m = alignment.maps[child.space], child.size
    if cm.pair_perms is not None:
        return torch.eye(m, dtype=torch.float64)[cm.pair_perms]
    if cm.q is not None:
        C = cm.q.double()
        C = (torch.full_like(C, 1.0 / m) if uniform else torch.linalg.inv(C).transpose(1, 2) if reads else C)
        return C[:, None].expand(n_t, n_s, m, m)
    return torch.eye(m, dtype=torch.float64)[cm.perm][:, None].expand(n_t, n_s, m, m)


def _apply_matrices(t, axes, consumed, alignment, parents, uniform: bool = False) -> torch.Tensor:
    out = t.detach().double()
    for d, expr in enumerate(axes):
        M = axis_matrix(expr, alignment, parents, bool(consumed[d]) if d < len(consumed) else False, uniform)
        if M.shape[0] == M.shape[1] and torch.equal(M, torch.eye(M.shape[0], dtype=M.dtype)):
            continue
        out = torch.tensordot(M, out, dims=([1], [d])).movedim(0, d)
    return out.to(t.dtype)


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                   like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``Σ_m w_m · state_m`` for floating tensors; other entries come from ``like`` (the target)."""
    out = {}
    for key, ref in like.items():
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.promote_types(ref.dtype, torch.float32))
            for w, s in zip(weights, states):
                if w:
                    acc.add_(s[key], alpha=w)
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


def build_module(target: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    return loaded_copy(target, state).eval()
