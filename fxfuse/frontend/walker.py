"""The walk of the space analysis: ``Walker`` ties the atoms of every tensor axis of a traced graph.

It walks the graph once, in order, with an ``AxisStore`` (``fxfuse.core.axes``), one method per opcode
as ``torch.fx.Interpreter`` has: placeholders get fresh atoms (graph inputs and tensors not saved
with the model pinned), outputs are pinned; a call is walked by the handler registered for its rule's
kind in ``fxfuse.frontend.kinds.WALKS`` (filled by the modules that define the kinds: the view kinds,
the routed-experts pattern), else by ``Walker.apply``, which applies the kind through an ``OpContext``
and pins every axis it leaves alone. After the walk, ``run`` settles what only the whole graph tells:
saved tensors no op reads, rows selected from packed axes, the parts a slice leaves out.
``fxfuse.frontend.spaces`` turns the walker's store into an ``Analysis``.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..core.axes import CONCAT, PRODUCT, AxisStore, Refinement
from ..core.schema import check_rule
from . import experts, rotary
from .all_kinds import KINDS, WALKS
from .groups import PERM, node_limits
from .kinds import Call, RuleMismatch
from .op_context import OpContext, _dim, _is_tensor
from .rules import RuleSet
from .space_types import UnruledOp
from .trace import BUFFER, CONSTANT, USER_INPUT, TracedModel, op_name


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self___", "")


def _data_dependent(val: Any) -> list[str]:
    """The data-dependent sizes of a node's value (a tensor or a list of them), as text."""
    if _is_tensor(val):
        return [str(s) for s in val.shape if _dim(s) is None]
    if isinstance(val, (list, tuple)):
        return [d for v in val for d in _data_dependent(v)]
    return []


@dataclass
class _Frame:
    """The graph being walked: the top-level graph, or a subgraph with its operands' atoms."""

    top: bool
    inputs: list | None
    k: int = 0  # the next placeholder's operand


