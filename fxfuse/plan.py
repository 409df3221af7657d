"""Planning: one transport map per free space, moving a source model into the target's basis.

A *block* is a free space ``H`` with the spaces nested under it (``D`` with
``Space.parent == H``: inside-head dims under heads). Blocks are solved
hierarchically: for every pair of parent units ``(j, k)`` the nested spaces are
matched first (``|H|²`` small assignments), their best similarity is added to
the parent's cost, then the parent is matched; ``D`` under target unit ``j``
takes the inner matching of the pair ``(j, p_H[j])``.

Costs are *similarities* ``S[j, k]`` (maximised):

* weights (Git Re-Basin weight matching): ``S[j, k] = Σ ⟨W_t[…j…], W_s'[…k…]⟩``
  over every member axis, ``W_s'`` the source tensor with all *other* spaces
  already moved; block coordinate descent in a seeded random order until a
  pass changes nothing (at most ``max_passes``);
* activations (OTFusion / Transformer Fusion): ``S[j, k]`` = Pearson
  correlation of target unit ``j`` and source unit ``k`` over calibration
  samples (every token one sample), summed over the nodes where the space
  lives; one pass (activations do not depend on the other maps).
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import numpy as np
import torch

from .layout import permute_piece, pieces
from .solvers import assignment, solve
from .spaces import Analysis


@dataclass(frozen=True)
class TransportMap:
    """How space ``space`` of a source model maps into the target basis.

    ``perm``: hard map, ``(n,)`` or, nested, ``(n_parent, n)``: target unit ``j``
    takes source unit ``perm[j]``. ``matrix``: soft map ``A`` (``n_t × n_s``, rows
    sum to 1). ``pair_perms``: for a nested space under a soft parent, the inner
    matching of every parent pair, ``(n_parent_t, n_parent_s, n)``.
    """

    space: int
    perm: torch.Tensor | None = None
    matrix: torch.Tensor | None = None
    pair_perms: torch.Tensor | None = None
    similarity_identity: float = 0.0
    similarity_aligned: float = 0.0

    @property
    def hard(self) -> bool:
        return self.matrix is None


@dataclass(frozen=True)
class Alignment:
    """Every map of one source model; ``passes`` of coordinate descent."""

    maps: Mapping[int, TransportMap]
    passes: int
    cost: str
    solver: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def hard(self) -> bool:
        return all(m.hard for m in self.maps.values())

    def perms(self) -> dict[int, torch.Tensor]:
        return {s: m.perm for s, m in self.maps.items() if m.perm is not None}


class CostModel(Protocol):
    def block(self, root: int, children: tuple[int, ...], perms: Mapping[int, torch.Tensor]
              ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """``(S_root (n×n), {child: S_pairs (n×n×m×m)})`` given the current ``perms`` of other spaces."""


# ---------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Block:
    root: int
    children: tuple[int, ...]
    root_free: bool


def blocks(analysis: Analysis, fixed: set[int]) -> list[Block]:
    """Group free spaces into blocks; ``fixed`` spaces keep the identity."""
    spaces = analysis.spaces
    movable = {s.id for s in spaces if s.free and s.size > 1 and s.id not in fixed}
    out: dict[int, list[int]] = {}
    for s in spaces:
        if s.id not in movable:
            continue
        parent = s.parent
        if parent is None:
            out.setdefault(s.id, [])
        elif spaces[parent].parent is None:  # one level of nesting is planned; deeper stays identity
            out.setdefault(parent, []).append(s.id)
    return [Block(root, tuple(ch), root in movable) for root, ch in sorted(out.items())]


def _pairwise(S4: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best inner matching for every parent pair: values ``(n, n)`` and perms ``(n, n, m)``."""
    n_t, n_s, m, _ = S4.shape
    values = np.empty((n_t, n_s))
    perms = np.empty((n_t, n_s, m), dtype=np.int64)
    for j in range(n_t):
        for k in range(n_s):
            p = assignment(-S4[j, k])
            perms[j, k] = p
            values[j, k] = S4[j, k][np.arange(m), p].sum()
    return values, perms


