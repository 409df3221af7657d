"""Emission: apply alignments to weights, average into the target, check function.

Hard maps move tensors exactly (``fxfuse.layout``). Soft maps act per axis by a
matrix built from the axis expression: a leaf takes its map ``A_s``, a product
the Kronecker product of its parts (or, for a nested part under a soft parent,
the block matrix ``M[(j,a),(k,b)] = A_H[j,k]·[b = π_{jk}(a)]``), a
concatenation the block-diagonal of its segments; the tensor becomes
``Σ_k M[j,k] W[…k…]`` along that axis.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from .layout import permute_tensor
from .plan import Alignment
from .spaces import Analysis, AxisExpr, Concat, Leaf


def aligned_state(analysis: Analysis, state: Mapping[str, torch.Tensor], alignment: Alignment) -> dict[str, torch.Tensor]:
    """``state`` moved into the target basis (tensors outside any space are copied)."""
    out = dict(state)
    perms = alignment.perms()
    parents = analysis.parents
    soft = {s: m for s, m in alignment.maps.items() if not m.hard or m.pair_perms is not None}
    for name, layout in analysis.layouts.items():
        t = state[name]
        if not t.is_floating_point():
            continue
        if soft and any(_mentions(ax, soft) for ax in layout.axes):
            t = _apply_soft(t, layout.axes, alignment, parents)
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


def axis_matrix(expr: AxisExpr, alignment: Alignment, parents: Mapping[int, int]) -> torch.Tensor:
    """The ``n_t × n_s`` matrix one axis moves by (identity for unmapped spaces)."""
    maps = alignment.maps
    if isinstance(expr, Leaf):
        m = maps.get(expr.space)
        if m is None:
            return torch.eye(expr.size)
        if m.matrix is not None:
            return m.matrix.double()
        if m.perm is not None and m.perm.dim() == 1:
            return torch.eye(expr.size, dtype=torch.float64)[m.perm]
        raise ValueError(f"space {expr.space} is nested; its parent must share the axis")
    if isinstance(expr, Concat):
        return torch.block_diag(*(axis_matrix(p, alignment, parents) for p in expr.parts))
    parts = list(expr.parts)
    mats: list[torch.Tensor] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if (isinstance(part, Leaf) and isinstance(nxt, Leaf) and parents.get(nxt.space) == part.space
                and nxt.space in maps):
            mats.append(_nested_matrix(part, nxt, alignment))
            i += 2
            continue
        mats.append(axis_matrix(part, alignment, parents))
        i += 1
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def _nested_matrix(parent: Leaf, child: Leaf, alignment: Alignment) -> torch.Tensor:
    """``M[(j,a),(k,b)] = A_H[j,k]·[b = π_{jk}(a)]`` (hard parent: ``π_{j,p(j)} = perm[j]``)."""
    A = axis_matrix(parent, alignment, {})
    cm = alignment.maps[child.space]
    m = child.size
    n_t, n_s = A.shape
    eye = torch.eye(m, dtype=torch.float64)
    if cm.pair_perms is not None:
        inner = eye[cm.pair_perms]  # (n_t, n_s, m, m): [j, k, a, b] = [b == π_jk(a)]
    else:
        inner = eye[cm.perm].unsqueeze(1).expand(n_t, n_s, m, m)  # only (j, p(j)) has weight
    M = A[:, :, None, None] * inner  # (j, k, a, b)
    return M.permute(0, 2, 1, 3).reshape(n_t * m, n_s * m)


def _apply_soft(t, axes, alignment, parents) -> torch.Tensor:
    out = t.detach().double()
    for d, expr in enumerate(axes):
        M = axis_matrix(expr, alignment, parents)
        if torch.equal(M, torch.eye(M.shape[0], M.shape[1], dtype=M.dtype)):
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
    module = copy.deepcopy(target)
    module.load_state_dict(dict(state), strict=True)
    return module.eval()
