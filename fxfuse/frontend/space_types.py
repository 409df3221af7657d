"""The result of the space analysis: immutable records handed to every later stage.

An ``Analysis`` holds the traced model, its ``spaces`` (leaf classes of axes that touch a
parameter or buffer: size, member axes, pinned status and reason, parent space when nested),
a ``ParamLayout`` per parameter/buffer (one ``AxisExpr`` per dim over spaces), the ops that had
no usable rule, and each space's symmetry group (``fxfuse.frontend.groups``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.exprs import AxisExpr, expr_leaves, expr_text
from .groups import SpaceGroup
from .trace import PARAMETER, TracedModel


@dataclass(frozen=True)
class ParamLayout:
    """A parameter or persistent buffer: its axes as expressions over spaces."""

    name: str
    kind: str  # "parameter" or "buffer"
    shape: tuple[int, ...]
    axes: tuple[AxisExpr, ...]
    aliases: tuple[str, ...] = ()
    consumed: tuple[bool, ...] = ()  # per axis: read by a contraction (its units are summed over)


@dataclass(frozen=True)
class Member:
    """Space ``s`` occurs in dim ``axis`` of ``param``; ``path`` locates it inside a structured axis."""

    param: str
    axis: int
    path: str = ""


@dataclass(frozen=True)
class Space:
    id: int
    name: str
    size: int
    free: bool
    reason: str | None
    members: tuple[Member, ...]
    roles: tuple[str, ...] = ()
    structure: str = ""
    parent: int | None = None


@dataclass(frozen=True)
class UnruledOp:
    op: str
    node: str
    module: str
    reason: str


@dataclass(frozen=True)
class UnfitRule:
    """A rule that was tried on ``nodes`` nodes of the graph (ops ``ops``) and fitted none of them."""

    rule: str  # its source, ``file.yaml:N``
    ops: tuple[str, ...]
    nodes: int
    reason: str

    @property
    def note(self) -> str:
        return (f"rule {self.rule} fits no node of the model ({', '.join(self.ops)} at {self.nodes} node"
                f"{'s' if self.nodes > 1 else ''}, all pinned): {self.reason}")


@dataclass(frozen=True)
class Analysis:
    traced: TracedModel
    spaces: tuple[Space, ...]
    layouts: Mapping[str, ParamLayout]
    unruled: tuple[UnruledOp, ...]
    rule_files: tuple[str, ...]
    node_axes: Mapping[str, Any] = field(default_factory=dict)
    unfit_rules: tuple[UnfitRule, ...] = ()  # rules that fitted no node they were tried on
    nesting_notes: tuple[str, ...] = ()  # spaces whose nesting was cut to one level
    groups: Mapping[int, SpaceGroup] = field(default_factory=dict)  # the maps each space commutes with
    summed: Mapping[int, str] = field(default_factory=dict)  # spaces an op keeps under orthogonal maps only as a sum
    scales: frozenset[str] = frozenset()  # uniform per-channel scales: left alone by non-permutation maps
    pattern_notes: tuple[str, ...] = ()  # subgraphs that looked like a recognised pattern and were not
    probes: Mapping[str, Any] = field(default_factory=dict)  # activations no node holds (fxfuse.frontend.experts.Probe)

    @property
    def notes(self) -> tuple[str, ...]:
        """Facts a user should see: rules that fit no node, and what the analysis restricted, and why."""
        return tuple(u.note for u in self.unfit_rules) + self.nesting_notes + self.pattern_notes

    def group(self, sid: int) -> SpaceGroup:
        return self.groups.get(sid) or SpaceGroup("perm", "")

    @property
    def free_spaces(self) -> tuple[Space, ...]:
        return tuple(s for s in self.spaces if s.free)

    @property
    def parents(self) -> dict[int, int]:
        """``{nested space: parent space}`` (inside-head dims under their heads)."""
        return {s.id: s.parent for s in self.spaces if s.parent is not None}

    def layout_of(self, name: str) -> ParamLayout:
        """The layout of a parameter or buffer by any of its state-dict names (tied names included)."""
        if name in self.layouts:
            return self.layouts[name]
        for layout in self.layouts.values():
            if name in layout.aliases:
                return layout
        raise KeyError(name)

    def space(self, sid: int) -> Space:
        return self.spaces[sid]

    @property
    def coverage(self) -> float:
        """Share of parameter elements that lie on at least one free space of size > 1."""
        free = {s.id for s in self.spaces if s.free and s.size > 1}
        total = movable = 0
        for lay in self.layouts.values():
            if lay.kind != PARAMETER:
                continue
            n = 1
            for d in lay.shape:
                n *= d
            total += n
            if any(leaf.space in free for ax in lay.axes for leaf in expr_leaves(ax)):
                movable += n
        return movable / total if total else 0.0

    def report(self) -> dict:
        """A JSON-serialisable summary: spaces, pins, unruled ops, coverage (``fxfuse.frontend.coverage``)."""
        from .coverage import full_coverage, pinned_inner

        model = self.traced.module
        n_params = sum(p.numel() for p in model.parameters())
        return {
            "model": type(model).__name__,
            "parameters": n_params,
            "coverage": round(self.coverage, 6),
            "full_coverage": round(full_coverage(self), 6),
            "pinned_inner": [{"id": p.id, "name": p.name, "size": p.size, "reason": p.reason, "params": p.params}
                             for p in pinned_inner(self)],
            "spaces": [
                {
                    "id": s.id, "name": s.name, "size": s.size, "free": s.free,
                    "reason": s.reason, "structure": s.structure, "roles": list(s.roles), "parent": s.parent,
                    "group": self.group(s.id).name, "group_limited_by": self.group(s.id).limited_by,
                    "members": [[m.param, m.axis] + ([m.path] if m.path else []) for m in s.members],
                }
                for s in self.spaces
            ],
            "pinned": [{"id": s.id, "name": s.name, "reason": s.reason} for s in self.spaces if not s.free],
            "unruled_ops": [
                {"op": u.op, "node": u.node, "module": u.module, "reason": u.reason} for u in self.unruled
            ],
            "layouts": {n: [expr_text(a) for a in lay.axes] for n, lay in self.layouts.items()},
            "rule_files": list(self.rule_files),
            "unfit_rules": [{"rule": u.rule, "ops": list(u.ops), "nodes": u.nodes, "reason": u.reason}
                            for u in self.unfit_rules],
            "notes": list(self.notes),
        }
