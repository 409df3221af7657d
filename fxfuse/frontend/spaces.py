"""Space analysis: which parameter axes must share one permutation.

``analyze_traced(traced, rules)`` walks the graph once, in order, with an
``AxisStore``: placeholders get fresh atoms (graph inputs and non-persistent
buffers pinned), every op's rule ties its atoms, outputs are pinned. The result
is an immutable ``Analysis``:

* ``spaces``: leaf classes that touch a parameter or buffer, each ``Space``
  with its size, member axes and pinned status;
* ``layouts``: for every parameter/buffer, one ``AxisExpr`` per dimension,
  a tree of ``Leaf(space)``, ``Product`` (row-major, heads × head_dim) and
  ``Concat`` (segments) nodes;
* ``unruled``: ops that had no rule (their axes were pinned: fail closed).

A size that depends on the data (an unbacked symbol of ``torch.export``: the
number of tokens routed to an expert) cannot be known: its axis is a pinned
atom of size 0, a kind sees it as ``None``, and an op whose rule then cannot
place its axes pins every axis it reads or writes, with that reason.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch

from . import experts
from ..core.axes import CONCAT, PRODUCT, AxisStore, Refinement
from ..core.errors import StrictError
from ..core.exprs import AxisExpr, Concat, Leaf, Product, expr_leaves, expr_text  # noqa: F401  (also imported from here)
from .groups import INVERTIBLE, NAMES, ORTHO, PERM, SpaceGroup, meet, node_limits
from .all_kinds import KINDS
from .kinds import RuleMismatch
from .rules import Rule, RuleSet, load_rules
from ..core.schema import check_rule
from .trace import BUFFER, CONSTANT, PARAMETER, USER_INPUT, TracedModel, trace
from .trace import op_name as _op_name

# ---------------------------------------------------------------- results


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


# ---------------------------------------------------------------- the analyser


def analyze(model: torch.nn.Module, example_args: tuple, rules: RuleSet | None = None, strict: bool = False,
            example_kwargs: Mapping[str, Any] | None = None, pins: Mapping[str, str] | None = None) -> Analysis:
    """Trace ``model`` on ``example_args`` and find its permutation spaces."""
    return analyze_traced(trace(model, example_args, example_kwargs), rules, strict, pins)


def analyze_traced(traced: TracedModel, rules: RuleSet | None = None, strict: bool = False,
                   pins: Mapping[str, str] | None = None) -> Analysis:
    """Run the rules over ``traced``'s graph. ``pins`` maps a param axis ``"name:axis"`` to a reason."""
    rules = rules if rules is not None else load_rules()
    walker = _Walker(traced, rules)
    walker.run()
    if strict and walker.unruled:
        u = walker.unruled[0]
        more = f" (and {len(walker.unruled) - 1} more)" if len(walker.unruled) > 1 else ""
        raise StrictError(f"no usable rule for {u.op} at node {u.node} ({u.module or 'top level'}){more}: {u.reason}")
    return walker.result(pins or {})


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self___", "")


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _dim(size: Any) -> int | None:
    """A dim's size, ``None`` where it depends on the data (an unbacked symbol such as ``u0``)."""
    if isinstance(size, int):
        return size
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return None if free_unbacked_symbols(size) else int(size)


def _data_dependent(val: Any) -> list[str]:
    """The data-dependent sizes of a node's value (a tensor or a list of them), as text."""
    if _is_tensor(val):
        return [str(s) for s in val.shape if _dim(s) is None]
    if isinstance(val, (list, tuple)):
        return [d for v in val for d in _data_dependent(v)]
    return []


# kinds whose output is a view of their one tensor argument (a parameter stays a parameter)
VIEW_KINDS = ("reshape", "transpose", "permute", "split", "slice", "select", "expand", "ignore")


