"""Kinds for composite ops: einsum equations, stack, repeat_interleave, repeat, meshgrid, recurrent layers.

Registered in ``fxfuse.frontend.kinds.KINDS`` on import (``fxfuse.frontend.all_kinds`` imports this
module). Same verbs as there: ``ctx.tie``, ``ctx.pin``, ``ctx.free``;
a node a kind cannot read raises ``RuleMismatch`` and fails closed.
"""
from __future__ import annotations

import operator
import re

from ..core.axes import CONCAT, PRODUCT
from .kinds import RuleMismatch, _norm, _single_output, kind

# ---------------------------------------------------------------- einsum equations

_TERM = re.compile(r"\.\.\.|[A-Za-z]")


def parse_equation(equation: str, operands: int) -> tuple[list[list[str]], list[str]]:
    """``"bhqd,bhkd->bhqk"`` -> ``([[b,h,q,d], [b,h,k,d]], [b,h,q,k])``; ``"..."`` is one term.

    Without ``->`` the output is the letters that occur exactly once, in alphabetical
    order, after ``...`` when an operand has one (numpy's implicit mode).
    """
    if not isinstance(equation, str):
        raise RuleMismatch(f"equation is not a string: {equation!r}")
    text = equation.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    terms = lhs.split(",")
    if len(terms) != operands:
        raise RuleMismatch(f"equation {equation!r} has {len(terms)} operands, the node {operands}")
    ins = []
    for term in terms + ([rhs] if arrow else []):
        tokens = _TERM.findall(term)
        if "".join(tokens) != term or tokens.count("...") > 1:
            raise RuleMismatch(f"cannot read einsum term {term!r} of {equation!r}")
        ins.append(tokens)
    if arrow:
        return ins[:-1], ins[-1]
    letters = [t for term in ins for t in term if t != "..."]
    out = sorted(t for t in set(letters) if letters.count(t) == 1)
    return ins, (["..."] if any("..." in term for term in ins) else []) + out


def _expand(term: list[str], rank: int) -> list[str | int]:
    """Each dim's letter; the dims of ``...`` become their offset from the right end of the ellipsis (0, 1, ...)."""
    if "..." not in term:
        if len(term) != rank:
            raise RuleMismatch(f"einsum term {''.join(term)!r} has {len(term)} dims, the tensor {rank}")
        return list(term)
    i = term.index("...")
    extra = rank - (len(term) - 1)
    if extra < 0:
        raise RuleMismatch(f"einsum term {''.join(term)!r} needs at least {len(term) - 1} dims, the tensor has {rank}")
    return term[:i] + list(range(extra - 1, -1, -1)) + term[i + 1:]


@kind("equation", "torch.einsum: the axis signature is read from the equation string (option 'equation'); a letter "
      "shared by tensors ties their axes, a letter summed on one operand alone ties nothing (sums are invariant).",
      options=("equation", "tensors"))
def equation(ctx) -> None:
    values = list(ctx.value(ctx.rule.option("tensors", "tensors")) or [])
    ins, out_term = parse_equation(ctx.value(ctx.rule.option("equation", "equation")), len(values))
    out = _single_output(ctx)
    operands = []
    for v, term in zip(values, ins):
        atoms, shape = ctx.atoms(v), ctx.shape(v)
        if atoms is None or shape is None:
            raise RuleMismatch("an einsum operand is not a tensor")
        operands.append((v, _expand(term, len(shape)), atoms, shape))
    out_dims = _expand(out_term, len(ctx.out_shape))
    members: dict[str | int, list[tuple[int, int]]] = {}
    for _, dims, atoms, shape in operands + [(None, out_dims, out, ctx.out_shape)]:
        for d, a, s in zip(dims, atoms, shape):
            if s != 1:  # size-1 dims broadcast
                members.setdefault(d, []).append((a, s))
    for d, group in members.items():
        if len({s for _, s in group}) > 1:
            raise RuleMismatch(f"einsum index {d!r} has sizes {sorted({s for _, s in group})}")
        for a, _ in group[1:]:
            ctx.tie(group[0][0], a)
    produced = set(out_dims)
    for v, dims, atoms, shape in operands:
        for d, a, s in zip(dims, atoms, shape):
            if s != 1:
                ctx.param_use(v, a, consumed=d not in produced)


