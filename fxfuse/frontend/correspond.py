"""Which parameter of one model is which of another, found from their exported graphs, not their names.

Two implementations of one architecture compute the same function with other
parameter names, module lists, weight layouts and fused projections. Each
exported graph is first canonicalised (``canonical``):

* views, reshapes, transposes and copies of activations, and dropout in eval,
  are transparent (the same value);
* ``addmm(b, x, W)``, ``mm(x, W)``, ``matmul(x, W)``, ``linear(x, W, b)`` and
  ``x @ W + b`` are one ``linear(x, V, b)`` with ``V`` in ``(out, in)`` layout,
  a view of the parameter (``Wᵀ`` for HF GPT-2's ``Conv1D``; ``fxfuse.frontend.relayout``);
* a linear whose output is only split along its output features (``split``,
  ``chunk``, ``unbind`` or an index of every piece, after reshapes and permutes
  that keep the features' outermost factor apart) is one linear per piece,
  each reading a slice of the fused weight and bias, the same as separate
  projections;
* ops that read no weight (masks, positions) are one leaf, named by the model
  inputs they read.

The two canonical graphs are then matched by colour: a node's forward colour
hashes its op, its scalar arguments, the shapes of its weight operands and
its operands' colours (unordered for ``add``/``mul``); its colour adds where
its value goes (the colours of its users and at which operand). Every colour
must occur as often in one graph as in the other; then nodes of one colour
pair in topological order, and their weight operands pair one to one, giving
``Piece`` s ``view_t(target) ← view_s(source)``. A graph that differs in one op,
a weight without a counterpart and nodes whose weights cannot be told apart
are each refused in one line naming both sides.

(One module above 500 lines on purpose: the canonical form and the matching
share the ``Node``/``Operand`` records and read as one algorithm, top to
bottom; apart, neither has a second user.)
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from ..core.errors import FxfuseError
from .relayout import Piece, View, compose, shape_of, text, transform_name
from .trace import BUFFER, PARAMETER, USER_INPUT, TracedModel, op_name


class CorrespondenceError(FxfuseError):
    """Two graphs whose parameters cannot be put in correspondence; one line naming both sides."""


TRANSPARENT = {
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.contiguous.default",
    "aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.transpose.int", "aten.permute.default",
    "aten.t.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.default", "aten.flatten.using_ints",
    "aten.unflatten.int", "aten.expand.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.to.device",
    "aten._to_copy.default", "aten.type_as.default", "aten.dropout.default", "aten.lift_fresh_copy.default",
}
TRANSPOSES = {"aten.t.default", "aten.transpose.int", "aten.permute.default"}
SPLITS = {"aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.tensor_split.sections",
          "aten.unbind.int", "aten.select.int"}
COMMUTATIVE = {"aten.add.Tensor", "aten.mul.Tensor", "aten.maximum.default", "aten.minimum.default"}
LINEAR = "linear"


@dataclass(frozen=True)
class Operand:
    """One tensor operand of a canonical node: ``kind`` ``act`` (``ref`` a node index), ``aux`` (``ref`` the
    sorted model inputs it reads) or ``state`` (``ref`` a state-dict name, ``view`` its layout)."""

    kind: str
    ref: object
    view: View = ()


@dataclass(frozen=True)
class Node:
    """A canonical op: ``op`` (``linear`` or an ATen name), scalar ``attrs``, ``operands``; ``fx`` the graph node
    it comes from."""

    op: str
    attrs: tuple
    operands: tuple[Operand, ...]
    fx: str

    @property
    def states(self) -> tuple[Operand, ...]:
        return tuple(o for o in self.operands if o.kind == "state")


@dataclass(frozen=True)
class Canonical:
    """A canonical graph: ``nodes`` in topological order (dead ones ``None``), ``outputs`` their operands,
    ``shapes`` of every state tensor read, ``states`` every state tensor (tied ones by their graph name),
    ``label`` naming the model in errors."""

    nodes: tuple
    outputs: tuple[Operand, ...]
    shapes: dict
    states: tuple[str, ...]
    label: str

    def live(self) -> list[tuple[int, Node]]:
        return [(i, n) for i, n in enumerate(self.nodes) if n is not None]

    def shape(self, o: Operand) -> tuple[int, ...]:
        return shape_of(self.shapes[o.ref], o.view)


def _val(node) -> object:
    return node.meta.get("val") if hasattr(node, "meta") else None


def _state_names(traced: TracedModel) -> dict[str, str]:
    """``{placeholder: state-dict name}`` of parameters and persistent floating-point buffers (buffers of
    integers or booleans, such as position ids and masks, are read like inputs)."""
    vals = {n.name: _val(n) for n in traced.graph.nodes if n.op == "placeholder"}
    out = {}
    for name, ph in traced.placeholders.items():
        val = vals.get(name)
        floating = isinstance(val, torch.Tensor) and val.is_floating_point()
        if ph.kind == PARAMETER or (ph.kind == BUFFER and ph.persistent and floating):
            out[name] = ph.target
    return out


def canonical(traced: TracedModel, label: str) -> Canonical:
    """The canonical graph of ``traced`` (see module doc)."""
    states = _state_names(traced)
    inputs = [n for n, ph in traced.placeholders.items() if ph.kind == USER_INPUT]
    nodes: list = []
    made: dict[int, object] = {}  # node index -> fx node it was made from
    values: dict = {}
    shapes: dict[str, tuple[int, ...]] = {}
    outputs: tuple = ()
    pending: dict = {}  # the end of a linear's output chain whose selects are pieces: those pieces
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            if n.name in states:
                values[n] = Operand("state", states[n.name])
                shapes[states[n.name]] = tuple(_val(n).shape)
            else:
                values[n] = Operand("aux", (inputs.index(n.name),) if n.name in inputs else ())
            continue
        if n.op == "output":
            outputs = tuple(values[a] for a in torch.utils._pytree.tree_leaves(n.args)
                            if isinstance(a, torch.fx.Node) and isinstance(values.get(a), Operand))
            continue
        if n.op == "get_attr":  # the body of a higher-order op: a leaf named by its ops
            body = getattr(traced.graph_module, n.target, None)
            ops = tuple(op_name(m.target) for m in body.graph.nodes if m.op == "call_function") \
                if isinstance(body, torch.fx.GraphModule) else (str(n.target),)
            values[n] = Operand("aux", ("body",) + ops)
            continue
        if n.op != "call_function":
            raise CorrespondenceError(f"{label}: node {n.name} ({n.op}) cannot be matched: only calls are")
        value = _canonical_call(n, values, nodes, made, shapes, pending)
        if value is not None:
            values[n] = value
    return Canonical(tuple(nodes), outputs, shapes, _read_states(traced, states), label)


def _read_states(traced: TracedModel, states: dict[str, str]) -> tuple[str, ...]:
    """The state tensors to be matched: those the graph reads, and any other that is no tied alias of one."""
    read = {n.name for n in traced.graph.nodes if n.op == "placeholder" and n.users}
    group = {}
    for first, others in traced.aliases.items():
        for name in (first, *others):
            group[name] = (first, *others)
    read_names = {states[p] for p in states if p in read}
    keep = [name for p, name in states.items()
            if p in read or not any(g in read_names for g in group.get(name, (name,)))]
    return tuple(sorted(set(keep)))


def _canonical_call(n, values: dict, nodes: list, made: dict, shapes: dict, pending: dict):
    op = op_name(n.target)
    leaves = torch.utils._pytree.tree_leaves((n.args, n.kwargs))
    tensors = [values.get(a) for a in leaves if isinstance(a, torch.fx.Node)]
    if op == "_operator.getitem" and isinstance(values.get(n.args[0]), tuple):
        return values[n.args[0]][n.args[1]]
    if not n.users and _val(n) is None:
        return None  # an assertion: no value
    if any(not isinstance(v, Operand) for v in tensors):
        return None  # reads a value that is no tensor (an assertion's result): nothing to match
    if all(v.kind == "aux" for v in tensors):  # reads no weight: a leaf named by the inputs it reads
        return Operand("aux", tuple(sorted({i for v in tensors for i in v.ref}, key=repr)))
    first = values.get(n.args[0]) if n.args and isinstance(n.args[0], torch.fx.Node) else None
    if op in TRANSPARENT and first is not None:
        if first.kind == "act":
            return first
        shape = shape_of(shapes[first.ref], first.view)
        if op in TRANSPOSES and len(shape) == 2:
            swap = n.args[1] not in ([0, 1], (0, 1)) if op == "aten.permute.default" else True
            return Operand("state", first.ref, compose(first.view, ("t",))) if swap else first
        if op not in TRANSPOSES and tuple(_val(n).shape) == shape:
            return first
    linear = _as_linear(op, n, values)
    if linear is not None:
        return _add(nodes, made, Node(LINEAR, (), linear, n.name), n)
    folded = _bias_add(op, n, values, nodes, made, shapes)
    if folded is not None:
        return folded
    if op in SPLITS and first is not None and first.kind == "act":
        pieces = _split_linear(n, first, nodes, made, shapes, pending)
        if pieces is not None:
            return pieces
    attrs = _scalars(n)
    operands = tuple(values[a] for a in leaves if isinstance(a, torch.fx.Node))
    value = _add(nodes, made, Node(op, attrs, operands, n.name), n)
    val = _val(n)
    if isinstance(val, (tuple, list)):  # a multi-output op: its items are its getitems
        return tuple(Operand("act", (value.ref, i)) for i in range(len(val)))
    return value


def _scalars(n) -> tuple:
    """The scalar arguments of a call as they enter its colour: floats (to 6 digits), flags and strings, by name,
    with the schema's defaults filled in (an argument given as its default equals one left out). Integers
    (dims, sizes) are left out, as views change them."""
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        named = list(enumerate(torch.utils._pytree.tree_leaves((n.args, n.kwargs))))
    else:
        named = []
        for i, arg in enumerate(schema.arguments):
            if i < len(n.args):
                named.append((arg.name, n.args[i]))
            elif arg.name in n.kwargs:
                named.append((arg.name, n.kwargs[arg.name]))
            elif arg.has_default_value():
                named.append((arg.name, arg.default_value))
    out = []
    for name, v in named:
        if isinstance(v, (bool, str)):
            out.append((name, v))
        elif isinstance(v, float):
            out.append((name, f"{v:.6g}"))
    return tuple(out)


def _add(nodes: list, made: dict, node: Node, fx) -> Operand:
    nodes.append(node)
    made[len(nodes) - 1] = fx
    return Operand("act", len(nodes) - 1)


def _as_linear(op: str, n, values: dict) -> tuple[Operand, ...] | None:
    """``(x, V, b)`` (or ``(x, V)``) of a node computing ``x Vᵀ + b`` with weight ``V``, else ``None``."""
    v = [values.get(a) if isinstance(a, torch.fx.Node) else a for a in n.args]
    is_state = lambda o: isinstance(o, Operand) and o.kind == "state"  # noqa: E731
    is_act = lambda o: isinstance(o, Operand) and o.kind in ("act", "aux")  # noqa: E731  (x: any non-weight)
    if op == "aten.linear.default" and is_act(v[0]) and is_state(v[1]) and (len(v) < 3 or v[2] is None
                                                                          or is_state(v[2])):
        return tuple(o for o in v[:3] if o is not None)
    if op == "aten.addmm.default" and len(v) == 3 and not n.kwargs and is_state(v[0]) and is_act(v[1]) \
            and is_state(v[2]):
        return v[1], Operand("state", v[2].ref, compose(v[2].view, ("t",))), v[0]
    if op in ("aten.mm.default", "aten.matmul.default") and is_act(v[0]) and is_state(v[1]):
        return v[0], Operand("state", v[1].ref, compose(v[1].view, ("t",)))
    return None


def _bias_add(op: str, n, values: dict, nodes: list, made: dict, shapes: dict) -> Operand | None:
    """``linear(x, V) + b`` (``x @ W + b``) as ``linear(x, V, b)``, when the sum is the product's only use and
    ``b`` a weight of its output features; else ``None``."""
    if op != "aten.add.Tensor" or len(n.args) != 2 or n.kwargs:
        return None
    for a, b in (n.args, n.args[::-1]):
        y, bias = values.get(a), values.get(b)
        if not (isinstance(y, Operand) and y.kind == "act" and isinstance(y.ref, int) and isinstance(bias, Operand)
                and bias.kind == "state"):
            continue
        linear = nodes[y.ref]
        if linear is None or linear.op != LINEAR or len(linear.operands) != 2:
            continue
        fx = a
        while fx is not made[y.ref] and op_name(getattr(fx, "target", None)) in TRANSPARENT - TRANSPOSES:
            fx = fx.args[0] if len(fx.users) == 1 else None
        features = shape_of(shapes[linear.operands[1].ref], linear.operands[1].view)[0]
        if fx is made[y.ref] and len(fx.users) == 1 and shape_of(shapes[bias.ref], bias.view) == (features,) \
                and tuple(_val(n).shape) == tuple(_val(a).shape):
            nodes[y.ref] = Node(LINEAR, (), linear.operands + (bias,), linear.fx)
            return y
    return None


def _split_linear(n, first: Operand, nodes: list, made: dict, shapes: dict, pending: dict):
    """The pieces of a linear's output split along its output features, as one linear per piece, else ``None``.

    The split (``split``/``chunk``/``unbind``, or ``select`` of every index) may come after views, reshapes
    and permutes of the output, so long as it cuts the outermost factor of the feature dim: ``chunk(3, -1)``
    of ``(…, 3d)``, or ``unbind(0)`` of ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``.
    """
    op = op_name(n.target)
    end = n.args[0]
    if op == "aten.select.int" and end in pending:
        return pending[end][n.args[2]]
    if not isinstance(first.ref, int) or nodes[first.ref].op != LINEAR:
        return None
    chain, fx = [], end
    while op_name(getattr(fx, "target", None)) in TRANSPARENT:
        chain.append(fx)
        fx = fx.args[0]
    if fx is not made[first.ref] or any(len(c.users) != 1 for c in [fx] + chain[1:]):
        return None
    if op == "aten.select.int":
        users = list(end.users)
        if any(op_name(u.target) != "aten.select.int" or u.args[1] != n.args[1] for u in users):
            return None
    elif len(end.users) != 1:
        return None
    feat = _feature_dims(fx, reversed(chain))
    val = _val(end)
    at = 1 if op in ("aten.unbind.int", "aten.select.int") else 2
    dim = n.args[at] if len(n.args) > at else n.kwargs.get("dim", 0)
    if feat is None or not isinstance(dim, int) or val is None or dim % val.dim() != feat[0]:
        return None
    inner = 1
    for d in feat[1:]:
        inner *= int(val.shape[d])
    if op in ("aten.unbind.int", "aten.select.int"):
        sizes = [1] * int(val.shape[dim])
    else:
        sizes = [int(p.shape[dim]) for p in _val(n)]
    linear = nodes[first.ref]
    weight = linear.operands[1]
    if shape_of(shapes[weight.ref], weight.view)[0] != sum(sizes) * inner:
        return None
    nodes[first.ref] = None
    out, start = [], 0
    for size in sizes:
        narrow = ("narrow", 0, start * inner, size * inner)
        states = tuple(Operand("state", o.ref, compose(o.view, narrow)) for o in linear.operands[1:])
        out.append(_add(nodes, made, Node(LINEAR, (), (linear.operands[0],) + states,
                                          f"{linear.fx}[{start * inner}:{(start + size) * inner}]"), made[first.ref]))
        start += size
    if op == "aten.select.int":
        pending[end] = out
        return out[n.args[2]]
    return tuple(out)


def _feature_dims(linear, chain) -> list[int] | None:
    """The dims of the last of ``chain``'s values that tile a linear's output features, outermost first; ``None``
    where an op of the chain mixes them with other dims."""
    shape = list(_val(linear).shape)
    feat = [len(shape) - 1]
    for c in chain:
        op, new = op_name(c.target), list(_val(c).shape)
        if op in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.flatten.using_ints",
                  "aten.unflatten.int", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.default"):
            if feat != list(range(feat[0], len(shape))):
                return None
            features = _prod(shape[feat[0]:])
            j = next((j for j in range(len(new), -1, -1) if _prod(new[j:]) == features
                      and _prod(new[:j]) == _prod(shape[:feat[0]])), None)
            if j is None or j == len(new):
                return None
            feat = list(range(j, len(new)))
        elif op == "aten.permute.default":
            perm = [d % len(shape) for d in c.args[1]]
            feat = [perm.index(d) for d in feat]
        elif op == "aten.transpose.int":
            a, b = c.args[1] % len(shape), c.args[2] % len(shape)
            feat = [b if d == a else a if d == b else d for d in feat]
        elif op == "aten.t.default":
            feat = [1 - d for d in feat]
        elif new != shape:
            return None
        shape = new
    return feat


def _prod(sizes) -> int:
    out = 1
    for x in sizes:
        out *= int(x)
    return out


# ---------------------------------------------------------------- colours


def _hash(*parts) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:20]


def _operand_key(o: Operand, graph: Canonical, colour: dict) -> object:
    if o.kind == "act":
        ref = o.ref if isinstance(o.ref, int) else o.ref[0]
        return ("act", colour[ref], None if isinstance(o.ref, int) else o.ref[1])
    if o.kind == "aux":
        return ("aux", o.ref)
    return ("state", graph.shape(o))


def colours(graph: Canonical) -> tuple[dict[int, str], dict[int, str]]:
    """``(forward, full)`` colours of the live nodes (see module doc)."""
    fwd: dict[int, str] = {}
    for i, node in graph.live():
        keys = [_operand_key(o, graph, fwd) for o in node.operands]
        if node.op in COMMUTATIVE:
            keys = sorted(keys, key=repr)
        fwd[i] = _hash(node.op, node.attrs, keys)
    uses: dict[int, list] = defaultdict(list)
    for i, node in graph.live():
        for pos, o in enumerate(node.operands):
            if o.kind == "act":
                ref = o.ref if isinstance(o.ref, int) else o.ref[0]
                uses[ref].append((i, "c" if node.op in COMMUTATIVE else pos))
    for pos, o in enumerate(graph.outputs):
        if o.kind == "act":
            uses[o.ref if isinstance(o.ref, int) else o.ref[0]].append((None, pos))
    full: dict[int, str] = {}
    for i, _node in reversed(graph.live()):
        users = sorted(repr(("out", p) if u is None else (full[u], p)) for u, p in uses[i])
        full[i] = _hash(fwd[i], users)
    return fwd, full


# ---------------------------------------------------------------- matching


@dataclass(frozen=True)
class Correspondence:
    """``pieces``: ``view_t(target) ← view_s(source)`` for every weight read by the two graphs; ``shapes``:
    ``(source shapes, target shapes)`` by name; ``labels``: ``(source, target)``."""

    pieces: tuple[Piece, ...]
    source_shapes: dict = field(default_factory=dict)
    target_shapes: dict = field(default_factory=dict)
    labels: tuple[str, str] = ("source", "target")

    def rows(self) -> list[tuple[str, str, str]]:
        """``(source expression, target expression, transform)``, one per piece, in the target's order."""
        out = []
        for p in self.pieces:
            s_shape, t_shape = self.source_shapes[p.source], self.target_shapes[p.target]
            s_view, t_view = p.source_view, p.target_view
            if t_view == (("t",),):  # Tᵀ ← S is T ← Sᵀ
                s_view, t_view = compose(s_view, ("t",)), ()
            out.append((text(p.source, s_view, s_shape), text(p.target, t_view, t_shape),
                        transform_name(p.source_view, p.target_view, s_shape, t_shape)))
        return out

    @property
    def identity(self) -> bool:
        """Whether every target tensor is the source tensor of the same name, as it is."""
        return all(p.source == p.target and p.source_view == p.target_view for p in self.pieces) and \
            len({p.target for p in self.pieces}) == len(self.pieces)


