"""Rotary position embeddings recognised as one subgraph, so the dims they rotate can move by rotations.

Op by op, ``x·cos + rotate_half(x)·sin`` ties the last axis of ``x`` (``m`` dims
inside a head) to ``cos`` and ``sin``, which are made from a constant
(``inv_freq``, not saved with the model): the dims are pinned. As a whole, with
``rotate_half(x) = cat(−x[…, h:], x[…, :h])`` (``h = m/2``) and ``cos``, ``sin``
taken of ``cat(f, f)`` (the same frequencies in both halves, as ``transformers``
writes them), the subgraph rotates every pair of dims ``(i, i + h)`` by the
angle ``f_i`` of the position:

    out_i = x_i cos f_i − x_{i+h} sin f_i,    out_{i+h} = x_{i+h} cos f_i + x_i sin f_i.

A map ``R`` made of one 2×2 rotation ``R(φ_i)`` per pair commutes with it
(rotations of one plane commute), and so does nothing else in general (the
frequencies differ): ``rope(R x) = R rope(x)``. With ``q`` and ``k`` moved by the
same ``R`` (their dims are one space, contracted by ``q·k``) the scores
``rope(Rq)·rope(Rk) = rope(q)·rope(k)`` stay the same. So the subgraph passes the
axes of ``x`` to its result unchanged and limits the last one to the group
``rotary`` (``fxfuse.frontend.groups.ROTARY``); every tensor in between is
internal and pinned.

Soundness rests on matching exactly (``find``): the slices at ``h`` of an even
last dim, the negated upper half first in the ``cat``, ``cos`` and ``sin`` reached
from ``aten.cos``/``aten.sin`` of one ``cat([f, f], -1)`` through casts, unsqueezes
and products with a number only, and every intermediate read only inside the
subgraph. Anything else is analysed op by op, which pins the dims as before.
Recognised only where whole groups are asked for (``compile --groups full``):
with permutations alone the dims stay pinned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .groups import ROTARY
from .kinds import kind, walk
from .trace import ASSERT_METADATA as ASSERT, call_op as _op, node_shape as _shape

PATTERN_OP = "pattern.rotary_embedding"
PASS_THROUGH = ("aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten._to_copy.default",
                "aten.alias.default", "aten.clone.default", "aten.contiguous.default", "aten.unsqueeze.default")


@dataclass(frozen=True)
class Rotary:
    """One matched subgraph ``out = x·cos + rotate_half(x)·sin``: its input, its result and the nodes it owns."""

    x: torch.fx.Node
    out: torch.fx.Node
    nodes: frozenset  # every node it owns (not x, not cos or sin)

    @property
    def name(self) -> str:
        return self.out.name


def _last(dim: Any, rank: int) -> bool:
    return isinstance(dim, int) and dim % rank == rank - 1


def _halves_of(n: Any, fn: str) -> bool:
    """Whether ``n`` is ``fn(cat([f, f], -1))`` reached through casts, unsqueezes and products with a number."""
    while isinstance(n, torch.fx.Node):
        op = _op(n)
        if op in PASS_THROUGH:
            n = n.args[0]
            continue
        if op == "aten.mul.Tensor" and len(n.args) == 2 and isinstance(n.args[1], (int, float)):
            n = n.args[0]
            continue
        if op != fn:
            return False
        cat = n.args[0]
        if _op(cat) != "aten.cat.default":
            return False
        parts = cat.args[0]
        shape = _shape(cat)
        dim = cat.args[1] if len(cat.args) > 1 else 0
        return (shape is not None and len(parts) == 2 and parts[0] is parts[1] and _last(dim, len(shape)))
    return False


def _slice(n: Any, x: Any, start: int, end: int, rank: int) -> bool:
    if _op(n) != "aten.slice.Tensor" or n.args[0] is not x:
        return False
    args = list(n.args) + [0, None, None, 1][len(n.args) - 1:]
    dim, lo, hi, step = args[1:5]
    return _last(dim, rank) and lo == start and (hi or 0) >= end and (step or 1) == 1


def _match_at(add: torch.fx.Node) -> Rotary | None:
    if _op(add) != "aten.add.Tensor" or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    muls = add.args
    if not all(_op(m) == "aten.mul.Tensor" and len(m.args) == 2 for m in muls):
        return None
    for plain, rotated in (muls, muls[::-1]):
        for x, cos in (plain.args, plain.args[::-1]):
            for cat, sin in (rotated.args, rotated.args[::-1]):
                got = _check(add, plain, rotated, x, cos, cat, sin)
                if got is not None:
                    return got
    return None


def _check(add, plain, rotated, x, cos, cat, sin) -> Rotary | None:
    shape = _shape(x)
    if shape is None or _shape(add) != shape or not shape or shape[-1] % 2 or shape[-1] < 2:
        return None
    rank, m = len(shape), shape[-1]
    h = m // 2
    if _op(cat) != "aten.cat.default" or not _last(cat.args[1] if len(cat.args) > 1 else 0, rank):
        return None
    parts = cat.args[0]
    if len(parts) != 2 or _op(parts[0]) != "aten.neg.default":
        return None
    upper, lower = parts[0].args[0], parts[1]
    if not (_slice(upper, x, h, m, rank) and _slice(lower, x, 0, h, rank)):
        return None
    if not (_halves_of(cos, "aten.cos.default") and _halves_of(sin, "aten.sin.default")):
        return None
    for t in (cos, sin):  # broadcast over x, never wider
        ts = _shape(t)
        if ts is None or len(ts) > rank or any(a not in (1, b) for a, b in zip(ts[::-1], shape[::-1])):
            return None
    owned = {plain, rotated, cat, parts[0], upper, lower, add}
    inside = owned - {add}
    for n in inside:  # every intermediate is read only inside the subgraph (assertions aside)
        if any(u not in owned and _op(u) != ASSERT for u in n.users):
            return None
    return Rotary(x, add, frozenset(owned))


def find(graph: torch.fx.Graph) -> dict[torch.fx.Node, Rotary]:
    """Every rotary subgraph of ``graph``: ``{owned node: its match}``."""
    owner: dict[torch.fx.Node, Rotary] = {}
    for node in graph.nodes:
        if node in owner:
            continue
        match = _match_at(node)
        if match is not None and not (match.nodes & owner.keys()):
            owner.update({n: match for n in match.nodes})
    return owner


@kind("rotary", "A rotary position embedding x·cos + rotate_half(x)·sin, recognised by fxfuse.frontend.rotary: the "
      "result takes the axes of x, whose last axis (the dims inside a head) may move by one 2×2 rotation per "
      f"frequency pair (i, i + m/2). Named on the pseudo-op {PATTERN_OP}; recognised with --groups full only.")
def rotary(ctx) -> None:
    """Not applied op by op: ``walk_rotary`` gives the matched subgraph its axes."""


@walk("rotary")
def walk_rotary(walker, call) -> None:
    """A node owned by a rotary match: internal nodes get fresh pinned axes; the result takes ``x``'s axes, its last
    limited to ``rotary``."""
    node, val = call.node, call.val
    match = walker.rotary[node]
    if node is not match.out:
        walker.env[node] = walker.fresh(val, f"inside the rotary embedding at {match.name}")
        return
    atoms = walker.env.get(match.x)
    walker.env[node] = atoms
    last = walker.atoms_flat(atoms)[-1:] if atoms is not None else []
    why = f"rotary embedding at {walker.names.get(node, node.name)}: one 2×2 rotation per frequency pair"
    walker.limits += [(a, ROTARY, why) for a in last]