def _block_value(S: np.ndarray, nested: Mapping[int, np.ndarray], p_root: np.ndarray,
                 inner: Mapping[int, np.ndarray]) -> float:
    """``Σ_j S[j, p(j)] + Σ_c Σ_j Σ_a S4_c[j, p(j), a, p_c[j, a]]``."""
    n = S.shape[0]
    rows = np.arange(n)
    total = float(S[rows, p_root].sum())
    for c, S4 in nested.items():
        m = S4.shape[-1]
        block = S4[rows, p_root]  # (n, m, m)
        total += float(block[rows[:, None], np.arange(m)[None, :], inner[c]].sum())
    return total


def solve_block(block: Block, cost: CostModel, perms: Mapping[int, torch.Tensor], solver: str = "exact",
                reg: float | None = None, soft: bool = False) -> tuple[dict[int, TransportMap], float, float]:
    """Solve one block with the other spaces at ``perms``.

    Returns the block's maps, the block's similarity under its maps in ``perms``
    (identity where absent) and under the new maps.
    """
    others = {s: p for s, p in perms.items() if s != block.root and s not in block.children}
    S, nested = cost.block(block.root, block.children, others)
    n = S.shape[0]
    pairs = {c: _pairwise(S4) for c, S4 in nested.items()}
    total = S + sum((v for v, _ in pairs.values()), np.zeros_like(S))
    A = None
    if not block.root_free:
        p_root = np.arange(n)
    elif soft:
        _, A = solve(-total, "sinkhorn", reg)
        p_root = A.argmax(1)
    else:
        p_root, A = solve(-total, solver, reg)
        if p_root is None:  # unequal sizes: the plan is the map
            p_root = A.argmax(1)
        else:
            A = None
    inner = {c: pp[np.arange(n), p_root] for c, (_, pp) in pairs.items()}
    current_root = perms.get(block.root)
    current_root = current_root.numpy() if current_root is not None else np.arange(n)
    current_inner = {}
    for c, S4 in nested.items():
        pc = perms.get(c)
        current_inner[c] = pc.numpy() if pc is not None else np.tile(np.arange(S4.shape[-1]), (n, 1))
    current = _block_value(S, nested, current_root, current_inner)
    aligned = _block_value(S, nested, p_root, inner)
    identity = _block_value(S, nested, np.arange(n), {c: np.tile(np.arange(S4.shape[-1]), (n, 1))
                                                     for c, S4 in nested.items()})
    maps: dict[int, TransportMap] = {}
    if block.root_free:
        maps[block.root] = TransportMap(
            block.root, perm=torch.from_numpy(p_root) if A is None else None,
            matrix=torch.from_numpy(A).float() if A is not None else None,
            similarity_identity=identity, similarity_aligned=aligned)
    for c, (_, pp) in pairs.items():
        maps[c] = TransportMap(c, perm=torch.from_numpy(inner[c]) if A is None else None,
                               pair_perms=torch.from_numpy(pp) if A is not None else None,
                               similarity_identity=identity, similarity_aligned=aligned)
    return maps, current, aligned


def align(target: Analysis, cost: CostModel, *, solver: str = "exact", reg: float | None = None,
          fixed: set[int] = frozenset(), iterative: bool = True, seed: int = 0, max_passes: int = 50,
          cost_name: str = "weights") -> Alignment:
    """Hard block coordinate descent (one pass unless ``iterative``), then a final solve per block.

    A block's new maps are taken only when they raise its similarity; the descent
    stops after a pass that changes nothing. With ``solver="sinkhorn"`` the final
    solve turns each block's cost, the other spaces at their hard maps, into a
    soft map.
    """
    todo = blocks(target, set(fixed))
    perms: dict[int, torch.Tensor] = {}
    order = list(range(len(todo)))
    rng = random.Random(seed)
    passes = 0
    limit = max_passes if iterative else 1
    while passes < limit:
        passes += 1
        rng.shuffle(order)
        changed = False
        for i in order:
            maps, current, aligned = solve_block(todo[i], cost, perms)
            if aligned > current + 1e-9 * (abs(current) + 1.0):
                for s, m in maps.items():
                    perms[s] = m.perm
                changed = True
        if not changed:
            break
    notes: list[str] = []
    if iterative and passes >= max_passes:
        notes.append(f"coordinate descent stopped after {max_passes} passes without converging")
        warnings.warn(notes[-1])
    final: dict[int, TransportMap] = {}
    soft = solver == "sinkhorn"
    for block in todo:
        maps, _, _ = solve_block(block, cost, perms, solver, reg, soft=soft)
        if not soft:  # keep the descent's maps; the re-solve records similarities
            maps = {s: TransportMap(s, perm=perms[s] if s in perms else _identity_like(m.perm), matrix=m.matrix,
                                    similarity_identity=m.similarity_identity,
                                    similarity_aligned=m.similarity_aligned)
                    for s, m in maps.items()}
        final.update(maps)
    return Alignment(final, passes, cost_name, solver, tuple(notes))