def match(source: Canonical, target: Canonical) -> Correspondence:
    """The correspondence of ``source``'s weights to ``target``'s (see module doc); ``CorrespondenceError``."""
    s_fwd, s_full = colours(source)
    t_fwd, t_full = colours(target)
    _check_counts(source, target, s_fwd, t_fwd, "")
    _check_counts(source, target, s_full, t_full, " (it is used differently)")
    if len(source.outputs) != len(target.outputs):
        raise CorrespondenceError(f"{source.label} returns {len(source.outputs)} tensors, {target.label} "
                                  f"{len(target.outputs)}")
    by_colour: dict[str, list[int]] = defaultdict(list)
    for i, _node in source.live():
        by_colour[s_full[i]].append(i)
    taken: Counter = Counter()
    pieces: list[Piece] = []
    for j, t_node in target.live():
        group = by_colour[t_full[j]]
        if len(group) > 1 and t_node.states:
            _ambiguous(source, target, group, [k for k, _ in target.live() if t_full[k] == t_full[j]])
        s_node = source.nodes[group[taken[t_full[j]]]]
        taken[t_full[j]] += 1
        s_states, t_states = _ordered(s_node, source), _ordered(t_node, target)
        for s, t in zip(s_states, t_states):
            pieces.append(Piece(t.ref, t.view, s.ref, s.view))
    pieces = _collapsed(list(dict.fromkeys(pieces)), source.shapes, target.shapes)
    _check_covered(source, {p.source for p in pieces}, target)
    _check_covered(target, {p.target for p in pieces}, source)
    return Correspondence(tuple(pieces), dict(source.shapes), dict(target.shapes), (source.label, target.label))


