"""Rule kinds: the Python mechanisms that YAML rules name.

A kind relates the axes of one op's tensors through an ``OpContext`` (see
``fxfuse.frontend.spaces``): ``ctx.tie(a, b)`` makes two atoms share a permutation,
``ctx.pin(a, why)`` forces the identity, ``ctx.free(a)`` declares an output
axis safe to move on its own (constant along it). Output axes a kind leaves
untouched are pinned by the analyser afterwards, and so are the axes of
integer arguments it leaves untouched (their values may be indices); a kind
that does not fit a node raises ``RuleMismatch``: all fail closed.

Shapes are concrete (``ctx.shape``); dims are normalised to ``0..rank-1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..core.axes import CONCAT, PRODUCT


class RuleMismatch(Exception):
    """The rule does not fit this node (rank, size or argument mismatch)."""


@dataclass(frozen=True)
class Kind:
    name: str
    apply: Callable[[Any], None]
    doc: str
    uses_axes: bool = False
    options: tuple[str, ...] = ()


KINDS: dict[str, Kind] = {}


def kind(name: str, doc: str, uses_axes: bool = False, options: tuple[str, ...] = ()):
    def register(fn):
        KINDS[name] = Kind(name, fn, doc, uses_axes, options)
        return fn

    return register


def _norm(dim: int, rank: int) -> int:
    if not isinstance(dim, int):
        raise RuleMismatch(f"expected an integer dim, got {dim!r}")
    d = dim + rank if dim < 0 else dim
    if not 0 <= d < max(rank, 1):
        raise RuleMismatch(f"dim {dim} out of range for rank {rank}")
    return d


def _dims(value, rank: int) -> list[int]:
    if value is None:
        return list(range(rank))
    if isinstance(value, int):
        value = [value]
    out = sorted({_norm(int(d), rank) for d in value})
    return out or list(range(rank))


def _single_output(ctx) -> list[int]:
    out = ctx.out
    if out is None or (out and isinstance(out[0], list)):
        raise RuleMismatch("expected one tensor output")
    return out


def _tie_right_aligned(ctx, groups: list[tuple[list[int], list[int]]]) -> None:
    """Tie dims of several tensors aligned from the right; size-1 dims broadcast."""
    width = max((len(atoms) for atoms, _ in groups), default=0)
    for k in range(1, width + 1):
        members = [(atoms[-k], shape[-k]) for atoms, shape in groups if len(atoms) >= k and shape[-k] != 1]
        if any(s is None for _, s in members):  # a size only the data knows (it may even be 1): no tie, pinned
            for atom, _ in members:
                ctx.pin(atom, f"{ctx.op} broadcasts a dim whose size depends on the data")
            continue
        sizes = {s for _, s in members}
        if len(sizes) > 1:
            raise RuleMismatch(f"cannot broadcast sizes {sorted(sizes)}")
        for atom, _ in members[1:]:
            ctx.tie(members[0][0], atom)


# ---------------------------------------------------------------- einsum


def _is_output(arg: str) -> bool:
    return arg == "out" or (arg.startswith("out") and arg[3:].isdigit())


@kind("einsum", "Per-argument axis signatures; shared names tie axes, names seen once are pinned.",
      uses_axes=True)
def einsum(ctx) -> None:
    rule = ctx.rule
    chosen, bound, errors = None, None, []
    for alt in rule.axes:
        tensors = []
        ok = True
        for arg, sig in alt:
            if not ctx.has(arg):
                raise RuleMismatch(f"{ctx.op} has no argument '{arg}' (rule {rule.source})")
            value = ctx.value(arg)
            shape = ctx.shape(value)
            if shape is None:
                continue
            rank, ell = len(shape), sig.ellipsis
            need = len(sig.dims) - (1 if ell is not None else 0)
            if (ell is None and rank != need) or (ell is not None and rank < need):
                errors.append(f"'{arg}' has rank {rank}, signature {sig.text!r}")
                ok = False
                break
            tensors.append((arg, sig, ctx.atoms(value), shape))
        if ok:
            chosen, bound = alt, tensors
            break
    if chosen is None:
        raise RuleMismatch("no signature fits: " + "; ".join(errors))

    # Split each tensor into (dims bound to names) and (ellipsis dims).
    sizes: dict[str, int] = {}
    named: list[tuple[str, Any, int, int]] = []  # (arg, Dim, atom, size)
    ellipses: list[tuple[list[int], list[int]]] = []
    for arg, sig, atoms, shape in bound:
        ell = sig.ellipsis
        if ell is None:
            pairs = list(zip(sig.dims, atoms, shape))
        else:
            extra = len(shape) - (len(sig.dims) - 1)
            pairs = list(zip(sig.dims[:ell], atoms[:ell], shape[:ell]))
            pairs += list(zip(sig.dims[ell + 1:], atoms[ell + extra:], shape[ell + extra:]))
            ellipses.append((list(atoms[ell:ell + extra]), list(shape[ell:ell + extra])))
        for dim, atom, size in pairs:
            named.append((arg, dim, atom, size))
            if not dim.group and size != 1:
                name = dim.names[0]
                if sizes.setdefault(name, size) != size:
                    raise RuleMismatch(f"axis '{name}' has sizes {sizes[name]} and {size}")
    for name, src in rule.sizes:
        value = src if isinstance(src, int) else ctx.value(src)
        if not isinstance(value, int):
            raise RuleMismatch(f"size of '{name}' from argument '{src}' is not an integer: {value!r}")
        if sizes.setdefault(name, value) != value:
            raise RuleMismatch(f"axis '{name}' has sizes {sizes[name]} and {value}")
    # a name seen alone only with size 1 (a key/value head axis broadcast over query heads) may be size 1
    ones = {d.names[0] for _, d, _, s in named if not d.group and s == 1} - set(sizes)
    for _, dim, _, size in named:
        if dim.group and size != 1:
            unknown = [n for n in dim.names if n not in sizes]
            if len(unknown) > 1 and set(unknown) & ones:
                sizes.update((n, 1) for n in unknown if n in ones)
                unknown = [n for n in unknown if n not in ones]
            known = 1
            for n in dim.names:
                known *= sizes.get(n, 1)
            if len(unknown) == 1 and size % known == 0:
                sizes[unknown[0]] = size // known
            elif unknown:
                raise RuleMismatch(f"cannot infer sizes of {unknown} in group of size {size}")
    for name in {n for _, d, _, _ in named for n in d.names}:
        sizes.setdefault(name, 1)

    reps = {name: ctx.new_atom(size) for name, size in sizes.items()}
    seen: dict[str, set[str]] = {name: set() for name in sizes}
    for arg, dim, atom, size in named:
        if dim.group:
            total = 1
            for n in dim.names:
                total *= sizes[n]
            if size == 1 and total != 1:
                continue  # broadcast
            if total != size:
                raise RuleMismatch(f"group ({' '.join(dim.names)}) has size {size}, expected {total}")
            parts = [n for n in dim.names if sizes[n] != 1]
            if not parts:
                continue
            ctx.tie(atom, ctx.compose([reps[n] for n in parts], PRODUCT))
            for n in parts:
                seen[n].add(arg)
        else:
            name = dim.names[0]
            if size == 1 and sizes[name] != 1:
                continue  # broadcast
            if size != 1:
                ctx.tie(atom, reps[name])
                seen[name].add(arg)
    # a parameter axis whose names all miss the output is read (contracted): a consumer of its units
    produced = {n for arg, sig in chosen if _is_output(arg) for n in sig.names}
    for arg, dim, atom, size in named:
        if size != 1 and not _is_output(arg):
            ctx.param_use(ctx.value(arg), atom, consumed=not any(n in produced for n in dim.names))
    for name, rep in reps.items():
        ctx.role(rep, name)
        if name in rule.pin:
            ctx.pin(rep, f"axis '{name}' pinned by rule {rule.source}")
        elif len(seen[name]) == 1 and name not in rule.free:
            ctx.pin(rep, f"axis '{name}' of {ctx.op} appears on one tensor only ({rule.source})")
    if ellipses:
        width = max(len(a) for a, _ in ellipses)
        for k in range(1, width + 1):
            members = [(a[-k], s[-k]) for a, s in ellipses if len(a) >= k and s[-k] != 1]
            if any(s is None for _, s in members) and len(members) > 1:  # a size only the data knows: pinned
                for atom, _ in members:
                    ctx.pin(atom, f"{ctx.op} broadcasts a dim whose size depends on the data")
                continue
            if len({s for _, s in members}) > 1:
                raise RuleMismatch(f"'...' dims do not broadcast: {sorted({s for _, s in members})}")
            for atom, _ in members[1:]:
                ctx.tie(members[0][0], atom)
            if len(members) == 1 and "..." not in rule.free:
                ctx.pin(members[0][0], f"'...' dim of {ctx.op} appears on one tensor only ({rule.source})")
            elif len(members) == 1:
                ctx.free(members[0][0])  # the rule declares the op invariant along it
    ctx.einsum_binding = (named, ellipses, sizes, chosen)  # read by fxfuse.frontend.groups


# ---------------------------------------------------------------- element-wise and reductions


@kind("broadcast", "Element-wise over all tensor arguments, aligned from the right (numpy broadcasting).")
def broadcast(ctx) -> None:
    out = _single_output(ctx)
    groups = [(ctx.atoms(v), list(ctx.shape(v))) for _, v in ctx.tensor_args()]
    _tie_right_aligned(ctx, groups + [(out, list(ctx.out_shape))])


@kind("reduce", "Reduces the dims in option 'dim' (an argument name; none = all); 'keepdim' likewise.",
      options=("dim", "keepdim", "input"))
def reduce(ctx) -> None:
    x = ctx.value(ctx.rule.option("input", "self"))
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    if atoms is None:
        raise RuleMismatch("reduced argument is not a tensor")
    dims = set(_dims(ctx.value(ctx.rule.option("dim", "dim")), len(shape)))
    keep = bool(ctx.value(ctx.rule.option("keepdim", "keepdim")) or False)
    outs = ctx.out if ctx.out and isinstance(ctx.out[0], list) else [ctx.out]
    shapes = ctx.out_shape if ctx.out and isinstance(ctx.out[0], list) else [ctx.out_shape]
    for out, oshape in zip(outs, shapes):
        if out is None:
            continue
        kept = [i for i in range(len(shape)) if i not in dims]
        positions = kept if keep else list(range(len(kept)))  # where each kept dim lands in the output
        if len(oshape) != (len(shape) if keep else len(kept)):
            raise RuleMismatch(f"output rank {len(oshape)} does not match reduction of rank {len(shape)}")
        for i, j in zip(kept, positions):
            ctx.tie(atoms[i], out[j])


@kind("arg_reduce", "max/min over option 'dim' with the index of the extreme (max.dim, min.dim): the reduced axis is "
      "pinned (the indices address it), the kept ones are tied to every output.", options=("dim", "keepdim"))
def arg_reduce(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    if atoms is None:
        raise RuleMismatch("reduced argument is not a tensor")
    value = ctx.value(ctx.rule.option("dim", "dim"))
    if not isinstance(value, int):
        raise RuleMismatch(f"expected one integer dim, got {value!r}")
    dim = _norm(value, len(shape))
    keep = bool(ctx.value(ctx.rule.option("keepdim", "keepdim")) or False)
    ctx.pin(atoms[dim], f"{ctx.op} returns positions along this axis")
    outs = ctx.out if ctx.out and isinstance(ctx.out[0], list) else [ctx.out]
    for out in outs:
        if out is None:
            continue
        if len(out) != (len(shape) if keep else len(shape) - 1):
            raise RuleMismatch("output rank does not match the reduction")
        kept = [i for i in range(len(shape)) if i != dim]
        for i, j in zip(kept, kept if keep else range(len(kept))):
            ctx.tie(atoms[i], out[j])


# ---------------------------------------------------------------- shape ops


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


@kind("index", "Advanced indexing (aten.index.Tensor): indexed axes are pinned, the others pass through.",
      options=("indices",))
def index(ctx) -> None:
    atoms = ctx.atoms(ctx.value("self"))
    out = _single_output(ctx)
    indices = list(ctx.value(ctx.rule.option("indices", "indices")))
    used = [i for i, v in enumerate(indices) if v is not None]
    for i in used:
        ctx.pin(atoms[i], f"axis indexed by {ctx.op}")
    idx_shapes = [ctx.shape(indices[i]) for i in used]
    bdims = max((len(s) for s in idx_shapes if s is not None), default=0)
    rest = [a for i, a in enumerate(atoms) if i not in used]
    contiguous = used == list(range(used[0], used[-1] + 1)) if used else True
    if len(out) != len(rest) + bdims:
        raise RuleMismatch("index output rank mismatch")
    if contiguous and used:
        before = used[0]
        positions = list(range(before)) + list(range(before + bdims, len(out)))
    else:
        positions = list(range(bdims, len(out)))
    for a, p in zip(rest, positions):
        ctx.tie(a, out[p])
    start = used[0] if (contiguous and used) else 0
    for k in range(bdims):
        ctx.pin(out[start + k], f"axis produced by indexing in {ctx.op}")
    for i in used:  # the index tensors' positions are those output axes; their values address the indexed axis
        for atom in ctx.atoms(indices[i]) or ():
            ctx.pin(atom, f"axis of an index tensor of {ctx.op}")


@kind("positional", "Order-dependent along the dims in option 'dims' (cumsum, roll, flip, diff): those are pinned.",
      options=("dims",))
def positional(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    out = _single_output(ctx)
    if len(ctx.out_shape) != len(shape):
        raise RuleMismatch("rank changed")
    value = ctx.value(ctx.rule.option("dims", "dim"))
    pinned = set(_dims(value if value not in ((), []) else None, len(shape)))
    for i, atom in enumerate(atoms):
        if i in pinned:
            ctx.pin(atom, f"order matters along this axis for {ctx.op}")
            ctx.pin(out[i], f"order matters along this axis for {ctx.op}")
        else:
            ctx.tie(out[i], atom)


@kind("index_rows", "Writes rows of option 'source' into self at positions along option 'dim' (index_add, "
      "index_copy): that axis is pinned on self, source and the output; the others are tied.",
      options=("dim", "source"))
def index_rows(ctx) -> None:
    x, src = ctx.value("self"), ctx.value(ctx.rule.option("source", "source"))
    atoms, shape, src_atoms = ctx.atoms(x), ctx.shape(x), ctx.atoms(src)
    out = _single_output(ctx)
    if src_atoms is None or len(ctx.out_shape) != len(shape) or len(src_atoms) != len(shape):
        raise RuleMismatch("expected self, source and the output of one rank")
    dim = _norm(ctx.value(ctx.rule.option("dim", "dim")), len(shape))
    for i, (a, b) in enumerate(zip(atoms, src_atoms)):
        if i == dim:
            for atom in (a, b, out[i]):
                ctx.pin(atom, f"{ctx.op} writes rows at positions along this axis")
        else:
            ctx.tie(out[i], a)
            ctx.tie(b, a)


@kind("unfold", "Tensor.unfold along option 'dimension': the windows replace that axis and their taps are a new "
      "last axis, both pinned (positions); the other axes pass through.", options=("dimension",))
def unfold(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    out = _single_output(ctx)
    if len(out) != len(shape) + 1:
        raise RuleMismatch("expected one more output dim than input dims")
    dim = _norm(ctx.value(ctx.rule.option("dimension", "dimension")), len(shape))
    for i, atom in enumerate(atoms):
        if i == dim:
            for a in (atom, out[i], out[-1]):
                ctx.pin(a, f"{ctx.op} takes windows of positions along this axis")
        else:
            ctx.tie(out[i], atom)


@kind("pad", "Pads the last dims (option 'pad': argument with [left, right, ...]): padded dims are pinned.",
      options=("pad",))
def pad(ctx) -> None:
    x = ctx.value("self")
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    out = _single_output(ctx)
    amounts = list(ctx.value(ctx.rule.option("pad", "pad")))
    padded = set()
    for k in range(len(amounts) // 2):
        if amounts[2 * k] or amounts[2 * k + 1]:
            padded.add(len(shape) - 1 - k)
    for i, atom in enumerate(atoms):
        if i in padded:
            ctx.pin(atom, f"padded by {ctx.op}")
            ctx.pin(out[i], f"padded by {ctx.op}")
        else:
            ctx.tie(out[i], atom)


# ---------------------------------------------------------------- special


@kind("constant", "Output is constant along every axis (zeros, ones, full): free; inputs untouched.")
def constant(ctx) -> None:
    for out in ctx.out_atoms():
        ctx.free(out)


@kind("pin", "Pins every axis of every tensor the op reads or writes (deliberate, not reported as unruled).")
def pin(ctx) -> None:
    reason = f"pinned by rule {ctx.rule.source} for {ctx.op}"
    for _, v in ctx.tensor_args():
        for atom in ctx.atoms(v):
            ctx.pin(atom, reason)
    for atom in ctx.out_atoms():
        ctx.pin(atom, reason)


@kind("ignore", "The op reads tensors but produces none (assertions): nothing is tied.")
def ignore(ctx) -> None:
    if ctx.out_atoms():
        raise RuleMismatch("kind 'ignore' is only for ops that return no tensor")


@kind("subgraph", "Higher-order op: analyse the submodule (argument index 'submodule') with the operands from "
      "index 'operands' on.", options=("submodule", "operands"))
def subgraph(ctx) -> None:
    sub = ctx.node.args[int(ctx.rule.option("submodule", 1))]
    operands = ctx.node.args[int(ctx.rule.option("operands", 2)):]
    results = ctx.analyze_subgraph(sub, operands)
    outs = ctx.out if ctx.out and isinstance(ctx.out[0], list) else [ctx.out]
    if len(results) != len(outs):
        raise RuleMismatch(f"submodule returns {len(results)} values, node has {len(outs)}")
    for mine, theirs in zip(outs, results):
        if mine is None or theirs is None:
            continue
        for a, b in zip(mine, theirs):
            ctx.tie(a, b)


KINDS["elementwise"] = Kind("elementwise", broadcast, "Alias of 'broadcast'.")