def _identity_like(p: torch.Tensor | None) -> torch.Tensor | None:
    if p is None:
        return None
    if p.dim() == 1:
        return torch.arange(p.shape[0])
    return torch.arange(p.shape[1]).expand(p.shape[0], -1).clone()


# ---------------------------------------------------------------- weight cost


class WeightCost:
    """Git Re-Basin weight matching similarity between a target and a source state dict."""

    def __init__(self, target: Analysis, target_state: Mapping[str, torch.Tensor],
                 source_state: Mapping[str, torch.Tensor]):
        self.parents = target.parents
        self.items: list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = []
        for name, layout in target.layouts.items():
            t = target_state[name].detach().double()
            s = source_state[name].detach().double()
            if not t.is_floating_point():
                continue
            for (pt, spaces), (ps, _) in zip(pieces(t.contiguous(), layout.axes), pieces(s.contiguous(), layout.axes)):
                self.items.append((pt, ps, spaces))
        self.by_space: dict[int, list[int]] = {}
        for i, (_, _, spaces) in enumerate(self.items):
            for sp in set(spaces):
                self.by_space.setdefault(sp, []).append(i)

    def block(self, root, children, perms):
        relevant = sorted(set(self.by_space.get(root, [])).union(*(self.by_space.get(c, []) for c in children)))
        n = None
        S = None
        nested: dict[int, np.ndarray] = {}
        for i in relevant:
            pt, ps, spaces = self.items[i]
            for d, sp in enumerate(spaces):
                if sp != root:
                    continue
                child_dims = [(c, spaces.index(c)) for c in children if c in spaces]
                mask = list(spaces)
                mask[d] = -2
                for c, cd in child_dims:
                    mask[cd] = -3
                moved = permute_piece(ps, tuple(mask), perms, self.parents)
                n = pt.shape[d]
                if S is None:
                    S = np.zeros((n, n))
                if not child_dims:
                    a = pt.movedim(d, 0).reshape(n, -1)
                    b = moved.movedim(d, 0).reshape(n, -1)
                    S += (a @ b.T).numpy()
                    continue
                for c, cd in child_dims:
                    m = pt.shape[cd]
                    a = pt.movedim((d, cd), (0, 1)).reshape(n, m, -1)
                    b = moved.movedim((d, cd), (0, 1)).reshape(n, m, -1)
                    S4 = torch.einsum("jar,kbr->jkab", a, b).numpy()
                    nested[c] = nested.get(c, 0) + S4
                    break  # one child per piece (pieces with two nested children count once)
        if S is None:
            raise ValueError(f"space {root} has no member tensor")
        return S, nested


# ---------------------------------------------------------------- activation cost


class ActivationCost:
    """Correlation similarity from accumulated activation statistics (see ``fxfuse.activations``)."""

    def __init__(self, stats: Mapping[int, np.ndarray], nested_stats: Mapping[tuple[int, int], np.ndarray]):
        self.stats, self.nested_stats = stats, nested_stats

    def block(self, root, children, perms):
        S = self.stats.get(root)
        nested = {c: self.nested_stats[(root, c)] for c in children if (root, c) in self.nested_stats}
        if S is None:
            n = next(iter(nested.values())).shape[0] if nested else 0
            S = np.zeros((n, n))
        return S, nested
