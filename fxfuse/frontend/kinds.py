"""Rule kinds: the Python mechanisms that YAML rules name.

A kind relates the axes of one op's tensors through an ``OpContext`` (see
``fxfuse.frontend.op_context``): ``ctx.tie(a, b)`` makes two atoms share a permutation,
``ctx.pin(a, why)`` forces the identity, ``ctx.free(a)`` declares an output
axis safe to move on its own (constant along it). Output axes a kind leaves
untouched are pinned by the analyser afterwards, and so are the axes of
integer arguments it leaves untouched (their values may be indices); a kind
that does not fit a node raises ``RuleMismatch``: all fail closed.

Shapes are concrete (``ctx.shape``); dims are normalised to ``0..rank-1``.

This module holds the registries, ``KINDS`` (``kind``) and ``WALKS`` (``walk``: how
the analysis's walker handles a call of a kind, where not by applying it), and
the kinds of ops that compute; the modules that define more kinds register them
(``fxfuse.frontend.shape_kinds``, ``layer_kinds``, ``experts``), and readers take
the complete registries from ``fxfuse.frontend.all_kinds``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..core.axes import PRODUCT


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


@dataclass(frozen=True)
class Call:
    """A call node as the analysis's walker hands it to the walk of its rule's kind: the node, its value
    (``meta["val"]``), the rule and the op name it was found by, the node's fresh atoms (``out``) and the
    nodes it reads (``inputs``)."""

    node: Any
    val: Any
    rule: Any
    op: str
    out: Any
    inputs: Any


# kind name -> how the walker (``fxfuse.frontend.walker.Walker``) walks a call of that kind: ``fn(walker, call)``.
# Registered beside the kind, by the module that defines it; a kind without one is walked by ``Walker.apply``.
WALKS: dict[str, Callable[[Any, Call], None]] = {}


def walk(*names: str):
    """Register the decorated ``fn(walker, call)`` as the walk of calls whose rule has one of these kinds."""
    def register(fn):
        for name in names:
            WALKS[name] = fn
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
