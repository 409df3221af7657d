"""The maps that refinement learns: a latent matrix per map of an alignment, its projection to the
nearest group element, and the differentiable move of a state dict by those matrices.

``project(L, group) = argmax_{P ∈ group} ⟨P, L⟩``: a linear assignment for permutations, a
many-to-one matching for spaces of different sizes, ``U Vᵀ`` (``L = U Σ Vᵀ``) for orthogonal maps
(on ``1^⊥`` for ``orthogonal_ones``); ``straight_through`` passes the gradient through the
projection (``P + L − stop_gradient(L)``); ``rotation`` is ``exp(A − Aᵀ)``; ``stretched`` adds
a bounded symmetric stretch for the maps of an invertible group. ``Mover`` applies the
per-axis matrices of ``fxfuse.backend.emit`` to a state dict, differentiably. The descent itself is
``fxfuse.backend.refine``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import math

import numpy as np
import torch

from ..core.errors import FxfuseError
from ..core.solvers import assignment, consumer, matching
from ..frontend.groups import INVERTIBLE, ORTHO_ONES, ROTARY
from ..frontend.spaces import Analysis, AxisExpr, Concat, Leaf, Product
from ..planner.groupmaps import block_rotation, nearest_block_rotation, ones_complement
from ..planner.layout import joint_matrix
from ..planner.plan import Alignment

GROUPS = ("permutation", "matching", "orthogonal", "orthogonal_ones", "invertible", "rotary")
ORTHO_TOL = 1e-6          # an initial group map farther than this from orthogonal is refused


class RefineError(FxfuseError):
    """Refinement cannot run on these inputs."""


def project(latent: torch.Tensor, group: str) -> torch.Tensor:
    """The exact group element nearest to ``latent`` (``(…, n_t, n_s)``), as a matrix.

    ``permutation``: ``argmax_P ⟨P, L⟩`` (a linear assignment); ``matching``: the
    hard many-to-one map maximising ``⟨A, L⟩`` (rows sum to 1); ``orthogonal``:
    ``U Vᵀ`` from the SVD ``L = U Σ Vᵀ`` (the orthogonal Procrustes solution);
    ``orthogonal_ones``: the orthogonal maps with ``Q·1 = 1``, ``B O Bᵀ + 11ᵀ/n``
    with ``O`` the projection of ``Bᵀ L B`` (``B`` an orthonormal basis of ``1^⊥``).
    """
    if group == "rotary":  # one angle per frequency pair (i, i + m/2)
        return nearest_block_rotation(latent.detach())
    if group == "orthogonal":  # thin where the widths differ: orthonormal columns or rows
        U, _, Vh = torch.linalg.svd(latent.detach(), full_matrices=latent.shape[-1] == latent.shape[-2])
        return U @ Vh
    if group == "orthogonal_ones":
        n_t, n = latent.shape[-2:]
        Bt = ones_complement(n_t).to(latent.device, latent.dtype)
        B = Bt if n_t == n else ones_complement(n).to(latent.device, latent.dtype)
        O = project(Bt.T @ latent.detach() @ B, "orthogonal")
        return Bt @ O @ B.T + torch.full((n_t, n), 1.0 / math.sqrt(n_t * n), dtype=latent.dtype, device=latent.device)
    if group not in ("permutation", "matching"):
        raise RefineError(f"unknown group {group!r} (one of {', '.join(GROUPS)})")
    flat = latent.detach().reshape(-1, *latent.shape[-2:]).double().cpu().numpy()
    out = np.zeros_like(flat)
    for i, L in enumerate(flat):
        if group == "matching":
            out[i] = matching(-L)
        else:
            out[i, np.arange(L.shape[0]), assignment(-L)] = 1.0
    return torch.from_numpy(out).to(latent.device, latent.dtype).reshape(latent.shape)


def straight_through(latent: torch.Tensor, group: str) -> torch.Tensor:
    """``project(L)`` in the forward pass, the identity's gradient in the backward pass."""
    return project(latent, group) + latent - latent.detach()


def _one_hot(perm: torch.Tensor, n: int) -> torch.Tensor:
    return torch.eye(n)[perm]


