"""Axis classes: a union-find over tensor axes with structural refinement.

Every dimension of every tensor in a graph is an *atom*. Ops tie atoms that
must carry the same permutation (``unify``). An atom class may be *refined*:

* ``product``: a class of size ``n = n_1·…·n_k`` read row-major as
  ``(i_1, …, i_k)``; it may only move by ``σ_1 ⊗ … ⊗ σ_k`` (a view of
  ``hidden`` as ``heads × head_dim``);
* ``concat``: a class of size ``n = n_1+…+n_k`` made of consecutive segments;
  it moves by ``diag(σ_1, …, σ_k)`` (the output of ``cat``, the input of
  ``split``).

The unrefined classes (leaves) are the spaces. A class is *pinned* when it
must keep the identity permutation; pinning a class pins its refinement.
When two refinements cannot be reconciled both classes are pinned: the store
fails closed, never guesses.
"""
from __future__ import annotations

from dataclasses import dataclass

PRODUCT, CONCAT = "product", "concat"


@dataclass(frozen=True)
class Refinement:
    kind: str  # PRODUCT or CONCAT
    children: tuple[int, ...]


class AxisStore:
    """Mutable union-find used while analysing one graph."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._refine: dict[int, Refinement] = {}
        self._pinned: dict[int, str] = {}
        self._roles: dict[int, dict[str, int]] = {}
        self.touched: set[int] = set()

    # ---------------------------------------------------------------- basics
    def new(self, size: int, pinned: str | None = None) -> int:
        atom = len(self._parent)
        self._parent.append(atom)
        self._size.append(int(size))
        if pinned is not None:
            self._pinned[atom] = pinned
        return atom

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, atom: int) -> int:
        parent = self._parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:
            parent[atom], atom = root, parent[atom]
        return root

    def size(self, atom: int) -> int:
        return self._size[atom]

    def refinement(self, atom: int) -> Refinement | None:
        return self._refine.get(self.find(atom))

    def pinned(self, atom: int) -> str | None:
        return self._pinned.get(self.find(atom))

    def roles(self, atom: int) -> dict[str, int]:
        return dict(self._roles.get(self.find(atom), {}))

    def add_role(self, atom: int, role: str) -> None:
        roles = self._roles.setdefault(self.find(atom), {})
        roles[role] = roles.get(role, 0) + 1

    # ---------------------------------------------------------------- pinning
    def pin(self, atom: int, reason: str) -> None:
        """Force the identity permutation on ``atom``'s class and its refinement."""
        stack = [atom]
        while stack:
            root = self.find(stack.pop())
            self.touched.add(root)
            if root in self._pinned:
                continue
            self._pinned[root] = reason
            ref = self._refine.get(root)
            if ref is not None:
                stack.extend(ref.children)

    # ---------------------------------------------------------------- refinement
    def refine(self, atom: int, kind: str, sizes: list[int]) -> tuple[int, ...]:
        """Refine a leaf class into children of ``sizes``; returns the children.

        If the class is already refined the same way, its children are returned.
        """
        root = self.find(atom)
        self.touched.add(root)
        ref = self._refine.get(root)
        if ref is not None:
            if ref.kind == kind and [self._size[c] for c in ref.children] == list(sizes):
                return ref.children
            raise StructureConflict(f"class of size {self._size[root]} already split as {self._describe(ref)}")
        total = _prod(sizes) if kind == PRODUCT else sum(sizes)
        if total != self._size[root]:
            raise StructureConflict(f"cannot split size {self._size[root]} into {kind} {sizes}")
        reason = self._pinned.get(root)
        children = tuple(self.new(s, reason) for s in sizes)
        self._refine[root] = Refinement(kind, children)
        return children

    def leaves(self, atom: int, kind: str) -> list[int]:
        """Flatten nested refinements of ``kind`` into a list of atoms."""
        ref = self._refine.get(self.find(atom))
        if ref is None or ref.kind != kind:
            return [self.find(atom)]
        out: list[int] = []
        for child in ref.children:
            out.extend(self.leaves(child, kind))
        return out

    # ---------------------------------------------------------------- unification
    def unify(self, a: int, b: int, where: str) -> None:
        """Tie two atoms of equal size; pins both (reason ``where``) on conflict."""
        ra, rb = self.find(a), self.find(b)
        self.touched.update((ra, rb))
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            raise ValueError(f"internal: unify sizes {self._size[ra]} != {self._size[rb]} at {where}")
        fa, fb = self._refine.get(ra), self._refine.get(rb)
        if fa is None or fb is None:
            self._link(ra, rb, fa or fb)
            return
        try:
            if fa.kind != fb.kind:
                raise StructureConflict(f"{self._describe(fa)} meets {self._describe(fb)}")
            self._align(self.leaves(ra, fa.kind), self.leaves(rb, fb.kind), fa.kind, where)
        except StructureConflict as exc:
            # the merged class keeps one refinement only: pin both before the other is dropped,
            # or its sub-axes would stay free while no longer tied to this class
            reason = f"conflicting structure at {where}: {exc}"
            self.pin(ra, reason)
            self.pin(rb, reason)
            self._link(ra, rb, fa)
            return
        self._link(self.find(ra), self.find(rb), fa)

    def _link(self, ra: int, rb: int, ref: Refinement | None) -> None:
        ra, rb = self.find(ra), self.find(rb)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._refine.pop(rb, None)
        if ref is not None:
            self._refine[ra] = ref
        else:
            self._refine.pop(ra, None)
        for role, n in self._roles.pop(rb, {}).items():
            roles = self._roles.setdefault(ra, {})
            roles[role] = roles.get(role, 0) + n
        reason = self._pinned.pop(rb, None) or self._pinned.get(ra)
        if reason is not None:
            self._pinned.pop(ra, None)
            self.pin(ra, reason)

    def _align(self, xs: list[int], ys: list[int], kind: str, where: str) -> None:
        """Tie two flattened refinements of equal total, splitting leaves as needed."""
        xs = [x for x in xs if not (kind == PRODUCT and self._size[x] == 1)]
        ys = [y for y in ys if not (kind == PRODUCT and self._size[y] == 1)]
        while xs and ys:
            x, y = xs[0], ys[0]
            sx, sy = self._size[x], self._size[y]
            if sx == sy:
                self.unify(x, y, where)
                xs.pop(0)
                ys.pop(0)
            elif sx > sy:
                xs[0:1] = self._cut(x, sy, kind)
            else:
                ys[0:1] = self._cut(y, sx, kind)
        if xs or ys:
            raise StructureConflict("refinements do not line up")

    def _cut(self, atom: int, head: int, kind: str) -> tuple[int, ...]:
        size = self._size[atom]
        if self._refine.get(self.find(atom)) is not None:
            raise StructureConflict(f"cannot cut a structured class of size {size} at {head}")
        if kind == PRODUCT:
            if size % head:
                raise StructureConflict(f"{head} does not divide {size}")
            return self.refine(atom, PRODUCT, [head, size // head])
        return self.refine(atom, CONCAT, [head, size - head])

    def _describe(self, ref: Refinement) -> str:
        sep = "×" if ref.kind == PRODUCT else "+"
        return sep.join(str(self._size[c]) for c in ref.children)


class StructureConflict(Exception):
    """Two views of one axis class cannot both hold."""


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