class Walker:
    """Walks one graph (and nested subgraphs) tying atoms; ``fxfuse.frontend.spaces`` builds the ``Analysis``."""

    def __init__(self, traced: TracedModel, rules: RuleSet, values: Mapping[str, Any] | None = None,
                 rotary: bool = False):
        """``rotary``: recognise rotary embeddings (``fxfuse.frontend.rotary``; with whole groups only)."""
        self.traced, self.rules, self.with_rotary = traced, rules, rotary
        self.rotary: dict[torch.fx.Node, Any] = {}  # node -> the rotary match that owns it
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
        self.summed: list[tuple[int, str]] = []  # (atom, why): kept by orthogonal maps only as a sum (groups.py)
        self._values = dict(traced.module.state_dict(keep_vars=False)) if values is None else values
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
        self.walk(self.traced.graph_module, top=True)
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
        carried = {self.store.find(a) for value in self.env.values() for a in self.atoms_flat(value)}
        for rest, node in self.slice_rests:
            for leaf in self.leaf_roots(rest):
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
                    sets.append({leaf for a in atoms for leaf in self.leaf_roots(a)})
        return sets

    def piece_leaf_counts(self) -> list[Counter[int]]:
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

    def leaf_roots(self, atom: int) -> list[int]:
        root = self.store.find(atom)
        ref = self.store.refinement(root)
        if ref is None:
            return [root]
        return [leaf for c in ref.children for leaf in self.leaf_roots(c)]

    # -- the walk: one method per opcode, as torch.fx.Interpreter
    def walk(self, gm: torch.fx.GraphModule, top: bool, inputs: list | None = None) -> list:
        """Walk ``gm``'s nodes in order, each by the method named after its opcode (``placeholder``,
        ``get_attr``, ``call_function``, ``output``; any other opcode: ``other``). Returns the atoms of the
        graph's outputs; ``inputs``: the atoms of a subgraph's placeholders (``top`` False)."""
        graph = gm.graph
        pattern = self.rules.lookup(experts.PATTERN_OP)
        if pattern is not None and pattern.kind == "routed_experts":
            found = experts.find(graph)
            self.experts.update(found.owner())
            self.expert_misses.update(found.misses)
        pattern = self.rules.lookup(rotary.PATTERN_OP)
        if self.with_rotary and pattern is not None and pattern.kind == "rotary":
            self.rotary.update(rotary.find(graph))
        frame = _Frame(top, inputs)
        for node in graph.nodes:
            val = node.meta.get("val")
            self.names[node] = self.prefix + node.name
            self.at = f" at {self.names[node]}"
            if node.op == "output":
                return self.output(node, frame)
            getattr(self, node.op, self.other)(node, val, frame)
        return []

    def placeholder(self, node: torch.fx.Node, val: Any, frame: _Frame) -> None:
        """A graph input: a subgraph's gets the operand's atoms; at top level, a user input is pinned (the
        interface), so is a tensor not saved with the model; a parameter or buffer gets its atoms, one set per
        tensor for tied names."""
        env = self.env
        if not frame.top:
            inputs, k = frame.inputs, frame.k
            env[node] = inputs[k] if inputs is not None and k < len(inputs) else self.fresh(val)
            frame.k += 1
            return
        ph = self.traced.placeholders.get(node.name)
        kind = ph.kind if ph else USER_INPUT
        if kind == USER_INPUT:
            env[node] = self.fresh(val, f"interface: graph input '{node.name}'")
        elif kind == CONSTANT or (kind == BUFFER and not ph.persistent):
            env[node] = self.fresh(val, f"constant tensor '{ph.target or node.name}' is not saved with the model")
        else:
            env[node] = self.fresh(val)
            if env[node] is None:
                return
            # torch.export gives each name of a tied tensor its own placeholder: one tensor, one set of atoms
            canon = self.canonical.get(ph.target, ph.target)
            self.param_view[node] = canon
            self.param_read[canon] = self.param_read.get(canon, False) or bool(node.users)
            if canon in self.param_atoms:
                for a, b in zip(self.param_atoms[canon][1], env[node]):
                    self.store.unify(a, b, f"tied tensor {canon} = {ph.target}")
            else:
                self.param_atoms[canon] = (kind, env[node])

    def get_attr(self, node: torch.fx.Node, val: Any, frame: _Frame) -> None:
        """A constant of the graph module: pinned (not a saved tensor)."""
        self.env[node] = self.fresh(val, f"constant '{node.target}'")

    def other(self, node: torch.fx.Node, val: Any, frame: _Frame) -> None:
        """Any other opcode (``call_module``, ``call_method``; not in an exported graph): fresh atoms."""
        self.env[node] = self.fresh(val)

    def output(self, node: torch.fx.Node, frame: _Frame) -> list:
        """The graph's outputs: pinned at top level (the interface); a subgraph hands their atoms back."""
        env = self.env
        outputs = list(torch.utils._pytree.tree_leaves(node.args[0]))
        if frame.top:
            for leaf in outputs:
                if isinstance(leaf, torch.fx.Node):
                    for atom in self.atoms_flat(env.get(leaf)):
                        self.store.pin(atom, f"interface: graph output '{leaf.name}'")
        return [env.get(x) if isinstance(x, torch.fx.Node) else None for x in outputs]

    def call_function(self, node: torch.fx.Node, val: Any, frame: _Frame | None = None) -> None:
        """A call, walked by the handler registered for its rule's kind (``fxfuse.frontend.kinds.WALKS``, filled
        by the modules that define the kinds), else by ``apply``. A node of a matched routed-experts subgraph goes
        to the pattern rule's kind; an op with no rule fails closed."""
        env = self.env
        if node in self.experts:
            rule = self.rules.lookup(experts.PATTERN_OP)
            WALKS[rule.kind](self, Call(node, val, rule, experts.PATTERN_OP, None, ()))
            return
        if node in self.rotary:
            rule = self.rules.lookup(rotary.PATTERN_OP)
            WALKS[rule.kind](self, Call(node, val, rule, rotary.PATTERN_OP, None, ()))
            return
        if node.target is operator.getitem:
            self.getitem(node, val)
            return
        out = self.fresh(val)
        env[node] = out
        inputs = [a for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]
        touches = self.atoms_flat(out) or any(self.atoms_flat(env.get(a)) for a in inputs)
        if not touches:
            return  # shape arithmetic, assertions on scalars: no tensor axes involved
        op = op_name(node.target)
        rule = self.rules.lookup(op)
        if rule is None:
            self.fail_closed(node, op, inputs, "no rule for this op")
            return
        if op in rule.ops and rule.origin[0] and (id(rule), op) not in self.checked:
            check_rule(rule, *rule.origin, ops=(op,))  # a custom op may register after its rule file was read
            self.checked.add((id(rule), op))
        if node in self.expert_misses:  # pin the expert axis with the reason before the op's rule does
            for atom in (env.get(node.args[1]) or [])[:1]:
                self.store.pin(atom, f"{self.expert_misses[node]} at {node.name}")
        WALKS.get(rule.kind, Walker.apply)(self, Call(node, val, rule, op, out, inputs))

    def getitem(self, node: torch.fx.Node, val: Any) -> None:
        """``operator.getitem`` of a list of tensors: the chosen tensor's atoms (a parameter's stays one)."""
        env = self.env
        src, idx = node.args
        axes = env.get(src)
        if isinstance(axes, list) and isinstance(idx, int) and 0 <= idx < len(axes) and (
                axes[idx] is None or isinstance(axes[idx], list)):
            env[node] = axes[idx]
            if src in self.param_view:
                self.param_view[node] = self.param_view[src]
        else:
            env[node] = self.fresh(val, f"getitem of an untracked value at {node.name}")

    def apply(self, call: Call) -> OpContext | None:
        """The default walk of a call: apply its rule's kind through an ``OpContext``; pin what it leaves alone.

        A kind that does not fit fails closed (every axis the node reads or writes pinned, the op listed as
        unruled), or pins with the reason where a size depends on the data. Returns the context, None where
        the rule did not fit.
        """
        env = self.env
        node, val, rule, op, out, inputs = call.node, call.val, call.rule, call.op, call.out, call.inputs
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
                return None
            # a rule that does not fit this node fails closed like a missing one
            self.fail_closed(node, op, inputs, f"rule {rule.source} does not fit: {exc}")
            fit[3] = fit[3] or f"{exc} (first at {node.name})"
            return None
        related = self.store.touched
        self.store.touched = before | related
        self._pin_unrelated_integers(ctx, related)
        fit[2] += 1
        for atom in self.atoms_flat(out):
            if atom not in self.store.touched and self.store.size(atom) > 1:
                self.store.pin(atom, f"axis created by {op} at {node.name}")
        try:
            self.limits += node_limits(ctx, self)
        except (RuleMismatch, TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
            why = f"{op} at {node.name} ({rule.source}): group not inferred ({exc})"
            self.limits += [(a, PERM, why) for a in self.atoms_flat(out)]
            self.limits += [(a, PERM, why) for x in inputs for a in self.atoms_flat(env.get(x))]
        return ctx

    def atoms_flat(self, axes: Any) -> list[int]:
        if axes is None:
            return []
        if axes and isinstance(axes[0], list) or (axes and axes[0] is None):
            return [a for sub in axes if sub is not None for a in sub]
        return list(axes)

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
            for atom in self.atoms_flat(self.env.get(value)):
                if store.size(atom) > 1 and store.find(atom) not in roots:
                    store.pin(atom, f"integer argument '{name}' of {ctx.op} at {ctx.node.name}: its values may "
                                    "be indices and the rule does not relate this axis")

    def _pin_touched(self, node, op: str, inputs, reason: str) -> None:
        """Pin every axis ``node`` reads or writes, with ``reason``: an op the analysis cannot place."""
        module = _module_path(node)
        why = f"{reason}: {op} at {node.name}" + (f" ({module})" if module else "")
        for atoms in [self.env.get(a) for a in inputs] + [self.env.get(node)]:
            for atom in self.atoms_flat(atoms):
                self.store.pin(atom, why)

    def fail_closed(self, node, op: str, inputs, reason: str) -> None:
        module = _module_path(node)
        self.unruled.append(UnruledOp(op, node.name, module, reason))
        why = f"{reason}: {op} at {node.name}" + (f" ({module})" if module else "")
        for a in inputs:
            for atom in self.atoms_flat(self.env.get(a)):
                self.store.pin(atom, why)
        for atom in self.atoms_flat(self.env.get(node)):
            self.store.pin(atom, why)