def rotation(generator: torch.Tensor, group: str) -> torch.Tensor:
    """``exp(A − Aᵀ)`` (``(…, n, n)``), differentiable: an orthogonal map; for ``orthogonal_ones`` the rotation
    acts on ``1^⊥`` only (``A`` is ``(…, n−1, n−1)``, the map ``B exp(A − Aᵀ) Bᵀ + 11ᵀ/n``); for ``rotary`` the
    generator is one angle per frequency pair (``(…, n/2)``, ``block_rotation``)."""
    if group == "rotary":
        return block_rotation(generator)
    R = torch.linalg.matrix_exp(generator - generator.transpose(-1, -2))
    if group != "orthogonal_ones":
        return R
    n = generator.shape[-1] + 1
    B = ones_complement(n).to(generator.device, generator.dtype)
    return B @ R @ B.T + torch.full((n, n), 1.0 / n, dtype=generator.dtype, device=generator.device)


def stretched(generator: torch.Tensor, condition: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R·exp(S), R·exp(−S))`` from one generator ``X`` (``(…, n, n)``), differentiable: ``R = exp(X − Xᵀ)``
    and ``S = c·(X + Xᵀ)/2 / max(c, ‖(X + Xᵀ)/2‖_F)``, ``c = ln(condition)/2``.

    ``M = R·exp(S)`` is invertible with condition number ``≤ e^{2c} = condition`` (the eigenvalues of
    ``S`` lie in ``[−c, c]``, since ``‖S‖₂ ≤ ‖S‖_F ≤ c``: a smooth bound, loose where ``S`` has high rank;
    an eigenvalue clamp would divide by the gaps of the eigenvalues, all 0 at the start), and ``R·exp(−S) = M^{−T}``: how an axis that reads ``M``'s units moves,
    with no inverse computed. ``X = 0`` gives the identity.
    """
    R = torch.linalg.matrix_exp(generator - generator.transpose(-1, -2))
    sym = (generator + generator.transpose(-1, -2)) / 2
    c = math.log(condition) / 2
    norm = sym.flatten(-2).norm(dim=-1)[..., None, None]
    S = sym * (c / torch.clamp(norm, min=c))
    return R @ torch.linalg.matrix_exp(S), R @ torch.linalg.matrix_exp(-S)


# ---------------------------------------------------------------- latents of one alignment


@dataclass(frozen=True)
class Latent:
    """One refinable map: ``group``, and whether it is a nested ``(n_parent, m, m)`` stack of inner maps;
    ``stretch``: ``√(n_t/n_s)`` of an embedding between widths (the latent is its orthonormal ``Q̃``: writers
    move by ``stretch·Q̃``, readers by ``Q̃/stretch``; ``fxfuse.planner.procrustes.embedding``)."""

    space: int
    group: str
    nested: bool
    stretch: float = 1.0


def about(base: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """A map rotated about its initial ``base``: ``base·R``, or ``R·base`` where ``base`` embeds into more
    units than it reads (``n_t > n_s``: every orthonormal ``n_t × n_s`` map is reached from the left)."""
    return R @ base if base.shape[-2] > base.shape[-1] else base @ R


def generator_shape(shape: torch.Size, group: str) -> tuple[int, ...]:
    """The shape of the generator of a map of ``shape`` rotated by ``about``: ``(…, n, n)`` (``n − 1`` on ``1^⊥``
    for ``orthogonal_ones``), ``(…, n/2)`` angles for ``rotary``."""
    if group == "rotary":
        return (*shape[:-2], shape[-1] // 2)
    n = max(shape[-2:]) - (group == "orthogonal_ones")
    return (*shape[:-2], n, n)


def latents_of(alignment: Alignment, levels: Mapping[int, int] | None = None, invertible: bool = False
               ) -> tuple[dict[int, Latent], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """``(kinds, initial latents, fixed pair perms)`` for every map of ``alignment``; refuses soft maps.

    A group map (``q``: ``(n, n)``, or ``(n_parent, m, m)`` inside heads) is orthogonal
    (``orthogonal_ones`` where ``levels`` says the space keeps the ones vector; ``invertible``
    where ``levels`` allows any invertible map and ``invertible`` asks for it);
    an initial map that is not orthogonal is refused.
    """
    kinds, init, pairs = {}, {}, {}
    for sid, m in alignment.maps.items():
        if m.q is not None:
            q = m.q.double() / m.stretch
            gram = q.transpose(-1, -2) @ q if q.shape[-2] >= q.shape[-1] else q @ q.transpose(-1, -2)
            if float((gram - torch.eye(gram.shape[-1], dtype=q.dtype)).abs().max()) > ORTHO_TOL:
                raise RefineError(f"space s{sid} moves by a group map that is not orthogonal: refinement learns "
                                  "orthogonal maps only")
            level = (levels or {}).get(sid)
            group = ("orthogonal_ones" if level == ORTHO_ONES else "rotary" if level == ROTARY
                     else "invertible" if invertible and level == INVERTIBLE and not m.embeds else "orthogonal")
            kinds[sid], init[sid] = Latent(sid, group, q.dim() == 3, m.stretch), q
            continue
        if m.pair_perms is not None:  # inner maps of heads under a matching of heads: kept as solved
            pairs[sid] = m.pair_perms
            continue
        if m.perm is not None:
            p = m.perm
            if p.dim() == 1:
                kinds[sid], init[sid] = Latent(sid, "permutation", False), _one_hot(p, p.shape[0])
            else:
                kinds[sid], init[sid] = Latent(sid, "permutation", True), torch.eye(p.shape[1])[p]
            continue
        if not m.matching:
            raise RefineError(f"space s{sid} has a soft (sinkhorn) map, which is no group element: refinement "
                              "needs hard maps (use the exact solver)")
        kinds[sid], init[sid] = Latent(sid, "matching", False), (m.matrix > 0).float()
    return kinds, init, pairs


def _axis_matrix(expr: AxisExpr, mats: Mapping[int, torch.Tensor], pairs: Mapping[int, torch.Tensor],
                 parents: Mapping[int, int], reads: bool, orthogonal: frozenset[int] = frozenset(),
                 device: torch.device | None = None) -> torch.Tensor:
    """The ``n_t × n_s`` matrix one axis moves by, differentiable in ``mats`` (see ``fxfuse.backend.emit.axis_matrix``).

    ``mats[s]``: ``(n_t, n_s)`` for a root space, ``(n_parent, m, m)`` for a space
    nested under a parent (the inner map under every target parent unit). An
    axis that reads units moves by ``consumer(A)`` (``= P`` for a permutation),
    by ``O`` itself for an orthogonal map ``O`` (the inverse transpose).
    """
    if isinstance(expr, Leaf):
        M = mats.get(expr.space)
        if M is None or M.dim() != 2:
            return torch.eye(expr.size, device=device)
        return consumer(M) if reads and expr.space not in orthogonal else M
    if isinstance(expr, Concat):
        return torch.block_diag(*(_axis_matrix(p, mats, pairs, parents, reads, orthogonal, device)
                                  for p in expr.parts))
    parts, out, i = _factors(expr), [], 0  # a nested space follows its parent even across nested products
    while i < len(parts):
        part, nxt = parts[i], parts[i + 1] if i + 1 < len(parts) else None
        if (isinstance(part, Leaf) and isinstance(nxt, Leaf) and parents.get(nxt.space) == part.space
                and (nxt.space in mats or nxt.space in pairs)):
            A = _axis_matrix(part, mats, pairs, parents, reads, orthogonal, device)
            n_t, n_s = A.shape
            children = [nxt]  # every space nested under ``part`` that follows it on this axis
            while (i + len(children) + 1 < len(parts) and isinstance(parts[i + len(children) + 1], Leaf)
                   and parents.get(parts[i + len(children) + 1].space) == part.space
                   and (parts[i + len(children) + 1].space in mats or parts[i + len(children) + 1].space in pairs)):
                children.append(parts[i + len(children) + 1])
            if len(children) > 1:
                inners = [torch.eye(c.size, device=device)[pairs[c.space].to(device)] if c.space in pairs
                          else mats[c.space][:, None].expand(n_t, n_s, c.size, c.size) for c in children]
                out.append(joint_matrix(A, inners))
                i += 1 + len(children)
                continue
            if nxt.space in pairs:
                pp = pairs[nxt.space]
                inner = torch.eye(nxt.size, device=device)[pp.to(device)]  # (n_t, n_s, m, m): [b == π_jk(a)]
                block = A[:, :, None, None] * inner
            else:
                block = A[:, :, None, None] * mats[nxt.space][:, None, :, :]
            out.append(block.permute(0, 2, 1, 3).reshape(n_t * nxt.size, n_s * nxt.size))
            i += 2
            continue
        out.append(_axis_matrix(part, mats, pairs, parents, reads, orthogonal, device))
        i += 1
    M = out[0]
    for m in out[1:]:
        M = torch.kron(M, m)
    return M


class Mover:
    """Moves one source state into the target basis by given (differentiable) maps."""

    def __init__(self, analysis: Analysis, state: Mapping[str, torch.Tensor], pairs: Mapping[int, torch.Tensor],
                 spaces: set[int], orthogonal: frozenset[int] = frozenset(), device: torch.device | None = None,
                 widths: Mapping[int, int] | None = None):
        """``device``: where the state lies and the maps are built (``None``: the CPU); ``widths``: the target's
        size of every space embedded into another width (a uniform scale on it is resized to that, its mean)."""
        self.state, self.pairs, self.parents, self.orthogonal = state, pairs, analysis.parents, orthogonal
        self.device = device
        self.moved: list[tuple[str, tuple[str, ...], list[tuple[int, AxisExpr, bool]]]] = []
        self.resized: dict[str, torch.Tensor] = {}
        touched = set(spaces) | set(pairs)
        skip = analysis.scales if orthogonal else frozenset()  # c·1 commutes with every map (fxfuse.planner.groupmaps)
        for name, layout in analysis.layouts.items():
            if not state[name].is_floating_point():
                continue
            if name in skip:
                t = _resized(state[name], layout.axes, widths or {})
                if t is not None:
                    self.resized.update({key: t for key in (name,) + layout.aliases})
                continue
            axes = [(d, e, bool(layout.consumed[d]) if d < len(layout.consumed) else False)
                    for d, e in enumerate(layout.axes) if any(leaf.space in touched for leaf in _leaves(e))]
            if axes:
                self.moved.append((name, layout.aliases, axes))

    def __call__(self, mats: Mapping[int, torch.Tensor], read_mats: Mapping[int, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
        """``read_mats``: the maps axes that read units move by where that is not ``mats`` itself (an
        invertible map's inverse transpose); those spaces are in ``orthogonal`` (no ``consumer``)."""
        out = dict(self.state)
        out.update({k: v for k, v in self.resized.items() if k in out})
        reading = {**mats, **(read_mats or {})}
        for name, aliases, axes in self.moved:
            t = self.state[name].float()
            for d, expr, reads in axes:
                M = _axis_matrix(expr, reading if reads else mats, self.pairs, self.parents, reads, self.orthogonal,
                                 self.device)
                t = torch.tensordot(M.to(t.dtype), t, dims=([1], [d])).movedim(0, d)
            for key in (name,) + aliases:
                if key in out:
                    out[key] = t
        return out


def _resized(t: torch.Tensor, axes: tuple[AxisExpr, ...], widths: Mapping[int, int]) -> torch.Tensor | None:
    """A uniform scale ``t`` with every axis on an embedded space resized to the target's width (its mean there);
    ``None`` where none is."""
    if not any(leaf.space in widths for e in axes for leaf in _leaves(e)):
        return None
    for d, e in enumerate(axes):
        if isinstance(e, Leaf) and e.space in widths:
            shape = list(t.shape)
            shape[d] = widths[e.space]
            t = t.mean(d, keepdim=True).expand(shape).contiguous()
        elif any(leaf.space in widths for leaf in _leaves(e)):
            raise RefineError(f"a uniform scale on space s{_leaves(e)[0].space} inside a composite axis: refinement "
                              "cannot resize it to the target's width")
    return t


def _factors(expr: AxisExpr) -> list[AxisExpr]:
    """The factors of a product, nested products flattened (row-major products are associative)."""
    return [f for part in expr.parts for f in (_factors(part) if isinstance(part, Product) else [part])]


def _leaves(expr: AxisExpr) -> list[Leaf]:
    if isinstance(expr, Leaf):
        return [expr]
    return [leaf for p in expr.parts for leaf in _leaves(p)]
