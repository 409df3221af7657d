"""Maps from a space's group applied to weights, and random group elements.

A map ``Q`` of a space (``n × n``; a permutation is the matrix ``Q[j, p[j]] = 1``)
moves every member axis that *writes* the space's units by ``Q`` and every axis
that only *reads* them (contracted, ``ParamLayout.consumed``) by ``Q^{-T}``
(``Q`` itself when ``Q`` is orthogonal): ``W_write' = Q W_write``,
``W_read' = W_read Q^{-1}``, so ``W_read' W_write' = W_read W_write``. A space
nested under heads moves by one map per head, ``(n_heads, m, m)``, applied after
the heads are permuted: ``new[j, a] = Σ_b Q_j[a, b] old[p(j), b]``. Uniform
per-channel scales (``Analysis.scales``) are left as they are: ``c·I``
commutes with every map. Soft maps of equal sizes (sinkhorn) act as in
``fxfuse.backend.emit``: ``A`` on writers, the column-normalised ``A`` on readers.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..core.solvers import consumer
from ..frontend.groups import IDENTITY, INVERTIBLE, ORTHO, ORTHO_ONES, PERM, ROTARY
from ..frontend.spaces import Analysis, AxisExpr, Concat, Product


def _pieces(t: torch.Tensor, axes: tuple[AxisExpr, ...], reads: tuple[bool, ...]):
    """Views of ``t`` with one space per dim, each dim with its read flag (see ``fxfuse.planner.layout.pieces``)."""
    for d, expr in enumerate(axes):
        if isinstance(expr, Product):
            shape = t.shape[:d] + tuple(p.size for p in expr.parts) + t.shape[d + 1:]
            return _pieces(t.view(shape), axes[:d] + expr.parts + axes[d + 1:],
                           reads[:d] + (reads[d],) * len(expr.parts) + reads[d + 1:])
        if isinstance(expr, Concat):
            out, offset = [], 0
            for part in expr.parts:
                out += _pieces(t.narrow(d, offset, part.size), axes[:d] + (part,) + axes[d + 1:], reads)
                offset += part.size
            return out
    return [(t, tuple(e.space for e in axes), reads)]


def _leaf_matrix(m, reads: bool) -> torch.Tensor | None:
    if getattr(m, "q", None) is not None and m.q.dim() == 2:
        Q = m.q.double()
        return torch.linalg.inv(Q).T if reads else Q
    if m.matrix is not None and m.pair_perms is None:
        A = m.matrix.double()
        return consumer(A) if reads else A
    if m.perm is not None and m.perm.dim() == 1:
        return torch.eye(m.perm.shape[0], dtype=torch.float64)[m.perm]
    return None


def _along(M: torch.Tensor, x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.tensordot(M, x, dims=([1], [d])).movedim(0, d)


def _move_piece(x: torch.Tensor, spaces: tuple[int, ...], reads: tuple[bool, ...], maps, parents) -> torch.Tensor:
    depth = {d: _depth(spaces[d], parents) for d in range(len(spaces))}
    for d in sorted(range(len(spaces)), key=lambda d: depth[d]):
        m = maps.get(spaces[d])
        if m is None:
            continue
        parent = parents.get(spaces[d])
        nested = parent is not None and parent in spaces and (
            (getattr(m, "q", None) is not None and m.q.dim() == 3) or (m.perm is not None and m.perm.dim() == 2)
            or m.pair_perms is not None)
        if not nested:
            M = _leaf_matrix(m, reads[d])
            if M is None:
                raise ValueError(f"space {spaces[d]} is nested; its parent must share the axis")
            x = _along(M, x, d)
            continue
        e = spaces.index(parent)
        if m.pair_perms is not None:  # under a soft parent: the parent and this dim move jointly
            raise ValueError("soft head maps with per-head matrices are not supported")
        if getattr(m, "q", None) is not None:
            C = m.q.double()
            C = torch.linalg.inv(C).transpose(1, 2) if reads[d] else C
        else:
            C = torch.eye(m.perm.shape[1], dtype=torch.float64)[m.perm]  # (n, m, m): C[j, a, perm[j, a]] = 1
        y = x.movedim((e, d), (0, 1))
        rest = y.shape[2:]
        y = torch.einsum("jab,jbr->jar", C, y.reshape(y.shape[0], y.shape[1], -1)).reshape(y.shape[0], -1, *rest)
        x = y.movedim((0, 1), (e, d))
    return x


def _depth(space: int, parents: Mapping[int, int]) -> int:
    n = 0
    while space in parents:
        space, n = parents[space], n + 1
    return n


def aligned_state_groups(analysis: Analysis, state: Mapping[str, torch.Tensor], alignment) -> dict[str, torch.Tensor]:
    """``state`` moved by ``alignment``'s maps (group matrices, permutations, equal-size soft maps)."""
    out = dict(state)
    parents = analysis.parents
    maps = alignment.maps
    for name, layout in analysis.layouts.items():
        t = state[name]
        if not t.is_floating_point() or name in analysis.scales:
            continue
        mentioned = {leaf for ax in layout.axes for leaf in _spaces_of(ax)}
        if not mentioned & set(maps):
            continue
        work = t.detach().double().clone().contiguous()
        reads = tuple(bool(c) for c in layout.consumed) + (False,) * (t.dim() - len(layout.consumed))
        for view, spaces, flags in _pieces(work, layout.axes, reads):
            if view.numel() and any(s in maps for s in spaces):  # (an empty piece: a slice of nothing)
                view.copy_(_move_piece(view.clone(), spaces, flags, maps, parents))
        moved = work.to(t.dtype)
        for key in (name,) + layout.aliases:
            if key in out:
                out[key] = moved
    return out


