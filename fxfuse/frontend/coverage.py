"""How much of a model can move: coverage figures and the pinned inner spaces.

Some axes are pinned by nature and no rule could free them: the interface
(graph inputs and outputs), kernel taps (a convolution's window), spatial
positions of a convolution's output grid and vocabularies (an embedding's rows,
looked up by id); call them *natural*. Every other pinned space of size > 1 is
an *inner* pin: a symmetry the rules do not (or cannot) use, listed with its
reason.

* ``coverage``: share of parameter elements on at least one free space;
* ``full_coverage``: share of parameter elements whose every axis is free,
  natural or of size 1 (a model whose attention heads are pinned scores less).

The functions take an ``fxfuse.frontend.spaces.Analysis`` (or one of its spaces) and read
only its spaces and layouts: ``Analysis.report`` builds on this module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.exprs import expr_leaves
from .trace import PARAMETER

# (what, axis names of the shipped rules, op names containing one of these): an axis that a
# rule's signature puts on one tensor only is pinned with the reason _SEEN_ONCE matches
NATURAL = (
    ("kernel taps", ("k", "kh", "kw", "kd"), ("conv",)),
    ("spatial positions", ("l", "ol", "h", "w", "oh", "ow", "d", "od"), ("conv", "pool")),
    ("vocabulary", ("vocab",), ("embedding",)),
)
_SEEN_ONCE = re.compile(r"axis '(\w+)' of (\S+) appears on one tensor only")


def natural_pin(space) -> str | None:
    """What pins a space by nature (``"interface"``, ``"kernel taps"``, ``"spatial positions"``,
    ``"vocabulary"``), or ``None`` for a free space or an inner pin."""
    reason = space.reason or ""
    if space.free:
        return None
    if reason.startswith("interface:"):
        return "interface"
    seen_once = _SEEN_ONCE.match(reason)
    if seen_once:
        axis, op = seen_once.groups()
        for what, axes, ops in NATURAL:
            if axis in axes and any(o in op for o in ops):
                return what
    return None


@dataclass(frozen=True)
class PinnedSpace:
    id: int
    name: str
    size: int
    reason: str
    params: int  # parameter elements that lie on it


def pinned_inner(analysis) -> tuple[PinnedSpace, ...]:
    """Pinned spaces of size > 1 that are not natural, largest first (by parameter elements on them)."""
    out = []
    for s in analysis.spaces:
        if s.free or s.size <= 1 or natural_pin(s) is not None:
            continue
        params = {m.param for m in s.members if analysis.layouts[m.param].kind == PARAMETER}
        out.append(PinnedSpace(s.id, s.name, s.size, s.reason or "", sum(_numel(analysis, p) for p in params)))
    return tuple(sorted(out, key=lambda p: (-p.params, p.id)))


def full_coverage(analysis) -> float:
    """Share of parameter elements whose every axis is free, natural or of size 1."""
    ok = {s.id for s in analysis.spaces if s.free or s.size <= 1 or natural_pin(s) is not None}
    total = movable = 0
    for lay in analysis.layouts.values():
        if lay.kind != PARAMETER:
            continue
        n = _numel(analysis, lay.name)
        total += n
        if all(leaf.space in ok for ax in lay.axes for leaf in expr_leaves(ax)):
            movable += n
    return movable / total if total else 0.0


def _numel(analysis, name: str) -> int:
    n = 1
    for d in analysis.layouts[name].shape:
        n *= d
    return n
