"""Activation statistics: correlation of target and source units on calibration inputs.

Both models run their exported graphs (``torch.fx.Interpreter``) on the same
batches; at up to ``nodes_per_space`` graph nodes where a space lives, every
position other than the space's axis is a sample (each token of each sequence).
For units ``x`` of the target and ``y`` of the source the accumulated sums give
the Pearson correlation ``ρ[j, k] = cov(x_j, y_k) / (σ(x_j) σ(y_k))``, summed
over nodes. A nested pair (heads × head_dim) is correlated jointly over
``(h, d)`` units and returned as ``(n_h, n_h, n_d, n_d)``.
A unit constant over the samples (a token-type embedding read at one type
only) correlates with nothing: a variance below ``VARIANCE_FLOOR`` of the
mean square is the rounding noise of ``E[x²] − E[x]²``, taken as zero.

A sample must be the same position in both models. An axis of another space
that is being moved (query heads next to a head dim of its own, as in
multi-query attention; the head dims beside the query heads of a key/value
group, both nested under the key/value heads) is in a different order in the
source, so it is not a sample axis: it is reduced by permutation-invariant moments, the mean ``m``
and the mean square of the units along it, each correlated as a feature of
its own (``x[…, j, a] → (mean_a x[…, j, a], mean_a x[…, j, a]²)``).

Nodes inside higher-order subgraphs (``wrap_with_set_grad_enabled``,
``wrap_with_autocast``) are read too: the capture runs each submodule through
the same interpreter, naming its nodes ``submodule/node`` as the analysis does.

Out of core (a model traced on ``meta`` weights, its weights read on access,
``fxfuse.backend.lazy``) each op reads the weights it uses from the state and drops
them after it; on a device (``fxfuse.core.device``) the graphs run there on copies
whose device arguments say so, and the sums accumulate there.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..core.errors import InputCheckError
from ..core.device import host, to as to_device
from ..core.progress import bar
from ..frontend.groups import ROTARY
from ..frontend.spaces import Analysis, Concat, Leaf, Product, expr_leaves, subgraph_prefix
from .layout import pieces
from .plan import ActivationCost, blocks

# Ops whose outputs are read: where spaces are made (linear, conv), normalised (norms) and carried
# (the residual adds). Summing correlations over up to ``nodes_per_space`` such nodes, spread
# along the graph, reads a residual stream itself and not only its increments; a unit a ReLU
# keeps at zero adds nothing where it is constant and is still told apart where it is not.
PREFERRED = ("linear", "conv", "addmm", "mm.", "bmm", "matmul", "embedding", "layer_norm", "batch_norm",
             "group_norm", "rms_norm", "scaled_dot_product_attention", "add", "mul", "gelu", "silu", "tanh",
             "relu", "hardtanh", "hardswish", "sigmoid")


# A variance below this share of the mean square is taken as zero: for a unit that is the same in every
# sample, E[x²] − E[x]² of float64 sums cancels to rounding noise (~1e-16 of E[x²] per addition), and the
# noise of two such units divided by each other read as correlations of hundreds. What it zeroes varies by
# less than 1e-5 of its value (~100 float32 ulps).
VARIANCE_FLOOR = 1e-10


class _Stats:
    """Running sums (float64) for the cross-correlation of two sets of units.

    With ``halves``, the same sums over the even samples (rows) alone are kept
    beside them (``h*``): ``halves()`` gives the even and the odd half, whose
    solutions should agree where the signal determines the assignment.
    """

    def __init__(self, n_t: int, n_s: int, halves: bool = False, device: torch.device | None = None):
        self.n = 0
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.st, self.ss, self.qt, self.qs = z(n_t), z(n_s), z(n_t), z(n_s)
        self.cross = z(n_t, n_s)
        if halves:
            self.hn = 0
            self.hst, self.hss, self.hqt, self.hqs = z(n_t), z(n_s), z(n_t), z(n_s)
            self.hcross = z(n_t, n_s)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.st += x.sum(0)
        self.ss += y.sum(0)
        self.qt += (x * x).sum(0)
        self.qs += (y * y).sum(0)
        self.cross.addmm_(x.T, y)
        if hasattr(self, "hn"):
            x, y = x[0::2], y[0::2]
            self.hn += x.shape[0]
            self.hst += x.sum(0)
            self.hss += y.sum(0)
            self.hqt += (x * x).sum(0)
            self.hqs += (y * y).sum(0)
            self.hcross.addmm_(x.T, y)

    def halves(self) -> tuple["_Stats", "_Stats"]:
        """The sums over the even samples and over the odd ones (the whole less the even)."""
        even, odd = _Stats.__new__(_Stats), _Stats.__new__(_Stats)
        even.n, even.st, even.ss, even.qt, even.qs, even.cross = (
            self.hn, self.hst, self.hss, self.hqt, self.hqs, self.hcross)
        odd.n, odd.st, odd.ss, odd.qt, odd.qs, odd.cross = (
            self.n - self.hn, self.st - self.hst, self.ss - self.hss, self.qt - self.hqt, self.qs - self.hqs,
            self.cross - self.hcross)
        return even, odd

    def to_host(self) -> None:
        """Move the sums to the CPU."""
        self.st, self.ss, self.qt, self.qs, self.cross = (host(t) for t in (self.st, self.ss, self.qt, self.qs,
                                                                            self.cross))
        if hasattr(self, "hn"):
            self.hst, self.hss, self.hqt, self.hqs, self.hcross = (
                host(t) for t in (self.hst, self.hss, self.hqt, self.hqs, self.hcross))

    def _centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cov (n_t × n_s), var_t, var_s)``; a unit constant over the samples (``VARIANCE_FLOOR``) has
        variance and covariances exactly 0."""
        n = max(self.n, 1)
        mt, ms = self.st / n, self.ss / n
        vt = self.qt / n - mt * mt
        vs = self.qs / n - ms * ms
        vt = torch.where(vt > VARIANCE_FLOOR * self.qt / n, vt, 0.0)
        vs = torch.where(vs > VARIANCE_FLOOR * self.qs / n, vs, 0.0)
        cov = self.cross / n - torch.outer(mt, ms)
        return torch.where(torch.outer(vt, vs) > 0, cov, 0.0), vt, vs

    def covariance(self) -> np.ndarray:
        """Cross-covariance of the centred units over one overall scale ``√(mean var_t · mean var_s)``.

        Unlike the correlation it is equivariant under rotations of either side,
        so Procrustes on it recovers orthogonal maps (``fxfuse.planner.procrustes``).
        """
        cov, vt, vs = self._centred()
        scale = float((vt.mean() * vs.mean()).sqrt())
        return host(cov / scale).numpy() if scale > 0 else np.zeros(tuple(cov.shape))

    def correlation(self) -> np.ndarray:
        cov, vt, vs = self._centred()
        den = torch.sqrt(torch.outer(vt, vs))
        # scale-free: a constant unit (zero variance) correlates with nothing
        return host(torch.where(den > 0, cov / den.clamp(min=torch.finfo(torch.float64).tiny), 0.0)).numpy()


