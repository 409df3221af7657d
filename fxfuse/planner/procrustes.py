"""Solvers for spaces whose group is larger than the permutations: orthogonal Procrustes.

For a similarity ``S`` (``n × n``, ``S[j, k] = Σ ⟨T[…j…], S'[…k…]⟩`` over every
member tensor with the other maps applied, or a cross-correlation of
activations), the orthogonal map maximising ``Σ_jk Q[j,k] S[j,k] = tr(Qᵀ S)``
is ``Q = U Vᵀ`` from ``S = U Σ Vᵀ`` (value ``Σ σ``). With ``Q·1 = 1`` required
(LayerNorm streams) the problem lives on ``1^⊥``: ``Q = B O Bᵀ + 11ᵀ/n`` with
``O`` the Procrustes solution of ``Bᵀ S B`` (``B`` an orthonormal basis of
``1^⊥``). Spaces whose group is ``invertible`` are solved orthogonally too
(a subgroup; it keeps every map well conditioned).

Widths that differ (``n_t × n_s``, a residual stream of another width): the maps
are *stretched orthonormal embeddings* ``Q = √(n_t/n_s)·Q̃`` with ``Q̃`` maximising
``tr(Q̃ᵀ S)`` over orthonormal columns (``n_t > n_s``) or rows (``n_t < n_s``):
``Q̃ = U Vᵀ`` from the thin SVD (on ``1^⊥``, plus ``1_t 1_sᵀ/√(n_t n_s)``, with ones,
so ``Q·1 = 1``). The stretch keeps every mean over the axis: ``‖Qx‖²/n_t = ‖x‖²/n_s``
for ``x`` in the rows' span, so a LayerNorm or an RMS norm of the embedded stream is
the embedded norm, eps included. Readers move by ``(Q⁺)ᵀ = (n_s/n_t)·Q``, so into a
wider target the source computes exactly what it did; into a narrower one it is
projected (not exact). A space some op keeps only as a *sum* over the axis (``q·k``,
``Σ x²``, a tied weight: ``Analysis.summed``) is not embedded: a matching as before.

Rotary dims (``fxfuse.frontend.rotary``): one 2×2 rotation per frequency pair
``(i, i + m/2)``. ``tr(Rᵀ S) = Σ_i a_i cos φ_i + b_i sin φ_i`` with ``a_i = S[i,i] +
S[i+h,i+h]``, ``b_i = S[i+h,i] − S[i,i+h]``: ``φ_i = atan2(b_i, a_i)``, value
``Σ_i √(a_i² + b_i²)``.

Heads: for every pair of target head ``j`` and source head ``k`` the in-head
maps are solved by Procrustes on that pair's block; the best value (the
nuclear norm, which no in-head map of the source changes) is the pair's cost,
added to the head similarity; heads are then matched by a linear assignment
and every target head keeps the in-head map of its matched pair.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..core.maps import Block, TransportMap, _pairwise
from ..core.solvers import assignment
from ..frontend.groups import ORTHO_ONES, PERM, ROTARY
from .groupmaps import nearest_block_rotation, ones_complement


def procrustes(S: np.ndarray, fix_ones: bool = False, device: torch.device | None = None) -> np.ndarray:
    """The orthogonal ``Q`` maximising ``tr(Qᵀ S)`` (``Q·1 = 1`` with ``fix_ones``); the SVD on ``device`` if set."""
    n = S.shape[0]
    if fix_ones and n > 1:
        B = ones_complement(n).numpy()
        return B @ procrustes(B.T @ S @ B, device=device) @ B.T + np.full((n, n), 1.0 / n)
    return _polar(S, device)


def _polar(S: np.ndarray, device: torch.device | None) -> np.ndarray:
    """``U Vᵀ`` of ``S = U Σ Vᵀ`` (batched over leading dims; thin where ``S`` is not square): numpy in place,
    or torch on ``device``."""
    full = S.shape[-1] == S.shape[-2]
    if device is None:
        U, _, Vt = np.linalg.svd(S, full_matrices=full)
        return U @ Vt
    U, _, Vt = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(S)).to(device), full_matrices=full)
    return (U @ Vt).cpu().numpy()


def rotary(S: np.ndarray) -> np.ndarray:
    """The block rotation ``R`` (one 2×2 rotation per pair ``(i, i + m/2)``) maximising ``tr(Rᵀ S)``, batched over
    leading dims of ``S`` (``(…, m, m)``)."""
    return nearest_block_rotation(torch.from_numpy(np.ascontiguousarray(S))).numpy()


def embedding(S: np.ndarray, fix_ones: bool = False, device: torch.device | None = None) -> np.ndarray:
    """The stretched orthonormal embedding ``Q = √(n_t/n_s)·Q̃`` (``n_t × n_s``) with ``Q̃`` maximising
    ``tr(Q̃ᵀ S)`` over orthonormal columns or rows (``Q·1_s = 1_t`` with ``fix_ones``); see the module doc."""
    n_t, n_s = S.shape
    if fix_ones and min(n_t, n_s) > 1:
        Bt, Bs = ones_complement(n_t).numpy(), ones_complement(n_s).numpy()
        Q = Bt @ _polar(Bt.T @ S @ Bs, device) @ Bs.T + np.full((n_t, n_s), 1.0 / np.sqrt(n_t * n_s))
    else:
        Q = _polar(S, device)
    return Q * np.sqrt(n_t / n_s)


def _pairwise_procrustes(S4: np.ndarray, fix_ones: bool, device: torch.device | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per head pair: value ``max_Q tr(Qᵀ S4[j,k])`` ``(n, n)`` and the maps ``(n, n, m, m)``."""
    n_t, n_s, m, _ = S4.shape
    if fix_ones:
        Qs = np.stack([np.stack([procrustes(S4[j, k], True, device) for k in range(n_s)]) for j in range(n_t)])
    else:
        Qs = _polar(S4, device)
    return np.einsum("jkab,jkab->jk", Qs, S4), Qs


