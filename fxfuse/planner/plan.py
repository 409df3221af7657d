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
  already moved (in the first pass, a space with no tensor whose other axes
  are solved reads its tensors with those axes reduced by their mean and mean
  square); block coordinate descent in a seeded random order
  until a pass changes nothing (at most ``max_passes``);
* activations (OTFusion / Transformer Fusion): ``S[j, k]`` = Pearson
  correlation of target unit ``j`` and source unit ``k`` over calibration
  samples (every token one sample), summed over the nodes where the space
  lives; one pass (activations do not depend on the other maps).
"""
from __future__ import annotations

import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from typing import Mapping, Protocol

import numpy as np
import torch

from ..core.maps import Alignment, Block, TransportMap, _pairwise  # noqa: F401  (also imported from here)
from ..core.progress import bar
from ..core.solvers import assignment, solve
from ..frontend.spaces import Analysis
from ..frontend.groups import ROTARY
from .weight_cost import WeightCost  # noqa: F401  (also imported from here)


class CostModel(Protocol):
    def block(self, root: int, children: tuple[int, ...], perms: Mapping[int, torch.Tensor],
              known_only: bool = False) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """``(S_root (n×n), {child: S_pairs (n×n×m×m)})`` given the current ``perms`` of other spaces.

        ``known_only``: leave out tensors with a movable axis that has no map yet (its order is unknown);
        where that leaves nothing, the weight cost reads them with those axes reduced by order-free moments.
        """


# ---------------------------------------------------------------- blocks


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
        elif spaces[parent].parent is None:  # always: the analysis nests one level deep (spaces.one_level)
            out.setdefault(parent, []).append(s.id)
    return [Block(root, tuple(ch), root in movable) for root, ch in sorted(out.items())]


def _block_value(S: np.ndarray, nested: Mapping[int, np.ndarray], root: np.ndarray,
                 inner: Mapping[int, np.ndarray]) -> float:
    """The block's similarity under a root map and inner maps.

    Permutation root ``p`` with inner tables ``(n, m)``:
    ``Σ_j S[j, p(j)] + Σ_c Σ_j Σ_a S4_c[j, p(j), a, p_c[j, a]]``; matrix root ``A``
    with inner pair perms ``(n_t, n_s, m)``: ``Σ_jk A[j,k] (S[j,k] + Σ_c Σ_a S4_c[j,k,a,π_jk(a)])``.
    """
    if root.ndim == 2:
        total = float((root * S).sum())
        for c, S4 in nested.items():
            vals = np.take_along_axis(S4, inner[c][..., None], axis=3)[..., 0].sum(-1)
            total += float((root * vals).sum())
        return total
    n = S.shape[0]
    rows = np.arange(n)
    total = float(S[rows, root].sum())
    for c, S4 in nested.items():
        m = S4.shape[-1]
        block = S4[rows, root]  # (n, m, m)
        total += float(block[rows[:, None], np.arange(m)[None, :], inner[c]].sum())
    return total


def solve_block(block: Block, cost: CostModel, perms: Mapping[int, torch.Tensor], solver: str = "exact",
                reg: float | None = None, soft: bool = False, known_only: bool = False,
                rigid: frozenset[int] = frozenset()) -> tuple[dict[int, TransportMap], float, float]:
    """Solve one block with the other spaces at ``perms``; nested children in ``rigid`` (a group without the
    permutations: rotary dims) keep the identity under every parent pair.

    Returns the block's maps, the block's similarity under its maps in ``perms``
    (identity where absent; ``-inf`` where the sizes differ and there is none
    yet) and under the new maps.
    """
    # nested children keep their current maps: a piece holding several of them (a grouped conv's
    # in and out units) reads each one's cost with the others at theirs
    others = {s: p for s, p in perms.items() if s != block.root}
    S, nested = cost.block(block.root, block.children, others, known_only)
    n_t, n_s = S.shape
    pairs = {c: _identity_pairs(S4) if c in rigid else _pairwise(S4) for c, S4 in nested.items()}
    # S + Σ_c values_c, added as ``S + ((0 + v_1) + v_2 …)``; without nested spaces ``S + 0``, made once and
    # negated in place (an n × n float64 matrix: a wide MLP space's is 250 MB)
    total = S + (sum((v for v, _ in pairs.values()), np.zeros_like(S)) if pairs else 0.0)
    np.negative(total, out=total)
    A = None
    if not block.root_free:
        p_root = np.arange(n_t)
    elif soft:
        _, A = solve(total, "sinkhorn", reg)
    elif solver == "exact" and n_t == n_s:  # ``solve``'s permutation, without its dense n × n map
        p_root = assignment(total)
    else:
        p_root, A = solve(total, solver, reg)
        if p_root is not None:
            A = None
    del total
    if A is not None:
        aligned = _block_value(S, nested, A, {c: pp for c, (_, pp) in pairs.items()})
    else:
        inner = {c: pp[np.arange(n_t), p_root] for c, (_, pp) in pairs.items()}
        aligned = _block_value(S, nested, p_root, inner)
    identity = None
    if n_t == n_s:
        identity = _block_value(S, nested, np.arange(n_t), {c: np.tile(np.arange(S4.shape[-1]), (n_t, 1))
                                                           for c, S4 in nested.items()})
    current_root = perms.get(block.root)
    if current_root is None:
        current = identity if identity is not None else -np.inf
    else:
        current_inner = {c: perms[c].numpy() for c in nested if c in perms}
        for c, S4 in nested.items():
            if c not in current_inner:
                m = S4.shape[-1]
                current_inner[c] = (np.tile(np.arange(m), (n_t, 1)) if current_root.dim() == 1
                                    else np.broadcast_to(np.arange(m), (n_t, n_s, m)).copy())
        current = _block_value(S, nested, current_root.double().numpy() if current_root.is_floating_point()
                               else current_root.numpy(), current_inner)
    maps: dict[int, TransportMap] = {}
    matching = A is not None and not soft
    if block.root_free:
        maps[block.root] = TransportMap(
            block.root, perm=torch.from_numpy(p_root) if A is None else None,
            matrix=torch.from_numpy(A).float() if A is not None else None,
            similarity_identity=identity, similarity_aligned=aligned, matching=matching)
    for c, (_, pp) in pairs.items():
        maps[c] = TransportMap(c, perm=torch.from_numpy(inner[c]) if A is None else None,
                               pair_perms=torch.from_numpy(pp) if A is not None else None,
                               similarity_identity=identity, similarity_aligned=aligned, matching=matching)
    return maps, current, aligned


def _identity_pairs(S4: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like ``fxfuse.core.maps._pairwise`` with the identity inside every parent pair: values ``Σ_a S4[j,k,a,a]``."""
    n_t, n_s, m, _ = S4.shape
    return np.einsum("jkaa->jk", S4), np.broadcast_to(np.arange(m), (n_t, n_s, m)).copy()