def _spaces_of(expr: AxisExpr) -> list[int]:
    if hasattr(expr, "space"):
        return [expr.space]
    return [s for p in expr.parts for s in _spaces_of(p)]


# ---------------------------------------------------------------- random elements


def random_orthogonal(n: int, g: torch.Generator, fix_ones: bool = False) -> torch.Tensor:
    """A Haar-random orthogonal ``n × n`` matrix (with ``Q·1 = 1`` when ``fix_ones``), float64."""
    if fix_ones:
        B = ones_complement(n)
        return B @ random_orthogonal(n - 1, g) @ B.T + torch.full((n, n), 1.0 / n, dtype=torch.float64)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(n, dtype=torch.float64))


def ones_complement(n: int) -> torch.Tensor:
    """An orthonormal basis ``B`` (``n × (n−1)``) of the vectors orthogonal to the all-ones vector."""
    M = torch.eye(n, dtype=torch.float64) - 1.0 / n
    U, _, _ = torch.linalg.svd(M)
    return U[:, : n - 1]


def block_rotation(angles: torch.Tensor) -> torch.Tensor:
    """``(…, 2h, 2h)`` from ``angles`` ``(…, h)``, differentiable: a 2×2 rotation by ``φ_i`` on each pair
    ``(i, i + h)``: ``R[i,i] = R[i+h,i+h] = cos φ_i``, ``R[i+h,i] = sin φ_i = −R[i,i+h]``."""
    c, s = torch.diag_embed(torch.cos(angles)), torch.diag_embed(torch.sin(angles))
    return torch.cat([torch.cat([c, -s], -1), torch.cat([s, c], -1)], -2)


def nearest_block_rotation(S: torch.Tensor) -> torch.Tensor:
    """The block rotation maximising ``tr(Rᵀ S)`` (batched over leading dims of ``S``, ``(…, m, m)``):
    ``φ_i = atan2(S[i+h,i] − S[i,i+h], S[i,i] + S[i+h,i+h])`` (``fxfuse.planner.procrustes``)."""
    h = S.shape[-1] // 2
    i = torch.arange(h, device=S.device)
    return block_rotation(torch.atan2(S[..., i + h, i] - S[..., i, i + h], S[..., i, i] + S[..., i + h, i + h]))


def random_element(level: int, n: int, g: torch.Generator) -> torch.Tensor:
    """A random map of the group ``level`` on ``n`` units (invertible: condition number ≤ e)."""
    if level == ORTHO_ONES:
        return random_orthogonal(n, g, fix_ones=True)
    if level == ORTHO:
        return random_orthogonal(n, g)
    if level == INVERTIBLE:
        s = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
        return random_orthogonal(n, g) @ torch.diag(s) @ random_orthogonal(n, g)
    if level == ROTARY:  # one uniform angle per frequency pair (i, i + n/2)
        return block_rotation((torch.rand(n // 2, generator=g, dtype=torch.float64) * 2 - 1) * torch.pi)
    raise ValueError(f"no random matrix for level {level}")


def random_group_maps(analysis: Analysis, seed: int = 0, largest: int = INVERTIBLE) -> dict:
    """One random element of each free space's group (``TransportMap``s, space order, seeded).

    ``largest`` caps the groups drawn from (``ORTHO``: orthogonal maps where a space
    allows any invertible one, the maps the solvers can recover).
    """
    from ..core.maps import TransportMap

    g = torch.Generator().manual_seed(int(seed))
    maps = {}
    for s in analysis.spaces:
        if not (s.free and s.size > 1):
            continue
        level = analysis.group(s.id).level
        if level == ROTARY and largest < ORTHO or level == IDENTITY:
            continue  # only the identity is left
        level = level if level == ROTARY else min(level, largest)
        rows = analysis.spaces[s.parent].size if s.parent is not None else None
        if level == PERM:
            perm = (torch.randperm(s.size, generator=g) if rows is None
                    else torch.stack([torch.randperm(s.size, generator=g) for _ in range(rows)]))
            maps[s.id] = TransportMap(s.id, perm=perm)
            continue
        q = (random_element(level, s.size, g) if rows is None
             else torch.stack([random_element(level, s.size, g) for _ in range(rows)]))
        maps[s.id] = TransportMap(s.id, q=q, solver="random")
    return maps