def _pairwise_rotary(S4: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per head pair: value ``max_R tr(Rᵀ S4[j,k])`` ``(n, n)`` over block rotations, and the maps ``(n, n, m, m)``."""
    Rs = rotary(S4)
    return np.einsum("jkab,jkab->jk", Rs, S4), Rs


def _value(M: torch.Tensor | None, S: np.ndarray) -> float:
    """``Σ M∘S`` for a map given as a permutation, a matrix, or nothing (the identity)."""
    if M is None:
        return float(np.trace(S))
    if not M.is_floating_point():
        return float(S[np.arange(S.shape[0]), M.numpy()].sum())
    return float((M.double().numpy() * S).sum())


def is_group_block(block: Block, levels) -> bool:
    return bool(levels) and ((block.root_free and levels.get(block.root, PERM) > PERM and not block.children)
                             or any(levels.get(c, PERM) > PERM for c in block.children))


def solve_group_block(block: Block, cost, perms, levels, known_only: bool = False,
                      embeddable: frozenset[int] = frozenset()) -> tuple[dict[int, TransportMap], float, float] | None:
    """Like ``fxfuse.planner.plan.solve_block`` for a block with group spaces; ``None`` where sizes differ, unless
    the block is one space of ``embeddable`` (a stretched orthonormal embedding: the module doc)."""
    others = {s: p for s, p in perms.items() if s != block.root}  # children at their maps, as in solve_block
    S, nested = cost.block(block.root, block.children, others, known_only)
    n_t, n_s = S.shape
    device = getattr(cost, "device", None)
    if n_t != n_s and not block.children and block.root in embeddable:
        Q = embedding(S, fix_ones=levels[block.root] == ORTHO_ONES, device=device)
        m = TransportMap(block.root, q=torch.from_numpy(Q), similarity_identity=None, solver="procrustes, embedding")
        Qn = m.descent_value().numpy()  # orthonormal: the similarity as the descent measures it
        aligned = float((Qn * S).sum())
        return {block.root: replace(m, similarity_aligned=aligned)}, _value(perms.get(block.root), S), aligned
    if n_t != n_s or any(S4.shape[2] != S4.shape[3] for S4 in nested.values()):
        return None
    rows = np.arange(n_t)
    if not block.children:
        Q = (rotary(S) if levels[block.root] == ROTARY
             else procrustes(S, fix_ones=levels[block.root] == ORTHO_ONES, device=device))
        aligned = float((Q * S).sum())
        m = TransportMap(block.root, q=torch.from_numpy(Q), similarity_identity=float(np.trace(S)),
                         similarity_aligned=aligned, solver="procrustes")
        return {block.root: m}, _value(perms.get(block.root), S), aligned
    values, tables = {}, {}
    for c, S4 in nested.items():
        level = levels.get(c, PERM)
        values[c], tables[c] = (_pairwise_rotary(S4) if level == ROTARY
                                else _pairwise_procrustes(S4, level == ORTHO_ONES, device) if level > PERM
                                else _pairwise(S4))
    total = S + sum(values.values(), np.zeros_like(S))
    p = assignment(-total) if block.root_free else rows
    aligned = float(total[rows, p].sum())
    identity = float(np.trace(S)) + sum(float(np.einsum("jjaa->", S4)) for S4 in nested.values())
    current_root = perms.get(block.root)
    pc = current_root.numpy() if current_root is not None and not current_root.is_floating_point() else rows
    current = float(S[rows, pc].sum())
    for c, S4 in nested.items():
        blocks_now = S4[rows, pc]  # (n, m, m)
        current += sum(_value(perms[c][j] if c in perms else None, blocks_now[j]) for j in rows)
    maps: dict[int, TransportMap] = {}
    if block.root_free:
        maps[block.root] = TransportMap(block.root, perm=torch.from_numpy(p), similarity_identity=identity,
                                        similarity_aligned=aligned, solver="assignment")
    for c in nested:
        chosen = tables[c][rows, p]
        if levels.get(c, PERM) > PERM:
            maps[c] = TransportMap(c, q=torch.from_numpy(np.ascontiguousarray(chosen)), similarity_identity=identity,
                                   similarity_aligned=aligned, solver="procrustes per head pair")
        else:
            maps[c] = TransportMap(c, perm=torch.from_numpy(chosen), similarity_identity=identity,
                                   similarity_aligned=aligned, solver="assignment per head pair")
    return maps, current, aligned
