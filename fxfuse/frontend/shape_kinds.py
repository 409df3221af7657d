"""Rule kinds that move axes without computing on them: reshape, transpose, permute, cat, split, slice,
select, expand; and the walk of a view (a parameter's view stays that parameter).

Registered in ``fxfuse.frontend.kinds.KINDS`` and ``WALKS`` on import (``fxfuse.frontend.all_kinds``
imports this module). Conventions as in ``fxfuse.frontend.kinds``: dims normalised to ``0..rank-1``;
a kind that does not fit raises ``RuleMismatch``.
"""
from __future__ import annotations

from ..core.axes import CONCAT, PRODUCT
from .kinds import Call, RuleMismatch, _norm, _single_output, kind, walk


@kind("reshape", "view/reshape/flatten/unflatten/(un)squeeze: splits and merges axes by shape arithmetic.",
      options=("input",))
def reshape(ctx) -> None:
    x = ctx.value(ctx.rule.option("input", "self"))
    out = _single_output(ctx)
    a = [(t, s) for t, s in zip(ctx.atoms(x), ctx.shape(x)) if s != 1]
    b = [(t, s) for t, s in zip(out, ctx.out_shape) if s != 1]
    i = j = 0
    while i < len(a) and j < len(b):
        ga, gb = [a[i]], [b[j]]
        pa, pb = a[i][1], b[j][1]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    raise RuleMismatch("shapes do not multiply out")
                ga.append(a[i])
                pa *= a[i][1]
                i += 1
            else:
                if j >= len(b):
                    raise RuleMismatch("shapes do not multiply out")
                gb.append(b[j])
                pb *= b[j][1]
                j += 1
        ctx.tie(ctx.compose([t for t, _ in ga], PRODUCT), ctx.compose([t for t, _ in gb], PRODUCT))
    if i != len(a) or j != len(b):
        raise RuleMismatch("shapes do not multiply out")


@kind("transpose", "Swaps the dims named by options 'dim0' and 'dim1' (argument names).",
      options=("dim0", "dim1"))
def transpose(ctx) -> None:
    x = ctx.value("self")
    atoms, rank = ctx.atoms(x), len(ctx.shape(x))
    out = _single_output(ctx)
    order = list(range(rank))
    if rank:
        d0 = _norm(ctx.value(ctx.rule.option("dim0", "dim0")), rank)
        d1 = _norm(ctx.value(ctx.rule.option("dim1", "dim1")), rank)
        order[d0], order[d1] = order[d1], order[d0]
    for i, src in enumerate(order):
        ctx.tie(out[i], atoms[src])


@kind("permute", "Reorders dims as the argument named by option 'dims' says.", options=("dims",))
def permute(ctx) -> None:
    x = ctx.value("self")
    atoms, rank = ctx.atoms(x), len(ctx.shape(x))
    out = _single_output(ctx)
    dims = [_norm(d, rank) for d in ctx.value(ctx.rule.option("dims", "dims"))]
    if sorted(dims) != list(range(rank)):
        raise RuleMismatch(f"{dims} is not a permutation of {rank} dims")
    for i, src in enumerate(dims):
        ctx.tie(out[i], atoms[src])


@kind("cat", "Concatenates the tensors of option 'tensors' along option 'dim': the output axis is their segments.",
      options=("tensors", "dim"))
def cat(ctx) -> None:
    values = [v for v in ctx.value(ctx.rule.option("tensors", "tensors")) if ctx.shape(v) is not None]
    out = _single_output(ctx)
    rank = len(ctx.out_shape)
    values = [v for v in values if len(ctx.shape(v)) == rank]  # legacy empty 1-D inputs are skipped
    dim = _norm(ctx.value(ctx.rule.option("dim", "dim")) or 0, rank)
    if any(ctx.shape(v)[dim] is None for v in values):  # segments of sizes only the data knows
        for atom in [out[dim]] + [ctx.atoms(v)[dim] for v in values]:
            ctx.pin(atom, f"{ctx.op} joins segments whose sizes depend on the data")
    else:
        segments = [ctx.atoms(v)[dim] for v in values if ctx.shape(v)[dim] > 0]
        ctx.tie(out[dim], ctx.compose(segments, CONCAT))
    for v in values:
        for i, atom in enumerate(ctx.atoms(v)):
            if i != dim:
                ctx.tie(out[i], atom)


@kind("split", "split/chunk/unbind along option 'dim': each output is one segment of the input axis.",
      options=("dim",))
