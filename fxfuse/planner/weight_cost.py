"""Weight matching (Git Re-Basin): ``WeightCost``, the similarity of a target and a source state dict.

For a block (a free space ``H`` and the spaces nested under it), ``S[j, k] = Σ ⟨W_t[…j…], W_s'[…k…]⟩``
over every member axis, ``W_s'`` the source tensor with all *other* spaces already moved by their
current maps (``fxfuse.planner.plan.align`` iterates to a fixed point); a tensor whose other axes are
not solved yet is read with those axes reduced by their mean and mean square. Products of pieces with
other movable dims are kept while those dims' maps stay (``fxfuse.planner.kept_products``).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from ..core.device import host, to as to_device
from ..core.maps import Block
from ..frontend.spaces import Analysis
from .kept_products import SPILL_BYTES, KeptProducts
from .layout import apply_matrix, permute_piece, pieces


# Memory for the products of pieces with other movable dims (float32 ``n × n_s`` each), reused while those dims'
# maps stay: a residual stream re-solved in every pass recomputes only the products whose other maps changed.
# Products beyond it go to a scratch file (at most ``SPILL_BYTES``), read back when reused.
PRODUCT_CACHE_BYTES = 1 << 29  # 512 MiB


class WeightCost:
    """Git Re-Basin weight matching similarity between a target and a source state dict.

    Tensors are unfolded into pieces with one space per dim (float32), read
    from the states when a block needs them, so a state that reads its
    tensors on access (``fxfuse.backend.lazy``) is never held whole. For a space at dim
    ``d`` of a piece, the target slices ``T_d`` (``n × rest``) are cached when
    the target state is held in memory; when every other dim of the piece is
    fixed (pinned or outside all blocks, e.g. an embedding's vocabulary) the
    product ``T_d S_dᵀ`` never changes and is computed once. A piece with other
    movable dims keeps its product with the maps it was made with
    (``fxfuse.planner.kept_products``: ``product_cache_bytes`` in memory, the
    rest up to ``product_spill_bytes`` in a scratch file) and reuses it,
    without reading the piece, while those maps are unchanged: the same bits
    in the same order of additions; a product found stale gives its slot to the
    new one (``KeptProducts.put``). Only products that a block can ask for again with the same maps are
    kept: those of a piece whose other spaces are not all the other spaces the
    block reads (a residual stream's piece in one layer's MLP, while the
    stream is solved again for another layer's change), or of a block solved
    again on its own account; an MLP space's products, which change with the
    stream that is the only other space of all its pieces, are not.
    """

    def __init__(self, target: Analysis, target_state: Mapping[str, torch.Tensor],
                 source_state: Mapping[str, torch.Tensor], movable: set[int] | None = None,
                 source: Analysis | None = None, skip: frozenset[str] = frozenset(),
                 device: torch.device | None = None):
        """``source``: the source's analysis where its sizes differ; ``skip``: parameters left out;
        ``device``: where the products run (``None``: in place, on the CPU; ``fxfuse.core.device``)."""
        self.device = device
        self.parents = target.parents
        self.sizes = {sp.id: (sp.size, (source or target).spaces[sp.id].size) for sp in target.spaces}
        self.movable = movable if movable is not None else {
            sp.id for sp in target.spaces if sp.free and sp.size > 1}
        self.states = (target_state, source_state)
        self.axes: dict[str, tuple[tuple, tuple]] = {}
        self.items: list[tuple[str, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
        for name, layout in target.layouts.items():
            if name in skip or not _floating(target_state, name):
                continue
            src_axes = (source or target).layouts[name].axes
            self.axes[name] = (layout.axes, src_axes)
            shapes = [torch.empty(sh, device="meta") for sh in (layout.shape, _shape(src_axes))]
            for k, ((pt, spaces), (ps, _)) in enumerate(zip(pieces(shapes[0], layout.axes), pieces(shapes[1], src_axes))):
                if any(sp in self.movable for sp in spaces):
                    self.items.append((name, k, spaces, tuple(pt.shape), tuple(ps.shape)))
        self.by_space: dict[int, list[int]] = {}
        for i, item in enumerate(self.items):
            for sp in set(item[2]):
                self.by_space.setdefault(sp, []).append(i)
        self._cache_target = getattr(target_state, "holds_tensors", isinstance(target_state, dict))
        self._target_cache: dict[tuple, torch.Tensor] = {}
        self._static: dict[tuple, torch.Tensor] = {}
        self._last: tuple[str, list, list] | None = None
        self.product_cache_bytes = PRODUCT_CACHE_BYTES
        self.product_spill_bytes = SPILL_BYTES
        self._kept: KeptProducts | None = None  # made on first use, with the room set then
        self._others: dict[tuple, frozenset[int]] = {}  # (root, children) -> the other movable spaces its pieces read
        self._block_others: frozenset[int] = frozenset()
        self._block_root = -1
        self.coupled: set[int] = set()  # roots with a piece holding several of their nested children

    silent_reason = "no floating-point member tensor to compare"

    def _pieces(self, i: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Item ``i``'s target and source pieces (float32), read from the states."""
        name, k, spaces = self.items[i][:3]
        if self._last is None or self._last[0] != name:
            both = []
            for state, axes in zip(self.states, self.axes[name]):
                t = state[name].detach().float().contiguous()
                both.append([view for view, _ in pieces(t, axes)])
            self._last = (name, both[0], both[1])
        return self._last[1][k], self._last[2][k], spaces

    def tensors_of(self, spaces) -> set[int]:
        return {i for sp in spaces for i in self.by_space.get(sp, [])}

    def silent(self, planned: list[Block]) -> list[int]:
        """Spaces of ``planned`` that no compared tensor carries (e.g. only an integer index buffer)."""
        spaces = [b.root for b in planned if b.root_free] + [c for b in planned for c in b.children]
        return sorted(s for s in spaces if s not in self.by_space)

    def _target(self, i: int, dims: tuple[int, ...]) -> torch.Tensor:
        key = (i, dims)
        m = self._target_cache.get(key)
        if m is None:
            pt = self._pieces(i)[0]
            lead = [pt.shape[d] for d in dims]
            m = to_device(pt.movedim(dims, tuple(range(len(dims)))).reshape(*lead, -1).contiguous(), self.device)
            if self._cache_target:
                self._target_cache[key] = m
        return m

    def _pair_similarity(self, i: int, d: int, cd: int, moved: torch.Tensor, others) -> np.ndarray:
        """``S4[j, k, a, b]``: target slice ``(j, a)`` of piece ``i`` (parent dim ``d``, child dim ``cd``)
        against source slice ``(k, b)``; ``others``: ``(child, dim, map)`` of the parent's other nested
        children in the piece, each taken at its current map under target unit ``j`` (identity if none)."""
        pt = self._pieces(i)[0]
        n, m, n_s = pt.shape[d], pt.shape[cd], moved.shape[d]
        a = self._target(i, (d, cd)).reshape(n, m, -1)
        if not any(p is not None for _, _, p in others):
            b = moved.movedim((d, cd), (0, 1)).reshape(n_s * m, -1)
            S4 = self._mm(a.reshape(n * m, -1), b).reshape(n, m, n_s, m)
        else:
            S4 = torch.empty(n, m, n_s, m)
            for j in range(n):
                src = moved
                for _, cd2, table in others:
                    if table is not None:
                        src = _inner_map_under(src, d, cd2, table[j])
                b = src.movedim((d, cd), (0, 1)).reshape(n_s * m, -1)
                S4[j] = self._mm(a[j], b).reshape(m, n_s, m)
        return S4.permute(0, 2, 1, 3).double().numpy()  # [j, k, a, b]

    def _moved_product(self, i: int, d: int, mask: list[int], perms: Mapping[int, torch.Tensor],
                       n_s: int) -> torch.Tensor:
        """``T_d S'_dᵀ`` (``n × n_s``) of piece ``i`` along dim ``d``, the source moved by the maps of its other
        spaces (``mask``); kept and reused, unread, while those maps are the same."""
        key = tuple(sorted({m for m in mask if m >= 0}))
        tag = (key, tuple(perms.get(sp) for sp in key))
        kept = self.kept
        product = kept.get((i, d), tag)
        if product is not None:
            return product
        ps = self._pieces(i)[1]
        moved = permute_piece(ps, tuple(mask), perms, self.parents)
        product = self._mm(self._target(i, (d,)), moved.movedim(d, 0).reshape(n_s, -1))
        # asked again with the same maps only if another space of the block's pieces (or the block itself) moves
        if self._block_root in self.coupled or not self._block_others.issubset(key):
            kept.put((i, d), tag, product)
        return product

    @property
    def kept(self) -> KeptProducts:
        """The kept products (``product_cache_bytes`` in memory, ``product_spill_bytes`` in a scratch file)."""
        if self._kept is None:
            self._kept = KeptProducts(self.product_cache_bytes, self.product_spill_bytes, _same_tag)
        return self._kept

    @property
    def _product_bytes(self) -> int:
        """Bytes of kept products held in memory."""
        return 0 if self._kept is None else self._kept.held

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a bᵀ`` (rows of ``a`` against rows of ``b``) on the CPU, computed on ``self.device`` if one is set."""
        if self.device is None:
            return a @ b.T
        return host(to_device(a, self.device) @ to_device(b, self.device).T)

    def _unknown(self, mask: list[int], perms: Mapping[int, torch.Tensor]) -> list[int]:
        """Dims of a piece whose space is movable but has no map yet (and dims nested under those)."""
        unknown = {m for m in mask if m in self.movable and m not in perms}
        return [e for e, m in enumerate(mask) if m in unknown or self.parents.get(m) in unknown]

    def _reduced(self, i: int, lead: tuple[int, ...], unknown: list[int], mask: list[int],
                 perms: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """``Σ_f ⟨f(T)[j], f(S')[k]⟩`` over slices along ``lead``, ``f`` the mean and the mean square over the
        ``unknown`` dims: invariant to their order, so a tensor whose other axes are not solved yet still
        tells units apart (``(rows_t, rows_s)``, rows over the ``lead`` dims jointly)."""
        pt, ps, _ = self._pieces(i)
        known = tuple(-4 if e in unknown else m for e, m in enumerate(mask))
        moved = permute_piece(ps, known, perms, self.parents)
        total = 0
        for x_t, x_s in ((pt, moved), (pt * pt, moved * moved)):
            a, b = x_t.mean(unknown, keepdim=True), x_s.mean(unknown, keepdim=True)
            rows_t = math.prod(a.shape[e] for e in lead)
            rows_s = math.prod(b.shape[e] for e in lead)
            a = a.movedim(lead, tuple(range(len(lead)))).reshape(rows_t, -1)
            b = b.movedim(lead, tuple(range(len(lead)))).reshape(rows_s, -1)
            total = total + self._mm(a, b)
        return total

    def _masks(self, root, children):
        """``(item, dim of root, spaces with root at -2 and children at -3)`` for every piece holding ``root``."""
        relevant = sorted(set(self.by_space.get(root, [])).union(*(self.by_space.get(c, []) for c in children)))
        for i in relevant:
            spaces = self.items[i][2]
            for d, sp in enumerate(spaces):
                if sp == root:
                    mask = list(spaces)
                    mask[d] = -2
                    for c in children:
                        if c in spaces:
                            mask[spaces.index(c)] = -3
                    yield i, d, mask

    def leaves_out(self, root, children, perms) -> bool:
        """Whether ``block(..., known_only=True)`` would leave out a tensor (one with an unsolved movable axis),
        or reads one whose cost depends on the block's own maps (a piece holding several of its children)."""
        return any(mask.count(-3) > 1 or any(m in self.movable and m not in perms for m in mask)
                   for _, _, mask in self._masks(root, children))

    def _pieces_into(self, S, nested, relevant, root, children, perms, known_only, static_pass, reduce_unknown):
        """Add the products of the pieces holding ``root`` that are static (or not) to ``S`` and ``nested``.

        With ``known_only``, a piece with an unsolved movable dim is left out, or with ``reduce_unknown``
        read through the order-free moments over those dims (``_reduced``). Returns ``S`` and how many
        pieces were added.
        """
        added = 0
        for i in relevant:
            spaces, shape_t, shape_s = self.items[i][2:]
            for d, sp in enumerate(spaces):
                if sp != root:
                    continue
                n, n_s = shape_t[d], shape_s[d]
                if S is None:
                    S = torch.zeros(n, n_s, dtype=torch.float32)
                child_dims = [(c, spaces.index(c)) for c in children if c in spaces]
                mask = list(spaces)
                mask[d] = -2
                for _, cd in child_dims:
                    mask[cd] = -3
                static = not child_dims and not any(m in self.movable for m in mask)
                if static != static_pass:
                    continue
                unknown = self._unknown(mask, perms) if known_only else []
                if unknown and not reduce_unknown:
                    continue
                added += 1
                if not unknown and not child_dims and not static:
                    S += self._moved_product(i, d, mask, perms, n_s)
                    continue
                pt, ps, _ = self._pieces(i)
                if unknown:
                    lead = (d,) + tuple(cd for _, cd in child_dims[:1])
                    prod = self._reduced(i, lead, unknown, mask, perms)
                    if not child_dims:
                        S += prod
                    else:
                        c, m = child_dims[0][0], pt.shape[child_dims[0][1]]
                        nested[c] = nested.get(c, 0) + prod.reshape(n, m, n_s, m).permute(0, 2, 1, 3).double().numpy()
                    continue
                if not child_dims:  # static: no other movable dim
                    S += self._mm(self._target(i, (d,)), ps.movedim(d, 0).reshape(n_s, -1))
                    continue
                moved = permute_piece(ps, tuple(mask), perms, self.parents)
                if len(child_dims) > 1:
                    self.coupled.add(root)
                for c, cd in child_dims:
                    S4 = self._pair_similarity(i, d, cd, moved, [(c2, cd2, perms.get(c2)) for c2, cd2 in child_dims
                                                                  if c2 != c])
                    # a piece with several nested children (a grouped conv's in and out units) adds its
                    # similarity once to the parent: each child's share is the piece's over their number
                    nested[c] = nested.get(c, 0) + S4 / len(child_dims)
        return S, added

    def block(self, root, children, perms, known_only=False):
        self._block_root = root
        self._block_others = self._other_spaces(root, tuple(children))
        S, nested = self._block(root, children, perms, known_only, reduce_unknown=False)
        if known_only and not np.any(S) and not nested:  # every tensor has an unsolved axis: read them anyway
            S, nested = self._block(root, children, perms, known_only, reduce_unknown=True)
        return S, nested

    def _other_spaces(self, root: int, children: tuple[int, ...]) -> frozenset[int]:
        """The movable spaces, other than ``root`` and ``children``, of the pieces holding ``root``."""
        got = self._others.get((root, children))
        if got is None:
            got = frozenset(m for _, _, mask in self._masks(root, children) for m in mask
                            if m >= 0 and m in self.movable)
            self._others[(root, children)] = got
        return got

    def _block(self, root, children, perms, known_only: bool, reduce_unknown: bool):
        relevant = sorted(set(self.by_space.get(root, [])).union(*(self.by_space.get(c, []) for c in children)))
        S = self._static.get(root)
        if S is not None:
            S = S.clone()
        nested: dict[int, np.ndarray] = {}
        for static_pass in (True, False):  # pieces with no other movable dim first: their sum is cached per space
            if static_pass and S is not None:
                continue
            S, added = self._pieces_into(S, nested, relevant, root, children, perms, known_only, static_pass,
                                         reduce_unknown)
            if static_pass and added:
                self._static[root] = S.clone()
        if S is None:  # no tensor to compare (yet): no preference, see ``silent``
            S = torch.zeros(self.sizes[root], dtype=torch.float32)
        return S.double().numpy(), nested


def _same_tag(a: tuple, b: tuple) -> bool:
    """Whether two tags (spaces, their maps) of a kept product are the same."""
    return a[0] == b[0] and all(_same_map(x, y) for x, y in zip(a[1], b[1]))


def _same_map(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    if x is None or y is None:
        return x is y
    return x is y or (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y))


def _floating(state: Mapping[str, torch.Tensor], name: str) -> bool:
    dtype = getattr(state, "dtype_of", None)
    return dtype(name).is_floating_point if dtype is not None else state[name].is_floating_point()


def _shape(axes: tuple) -> tuple[int, ...]:
    return tuple(e.size for e in axes)


def _inner_map_under(t: torch.Tensor, d: int, cd: int, row: torch.Tensor) -> torch.Tensor:
    """``t`` with nested dim ``cd`` moved by one target unit's inner map: ``row`` is a permutation
    ``(m,)`` or a group map ``(m, m)`` (for every source unit along the parent dim ``d``), or one
    permutation per source unit ``(n_s, m)``."""
    if row.is_floating_point():
        return apply_matrix(t, cd, row)
    row = row.long()
    if row.dim() == 1:
        return t.index_select(cd, row)
    shape = [1] * t.dim()
    shape[d], shape[cd] = row.shape
    index = row.reshape(shape) if d < cd else row.t().reshape(shape)
    return torch.gather(t, cd, index.expand(t.shape))