# ---------------------------------------------------------------- stack and repeat_interleave


@kind("stack", "Stacks the tensors of option 'tensors' along a new axis at option 'dim': that axis indexes the "
      "tensors and is pinned, the others are tied.", options=("tensors", "dim"))
def stack(ctx) -> None:
    values = list(ctx.value(ctx.rule.option("tensors", "tensors")) or [])
    out = _single_output(ctx)
    rank = len(ctx.out_shape)
    dim = _norm(ctx.value(ctx.rule.option("dim", "dim")) or 0, rank)
    for v in values:
        atoms = ctx.atoms(v)
        if atoms is None or len(atoms) != rank - 1:
            raise RuleMismatch("a stacked value is not a tensor of the output's rank minus one")
        for i, atom in enumerate(atoms):
            ctx.tie(out[i if i < dim else i + 1], atom)
    if ctx.out_shape[dim] > 1:
        ctx.pin(out[dim], f"{ctx.op} keeps its tensors in order")


@kind("repeat_interleave", "Repeats each index of option 'dim' (an integer count, option 'repeats') in place: the "
      "output axis is (input axis × copies), constant along the copies, which are free.",
      options=("repeats", "dim"))
def repeat_interleave(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    out = _single_output(ctx)
    repeats = ctx.value(ctx.rule.option("repeats", "repeats"))
    dim = ctx.value(ctx.rule.option("dim", "dim"))
    if atoms is None or dim is None or not isinstance(repeats, int) or len(out) != len(atoms):
        raise RuleMismatch("only an integer count of repeats along one dim is understood")
    d = _norm(dim, len(shape))
    for i, atom in enumerate(atoms):
        if i != d:
            ctx.tie(out[i], atom)
    _tile(ctx, out[d], atoms[d], shape[d], repeats, copies_outer=False)


def _tile(ctx, out, atom, size: int, count: int, copies_outer: bool) -> None:
    """Output axis ``out`` holds ``count`` copies of input axis ``atom`` (of ``size``): tied when there is one copy,
    free when the input axis has one element, else the product of the axis and a free copies axis (the copies
    outer, ``out[c·n + i]``, or inner, ``out[i·count + c]``)."""
    if count == 1:
        ctx.tie(out, atom)
    elif size == 1:
        ctx.free(out)
    else:
        copies = ctx.new_atom(count)
        ctx.free(copies)
        ctx.tie(out, ctx.compose([copies, atom] if copies_outer else [atom, copies], PRODUCT))


@kind("repeat", "Tiles the tensor (aten.repeat, option 'repeats': the count per dim, new dims in front): a dim "
      "repeated k > 1 times is (copies × input axis), constant along the copies, which are free, like new dims.",
      options=("repeats",))
def repeat(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    out = _single_output(ctx)
    repeats = ctx.value(ctx.rule.option("repeats", "repeats"))
    if atoms is None or not isinstance(repeats, (list, tuple)) or not all(isinstance(r, int) for r in repeats) \
            or len(repeats) < len(atoms) or len(out) != len(repeats):
        raise RuleMismatch("only integer repeat counts, one per output dim, are understood")
    lead = len(repeats) - len(atoms)
    for i in range(lead):  # new leading dims: the output is constant along them
        ctx.free(out[i])
    for j, atom in enumerate(atoms):  # out[c·n + i] = x[i]: the copies are the outer factor
        _tile(ctx, out[lead + j], atom, shape[j], repeats[lead + j], copies_outer=True)


@kind("meshgrid", "aten.meshgrid: output k varies along one dim only, tied to tensor k (the first two dims swapped "
      "with option 'indexing' = 'xy'); it is constant, hence free, along the others.", options=("tensors", "indexing"))
def meshgrid(ctx) -> None:
    values = list(ctx.value(ctx.rule.option("tensors", "tensors")) or [])
    indexing = ctx.value(ctx.rule.option("indexing", "indexing")) or "ij"
    outs = ctx.out
    if indexing not in ("ij", "xy") or not isinstance(outs, list) or len(outs) != len(values) \
            or any(not isinstance(o, list) or len(o) != len(values) for o in outs):
        raise RuleMismatch("expected one output of rank N per input, N the number of inputs, and 'ij' or 'xy'")
    position = list(range(len(values)))
    if indexing == "xy" and len(values) >= 2:  # out[k] has shape (n1, n0, n2, ...)
        position[0], position[1] = 1, 0
    for k, (value, out) in enumerate(zip(values, outs)):
        atoms = ctx.atoms(value)
        if atoms is None or len(atoms) > 1:
            raise RuleMismatch(f"input {k} is not a 0-d or 1-d tensor")
        for d, atom in enumerate(out):
            if d == position[k] and atoms:
                ctx.tie(atom, atoms[0])
            else:
                ctx.free(atom)


# ---------------------------------------------------------------- recurrent layers


def _output_used(ctx, index: int) -> bool:
    return any(u.target is operator.getitem and u.args[1] == index and u.users for u in ctx.node.users)


def _is_constant(ctx, value) -> bool:
    """A tensor made by a ``constant`` rule (zeros, full): unchanged by any permutation of any axis."""
    from .trace import op_name as _op_name

    if getattr(value, "op", None) != "call_function":
        return False
    rule = ctx.walker.rules.lookup(_op_name(value.target))
    return rule is not None and rule.kind == "constant"


@kind("recurrent", "aten.lstm.input / aten.gru.input / aten.rnn_*.input: per layer and direction, the hidden units "
      "are a space and the packed gate rows are (gates × units) with the gates pinned; the units carry across time "
      "steps, so w_hh's columns, the output and the hidden state share them (with proj_size: the projected units).")
def recurrent(ctx) -> None:
    x = ctx.value("input")
    xa, xs = ctx.atoms(x), ctx.shape(x)
    params = list(ctx.value("params") or [])
    layers, bidirectional = ctx.value("num_layers"), bool(ctx.value("bidirectional"))
    if xa is None or not isinstance(layers, int) or len(xs) not in (2, 3):
        raise RuleMismatch("expected an input of rank 2 or 3 and an integer num_layers")
    directions = 2 if bidirectional else 1
    per = 4 if ctx.value("has_biases") else 2
    if len(params) == layers * directions * (per + 1):
        per += 1  # LSTM with proj_size: weight_hr (proj × units) last
    elif len(params) != layers * directions * per:
        raise RuleMismatch(f"{len(params)} weights for {layers} layers × {directions} directions")
    outs = ctx.out
    if not outs or not isinstance(outs[0], list):
        raise RuleMismatch("expected a tuple of outputs")
    feature = xa[-1]
    carried, cells = [], []  # per layer and direction: the units fed back (h), the cell units (c)
    for layer in range(layers):
        layer_out = []
        for d in range(directions):
            group = params[(layer * directions + d) * per:(layer * directions + d + 1) * per]
            unit, fed_back = _recurrent_cell(ctx, group, feature, projected=per in (3, 5))
            cells.append(unit)
            carried.append(fed_back)
            layer_out.append(fed_back)
        feature = ctx.compose(layer_out, CONCAT)
    # output: (T, B, D·H) or (B, T, D·H) or unbatched (T, D·H); time and batch pass through
    output = outs[0]
    for a, b in zip(xa[:-1], output[:-1]):
        ctx.tie(a, b)
    ctx.tie(output[-1], feature)
    # hidden states (L·D, [B,] H): h (and LSTM's c); row k belongs to layer k // D, direction k % D
    hx = ctx.value("hx")
    inputs = hx if isinstance(hx, (list, tuple)) else [hx]
    for i, value in enumerate(inputs):
        _tie_state(ctx, ctx.atoms(value), xa, xs, carried if i == 0 else cells,
                   unused=_is_constant(ctx, value))
    for k in range(1, len(outs)):
        _tie_state(ctx, outs[k], xa, xs, carried if k == 1 else cells, unused=not _output_used(ctx, k))


def _recurrent_cell(ctx, group: list, feature: int, projected: bool) -> tuple[int, int]:
    """Tie one layer-direction's weights; returns (its cell units, the units it feeds back and outputs)."""
    w_ih, w_hh, *rest = group
    w_hr = rest.pop() if projected else None
    (rows_ih, cols_ih), (rows_hh, cols_hh) = ctx.atoms(w_ih), ctx.atoms(w_hh)
    hidden = ctx.store.size(ctx.atoms(w_hr)[1] if projected else cols_hh)
    gates, left = divmod(ctx.store.size(rows_hh), hidden)
    if left:
        raise RuleMismatch(f"weight_hh rows {ctx.store.size(rows_hh)} are not a multiple of {hidden} units")
    unit, gate = ctx.new_atom(hidden), ctx.new_atom(gates)
    ctx.pin(gate, f"the gates of {ctx.op} have distinct roles")
    ctx.role(unit, "hidden")
    ctx.role(gate, "gates")
    fed_back = unit
    if projected:
        rows_hr, cols_hr = ctx.atoms(w_hr)
        fed_back = rows_hr
        ctx.tie(cols_hr, unit)
        ctx.param_use(w_hr, rows_hr, consumed=False)
        ctx.param_use(w_hr, cols_hr, consumed=True)
    packed = ctx.compose([gate, unit], PRODUCT)
    for w, rows, cols, fed in ((w_ih, rows_ih, cols_ih, feature), (w_hh, rows_hh, cols_hh, fed_back)):
        ctx.tie(rows, packed)
        ctx.tie(cols, fed)
        ctx.param_use(w, rows, consumed=False)
        ctx.param_use(w, cols, consumed=True)
    for b in rest:
        ctx.tie(ctx.atoms(b)[0], packed)
        ctx.param_use(b, ctx.atoms(b)[0], consumed=False)
    return unit, fed_back


def _tie_state(ctx, atoms, xa: list, xs: list, units: list[int], unused: bool) -> None:
    """A hidden state ``(L·D, [B,] H)``: one feature axis for every layer and direction."""
    if atoms is None or len(atoms) != len(xs):
        raise RuleMismatch("hidden state of unexpected rank")
    if len(xs) == 3:
        ctx.tie(atoms[1], xa[0 if ctx.value("batch_first") else 1])
    ctx.pin(atoms[0], f"rows of the hidden state of {ctx.op} are its layers and directions")
    if len(units) == 1:
        ctx.tie(atoms[-1], units[0])
    elif unused:
        ctx.free(atoms[-1])  # a constant initial state, or a final state nobody reads
    else:  # every layer's units on one axis: they must share one permutation
        for unit in units:
            ctx.tie(atoms[-1], unit)


# ---------------------------------------------------------------- gated linear units


@kind("glu", "GLU along option 'dim': the input axis is (2 × c), values then gates; both halves move with the "
      "output's c, the 2 is pinned.", options=("dim",))
def glu(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    out = _single_output(ctx)
    dim = _norm(ctx.value(ctx.rule.option("dim", "dim")), len(shape))
    if len(ctx.out_shape) != len(shape) or shape[dim] != 2 * ctx.out_shape[dim]:
        raise RuleMismatch("the output is not the input with half the axis")
    halves = ctx.new_atom(2)
    ctx.pin(halves, f"{ctx.op}: values and gates are the two halves of this axis")
    ctx.tie(atoms[dim], ctx.compose([halves, out[dim]], PRODUCT))
    for i, atom in enumerate(atoms):
        if i != dim:
            ctx.tie(out[i], atom)