def _contains(exprs: tuple, space: int) -> bool:
    return any(leaf.space == space for e in exprs if e is not None for leaf in expr_leaves(e))


def node_exprs(analysis: Analysis, name: str) -> tuple | None:
    """The axes of node ``name``, or of the probe of that name (``Analysis.probes``)."""
    probe = analysis.probes.get(name)
    return probe.axes if probe is not None else analysis.node_axes.get(name)


def choose_nodes(analysis: Analysis, space: int, k: int, also: int | None = None) -> list[str]:
    """Up to ``k`` nodes (evenly spread, preferred ops first) whose output carries ``space`` (and ``also``);
    probes (activations computed from nodes, ``Analysis.probes``) count as nodes.

    Nodes with a size that depends on the data (rows dispatched to an expert) are left out: the two models
    route different tokens, so their rows are not the same samples. A space found there is read at no view
    of a weight either (a slice of an expert's stacked weight: the same for every input).
    """
    ops = graph_ops(analysis.traced.graph_module)
    ops.update({name: "probe" for name in analysis.probes})
    unknown = data_dependent_nodes(analysis.traced.graph_module)
    found, dispatched = [], False
    for name, exprs in list(analysis.node_axes.items()) + [(n, p.axes) for n, p in analysis.probes.items()]:
        if name not in ops or exprs is None or not exprs or not isinstance(exprs[0], (Leaf, Product, Concat)):
            continue
        if _contains(exprs, space) and (also is None or _contains(exprs, also)):
            if name in unknown:
                dispatched = True
            else:
                found.append(name)
    if dispatched:  # the space's activations are the dispatched rows: its views of weights are no signal either
        weights = weight_only_nodes(analysis)
        found = [n for n in found if n not in weights]
    good = [n for n in found if any(p in ops[n] for p in PREFERRED)] or found
    if len(good) <= k:
        return good
    step = len(good) / k
    return [good[int(i * step)] for i in range(k)]