class _Walker:
    """Walks one graph (and nested subgraphs) tying atoms; produces an ``Analysis``."""

    def __init__(self, traced: TracedModel, rules: RuleSet):
        self.traced, self.rules = traced, rules
        self.store = AxisStore()
        self.env: dict[torch.fx.Node, Any] = {}
        self.unruled: list[UnruledOp] = []
        self.param_atoms: dict[str, tuple[str, list[int]]] = {}  # state-dict name -> (kind, atoms)
        self.param_read: dict[str, bool] = {}  # state-dict name -> whether some node reads it
        self.canonical = {alias: name for name, aliases in traced.aliases.items() for alias in aliases}
        self.rows: list[tuple[int, int, int, int, int]] = []  # (E, P, X, row, selected output atom)
        self.slice_rests: list[tuple[int, str]] = []  # (the part of an axis a partial slice leaves out, node)
        self.param_view: dict[torch.fx.Node, str] = {}  # a parameter, or a view of one -> its state-dict name
        self.param_uses: list[tuple[str, int, bool]] = []  # (name, atom, read by a contraction)
        self.checked: set[tuple[int, str]] = set()  # (id(rule), op) checked against the op's schema
        self.fits: dict[int, list] = {}  # id(rule) -> [rule, ops seen, nodes fitted, first misfit reason]
        self.limits: list[tuple[int, int, str]] = []  # (atom, group level, why): see fxfuse.frontend.groups
        self.scales: set[str] = set()
        self._values = dict(traced.module.state_dict(keep_vars=False))
        self._uniform: dict[str, bool] = {}
        self.prefix = ""  # where the walk is: "" at top level, "submodule/" inside a higher-order op's body
        self.names: dict[torch.fx.Node, str] = {}  # node -> its name in ``Analysis.node_axes``
        self.experts: dict[torch.fx.Node, Any] = {}  # node -> the routed-experts match that owns it (fxfuse.frontend.experts)
        self.expert_misses: dict[torch.fx.Node, str] = {}  # expert product outside every match -> why
        self.probes: dict[str, Any] = {}  # name -> experts.Probe over atoms
        self.at = ""  # the node being walked, for the reason of a data-dependent size

    def uniform(self, name: str) -> bool:
        """Whether parameter ``name`` holds one value everywhere (a per-channel scale folded away)."""
        if name not in self._uniform:
            t = self._values.get(name)
            self._uniform[name] = bool(t is not None and t.is_floating_point() and t.numel() > 0 and not t.is_meta
                                       and torch.equal(t, torch.full_like(t, float(t.reshape(-1)[0]))))
        return self._uniform[name]

    # -- values and atoms
    def fresh(self, val: Any, pinned: str | None = None) -> Any:
        if _is_tensor(val):
            sizes = [_dim(s) for s in val.shape]
            unknown = (pinned or f"size {{}} depends on the data{self.at}").format
            return [self.store.new(n, pinned) if n is not None else self.store.new(0, unknown(s))
                    for n, s in zip(sizes, val.shape)]
        if isinstance(val, (list, tuple)):
            return [self.fresh(v, pinned) if _is_tensor(v) else None for v in val]
        return None

    def run(self) -> None:
        self._walk(self.traced.graph_module, top=True)
        self._pin_unread()
        self._resolve_rows()
        self._pin_slice_rests()

    def _pin_unread(self) -> None:
        """Pin the axes of a saved tensor that no node of the graph reads.

        Moving it cannot change the traced function, yet the model may still compute with it
        (through a tensor derived from it and kept outside the state dict, traced as a constant
        instead): fail closed.
        """
        for name, read in self.param_read.items():
            if not read:
                for atom in self.param_atoms[name][1]:
                    self.store.pin(atom, f"'{name}' is read by no op of the graph")

    def _pin_slice_rests(self) -> None:
        """Pin the parts of a sliced axis that no tensor of the graph carries as a whole axis (``pos[:, :T]``
        leaves positions ``T:`` out): the traced function cannot see them move, other input sizes would.
        A tensor that carries the whole sliced axis does not count (conservative: it may be the parameter)."""
        if not self.slice_rests:
            return
        carried = {self.store.find(a) for value in self.env.values() for a in self._atoms_flat(value)}
        for rest, node in self.slice_rests:
            for leaf in self._leaf_roots(rest):
                if leaf not in carried:
                    self.store.pin(leaf, f"left out by the slice at {node} and read by no op")

    def _resolve_rows(self) -> None:
        """Settle rows taken by ``select`` from a packed axis ``X = (P × E)``, ``P`` pinned.

        If every tensor that carries ``E`` also carries ``P``, and every row of ``P`` was
        selected, then ``E`` may move by a different permutation in each row (the nesting
        argument of heads): ``X`` becomes the concatenation of one segment per row, each
        tied to the selected outputs of that row. Otherwise each output is tied to ``E``.
        """
        store = self.store
        groups: dict[tuple[int, int, int], dict[int, list[int]]] = {}
        for e, p, x, row, out in self.rows:
            groups.setdefault((store.find(e), store.find(p), store.find(x)), {}).setdefault(row, []).append(out)
        if not groups:
            return
        holding = self._tensor_leaf_sets()
        param_roots = {store.find(a) for _, atoms in self.param_atoms.values() for a in atoms}
        for (e, p, x), rows in groups.items():
            ref = store.refinement(x)
            ok = (ref is not None and ref.kind == PRODUCT and [store.find(c) for c in ref.children] == [p, e]
                  and store.refinement(e) is None and store.pinned(p) is not None and store.pinned(e) is None
                  and set(rows) == set(range(store.size(p))) and e not in param_roots
                  and all(p in t for t in holding if e in t))
            if not ok:
                for outs in rows.values():
                    for out in outs:
                        store.unify(e, out, "select of a row")
                continue
            segments = [store.new(store.size(e)) for _ in range(store.size(p))]
            store._refine[x] = Refinement(CONCAT, tuple(segments))
            for row, outs in rows.items():
                for out in outs:
                    store.unify(segments[row], out, "row of a packed axis")

    def _tensor_leaf_sets(self) -> list[set[int]]:
        """For every tensor of the graph (and every parameter), the set of leaf classes it carries."""
        sets: list[set[int]] = []
        values = list(self.env.values()) + [atoms for _, atoms in self.param_atoms.values()]
        for value in values:
            groups = value if value and (isinstance(value[0], list) or value[0] is None) else [value]
            for atoms in groups:
                if atoms:
                    sets.append({leaf for a in atoms for leaf in self._leaf_roots(a)})
        return sets

    def _piece_leaf_counts(self) -> list[Counter[int]]:
        """For every piece of every tensor (concatenations split into their segments), how often it
        carries each leaf class."""
        out: list[Counter[int]] = []
        values = list(self.env.values()) + [atoms for _, atoms in self.param_atoms.values()]
        for value in values:
            groups = value if value and (isinstance(value[0], list) or value[0] is None) else [value]
            for atoms in groups:
                if not atoms:
                    continue
                combos: set[tuple[int, ...]] = {()}
                for a in atoms:
                    combos = {c + s for c in combos for s in self._segments(a)}
                out += [Counter(c) for c in combos]
        return out

    def _segments(self, atom: int) -> set[tuple[int, ...]]:
        """The leaf classes of each segment of an axis: one tuple per way through its concatenations."""
        root = self.store.find(atom)
        ref = self.store.refinement(root)
        if ref is None:
            return {(root,)}
        if ref.kind != PRODUCT:
            return {s for c in ref.children for s in self._segments(c)}
        combos: set[tuple[int, ...]] = {()}
        for c in ref.children:
            combos = {tuple(sorted(x + s)) for x in combos for s in self._segments(c)}
        return combos

    def _walk(self, gm: torch.fx.GraphModule, top: bool, inputs: list | None = None) -> list:
        graph = gm.graph
        env = self.env
        pattern = self.rules.lookup(experts.PATTERN_OP)
        if pattern is not None and pattern.kind == "routed_experts":
            found = experts.find(graph)
            self.experts.update(found.owner())
            self.expert_misses.update(found.misses)
        outputs: list = []
        k = 0
        for node in graph.nodes:
            val = node.meta.get("val")
            self.names[node] = self.prefix + node.name
            self.at = f" at {self.names[node]}"
            if node.op == "placeholder":
                if not top:
                    env[node] = inputs[k] if inputs is not None and k < len(inputs) else self.fresh(val)
                    k += 1
                    continue
                ph = self.traced.placeholders.get(node.name)
                kind = ph.kind if ph else USER_INPUT
                if kind == USER_INPUT:
                    env[node] = self.fresh(val, f"interface: graph input '{node.name}'")
                elif kind == CONSTANT or (kind == BUFFER and not ph.persistent):
                    env[node] = self.fresh(val, f"constant tensor '{ph.target or node.name}' is not saved with the model")
                else:
                    env[node] = self.fresh(val)
                    if env[node] is None:
                        continue
                    # torch.export gives each name of a tied tensor its own placeholder: one tensor, one set of atoms
                    canon = self.canonical.get(ph.target, ph.target)
                    self.param_view[node] = canon
                    self.param_read[canon] = self.param_read.get(canon, False) or bool(node.users)
                    if canon in self.param_atoms:
                        for a, b in zip(self.param_atoms[canon][1], env[node]):
                            self.store.unify(a, b, f"tied tensor {canon} = {ph.target}")
                    else:
                        self.param_atoms[canon] = (kind, env[node])
            elif node.op == "get_attr":
                env[node] = self.fresh(val, f"constant '{node.target}'")
            elif node.op == "call_function":
                self._call(node, val)
            elif node.op == "output":
                outputs = list(torch.utils._pytree.tree_leaves(node.args[0]))
                if top:
                    for leaf in outputs:
                        if isinstance(leaf, torch.fx.Node):
                            for atom in self._atoms_flat(env.get(leaf)):
                                self.store.pin(atom, f"interface: graph output '{leaf.name}'")
                return [env.get(x) if isinstance(x, torch.fx.Node) else None for x in outputs]
            else:
                env[node] = self.fresh(val)
        return outputs

    def _atoms_flat(self, axes: Any) -> list[int]:
        if axes is None:
            return []
        if axes and isinstance(axes[0], list) or (axes and axes[0] is None):
            return [a for sub in axes if sub is not None for a in sub]
        return list(axes)

    def _call(self, node: torch.fx.Node, val: Any) -> None:
        env = self.env
        if node in self.experts:
            self._routed_experts(node, val)
            return
        if node.target is operator.getitem:
            src, idx = node.args
            axes = env.get(src)
            if isinstance(axes, list) and isinstance(idx, int) and 0 <= idx < len(axes) and (
                    axes[idx] is None or isinstance(axes[idx], list)):
                env[node] = axes[idx]
                if src in self.param_view:
                    self.param_view[node] = self.param_view[src]
            else:
                env[node] = self.fresh(val, f"getitem of an untracked value at {node.name}")
            return
        out = self.fresh(val)
        env[node] = out
        inputs = [a for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]
        touches = self._atoms_flat(out) or any(self._atoms_flat(env.get(a)) for a in inputs)
        if not touches:
            return  # shape arithmetic, assertions on scalars: no tensor axes involved
        op = _op_name(node.target)
        rule = self.rules.lookup(op)
        if rule is None:
            self._fail_closed(node, op, inputs, "no rule for this op")
            return
        if op in rule.ops and rule.origin[0] and (id(rule), op) not in self.checked:
            check_rule(rule, *rule.origin, ops=(op,))  # a custom op may register after its rule file was read
            self.checked.add((id(rule), op))
        if node in self.expert_misses:  # pin the expert axis with the reason before the op's rule does
            for atom in (env.get(node.args[1]) or [])[:1]:
                self.store.pin(atom, f"{self.expert_misses[node]} at {node.name}")
        ctx = OpContext(self, node, rule, op, out, val)
        before = set(self.store.touched)
        self.store.touched = set()  # what this op's rule relates
        fit = self.fits.setdefault(id(rule), [rule, {}, 0, None])
        fit[1][op] = fit[1].get(op, 0) + 1
        try:
            KINDS[rule.kind].apply(ctx)
        except (RuleMismatch, TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
            self.store.touched = before
            unknown = _data_dependent(val) + [d for x in inputs for d in _data_dependent(x.meta.get("val"))]
            if unknown:  # not a misfit: no rule can place an axis whose size it cannot know
                self._pin_touched(node, op, inputs, f"size {unknown[0]} depends on the data ({rule.source}: {exc})")
                return
            # a rule that does not fit this node fails closed like a missing one
            self._fail_closed(node, op, inputs, f"rule {rule.source} does not fit: {exc}")
            fit[3] = fit[3] or f"{exc} (first at {node.name})"
            return
        related = self.store.touched
        self.store.touched = before | related
        self._pin_unrelated_integers(ctx, related)
        fit[2] += 1
        for atom in self._atoms_flat(out):
            if atom not in self.store.touched and self.store.size(atom) > 1:
                self.store.pin(atom, f"axis created by {op} at {node.name}")
        try:
            self.limits += node_limits(ctx, self)
        except (RuleMismatch, TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
            why = f"{op} at {node.name} ({rule.source}): group not inferred ({exc})"
            self.limits += [(a, PERM, why) for a in self._atoms_flat(out)]
            self.limits += [(a, PERM, why) for x in inputs for a in self._atoms_flat(env.get(x))]
        if rule.kind in VIEW_KINDS:
            tensors = ctx.tensor_args()
            if len(tensors) == 1 and tensors[0][1] in self.param_view:
                self.param_view[node] = self.param_view[tensors[0][1]]

    def _routed_experts(self, node: torch.fx.Node, val: Any) -> None:
        """A node owned by a routed-experts match: fresh axes; at its last node, the pattern's signature.

        The kind (``fxfuse.frontend.experts.routed_experts``) ties the subgraph's inputs and
        result; every axis of the nodes it owns that it did not tie is pinned. A
        signature that does not fit pins every axis the subgraph reads or writes.
        """
        store, env = self.store, self.env
        env[node] = self.fresh(val)
        match = self.experts[node]
        if node is not match.out:
            return
        rule = self.rules.lookup(experts.PATTERN_OP)
        fit = self.fits.setdefault(id(rule), [rule, {}, 0, None])
        fit[1][experts.PATTERN_OP] = fit[1].get(experts.PATTERN_OP, 0) + 1
        ctx = OpContext(self, node, rule, experts.PATTERN_OP, env[node], val)
        before, store.touched = set(store.touched), set()
        try:
            KINDS[rule.kind].apply(ctx)
        except (RuleMismatch, TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
            store.touched = before
            reason = f"rule {rule.source} does not fit: {exc}"
            fit[3] = fit[3] or f"{exc} (first at {node.name})"
            self._fail_closed(node, experts.PATTERN_OP, list(node.all_input_nodes), reason)
            for n in match.nodes:
                for x in (n, *n.all_input_nodes):
                    for atom in self._atoms_flat(env.get(x)):
                        store.pin(atom, f"{reason}: {experts.PATTERN_OP} at {node.name}")
            return
        related = {store.find(a) for a in store.touched}
        store.touched = before | store.touched
        fit[2] += 1
        for n in match.nodes:
            for atom in self._atoms_flat(env.get(n)):
                if store.size(atom) > 1 and store.find(atom) not in related:
                    store.pin(atom, f"inside routed experts {match.name}")

    def _pin_unrelated_integers(self, ctx: "OpContext", related: set[int]) -> None:
        """Pin the axes of integer (or boolean) arguments that the op's rule neither tied nor pinned.

        Such a tensor's values may be positions (an index buffer gathering rows of a table):
        moving its axes on their own changes what the op reads. A rule that relates an axis
        (ties it to an output, pins it, declares it free) has said how it moves; an axis it
        leaves alone fails closed.
        """
        store = self.store
        roots = {store.find(a) for a in related}
        for name, value in ctx.tensor_args():
            val = value.meta.get("val")
            if val.is_floating_point() or val.is_complex():
                continue
            for atom in self._atoms_flat(self.env.get(value)):
                if store.size(atom) > 1 and store.find(atom) not in roots:
                    store.pin(atom, f"integer argument '{name}' of {ctx.op} at {ctx.node.name}: its values may "
                                    "be indices and the rule does not relate this axis")

    def _pin_touched(self, node, op: str, inputs, reason: str) -> None:
        """Pin every axis ``node`` reads or writes, with ``reason``: an op the analysis cannot place."""
        module = _module_path(node)
        why = f"{reason}: {op} at {node.name}" + (f" ({module})" if module else "")
        for atoms in [self.env.get(a) for a in inputs] + [self.env.get(node)]:
            for atom in self._atoms_flat(atoms):
                self.store.pin(atom, why)

    def _fail_closed(self, node, op: str, inputs, reason: str) -> None:
        module = _module_path(node)
        self.unruled.append(UnruledOp(op, node.name, module, reason))
        why = f"{reason}: {op} at {node.name}" + (f" ({module})" if module else "")
        for a in inputs:
            for atom in self._atoms_flat(self.env.get(a)):
                self.store.pin(atom, why)
        for atom in self._atoms_flat(self.env.get(node)):
            self.store.pin(atom, why)

    # -- result
    def result(self, pins: Mapping[str, str]) -> Analysis:
        store = self.store
        aliases = self.traced.aliases
        for key, reason in pins.items():
            name, _, axis = key.rpartition(":")
            if name in self.param_atoms:
                store.pin(self.param_atoms[name][1][int(axis)], reason)
        ids: dict[int, int] = {}
        members: dict[int, list[Member]] = {}
        first_param: dict[int, str] = {}

        def build(atom: int, pname: str, axis: int, path: str) -> AxisExpr:
            root = store.find(atom)
            ref = store.refinement(root)
            if ref is None:
                sid = ids.setdefault(root, len(ids))
                members.setdefault(sid, []).append(Member(pname, axis, path))
                first_param.setdefault(sid, f"{pname}:{axis}")
                return Leaf(sid, store.size(root))
            sep = "×" if ref.kind == PRODUCT else "|"
            parts = tuple(build(c, pname, axis, f"{path}{sep}{i}/{len(ref.children)}")
                          for i, c in enumerate(ref.children))
            return (Product if ref.kind == PRODUCT else Concat)(parts, store.size(root))

        uses: dict[tuple[str, frozenset], set[bool]] = {}
        for name, atom, consumed in self.param_uses:
            uses.setdefault((name, frozenset(self._leaf_roots(atom))), set()).add(consumed)
        layouts: dict[str, ParamLayout] = {}
        for name, (kind, atoms) in self.param_atoms.items():
            shape = tuple(store.size(a) for a in atoms)
            axes = tuple(build(a, name, i, "") for i, a in enumerate(atoms))
            # an axis only ever contracted reads its units (a consumer); any other use writes them
            consumed = tuple(uses.get((name, frozenset(self._leaf_roots(a)))) == {True} for a in atoms)
            layouts[name] = ParamLayout(name, kind, shape, axes, aliases.get(name, ()), consumed)
        roots = {sid: root for root, sid in ids.items()}
        spaces = []
        for sid in range(len(ids)):
            root = roots[sid]
            reason = store.pinned(root)
            size = store.size(root)
            roles = tuple(r for r, _ in Counter(store.roles(root)).most_common())
            structure = _structure(members[sid])
            if size == 1 and reason is None:
                reason = "size 1"
            spaces.append(Space(sid, first_param[sid], size, reason is None, reason,
                                tuple(members[sid]), roles, structure))
        parents, shared = one_level(self._nesting(ids))
        spaces = [replace(s, parent=parents.get(s.id)) for s in spaces]
        notes = tuple(f"s{c} ({spaces[c].name}) could move its own way under each unit of s{p} "
                      f"({spaces[p].name}) but moves by one permutation shared by all of them: nesting is "
                      "planned one level deep" for c, p in sorted(shared.items()))
        node_axes = {self.names[n]: self._node_expr(v, ids) for n, v in self.env.items()}
        unfit = tuple(UnfitRule(rule.source, tuple(ops), sum(ops.values()), reason)
                      for rule, ops, fitted, reason in self.fits.values() if not fitted)
        missed: dict[str, list[str]] = {}
        for n, why in self.expert_misses.items():
            missed.setdefault(why, []).append(self.names[n])
        misses = tuple(f"{why} at {', '.join(at)}: the expert axis stays pinned" for why, at in missed.items())
        return Analysis(self.traced, tuple(spaces), layouts, tuple(self.unruled), self.rules.files, node_axes,
                        unfit, nesting_notes=notes, groups=self._groups(ids, uses), scales=frozenset(self.scales),
                        pattern_notes=misses, probes={name: replace(p, axes=self._node_expr(list(p.axes), ids))
                                                      for name, p in self.probes.items()})

    def _groups(self, ids: dict[int, int], uses: dict) -> dict[int, SpaceGroup]:
        """Each space's group: the meet of the limits of every op on it (``fxfuse.frontend.groups``)."""
        limit: dict[int, tuple[int, str]] = {}
        for atom, level, why in self.limits:
            for leaf in self._leaf_roots(atom):
                if leaf in ids:
                    limit[ids[leaf]] = meet(limit.get(ids[leaf]), (level, why))
        for (name, leaves), kinds in uses.items():
            if len(kinds) > 1:  # both read by a contraction and written: Q and Q^{-T} must agree
                for leaf in leaves:
                    if leaf in ids:
                        limit[ids[leaf]] = meet(limit.get(ids[leaf]), (
                            ORTHO, f"parameter {name} both writes and reads (contracts) the axis"))
        out = {}
        for sid in ids.values():
            level, why = limit.get(sid, (PERM, "no op constrains it"))
            out[sid] = SpaceGroup(NAMES[min(level, INVERTIBLE)], why)
        return out

    def _leaf_roots(self, atom: int) -> list[int]:
        root = self.store.find(atom)
        ref = self.store.refinement(root)
        if ref is None:
            return [root]
        return [leaf for c in ref.children for leaf in self._leaf_roots(c)]

    def _nesting(self, ids: dict[int, int]) -> dict[int, int]:
        """``{child space: parent space}`` where the child may move differently under each parent index.

        In a product ``(heads × head_dim)`` the inside-head permutation may depend on the head
        iff every tensor of the graph that carries ``head_dim`` also carries ``heads``, each once
        in every segment (then the joint move ``(h, d) -> (p(h), p_h(d))`` is one bijection
        applied to whole tensors). A tensor with ``head_dim`` but not ``heads`` (a reduction over
        heads, a per-dim scale broadcast over heads) forces one shared inside permutation, and so
        does a segment that holds either twice (a grouped convolution's weight with ``heads`` on
        its rows and its columns: under which of them would ``head_dim`` move?).
        """
        store = self.store
        candidates: dict[int, list[int]] = {}
        for root, ref in list(store._refine.items()):
            if store.find(root) != root or ref.kind != PRODUCT:
                continue
            leaves = [leaf for c in ref.children for leaf in self._leaf_roots(c)]
            for i, leaf in enumerate(leaves):
                for earlier in leaves[:i]:
                    if earlier != leaf and earlier not in candidates.setdefault(leaf, []):
                        candidates[leaf].append(earlier)
        if not candidates:
            return {}
        pieces = self._piece_leaf_counts()
        parents: dict[int, int] = {}
        for child, cands in candidates.items():
            if child not in ids or store.pinned(child) or store.size(child) <= 1:
                continue
            holding = [t for t in pieces if child in t]
            ok = [c for c in cands if c in ids and store.size(c) > 1 and all(t[c] == t[child] == 1 for t in holding)]
            if ok:
                parents[ids[child]] = ids[ok[-1]]
        for child in list(parents):  # no cycles
            seen, p = {child}, parents.get(child)
            while p is not None:
                if p in seen:
                    parents.pop(child)
                    break
                seen.add(p)
                p = parents.get(p)
        return parents

    def _node_expr(self, axes: Any, ids: dict[int, int]) -> Any:
        if axes is None:
            return None
        if axes and (isinstance(axes[0], list) or axes[0] is None):
            return tuple(self._node_expr(a, ids) for a in axes)
        return tuple(self._atom_expr(a, ids) for a in axes)

    def _atom_expr(self, atom: int, ids: dict[int, int]) -> AxisExpr | None:
        root = self.store.find(atom)
        ref = self.store.refinement(root)
        if ref is None:
            sid = ids.get(root)
            return Leaf(sid, self.store.size(root)) if sid is not None else Leaf(-1, self.store.size(root))
        parts = tuple(self._atom_expr(c, ids) for c in ref.children)
        return (Product if ref.kind == PRODUCT else Concat)(parts, self.store.size(root))


def one_level(parents: Mapping[int, int]) -> tuple[dict[int, int], dict[int, int]]:
    """Nesting cut to one level: ``(kept {child: parent}, shared {child: parent it no longer has})``.

    Groups inside groups (grouped convolutions of several group counts) nest deeper;
    planning, permuting and emission all read ``Space.parent``, so it is cut here, once.
    Bottom-up, a space keeps its parent unless it is itself the parent of a kept child;
    then it moves by one permutation shared by every unit of its parent (a restriction
    of the nested move, hence sound).
    """
    def depth(s: int) -> int:
        d = 0
        while s in parents:
            s, d = parents[s], d + 1
        return d

    kept: dict[int, int] = {}
    shared: dict[int, int] = {}
    for child in sorted(parents, key=lambda c: (-depth(c), c)):
        if child in kept.values():
            shared[child] = parents[child]
        else:
            kept[child] = parents[child]
    return kept, shared


def _structure(members: list[Member]) -> str:
    paths = sorted({m.path for m in members if m.path})
    return paths[0] if paths else ""


class OpContext:
    """What a kind sees of one node: argument values, shapes, atoms, and the tie/pin verbs."""

    def __init__(self, walker: _Walker, node: torch.fx.Node, rule: Rule, op: str, out: Any, val: Any):
        self.walker, self.node, self.rule, self.op = walker, node, rule, op
        self.store = walker.store
        self.out = out
        self.out_shape = self._shape_of_val(val)
        self._bound = self._bind(node)

    @staticmethod
    def _shape_of_val(val: Any) -> Any:
        if _is_tensor(val):
            return [_dim(s) for s in val.shape]
        if isinstance(val, (list, tuple)):
            return [[_dim(s) for s in v.shape] if _is_tensor(v) else None for v in val]
        return None

    def _bind(self, node: torch.fx.Node) -> dict[str, Any]:
        schema = getattr(node.target, "_schema", None)
        bound: dict[str, Any] = {}
        if schema is not None:
            for i, arg in enumerate(schema.arguments):
                if i < len(node.args) and not arg.kwarg_only:
                    bound[arg.name] = node.args[i]
                elif arg.name in node.kwargs:
                    bound[arg.name] = node.kwargs[arg.name]
                elif arg.has_default_value():
                    bound[arg.name] = arg.default_value
        else:
            for i, a in enumerate(node.args):
                bound[f"arg{i}"] = a
            bound.update(node.kwargs)
        return bound

    # -- reading
    def value(self, name: str) -> Any:
        """The argument called ``name`` (schema name; ``out``/``outN`` for outputs)."""
        if name == "out":
            return _OUT
        if name.startswith("out") and name[3:].isdigit():
            return (_OUT, int(name[3:]))
        return self._bound.get(name)

    def has(self, name: str) -> bool:
        """Whether the op has an argument (or output) called ``name``."""
        if name == "out" or (name.startswith("out") and name[3:].isdigit()):
            return True
        return name in self._bound

    def shape(self, value: Any) -> list[int] | None:
        if value is _OUT:
            single = self.out is not None and all(isinstance(a, int) for a in self.out)  # one tensor's atoms
            return self.out_shape if single else None
        if isinstance(value, tuple) and len(value) == 2 and value[0] is _OUT:
            shapes = self.out_shape
            return shapes[value[1]] if isinstance(shapes, list) and value[1] < len(shapes) and isinstance(shapes[value[1]], list) else None
        if isinstance(value, torch.fx.Node):
            return self._shape_of_val(value.meta.get("val")) if _is_tensor(value.meta.get("val")) else None
        return None

    def atoms(self, value: Any) -> list[int] | None:
        if value is _OUT:
            return self.out
        if isinstance(value, tuple) and len(value) == 2 and value[0] is _OUT:
            return self.out[value[1]]
        if isinstance(value, torch.fx.Node):
            return self.walker.env.get(value)
        return None

    def tensor_args(self) -> list[tuple[str, torch.fx.Node]]:
        return [(k, v) for k, v in self._bound.items()
                if isinstance(v, torch.fx.Node) and _is_tensor(v.meta.get("val"))]

    def out_atoms(self) -> list[int]:
        return self.walker._atoms_flat(self.out)

    # -- writing
    def new_atom(self, size: int) -> int:
        return self.store.new(size)

    def tie(self, a: int, b: int) -> None:
        if self.store.size(a) != self.store.size(b):
            raise RuleMismatch(f"cannot tie axes of sizes {self.store.size(a)} and {self.store.size(b)}")
        self.store.unify(a, b, f"{self.op} at {self.node.name}")

    def pin(self, atom: int, reason: str) -> None:
        self.store.pin(atom, f"{reason} at {self.node.name}")

    def free(self, atom: int) -> None:
        self.store.touched.add(atom)

    def defer_row(self, atom: int, selected: int, row: int, out: int) -> bool:
        """Record that ``out`` is row ``row`` of ``atom`` in a packed ``(selected × atom)`` axis.

        Returns False (tie as usual) unless some product refinement has exactly the
        classes of ``selected`` and ``atom`` as its two factors.
        """
        store = self.store
        p, e = store.find(selected), store.find(atom)
        for root, ref in store._refine.items():
            if (store.find(root) == root and ref.kind == PRODUCT and len(ref.children) == 2
                    and store.find(ref.children[0]) == p and store.find(ref.children[1]) == e):
                self.walker.rows.append((e, p, root, row, out))
                self.free(out)
                return True
        return False

    def role(self, atom: int, name: str) -> None:
        self.store.add_role(atom, name)

    def param_use(self, value: Any, atom: int, consumed: bool) -> None:
        """Record how an op uses an axis of a parameter: read by a contraction (``consumed``) or not."""
        name = self.walker.param_view.get(value) if isinstance(value, torch.fx.Node) else None
        if name is not None:
            self.walker.param_uses.append((name, atom, consumed))

    def compose(self, atoms: list[int], kind: str) -> int:
        """An atom refined as ``kind`` over ``atoms`` (the atom itself when there is one)."""
        if len(atoms) == 1:
            return atoms[0]
        sizes = [self.store.size(a) for a in atoms]
        total = sum(sizes) if kind == CONCAT else _prod(sizes)
        joined = self.store.new(total)
        for child, atom in zip(self.store.refine(joined, kind, sizes), atoms):
            self.store.unify(child, atom, f"{self.op} at {self.node.name}")
        return joined

    def analyze_subgraph(self, sub: torch.fx.Node, operands) -> list:
        gm = getattr(self.walker.traced.graph_module, sub.target)
        inputs = [self.walker.env.get(o) if isinstance(o, torch.fx.Node) else None for o in operands]
        outer = self.walker.prefix
        self.walker.prefix = subgraph_prefix(outer, sub.target)
        try:
            return self.walker._walk(gm, top=False, inputs=inputs)
        finally:
            self.walker.prefix = outer


def subgraph_prefix(prefix: str, submodule: str) -> str:
    """Nodes of a higher-order op's submodule are named ``submodule/node`` (nested: ``outer/inner/node``)."""
    return f"{prefix}{submodule}/"


_OUT = object()


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