COUPLED_RESOLVES = 8  # re-solves of a block on its own account (nested children sharing a piece)


def align(target: Analysis, cost: CostModel, *, solver: str = "exact", reg: float | None = None,
          fixed: set[int] = frozenset(), iterative: bool = True, seed: int = 0, max_passes: int = 50,
          cost_name: str = "weights", levels: Mapping[int, int] | None = None, progress=None,
          embeddable: frozenset[int] = frozenset()) -> Alignment:
    """Hard block coordinate descent, then soft maps if asked.

    Pass 1 visits blocks in graph order and, when ``iterative``, lets each see
    only tensors whose other movable axes are already solved (unsolved ones add
    noise only): a layer-by-layer propagation that gives the descent a good
    start. A block that would see nothing that way (every tensor carries
    another unsolved space, as heads next to head dims of their own) sees its
    tensors with those axes reduced by order-free moments (mean and mean
    square), so it is solved from its weights and not fixed at the identity for
    the later blocks to settle around. A block that saw all its tensors in pass
    1 has seen its full cost, which no later block of pass 1 changes (a later
    block's spaces were unsolved then, so their tensors were left out): it is
    solved again only once a neighbour changes, and the result is the same as
    solving it again. Later passes visit blocks in a seeded random order, each with the
    full cost; a block's new maps are taken only when they raise its
    similarity, and a block is solved again only when a block it shares a
    tensor with has changed. With ``solver="sinkhorn"`` each block's final cost,
    the others at their hard maps, becomes a soft map.

    ``levels``: each space's group (``fxfuse.frontend.groups``); blocks with a group
    larger than the permutations are solved by ``fxfuse.planner.procrustes`` and stay
    hard (function preserving) whatever the solver. A space of ``embeddable`` whose sizes differ moves by a
    stretched orthonormal embedding (``fxfuse.planner.procrustes.embedding``), else by a matching.
    """
    from .procrustes import is_group_block, solve_group_block

    todo = blocks(target, set(fixed))
    grouped = {i for i, b in enumerate(todo) if is_group_block(b, levels or {})}
    rigid = frozenset(s for s, level in (levels or {}).items() if level == ROTARY)

    clock = _Clock(cost)

    def solve_one(i: int, known_only: bool = False):
        with clock.timing(todo[i].root):
            if i in grouped:
                got = solve_group_block(todo[i], clock, perms, levels, known_only, embeddable)
                if got is not None:
                    return got
                grouped.discard(i)  # sizes differ: permutations and matchings as usual
            return solve_block(todo[i], clock, perms, known_only=known_only, rigid=rigid)

    perms: dict[int, torch.Tensor] = {}
    results: dict[int, dict[int, TransportMap]] = {}
    neighbours = _neighbours(todo, cost)

    def take(i: int, maps: dict[int, TransportMap]) -> bool:
        changed = False
        for s, m in maps.items():
            value = m.descent_value()
            if value is None:
                continue
            old = perms.get(s)
            changed |= old is None or old.shape != value.shape or not torch.equal(old, value)
            perms[s] = value
        results[i] = maps
        return changed

    dirty: set[int] = set()
    own_resolves: dict[int, int] = {}
    with bar(progress, "solving, pass 1", len(todo)) as b:
        for i in range(len(todo)):
            complete = not iterative or _complete(todo[i], cost, perms)
            take(i, solve_one(i, known_only=iterative)[0])  # the descent is hard
            if iterative and (not complete or todo[i].root in getattr(cost, "coupled", ())):
                dirty.add(i)
            b.update()
    passes = 1
    order = list(range(len(todo)))
    rng = random.Random(seed)
    while dirty and passes < max_passes:
        passes += 1
        rng.shuffle(order)
        b = bar(progress, f"solving, pass {passes}", len(dirty))
        for i in order:
            if i not in dirty:
                continue
            dirty.discard(i)
            b.update()
            maps, current, aligned = solve_one(i)
            if aligned > current + (1e-6 if i in grouped else 1e-9) * (abs(current) + 1.0):
                if take(i, maps):
                    dirty |= neighbours[i]
                    # nested children sharing a piece were solved each against the others' old maps: again, a
                    # few times (the gain it claims is not exact, so re-solving it on its own could cycle)
                    if todo[i].root in getattr(cost, "coupled", ()) and own_resolves.get(i, 0) < COUPLED_RESOLVES:
                        own_resolves[i] = own_resolves.get(i, 0) + 1
                        dirty.add(i)
            else:  # keep the maps, record the similarities of this full-cost solve
                results[i] = {s: replace(results[i][s], similarity_identity=m.similarity_identity,
                                         similarity_aligned=current) for s, m in maps.items()}
        b.close()
    notes: list[str] = []
    silent = getattr(cost, "silent", lambda _planned: [])(todo)
    if silent:
        notes.append(f"no signal for space(s) {', '.join(f's{s}' for s in silent)} ({cost.silent_reason}): "
                     "kept at the identity")
        warnings.warn(notes[-1])
    if dirty:
        notes.append(f"coordinate descent stopped after {max_passes} passes without converging")
        warnings.warn(notes[-1])
    final: dict[int, TransportMap] = {}
    for i, block in enumerate(todo):
        if i not in grouped and (solver == "sinkhorn" or any(m.descent_value() is None for m in results[i].values())):
            with clock.timing(block.root):
                maps, _, _ = solve_block(block, clock, perms, solver, reg, soft=solver == "sinkhorn", rigid=rigid)
        else:
            maps = results[i]
        final.update(maps)
    return Alignment(final, passes, cost_name, solver, tuple(notes), clock.seconds)


