"""Routed experts: a mixture-of-experts layer recognised as one subgraph, so its experts can move.

The axis analysis follows axes, not index values. Op by op, the routing
(``topk`` → ``sort`` → ``histc`` → ``cumsum`` → grouped matrix products →
``index_put_`` → unsort) must keep the expert axis in order. As a whole,
though, the subgraph that ``transformers`` writes (``grouped_mm_experts_forward``)
computes, for ``T`` tokens, ``K`` slots and ``E`` experts,

    out[t] = Σ_k v[t·K + k] · FFN(x[t]; θ_{i[t, k]}),    i[t, :] = topk_K(p[t, :]),
    FFN(x; θ_e) = (act(x·G_e) ⊙ (x·U_e)) · D_e          (gated; act(x·U_e)·D_e otherwise),

whatever the dispatch does in between: it sorts the (token, slot) pairs by
expert, counts them per expert (``histc``), runs each expert on its contiguous
rows (``offs = cumsum(counts)``) and puts the rows back (``index_put_`` of the
inverse sort). So for a permutation ``σ`` of the experts, moving the scores'
columns ``p[:, e] → p[:, σ(e)]`` and every expert stack ``θ_e → θ_σ(e)`` together
leaves ``out`` unchanged: ``topk`` picks the same experts under their new ids,
with the same values ``v``, and every pair meets the same weights. Inside each
expert the ``F`` hidden units may move by a permutation of their own ``τ_e``
(the gate and up columns and the down rows of expert ``e`` alike): ``FFN(x;
θ_e)`` is unchanged. That is heads and inside-head dims again: the units are a
space nested under the experts.

The subgraph therefore gets one signature (``routed_experts``, applied once):

    scores p: "t e"    rows x: "t h"    pair weights v: "(t k)"   top-k values: "t k"
    up weight: "e h (f | f)" (gated: gate half, up half) or "e h f"    down weight: "e f o"    out: "t o"

``k`` (slot order) is pinned and ``f`` is nested under ``e``; every tensor in between is internal: its axes are pinned and tied to
nothing, so no activation inside the dispatch carries ``e`` or ``f``.

Soundness rests on matching the subgraph exactly (``find``): each op, each
argument that matters (``k``, ``dim``, ``bins = E``, ``min = 0``, ``max = E-1``,
the floor division by ``K``, ``arange(T·K)``), each size, and that every
intermediate is read only inside the subgraph (an op that also reads the
indices, the sorted ids or the dispatched rows breaks it). Anything else is a
miss: its ops are analysed one by one by their own rules, which pin the expert
axis, and the miss is reported with its reason. Ties between top-k scores
could make the moved model pick another of the tied experts; the self-check
of every moved model would say so.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core.axes import CONCAT, PRODUCT
from .groups import PERM
from .kinds import KINDS, Call, RuleMismatch, kind, walk
from .op_context import OpContext
from .trace import ASSERT_METADATA as ASSERT, call_op as _op, node_shape as _shape

# the rule that switches the recognition on (``rules/experts.yaml``); a rule file may replace it
PATTERN_OP = "pattern.routed_experts"
GROUPED_MM = ("transformers.grouped_mm_fallback.default", "aten._grouped_mm.default")
ACTIVATIONS = ("aten.silu.default", "aten.gelu.default", "aten.relu.default", "aten.tanh.default",
               "aten.sigmoid.default")
CASTS = ("aten.to.dtype", "aten._to_copy.default", "aten.alias.default", "aten.clone.default",
         "aten.contiguous.default")
EXACT = (torch.int32, torch.int64, torch.float32, torch.float64)  # hold every id and position of a layer exactly


@dataclass(frozen=True)
class RoutedExperts:
    """One matched subgraph: its inputs, its result and every node it owns."""

    topk: torch.fx.Node  # (T, E) scores -> top-K values and indices
    scores: torch.fx.Node  # p (T, E)
    rows: torch.fx.Node  # x (T, H), gathered per pair
    pair_weights: torch.fx.Node  # v (T·K,), gathered per pair
    up_weight: torch.fx.Node  # (E, H, U): U = 2F gated, F otherwise
    down_weight: torch.fx.Node  # (E, F, O)
    out: torch.fx.Node  # (T, O): the last node, where the signature is applied
    gated: bool
    act: torch.fx.Node  # the activation of the gate half (of the whole up product when not gated)
    nodes: frozenset  # every node it owns (not the inputs, not the top-k values)

    @property
    def name(self) -> str:
        return f"{self.topk.name}..{self.out.name}"


class Miss(Exception):
    """The subgraph around a top-k is not the routed-experts pattern; the message says where and why."""


def _arg(n: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if i < len(n.args):
        return n.args[i]
    return n.kwargs.get(name, default)


class _Matcher:
    """Walks forward from one ``topk``; collects the nodes it owns; raises ``Miss`` at the first surprise."""

    def __init__(self, topk: torch.fx.Node):
        self.owned: set[torch.fx.Node] = set()
        self.topk = topk

    def expect(self, cond: bool, what: str, at: torch.fx.Node) -> None:
        if not cond:
            raise Miss(f"{what} at {at.name}")

    def users(self, n: torch.fx.Node) -> list[torch.fx.Node]:
        """Users of ``n`` past casts and copies; assertions on it are owned and skipped.

        A cast acts element by element, so it commutes with any move of the pairs or
        experts; on ids and positions it must also keep every value (to 32 or 64 bits).
        """
        out = []
        for u in n.users:
            if _op(u) == ASSERT:
                self.owned.add(u)
            elif _op(u) in CASTS:
                src, dst = n.meta.get("val"), u.meta.get("val")
                self.expect(isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and (
                    src.is_floating_point() or dst.dtype in EXACT), "integer values cast to a narrower type", u)
                self.owned.add(u)
                out += self.users(u)
            else:
                out.append(u)
        return out

    def only_user(self, n: torch.fx.Node, op: str | tuple[str, ...], what: str) -> torch.fx.Node:
        ops = (op,) if isinstance(op, str) else op
        users = self.users(n)
        self.expect(len(users) == 1 and _op(users[0]) in ops, f"{what}: expected one reader ({', '.join(ops)}), "
                    f"found {', '.join(_op(u) or u.name for u in users) or 'none'}", n)
        self.owned.add(users[0])
        return users[0]

    def getitems(self, n: torch.fx.Node) -> dict[int, torch.fx.Node]:
        items = {}
        for u in n.users:
            self.expect(u.target is operator.getitem, f"{_op(n)} read other than by indexing its results", n)
            items[u.args[1]] = u
        return items

    def source(self, n: Any) -> Any:
        """``n`` before value-preserving casts (the tensor a dispatch reads)."""
        while _op(n) in CASTS and n in self.owned:
            n = n.args[0]
        return n

    def match(self) -> RoutedExperts:
        tk = self.topk
        self.owned.add(tk)
        scores = tk.args[0]
        ps = _shape(scores)
        self.expect(ps is not None and len(ps) == 2, "top-k scores are not a (tokens, experts) matrix", tk)
        T, E = ps
        K = _arg(tk, 1, "k")
        dim, largest = _arg(tk, 2, "dim", -1), _arg(tk, 3, "largest", True)
        self.expect(isinstance(K, int) and 0 < K <= E and dim in (-1, 1) and largest is True,
                    "top-k not of the largest K along the experts", tk)
        items = self.getitems(tk)
        self.expect(1 in items, "top-k indices unused", tk)
        values, indices = items.get(0), items[1]
        self.owned.add(indices)
        S = T * K
        flat = self.only_user(indices, ("aten.reshape.default", "aten.view.default"), "top-k indices")
        self.expect(_shape(flat) == (S,), "indices not flattened to (tokens·K,)", flat)
        srt = self.only_user(flat, ("aten.sort.default", "aten.sort.stable"), "flattened indices")
        if _op(srt) == "aten.sort.default":
            sdim, desc = _arg(srt, 1, "dim", -1), _arg(srt, 2, "descending", False)
        else:
            sdim, desc = srt.kwargs.get("dim", -1), srt.kwargs.get("descending", False)
        self.expect(sdim in (-1, 0) and desc is False, "sort not ascending along the pairs", srt)
        sitems = self.getitems(srt)
        self.expect(set(sitems) == {0, 1}, "sort results not both used", srt)
        ids, perm = sitems[0], sitems[1]
        self.owned |= {ids, perm}
        # counts per expert and their offsets
        histc = self.only_user(ids, "aten.histc.default", "sorted expert ids")
        bins, lo, hi = _arg(histc, 1, "bins", 100), _arg(histc, 2, "min", 0), _arg(histc, 3, "max", 0)
        self.expect(bins == E and lo == 0 and hi == E - 1, f"histc not of {E} bins over 0..{E - 1}", histc)
        offs = self.only_user(histc, "aten.cumsum.default", "expert counts")
        self.expect(_arg(offs, 1, "dim") in (0, -1), "counts not summed along the experts", offs)
        # the sort's permutation: rows gathered, pair weights gathered, inverse built
        readers = {_op(u): u for u in self.users(perm)}
        self.expect(len(readers) == 4 and len(self.users(perm)) == 4, "sort permutation read by other ops", perm)
        fd = readers.get("aten.floor_divide.default")
        self.expect(fd is not None and fd.args[0] is perm and fd.args[1] == K,
                    f"pair index not divided by K={K}", perm)
        self.owned.add(fd)
        gather = self.only_user(fd, "aten.index.Tensor", "token of each pair")
        self.expect(list(gather.args[1]) == [fd] and _shape(gather.args[0]) is not None
                    and len(_shape(gather.args[0])) == 2 and _shape(gather.args[0])[0] == T,
                    "rows not gathered from a (tokens, features) tensor", gather)
        rows = gather.args[0]
        pick = readers.get("aten.index.Tensor")
        self.expect(pick is not None and list(pick.args[1]) == [perm] and _shape(pick.args[0]) == (S,),
                    "pair weights not gathered by the sort", perm)
        self.owned.add(pick)
        empty = readers.get("aten.empty_like.default")
        put = readers.get("aten.index_put_.default") or readers.get("aten.index_put.default")
        self.expect(empty is not None and put is not None, "no inverse of the sort", perm)
        self.owned |= {empty, put}
        self.expect(self.users(empty) == [put], "inverse buffer read elsewhere", empty)
        self.expect(put.args[0] is empty and list(put.args[1]) == [perm] and not _arg(put, 3, "accumulate", False),
                    "inverse not written at the sort's positions", put)
        ar = put.args[2]
        self.expect(self._is_arange(ar, S) and self.users(ar) == [put], f"inverse values not arange({S})", put)
        self.owned.add(ar)
        # expert products
        up = self.only_user(gather, GROUPED_MM, "dispatched rows")
        self.grouped_mm(up, offs, 0)
        wu = _shape(up.args[1])
        gated = _op(self.users(up)[0]) == "aten.chunk.default" if len(self.users(up)) == 1 else False
        if gated:
            chunk = self.only_user(up, "aten.chunk.default", "up projection")
            self.expect(_arg(chunk, 1, "chunks") == 2 and _arg(chunk, 2, "dim", 0) in (-1, 1),
                        "up projection not split into gate and up halves", chunk)
            halves = self.getitems(chunk)
            self.expect(set(halves) == {0, 1}, "gate or up half unused", chunk)
            self.owned |= set(halves.values())
            act = self.only_user(halves[0], ACTIVATIONS, "gate half")
            self.expect(act.args[0] is halves[0], "activation of another tensor", act)
            mul = self.only_user(act, "aten.mul.Tensor", "activated gate")
            self.expect(self.only_user(halves[1], "aten.mul.Tensor", "up half") is mul,
                        "gate and up halves not multiplied together", mul)
            hidden = mul
        else:
            hidden = act = self.only_user(up, ACTIVATIONS, "up projection")
            self.expect(self.source(act.args[0]) is up, "activation of another tensor", act)
        down = self.only_user(hidden, GROUPED_MM, "expert hidden units")
        self.grouped_mm(down, offs, 1)
        self.expect(self.users(offs) == [up, down] or self.users(offs) == [down, up], "offsets read elsewhere", offs)
        wd = _shape(down.args[1])
        F = wd[1]
        self.expect(wu[0] == E and wd[0] == E and wu[2] == (2 * F if gated else F),
                    f"expert stacks not of {E} experts with matching units", down)
        self.expect(self.source(down.args[0]) is hidden, "down projection reads other rows", down)
        # weighting, unsort, sum over slots
        scale = self.only_user(pick, "aten.unsqueeze.default", "gathered pair weights")
        self.expect(_arg(scale, 1, "dim") in (-1, 1), "pair weights not broadcast over features", scale)
        weighted = self.only_user(down, "aten.mul.Tensor", "expert outputs")
        self.expect({self.source(a) for a in weighted.args} == {down, scale} and self.users(scale) == [weighted],
                    "expert outputs not scaled by their pair weights", weighted)
        unsort = self.only_user(weighted, "aten.index.Tensor", "weighted outputs")
        self.expect(self.source(unsort.args[0]) is weighted and list(unsort.args[1]) == [put]
                    and self.users(put) == [unsort], "outputs not put back by the inverse sort", unsort)
        O = wd[2]
        split = self.only_user(unsort, ("aten.view.default", "aten.reshape.default"), "unsorted outputs")
        self.expect(_shape(split) == (T, K, O), f"outputs not viewed as ({T}, {K}, {O})", split)
        out = self.only_user(split, "aten.sum.dim_IntList", "per-slot outputs")
        self.expect(list(_arg(out, 1, "dim")) in ([1], [-2]) and not _arg(out, 2, "keepdim", False),
                    "outputs not summed over the slots", out)
        self.expect(self.source(up.args[0]) is gather, "up projection reads other rows", up)
        nodes = frozenset(self.owned)
        for n in nodes - {out}:
            for u in n.users:
                self.expect(u in nodes or (n is tk and u is values), "an intermediate is read outside the layer", n)
        return RoutedExperts(tk, scores, rows, pick.args[0], up.args[1], down.args[1], out, gated, act, nodes)

    def grouped_mm(self, n: torch.fx.Node, offs: torch.fx.Node, which: int) -> None:
        w = _shape(n.args[1])
        self.expect(w is not None and len(w) == 3 and _arg(n, 2, "offs") is offs, "expert product not of a "
                    "(experts, in, out) stack over the counted offsets", n)
        if _op(n) == "aten._grouped_mm.default":
            self.expect(_arg(n, 3, "bias") is None and _arg(n, 4, "out_dtype") is None,
                        "expert product with a bias or dtype", n)

    @staticmethod
    def _is_arange(n: Any, size: int) -> bool:
        if _op(n) == "aten.arange.default":
            return list(n.args) == [size]
        if _op(n) in ("aten.arange.start", "aten.arange.start_step"):
            return list(n.args[:2]) == [0, size] and list(n.args[2:]) in ([], [1])
        return False


@dataclass(frozen=True)
class Found:
    """Every routed-experts subgraph of one graph, and the expert products left out, with why."""

    matches: tuple[RoutedExperts, ...]
    misses: tuple[tuple[torch.fx.Node, str], ...]  # (grouped product node, reason)

    def owner(self) -> dict[torch.fx.Node, RoutedExperts]:
        return {n: m for m in self.matches for n in m.nodes}


def find(graph: torch.fx.Graph) -> Found:
    """Match the pattern from every ``topk``; a grouped expert product outside every match is a miss."""
    matches, why = [], []
    for n in graph.nodes:
        if _op(n) != "aten.topk.default":
            continue
        try:
            matches.append(_Matcher(n).match())
        except Miss as exc:
            why.append(f"{n.name}: {exc}")
    owned = {x for m in matches for x in m.nodes}
    reason = "; ".join(why) if why else "no top-k routing found"
    misses = tuple((n, f"routed experts not recognised ({reason})") for n in graph.nodes
                   if _op(n) in GROUPED_MM and n not in owned)
    return Found(tuple(matches), misses)


# ---------------------------------------------------------------- the signature


@dataclass(frozen=True)
class Probe:
    """An activation no graph node holds, computed from nodes that do (read by activation costs).

    ``compute(*values of the nodes named in inputs)``; ``axes``: one ``AxisExpr`` per dim
    (atoms while the analysis runs).
    """

    inputs: tuple[str, ...]
    compute: Callable[..., torch.Tensor]
    axes: tuple


def _expert_units(act: torch.fx.Node, gated: bool) -> Callable[..., torch.Tensor]:
    """``(x (T, H), up weight (E, H, U)) -> (T, E, F)``: every expert's hidden units on every token.

    The dispatch runs each token through its top-K experts only, in an order that
    depends on the routing, so no node holds the units of one expert as a unit
    axis; this dense activation does, with tokens as samples, for matching the
    units of each pair of experts.
    """
    fn = functools.partial(act.target, *act.args[1:], **act.kwargs)

    def compute(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("th,ehu->teu", x, weight.to(x.dtype))
        if gated:
            gate, up = z.chunk(2, dim=-1)
            return fn(gate) * up
        return fn(z)

    return compute



@kind("routed_experts", "A whole routed mixture-of-experts subgraph (top-k routing, dispatch sorted by expert, "
      "grouped expert products, weighted unsort), recognised by fxfuse.frontend.experts: the experts are a space of the "
      "router's score columns and the expert stacks, each expert's hidden units a space nested under it. Named on "
      f"the pseudo-op {PATTERN_OP}; anything that is not exactly the pattern keeps its ops' own rules.")
def routed_experts(ctx) -> None:
    match = ctx.walker.experts.get(ctx.node)
    if match is None or match.out is not ctx.node:
        raise RuleMismatch(f"kind routed_experts applies to a whole matched subgraph ({PATTERN_OP}), not to one op")
    atoms = lambda n: ctx.atoms(n)  # noqa: E731
    (t, e), (tx, h) = atoms(match.scores), atoms(match.rows)
    (pair,) = atoms(match.pair_weights)
    ue, uh, uo = atoms(match.up_weight)
    de, df, do = atoms(match.down_weight)
    to, oo = ctx.out
    store = ctx.store
    T, K = store.size(t), store.size(pair) // max(store.size(t), 1)
    F = store.size(df)
    slot = ctx.new_atom(K)
    ctx.pin(slot, "the top-k slots are ordered by score")
    units = ctx.new_atom(F)
    ctx.role(e, "experts")
    ctx.role(units, "units")
    for a, b in ((e, ue), (e, de), (h, uh), (df, units), (do, oo)):
        ctx.tie(a, b)
    for a in (tx, to):
        if T > 1:
            ctx.tie(t, a)
    topk_values = ctx.walker.env.get(match.topk)
    if topk_values and topk_values[0] is not None:
        vt, vk = topk_values[0]
        if T > 1:
            ctx.tie(t, vt)
        if K > 1:
            ctx.tie(vk, slot)
    ctx.tie(pair, ctx.compose([t, slot], PRODUCT))
    ctx.tie(uo, ctx.compose([units, units], CONCAT) if match.gated else units)  # gated: gate half | up half
    ctx.compose([e, units], PRODUCT)  # units within each expert: the product that lets them nest (spaces._nesting)
    for w, axes in ((match.up_weight, ((ue, False), (uh, True), (uo, False))),
                    (match.down_weight, ((de, False), (df, True), (do, False)))):
        for a, consumed in axes:
            ctx.param_use(w, a, consumed)
    names = ctx.walker.names
    ctx.walker.probes[f"{names[match.out]}:expert_units"] = Probe(
        (names[match.rows], names[match.up_weight]), _expert_units(match.act, match.gated), (t, e, units))
    why = f"routed experts {match.name}: experts are chosen by index"
    ctx.walker.limits += [(a, PERM, why) for a in (e, units, h, oo, t)]


@walk("routed_experts")
def walk_routed_experts(walker, call: Call) -> None:
    """A node owned by a routed-experts match: fresh axes; at its last node, the pattern's signature.

    The kind (``routed_experts`` above) ties the subgraph's inputs and result; every axis of the nodes
    it owns that it did not tie is pinned. A signature that does not fit pins every axis the subgraph
    reads or writes.
    """
    node, val = call.node, call.val
    store, env = walker.store, walker.env
    env[node] = walker.fresh(val)
    match = walker.experts[node]
    if node is not match.out:
        return
    rule = call.rule
    fit = walker.fits.setdefault(id(rule), [rule, {}, 0, None])
    fit[1][PATTERN_OP] = fit[1].get(PATTERN_OP, 0) + 1
    ctx = OpContext(walker, node, rule, PATTERN_OP, env[node], val)
    before, store.touched = set(store.touched), set()
    try:
        KINDS[rule.kind].apply(ctx)
    except (RuleMismatch, TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
        store.touched = before
        reason = f"rule {rule.source} does not fit: {exc}"
        fit[3] = fit[3] or f"{exc} (first at {node.name})"
        walker.fail_closed(node, PATTERN_OP, list(node.all_input_nodes), reason)
        for n in match.nodes:
            for x in (n, *n.all_input_nodes):
                for atom in walker.atoms_flat(env.get(x)):
                    store.pin(atom, f"{reason}: {PATTERN_OP} at {node.name}")
        return
    related = {store.find(a) for a in store.touched}
    store.touched = before | store.touched
    fit[2] += 1
    for n in match.nodes:
        for atom in walker.atoms_flat(env.get(n)):
            if store.size(atom) > 1 and store.find(atom) not in related:
                store.pin(atom, f"inside routed experts {match.name}")
