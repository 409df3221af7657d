"""Space analysis: which parameter axes must share one permutation.

``analyze_traced(traced, rules)`` walks the graph once, in order, with an
``AxisStore`` (``fxfuse.frontend.walker``): placeholders get fresh atoms (graph
inputs and non-persistent buffers pinned), every op's rule ties its atoms,
outputs are pinned. The result is an immutable ``Analysis``
(``fxfuse.frontend.space_types``), built here from the walker's store:

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

from collections import Counter
from dataclasses import replace
from typing import Any, Mapping

import torch

from ..core.axes import PRODUCT
from ..core.errors import StrictError
from ..core.exprs import AxisExpr, Concat, Leaf, Product, expr_leaves, expr_text  # noqa: F401  (also imported from here)
from .groups import INVERTIBLE, NAMES, ORTHO, PERM, SpaceGroup, meet
from .op_context import OpContext, subgraph_prefix  # noqa: F401  (also imported from here)
from .rules import RuleSet, load_rules
from .shape_kinds import VIEW_KINDS  # noqa: F401  (also imported from here)
from .space_types import Analysis, Member, ParamLayout, Space, UnfitRule, UnruledOp  # noqa: F401  (also imported from here)
from .trace import TracedModel, trace
from .walker import Walker


def analyze(model: torch.nn.Module, example_args: tuple, rules: RuleSet | None = None, strict: bool = False,
            example_kwargs: Mapping[str, Any] | None = None, pins: Mapping[str, str] | None = None) -> Analysis:
    """Trace ``model`` on ``example_args`` and find its permutation spaces."""
    return analyze_traced(trace(model, example_args, example_kwargs), rules, strict, pins)


def analyze_traced(traced: TracedModel, rules: RuleSet | None = None, strict: bool = False,
                   pins: Mapping[str, str] | None = None, values: Mapping[str, Any] | None = None,
                   rotary: bool = False) -> Analysis:
    """Run the rules over ``traced``'s graph. ``pins`` maps a param axis ``"name:axis"`` to a reason;
    ``values``: the weights, read on access, where the module holds ``meta`` tensors (uniform scales);
    ``rotary``: recognise rotary embeddings, whose dims then move by rotations (whole groups only)."""
    rules = rules if rules is not None else load_rules()
    walker = Walker(traced, rules, values, rotary)
    walker.run()
    if strict and walker.unruled:
        u = walker.unruled[0]
        more = f" (and {len(walker.unruled) - 1} more)" if len(walker.unruled) > 1 else ""
        raise StrictError(f"no usable rule for {u.op} at node {u.node} ({u.module or 'top level'}){more}: {u.reason}")
    return _result(walker, pins or {})


# ---------------------------------------------------------------- the Analysis of a finished walk


def _result(w: Walker, pins: Mapping[str, str]) -> Analysis:
    """The ``Analysis`` of a finished walk: spaces from the store's leaf classes, layouts, groups, nesting."""
    store = w.store
    aliases = w.traced.aliases
    for key, reason in pins.items():
        name, _, axis = key.rpartition(":")
        if name in w.param_atoms:
            store.pin(w.param_atoms[name][1][int(axis)], reason)
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
    for name, atom, consumed in w.param_uses:
        uses.setdefault((name, frozenset(w.leaf_roots(atom))), set()).add(consumed)
    layouts: dict[str, ParamLayout] = {}
    for name, (kind, atoms) in w.param_atoms.items():
        shape = tuple(store.size(a) for a in atoms)
        axes = tuple(build(a, name, i, "") for i, a in enumerate(atoms))
        # an axis only ever contracted reads its units (a consumer); any other use writes them
        consumed = tuple(uses.get((name, frozenset(w.leaf_roots(a)))) == {True} for a in atoms)
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
    parents, shared = one_level(_nesting(w, ids))
    spaces = [replace(s, parent=parents.get(s.id)) for s in spaces]
    notes = tuple(f"s{c} ({spaces[c].name}) could move its own way under each unit of s{p} "
                  f"({spaces[p].name}) but moves by one permutation shared by all of them: nesting is "
                  "planned one level deep" for c, p in sorted(shared.items()))
    node_axes = {w.names[n]: _node_expr(w, v, ids) for n, v in w.env.items()}
    unfit = tuple(UnfitRule(rule.source, tuple(ops), sum(ops.values()), reason)
                  for rule, ops, fitted, reason in w.fits.values() if not fitted)
    missed: dict[str, list[str]] = {}
    for n, why in w.expert_misses.items():
        missed.setdefault(why, []).append(w.names[n])
    misses = tuple(f"{why} at {', '.join(at)}: the expert axis stays pinned" for why, at in missed.items())
    return Analysis(w.traced, tuple(spaces), layouts, tuple(w.unruled), w.rules.files, node_axes,
                    unfit, nesting_notes=notes, groups=_groups(w, ids, uses), summed=_summed(w, ids, uses),
                    scales=frozenset(w.scales),
                    pattern_notes=misses, probes={name: replace(p, axes=_node_expr(w, list(p.axes), ids))
                                                  for name, p in w.probes.items()})