def split(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    outs, shapes = ctx.out, ctx.out_shape
    if not outs or not isinstance(outs[0], list):
        raise RuleMismatch("expected a list of tensor outputs")
    dim = _norm(ctx.value(ctx.rule.option("dim", "dim")) or 0, len(shape))
    if all(len(s) == len(shape) - 1 for s in shapes):  # unbind: the axis itself becomes the output index
        ctx.pin(atoms[dim], f"{ctx.op} turns the axis into separate outputs")
        for out in outs:
            for i, atom in enumerate(a for k, a in enumerate(atoms) if k != dim):
                ctx.tie(out[i], atom)
        return
    if shape[dim] is None or any(s[dim] is None for s in shapes):  # segments of sizes only the data knows
        for atom in [atoms[dim]] + [o[dim] for o in outs]:
            ctx.pin(atom, f"{ctx.op} cuts segments whose sizes depend on the data")
    elif sum(s[dim] for s in shapes) != shape[dim]:
        raise RuleMismatch("outputs do not cover the split axis")
    else:
        ctx.tie(atoms[dim], ctx.compose([o[dim] for o, s in zip(outs, shapes) if s[dim] > 0], CONCAT))
    for out in outs:
        for i, atom in enumerate(atoms):
            if i != dim:
                ctx.tie(out[i], atom)


@kind("slice", "Slices along option 'dim': a full slice ties the axis; a contiguous partial one makes the input axis "
      "the segments (before | taken | after), the taken one tied to the output; a strided one pins it.",
      options=("dim",))
def slice_(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    out = _single_output(ctx)
    if len(ctx.out_shape) != len(shape):
        raise RuleMismatch("slice changed the rank")
    dim = _norm(ctx.value(ctx.rule.option("dim", "dim")) or 0, len(shape))
    for i, atom in enumerate(atoms):
        if i != dim or ctx.out_shape[i] == shape[i]:
            ctx.tie(out[i], atom)
            continue
        span = _contiguous_span(ctx.value("start"), ctx.value("step") if ctx.has("step") else 1, shape[i],
                                ctx.out_shape[i])
        if span is None:
            ctx.pin(atom, f"strided or symbolic slice by {ctx.op}")
            ctx.pin(out[i], f"strided or symbolic slice by {ctx.op}")
            continue
        before, after = span
        rests = [ctx.new_atom(n) for n in (before, after) if n > 0]
        segments = ([rests[0]] if before > 0 else []) + [out[i]] + ([rests[-1]] if after > 0 else [])
        ctx.tie(atom, ctx.compose(segments, CONCAT))
        ctx.walker.slice_rests += [(r, ctx.node.name) for r in rests]


def _contiguous_span(start, step, size: int, taken: int) -> tuple[int, int] | None:
    """``(elements before, elements after)`` the slice ``[start : start + taken]`` of an axis of ``size``;
    ``None`` when the step is not 1 or the start is not a number."""
    if step not in (None, 1) or not (start is None or isinstance(start, int)):
        return None
    begin = 0 if start is None else (start + size if start < 0 else start)
    begin = min(max(begin, 0), size)
    if begin + taken > size:
        return None
    return begin, size - begin - taken


@kind("select", "Picks one index along option 'dim': that axis is pinned, the others pass through (a row of a "
      "packed (rows × E) axis, like nn.MultiheadAttention's in_proj, may get its own permutation).",
      options=("dim",))
def select(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    out = _single_output(ctx)
    dim = _norm(ctx.value(ctx.rule.option("dim", "dim")), len(shape))
    ctx.pin(atoms[dim], f"index selected by {ctx.op}")
    rest = [a for i, a in enumerate(atoms) if i != dim]
    if len(rest) != len(out):
        raise RuleMismatch("select output rank mismatch")
    index = ctx.value("index")
    for a, b in zip(rest, out):
        # a row of a packed (rows × E) axis may move on its own: decided after the walk
        if not (isinstance(index, int) and ctx.defer_row(a, atoms[dim], index % shape[dim], b)):
            ctx.tie(a, b)


@kind("expand", "Broadcasts to a larger shape: new and size-1-expanded axes are constant, hence free.")
def expand(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    out, oshape = _single_output(ctx), ctx.out_shape
    lead = len(oshape) - len(shape)
    if lead < 0:
        raise RuleMismatch("expand lowered the rank")
    for k in range(len(oshape)):
        i = k - lead
        if i < 0 or (shape[i] == 1 and oshape[k] != 1):
            ctx.free(out[k])
        else:
            ctx.tie(out[k], atoms[i])


# kinds whose output is a view of their one tensor argument (a parameter stays a parameter)
VIEW_KINDS = ("reshape", "transpose", "permute", "split", "slice", "select", "expand", "ignore")


@walk(*VIEW_KINDS)
def walk_view(walker, call: Call) -> None:
    """Apply the kind; a view of a parameter (or of a view of one) stays that parameter for ``param_use``."""
    ctx = walker.apply(call)
    if ctx is None:
        return
    tensors = ctx.tensor_args()
    if len(tensors) == 1 and tensors[0][1] in walker.param_view:
        walker.param_view[call.node] = walker.param_view[tensors[0][1]]