class _Clock:
    """A cost model's stand-in that times its ``block`` calls inside each block's solves (``Alignment.seconds``)."""

    def __init__(self, cost: CostModel):
        self.cost, self.seconds, self._products = cost, {}, 0.0

    def __getattr__(self, name):
        return getattr(self.cost, name)

    def block(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.cost.block(*args, **kwargs)
        finally:
            self._products += time.perf_counter() - start

    @contextmanager
    def timing(self, root: int):
        start, self._products = time.perf_counter(), 0.0
        try:
            yield
        finally:
            entry = self.seconds.setdefault(root, {"products_s": 0.0, "assign_s": 0.0, "solves": 0})
            entry["products_s"] += self._products
            entry["assign_s"] += time.perf_counter() - start - self._products
            entry["solves"] += 1


def _complete(block: Block, cost: CostModel, perms: Mapping[int, torch.Tensor]) -> bool:
    """Whether ``known_only`` leaves out nothing of ``block``'s cost (``False`` if the cost cannot tell)."""
    leaves_out = getattr(cost, "leaves_out", None)
    if leaves_out is None:
        return False
    others = {s: p for s, p in perms.items() if s != block.root and s not in block.children}
    return not leaves_out(block.root, block.children, others)


def _neighbours(todo: list[Block], cost: CostModel) -> dict[int, set[int]]:
    """Blocks whose costs read a tensor that another block moves."""
    touching = getattr(cost, "tensors_of", None)
    if touching is None:
        return {i: set() for i in range(len(todo))}
    owner: dict[int, set[int]] = {}
    for i, b in enumerate(todo):
        for t in touching((b.root,) + b.children):
            owner.setdefault(t, set()).add(i)
    out = {i: set() for i in range(len(todo))}
    for group in owner.values():
        for i in group:
            out[i] |= group - {i}
    return out


# ---------------------------------------------------------------- activation cost


class ActivationCost:
    """Correlation similarity from accumulated activation statistics (see ``fxfuse.planner.activations``)."""

    silent_reason = "constant on the calibration data, or read at no node"

    def __init__(self, stats: Mapping[int, np.ndarray], nested_stats: Mapping[tuple[int, int], np.ndarray],
                 sizes: Mapping[int, tuple[int, int]], device: torch.device | None = None):
        """``sizes``: ``{space: (target size, source size)}``; ``device``: where Procrustes runs (``None``: CPU)."""
        self.stats, self.nested_stats, self.sizes, self.device = stats, nested_stats, sizes, device
        self.halves: tuple["ActivationCost", "ActivationCost"] | None = None  # even and odd samples alone

    def undetermined(self, planned: list[Block]) -> dict[int, float]:
        """Spaces whose permutation the two halves of the samples solve differently: ``{space: share of units}``.

        Each block is solved on the even samples' costs and on the odd ones'; a
        unit mapped differently is one the signal does not determine (noise
        beyond the units' own variation). Blocks of unequal sizes are left out.
        """
        if self.halves is None:
            return {}
        out: dict[int, float] = {}
        for b in planned:
            if any(self.sizes[s][0] != self.sizes[s][1] for s in (b.root,) + b.children):
                continue
            even, odd = (solve_block(b, half, {})[0] for half in self.halves)
            for s, m in even.items():
                p, q = m.perm, odd[s].perm
                if p is not None and q is not None and not torch.equal(p, q):
                    out[s] = float((p != q).double().mean())
        return out

    def silent(self, planned: list[Block]) -> list[int]:
        """Spaces of ``planned`` without any correlation signal: no node exposes them, or their units are
        constant on the data (a nested space: no joint node with its parent)."""
        def signal(*costs) -> bool:
            return any(c is not None and np.any(c) for c in costs)

        out = []
        for b in planned:
            nested = [self.nested_stats.get((b.root, c)) for c in b.children]
            if b.root_free and not signal(self.stats.get(b.root), *nested):
                out.append(b.root)
            out += [c for c, v in zip(b.children, nested) if not signal(v)]
        return sorted(out)

    def block(self, root, children, perms, known_only=False):
        """Correlations; a space no node exposes gets a zero cost (it keeps the identity)."""
        S = self.stats.get(root, np.zeros(self.sizes[root]))
        nested = {c: self.nested_stats[(root, c)] for c in children if (root, c) in self.nested_stats}
        return S, nested