def _units(value: torch.Tensor, exprs: tuple, space: int, child: int | None,
           moved: frozenset[int] = frozenset(), rotated: frozenset[int] = frozenset()
           ) -> list[tuple[int, torch.Tensor]]:
    """``(feature, (samples, units))`` matrices of ``value`` along ``space`` (joint ``space × child`` if nested).

    Every piece holding the space gives its samples (pieces pool them, same
    feature). Dims of other ``moved`` spaces are not samples (their order
    differs between the models): such a piece gives the mean (feature 1) and
    the mean square (feature 2) over those dims; a piece without them gives
    its values (feature 0). Where every such dim is of a ``rotated`` space (moved by rotations, whose mean
    changes), only the mean square, which rotations keep.
    """
    out = []
    for view, spaces in pieces(value, tuple(exprs)):
        if space not in spaces or (child is not None and child not in spaces):
            continue
        units = (spaces.index(space),) if child is None else (spaces.index(space), spaces.index(child))
        other = tuple(i for i, s in enumerate(spaces) if s in moved and i not in units)
        width = 1
        for d in units:
            width *= view.shape[d]
        lead = view.movedim(units, tuple(range(-len(units), 0)))
        if not other:
            out.append((0, lead.reshape(-1, width)))
            continue
        # dims before the moved unit dims keep their index; reduce them
        kept = [i for i in range(view.dim()) if i not in units]
        dims = tuple(kept.index(i) for i in other)
        x = lead.double()
        if not all(spaces[i] in rotated for i in other):
            out.append((1, x.mean(dims).reshape(-1, width)))
        out.append((2, (x * x).mean(dims).reshape(-1, width)))
    return out


_INPUT_CHECKS = (torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_async.msg)


class _Capture(torch.fx.Interpreter):
    """Runs a graph keeping the values of ``wanted`` nodes; higher-order ops run their submodules the same way."""

    def __init__(self, gm, wanted: set[str], values: dict[str, torch.Tensor] | None = None, prefix: str = ""):
        super().__init__(gm)
        self.wanted, self.prefix = wanted, prefix
        self.values = {} if values is None else values

    def run(self, *args, **kwargs):
        try:
            return super().run(*args, **kwargs)
        except InputCheckError as exc:  # the interpreter appends the node's code on further lines
            raise InputCheckError(str(exc).splitlines()[0]) from None

    def run_node(self, n):
        if n.op == "call_function" and n.target in _INPUT_CHECKS:
            try:
                return super().run_node(n)
            except RuntimeError as exc:
                check = str(exc).splitlines()[0] if str(exc) else "an input check"
                raise InputCheckError(
                    f"node {n.name!r}: {check}; the example inputs pass this check of the traced model but these "
                    "samples do not (random token ids hold no special tokens, such as the end-of-sequence token "
                    "a classifier pools): give samples shaped like real inputs (--calib FILE)") from None
        if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = tuple(self._inner(a, v) for a, v in zip(n.args, args))
            result = n.target(*args, **kwargs)
        else:
            result = super().run_node(n)
        key = self.prefix + n.name
        if key in self.wanted and isinstance(result, torch.Tensor):
            self.values[key] = result.detach()
        return result

    def _inner(self, arg, value):
        """A submodule argument as a callable that captures its own nodes, named ``prefix/submodule/node``."""
        if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and isinstance(value, torch.fx.GraphModule)):
            return value
        inner = _Capture(value, self.wanted, self.values, subgraph_prefix(self.prefix, arg.target))
        return lambda *a: inner.run(*a)


