"""What planning hands on: blocks of spaces, one transport map per space, a model's alignment.

A *block* is a free space with the spaces nested under it (``fxfuse.planner.plan``);
``_pairwise`` solves a block's nested spaces for every pair of parent units
(``|H|²`` small assignments), for the permutation and the group solvers alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from .solvers import assignment


@dataclass(frozen=True)
class TransportMap:
    """How space ``space`` of a source model maps into the target basis.

    ``perm``: a permutation, ``(n,)`` or, nested, ``(n_parent, n)``: target unit
    ``j`` takes source unit ``perm[j]``. ``matrix``: ``A`` (``n_t × n_s``, rows sum
    to 1), soft or, with ``matching``, a hard many-to-one map between spaces of
    different sizes (``fxfuse.core.solvers.matching``). ``pair_perms``: for a nested
    space under a ``matrix`` parent, the inner matching of every parent pair,
    ``(n_parent_t, n_parent_s, n)``. ``similarity_identity`` is ``None`` where the
    sizes differ (there is no identity).
    """

    space: int
    perm: torch.Tensor | None = None
    matrix: torch.Tensor | None = None
    pair_perms: torch.Tensor | None = None
    similarity_identity: float | None = 0.0
    similarity_aligned: float = 0.0
    matching: bool = False
    q: torch.Tensor | None = None  # a group map (n × n), or one per parent unit (n_parent × n × n): fxfuse.planner.groupmaps
    # between widths: a stretched orthonormal embedding (n_t × n_s, fxfuse.planner.procrustes.embedding)
    solver: str = ""

    @property
    def embeds(self) -> bool:
        """A group map between different widths: ``q`` is ``√(n_t/n_s)·Q̃``, ``Q̃`` with orthonormal columns or rows."""
        return self.q is not None and self.q.dim() == 2 and self.q.shape[0] != self.q.shape[1]

    @property
    def stretch(self) -> float:
        """``√(n_t/n_s)``: what an embedding's orthonormal ``Q̃`` is multiplied by (1 for every other map)."""
        return (self.q.shape[0] / self.q.shape[1]) ** 0.5 if self.embeds else 1.0

    @property
    def hard(self) -> bool:
        """The aligned model computes exactly what the source does: a permutation, a group map, an embedding into
        a wider target (not into a narrower one: that projects the source)."""
        return self.matrix is None and not (self.embeds and self.q.shape[0] < self.q.shape[1])

    @property
    def kind(self) -> str:
        if self.q is not None:
            return "embedding" if self.embeds else "group"
        return "permutation" if self.hard else "matching" if self.matching else "soft"

    def descent_value(self) -> torch.Tensor | None:
        """What the coordinate descent moves other tensors by: a perm, a matching's matrix, or pair perms."""
        if self.q is not None:
            return self.q / self.stretch if self.embeds else self.q
        if self.perm is not None:
            return self.perm
        if self.matching:
            return self.matrix if self.matrix is not None else self.pair_perms
        return None


@dataclass(frozen=True)
class Alignment:
    """Every map of one source model; ``passes`` of coordinate descent."""

    maps: Mapping[int, TransportMap]
    passes: int
    cost: str
    solver: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    seconds: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    """Per block (its root space): ``products_s`` (the cost model's similarities), ``assign_s`` (the
    rest of its solves: assignments, Procrustes) and ``solves``, over every pass."""

    @property
    def hard(self) -> bool:
        return all(m.hard for m in self.maps.values())

    def perms(self) -> dict[int, torch.Tensor]:
        return {s: m.perm for s, m in self.maps.items() if m.perm is not None}


@dataclass(frozen=True)
class Block:
    root: int
    children: tuple[int, ...]
    root_free: bool


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