def _groups(w, ids: dict[int, int], uses: dict) -> dict[int, SpaceGroup]:
    """Each space's group: the meet of the limits of every op on it (``fxfuse.frontend.groups``)."""
    limit: dict[int, tuple[int, str]] = {}
    for atom, level, why in w.limits:
        for leaf in w.leaf_roots(atom):
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
        out[sid] = SpaceGroup(NAMES[level if level in NAMES else INVERTIBLE], why)
    return out


def _summed(w, ids: dict[int, int], uses: dict) -> dict[int, str]:
    """Spaces that some op keeps under orthogonal maps only as a sum over the axis, with the first such op
    (``fxfuse.frontend.groups``): between widths no stretched orthonormal embedding keeps them."""
    out: dict[int, str] = {}
    for atom, why in getattr(w, "summed", ()):
        for leaf in w.leaf_roots(atom):
            if leaf in ids:
                out.setdefault(ids[leaf], why)
    for (name, leaves), kinds in uses.items():
        if len(kinds) > 1:
            for leaf in leaves:
                if leaf in ids:
                    out.setdefault(ids[leaf], f"parameter {name} both writes and reads (contracts) the axis")
    return out


def _nesting(w, ids: dict[int, int]) -> dict[int, int]:
    """``{child space: parent space}`` where the child may move differently under each parent index.

    In a product ``(heads × head_dim)`` the inside-head permutation may depend on the head
    iff every tensor of the graph that carries ``head_dim`` also carries ``heads``, each once
    in every segment (then the joint move ``(h, d) -> (p(h), p_h(d))`` is one bijection
    applied to whole tensors). A tensor with ``head_dim`` but not ``heads`` (a reduction over
    heads, a per-dim scale broadcast over heads) forces one shared inside permutation, and so
    does a segment that holds either twice (a grouped convolution's weight with ``heads`` on
    its rows and its columns: under which of them would ``head_dim`` move?).
    """
    store = w.store
    candidates: dict[int, list[int]] = {}
    for root, ref in list(store._refine.items()):
        if store.find(root) != root or ref.kind != PRODUCT:
            continue
        leaves = [leaf for c in ref.children for leaf in w.leaf_roots(c)]
        for i, leaf in enumerate(leaves):
            for earlier in leaves[:i]:
                if earlier != leaf and earlier not in candidates.setdefault(leaf, []):
                    candidates[leaf].append(earlier)
    if not candidates:
        return {}
    pieces = w.piece_leaf_counts()
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


def _node_expr(w, axes: Any, ids: dict[int, int]) -> Any:
    if axes is None:
        return None
    if axes and (isinstance(axes[0], list) or axes[0] is None):
        return tuple(_node_expr(w, a, ids) for a in axes)
    return tuple(_atom_expr(w, a, ids) for a in axes)


def _atom_expr(w, atom: int, ids: dict[int, int]) -> AxisExpr | None:
    root = w.store.find(atom)
    ref = w.store.refinement(root)
    if ref is None:
        sid = ids.get(root)
        return Leaf(sid, w.store.size(root)) if sid is not None else Leaf(-1, w.store.size(root))
    parts = tuple(_atom_expr(w, c, ids) for c in ref.children)
    return (Product if ref.kind == PRODUCT else Concat)(parts, w.store.size(root))


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