def _collapsed(pieces: list[Piece], s_shapes: dict, t_shapes: dict) -> list[Piece]:
    """Pieces of one target tensor that copy one source tensor of its size slice by slice, through views equal
    but for their transposes, as one whole-tensor piece (a fused projection matched to a fused projection is a
    copy, or a transpose)."""
    by_target: dict[str, list[Piece]] = defaultdict(list)
    for p in pieces:
        by_target[p.target].append(p)
    out = []
    for name, group in by_target.items():
        whole = _whole(group, s_shapes, t_shapes[name])
        out.extend([whole] if whole is not None else group)
    return out


def _whole(group: list[Piece], s_shapes: dict, t_shape: tuple) -> Piece | None:
    first = group[0]
    heads = set()
    for p in group:
        k = len(p.source_view) - (1 if p.source_view and p.source_view[-1][0] == "narrow" else 0)
        j = len(p.target_view) - (1 if p.target_view and p.target_view[-1][0] == "narrow" else 0)
        if p.source != first.source or p.source_view[k:] != p.target_view[j:]:
            return None
        heads.add((p.source_view[:k], p.target_view[:j]))
    if len(heads) != 1:
        return None
    s_head, t_head = heads.pop()
    if shape_of(s_shapes[first.source], s_head) != shape_of(t_shape, t_head):
        return None
    narrows = sorted(p.target_view[-1][2:] for p in group
                     if p.target_view and p.target_view[-1][0] == "narrow" and p.target_view[-1][1] == 0)
    size = shape_of(t_shape, t_head)[0] if t_shape else 0
    if narrows and (len(narrows) != len(group) or any(a != b for (a, _), b in
                                                      zip(narrows, [0] + [x + n for x, n in narrows[:-1]]))
                    or narrows[-1][0] + narrows[-1][1] != size):
        return None
    if not narrows and len(group) != 1:
        return None
    return Piece(first.target, t_head, first.source, s_head)