def graph_ops(gm: torch.fx.GraphModule, prefix: str = "") -> dict[str, str]:
    """``{node name: op}`` for every call of ``gm`` and of the submodules its higher-order ops run."""
    ops = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        ops[prefix + n.name] = str(n.target)
        if isinstance(n.target, torch._ops.HigherOrderOperator):
            for a in n.args:
                sub = getattr(gm, a.target, None) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else None
                if isinstance(sub, torch.fx.GraphModule):
                    ops.update(graph_ops(sub, subgraph_prefix(prefix, a.target)))
    return ops


def weight_only_nodes(analysis: Analysis) -> set[str]:
    """Top-level nodes that no graph input reaches (a view of a weight, a table gathered by a saved index): their
    values are weights, the same for every input, and carry no activation signal."""
    from ..frontend.trace import USER_INPUT

    graph = analysis.traced.graph_module.graph
    reached: set = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            ph = analysis.traced.placeholders.get(node.name)
            if ph is None or ph.kind == USER_INPUT:
                reached.add(node)
        elif any(a in reached for a in node.all_input_nodes):
            reached.add(node)
    return {n.name for n in graph.nodes if n.op == "call_function" and n not in reached}


def data_dependent_nodes(gm: torch.fx.GraphModule, prefix: str = "") -> set[str]:
    """Nodes (of ``gm`` and the submodules its higher-order ops run) with a size that depends on the data: their
    rows (tokens routed to an expert) are not the same samples in two models, so they are read at no node."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    out = set()
    for n in gm.graph.nodes:
        vals = n.meta.get("val")
        vals = vals if isinstance(vals, (list, tuple)) else [vals]
        if any(isinstance(v, torch.Tensor) and free_unbacked_symbols(v.shape) for v in vals):
            out.add(prefix + n.name)
        if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator):
            for a in n.args:
                sub = getattr(gm, a.target, None) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else None
                if isinstance(sub, torch.fx.GraphModule):
                    out |= data_dependent_nodes(sub, subgraph_prefix(prefix, a.target))
    return out


def on_device(analysis: Analysis, device: torch.device | None, out_of_core: bool = False):
    """``(exported program, graph module to run)``: the graph itself where it runs where it was traced, else
    a copy whose devices named inside the graph (``device=`` arguments, ``aten.to``) say ``device`` (the CPU
    if ``None``), ``meta`` too for a graph traced on ``meta`` weights (out of core). The program's own
    tensors do not move: ``_run`` moves the inputs it gives the graph."""
    ep = analysis.traced.exported
    if device is None and not out_of_core:
        return ep, ep.graph_module
    where = str(device or "cpu")
    mapping = {"meta": where, "cpu": where}
    gm = copy.deepcopy(ep.graph_module)

    def moved(d):
        return torch.device(mapping.get(str(d), str(d))) if isinstance(d, (torch.device, str)) else d

    for m in gm.modules():
        if not isinstance(m, torch.fx.GraphModule):
            continue
        for node in m.graph.nodes:
            if "device" in node.kwargs:
                node.kwargs = {**node.kwargs, "device": moved(node.kwargs["device"])}
            if node.op == "call_function" and node.target is torch.ops.aten.to.device:
                node.args = (node.args[0], moved(node.args[1]), *node.args[2:])
        m.recompile()
    return ep, gm


class _Stored:
    """A weight placeholder of a graph run out of core: read from the state at each use, as ``dtype``."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