def _ordered(node: Node, graph: Canonical) -> list[Operand]:
    states = list(node.states)
    return sorted(states, key=lambda o: graph.shape(o)) if node.op in COMMUTATIVE else states


def _describe(graph: Canonical, i: int) -> str:
    node = graph.nodes[i]
    weights = ", ".join(sorted({o.ref for o in node.states}))
    return f"node {node.fx} ({node.op}{', reading ' + weights if weights else ''})"


def _check_counts(source: Canonical, target: Canonical, s_col: dict, t_col: dict, how: str) -> None:
    s_count, t_count = Counter(s_col.values()), Counter(t_col.values())
    if s_count == t_count:
        return
    s_first = next((i for i, _ in source.live() if s_count[s_col[i]] != t_count[s_col[i]]), None)
    t_first = next((i for i, _ in target.live() if t_count[t_col[i]] != s_count[t_col[i]]), None)
    if t_first is None:
        raise CorrespondenceError(f"the graphs differ: {source.label} {_describe(source, s_first)} has no "
                                  f"counterpart in {target.label}{how}")
    if s_first is None:
        raise CorrespondenceError(f"the graphs differ: {target.label} {_describe(target, t_first)} has no "
                                  f"counterpart in {source.label}{how}")
    raise CorrespondenceError(f"the graphs differ: {source.label} {_describe(source, s_first)} against "
                              f"{target.label} {_describe(target, t_first)}{how}")


def _ambiguous(source: Canonical, target: Canonical, s_group: list[int], t_group: list[int]) -> None:
    s = "; ".join(_describe(source, i) for i in s_group[:3])
    t = "; ".join(_describe(target, i) for i in t_group[:3])
    raise CorrespondenceError(f"ambiguous match: {source.label} {s} and {target.label} {t} compute alike, so their "
                              "weights cannot be told apart")


def _check_covered(graph: Canonical, used: set[str], other: Canonical) -> None:
    missing = [name for name in graph.states if name not in used]
    if missing:
        raise CorrespondenceError(f"{graph.label} {missing[0]} has no counterpart in {other.label}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                  + ": the graph reads no such weight there")


def correspond(source: TracedModel, target: TracedModel, labels: tuple[str, str] = ("source", "target")
               ) -> Correspondence:
    """The correspondence of two traced models' weights (``canonical`` then ``match``)."""
    return match(canonical(source, labels[0]), canonical(target, labels[1]))