class _Streamed(_Capture):
    """``_Capture`` whose weights (``_Stored`` placeholders) are read from ``state`` by each op that uses them
    and dropped after it: peak memory is one op's weights plus the live activations."""

    def __init__(self, gm, wanted: set[str], state: Mapping[str, torch.Tensor], device: torch.device | None):
        super().__init__(gm, wanted)
        self.state, self.device = state, device

    def fetch_args_kwargs_from_env(self, n):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return torch.fx.node.map_aggregate(args, self._read), torch.fx.node.map_aggregate(kwargs, self._read)

    def _read(self, value):
        if not isinstance(value, _Stored):
            return value
        t = self.state[value.name]
        return to_device(t.to(value.dtype) if t.is_floating_point() else t, self.device)


def _stored_inputs(ep, flat: list) -> list:
    """``flat`` with every parameter and persistent buffer on ``meta`` (a model fused out of core) as a
    ``_Stored`` placeholder of its state-dict name."""
    from torch.export.graph_signature import InputKind

    out = []
    for spec, value in zip(ep.graph_signature.input_specs, flat):
        stored = spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent)
        if stored and isinstance(value, torch.Tensor) and value.device.type == "meta":
            value = _Stored(spec.target, value.dtype)
        out.append(value)
    return out


def _run(analysis: Analysis, args: tuple, kwargs: Mapping[str, Any], wanted: set[str], program=None,
         device: torch.device | None = None, state: Mapping[str, torch.Tensor] | None = None
         ) -> dict[str, torch.Tensor]:
    """The values of the ``wanted`` nodes on one batch; ``program``: ``on_device``'s ``(exported program,
    graph module)``, run on ``device`` (where every input goes); ``state``: the weights, read on access, of a
    model whose module holds ``meta`` tensors (fused out of core; ``None``: the module's own)."""
    ep, gm = program if program is not None else on_device(analysis, device, state is not None)
    flat = ep._graph_module_flat_inputs(tuple(args), dict(kwargs))
    if state is not None:
        flat = _stored_inputs(ep, flat)
    if device is not None:
        flat = [to_device(x, device) if isinstance(x, torch.Tensor) else x for x in flat]
    probes = {n: analysis.probes[n] for n in wanted if n in analysis.probes}
    keep = set(wanted) | {i for p in probes.values() for i in p.inputs}
    cap = _Streamed(gm, keep, state, device) if state is not None else _Capture(gm, keep)
    with torch.no_grad():
        cap.run(*flat)
        for name, probe in probes.items():
            cap.values[name] = probe.compute(*(cap.values[i] for i in probe.inputs))
    return cap.values


def activation_cost(target: Analysis, source: Analysis, batches: Sequence[tuple[tuple, Mapping[str, Any]]],
                    fixed: set[int] = frozenset(), nodes_per_space: int = 16,
                    progress: Callable[[str], None] | None = None, levels=None,
                    reduce: Callable[[dict], None] | None = None, halves: bool = False,
                    device: torch.device | None = None,
                    states: Sequence[Mapping[str, torch.Tensor] | None] = (None, None)) -> ActivationCost:
    """Correlation costs for every block of ``target`` from both models' activations on ``batches``.

    ``reduce``: applied to the accumulated sums before they become correlations
    (``fxfuse.models.distributed.all_reduce_sums``: the sums of every worker's batches);
    ``halves``: also the costs of the even and of the odd samples alone (``ActivationCost.halves``);
    ``device``: where both graphs run and the sums accumulate (``None``: in place);
    ``states``: the target's and the source's weights where their modules hold ``meta`` tensors (out of
    core): each op reads the weights it uses from them (``None``: the modules' own).
    """
    programs = (on_device(target, device, states[0] is not None), on_device(source, device, states[1] is not None))
    plan_blocks = blocks(target, set(fixed))
    jobs: list[tuple[tuple[int, int | None], str]] = []
    for b in plan_blocks:
        if b.root_free or not b.children:
            jobs += [((b.root, None), n) for n in choose_nodes(target, b.root, nodes_per_space)]
        for c in b.children:
            jobs += [((b.root, c), n) for n in choose_nodes(target, c, nodes_per_space, also=b.root)]
    wanted = {n for _, n in jobs}
    # spaces whose axes are no samples: the other moved spaces (a block's own nested dims stay samples,
    # their joint statistics come from the nested jobs)
    moved = frozenset(b.root for b in plan_blocks if b.root_free) | {c for b in plan_blocks for c in b.children}
    own = {b.root: frozenset(b.children) for b in plan_blocks}
    grouped_block = {b.root: any((levels or {}).get(s, 0) > 0 for s in (b.root,) + b.children) for b in plan_blocks}
    rotary = frozenset(s for s, level in (levels or {}).items() if level == ROTARY)
    stats: dict[tuple[tuple[int, int | None], str, int], _Stats] = {}
    shown = bar(progress, "activations", len(batches))
    for i, (args, kwargs) in enumerate(batches):
        vt = _run(target, args, kwargs, wanted, programs[0], device, states[0])
        vs = _run(source, args, kwargs, wanted, programs[1], device, states[1])
        for key, node in jobs:
            space, child = key
            exprs, exprs_s = node_exprs(target, node), node_exprs(source, node)
            if node not in vs or exprs_s is None:
                raise ValueError(f"node {node} of the target has no counterpart in the source graph")
            # the other nested dims of the block are moved too: samples only along dims that keep their order
            # (their moments are permutation-invariant; a block with a larger group keeps them as samples)
            others = moved - own[space] if child is None or grouped_block[space] else moved - {space, child}
            # a block's rotary dims move by rotations the samples cannot follow: reduced to their mean square
            others |= rotary & own[space] - {child}
            for (feature, x), (_, y) in zip(_units(vt[node], exprs, space, child, others, rotary),
                                            _units(vs[node], exprs_s, space, child, others, rotary)):
                st = stats.get((key, node, feature))
                if st is None:
                    st = stats[(key, node, feature)] = _Stats(x.shape[1], y.shape[1], halves, device)
                st.add(x, y)
        shown.update()
    shown.close()
    if device is not None:  # the sums come back to the CPU: reduced over workers and turned into costs there
        for st in stats.values():
            st.to_host()
    if reduce is not None:
        reduce(stats)
    sizes = {s.id: (s.size, source.spaces[s.id].size) for s in target.spaces}
    cost = ActivationCost(*_costs(target, source, stats, levels), sizes, device)
    if halves:
        parts = [{k: st.halves()[h] for k, st in stats.items()} for h in (0, 1)]
        cost.halves = tuple(ActivationCost(*_costs(target, source, p, levels), sizes, device) for p in parts)
    return cost


def _costs(target: Analysis, source: Analysis, stats: Mapping, levels) -> tuple[dict, dict]:
    """``(root costs, nested costs)`` summed over the nodes of each job."""
    root_cost: dict[int, np.ndarray] = {}
    nested_cost: dict[tuple[int, int], np.ndarray] = {}
    for ((space, child), _, _), st in stats.items():
        grouped = (levels or {}).get(space if child is None else child, 0) > 0
        rho = st.covariance() if grouped else st.correlation()  # groups: covariance (rotation-equivariant)
        if child is None:
            root_cost[space] = root_cost.get(space, 0) + rho
        else:
            n, n_s = target.spaces[space].size, source.spaces[space].size
            m = target.spaces[child].size
            r4 = rho.reshape(n, m, n_s, m).transpose(0, 2, 1, 3)
            nested_cost[(space, child)] = nested_cost.get((space, child), 0) + r4
    return root_cost, nested_cost
