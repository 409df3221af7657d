"""Symmetry groups of spaces: which maps an op commutes with on each axis, and a space's meet.

A space may move by any map ``Q`` that every op it passes through commutes
with (producing axes by ``Q``, consuming axes by ``Q^{-T}``). The groups form a
chain, and a space's group is the smallest (the *meet*) over its ops:

==================  ========================================================
``perm``            permutations (every op commutes with these)
``orthogonal_ones`` orthogonal maps with ``Q·1 = 1`` (LayerNorm without affine)
``orthogonal``      orthogonal maps (RMSNorm without weight, ``q·k`` contractions)
``invertible``      any invertible map (linear layers, residual adds, reshapes)
==================  ========================================================

Rules declare groups per axis name (``groups: {i: invertible}``, einsum) or
for every axis of a Python kind (``group: invertible``); an axis without one is
``perm``. Element-wise rules may say ``group: sum`` (``a + b``: linear jointly,
so any map on axes where every operand varies, ``orthogonal_ones`` where one is
broadcast or a scalar is added) or ``group: product`` (``a · b``, ``a / b``:
linear in the one operand that varies along an axis; a second varying operand
is allowed only when it is a parameter that is uniform along it: a per-channel
scale already folded away). ``scale: [weight]`` names arguments that multiply
per channel: the declared groups hold only where they are uniform parameters.
``means: [c]`` says the op averages over ``c`` (a norm); an orthogonal limit
without it is recorded as a *sum* over the axis (``walker.summed``), which rules
out stretched embeddings between widths (``fxfuse.planner.procrustes``).

Off the chain, ``rotary`` (one 2×2 rotation per frequency pair, the dims a
rotary embedding rotates: ``fxfuse.frontend.rotary``) lies inside
``orthogonal`` and meets ``perm`` and ``orthogonal_ones`` in ``identity``: a
space left with the identity alone is pinned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PERM, ORTHO_ONES, ORTHO, INVERTIBLE = 0, 1, 2, 3
# off the chain: a rotary embedding's dims (``fxfuse.frontend.rotary``) move only by a 2×2 rotation per frequency
# pair ``(i, i + m/2)``; that group lies inside ``orthogonal`` and meets ``perm`` and ``orthogonal_ones`` in the
# identity alone, which pins the space
ROTARY, IDENTITY = 4, -1
LEVELS = {"perm": PERM, "orthogonal_ones": ORTHO_ONES, "orthogonal": ORTHO, "invertible": INVERTIBLE}  # rules' groups
NAMES = {v: k for k, v in LEVELS.items()} | {ROTARY: "rotary", IDENTITY: "identity"}
_BY_NAME = {v: k for k, v in NAMES.items()}
BROADCAST_GROUPS = ("sum", "product")
MODES = ("perm", "full")

# Python kinds that only move data: every axis they tie commutes with any map
DATA_MOVING = {"reshape", "transpose", "permute", "cat", "split", "slice", "select", "expand", "index", "subgraph"}
QUADRATIC_READERS = ("aten.mean.dim", "aten.sum.dim_IntList")


@dataclass(frozen=True)
class SpaceGroup:
    """The group of one space and what limited it (``limited_by``: op, node and rule file, or a fact)."""

    name: str
    limited_by: str = ""

    @property
    def level(self) -> int:
        return _BY_NAME[self.name]


def meet_level(a: int, b: int) -> int:
    """The largest group inside both: the smaller on the chain; ``rotary`` inside ``orthogonal`` and
    ``invertible``, and only the identity in common with ``perm`` and ``orthogonal_ones``."""
    if a == b or IDENTITY in (a, b):
        return min(a, b)
    if ROTARY in (a, b):
        other = b if a == ROTARY else a
        return ROTARY if other in (ORTHO, INVERTIBLE) else IDENTITY
    return min(a, b)


def meet(a: tuple[int, str] | None, b: tuple[int, str]) -> tuple[int, str]:
    """The meet of two ``(level, reason)`` limits: the reason of the smaller (the first reason wins a tie; both
    where the meet is smaller than either)."""
    if a is None:
        return b
    level = meet_level(a[0], b[0])
    if level == a[0]:
        return a
    if level == b[0]:
        return b
    return level, f"{a[1]}; and {b[1]}"


# ---------------------------------------------------------------- per node


def node_limits(ctx: Any, walker: Any) -> list[tuple[int, int, str]]:
    """``(atom, level, reason)`` for every axis of every tensor of one analysed node."""
    rule, node = ctx.rule, ctx.node
    where = f"{ctx.op} at {node.name} ({rule.source})"
    if rule.kind in ("ignore", "pin"):  # no tensor out, or every axis pinned anyway
        return []
    if rule.kind == "einsum":
        return _einsum_limits(ctx, walker, where)
    if rule.kind in ("broadcast", "elementwise") and rule.group in BROADCAST_GROUPS:
        return _broadcast_limits(ctx, walker, where)
    level = LEVELS[rule.group] if rule.group in LEVELS else (INVERTIBLE if rule.kind in DATA_MOVING else PERM)
    out: list[tuple[int, int, str]] = []
    if rule.kind == "reduce":
        return _reduce_limits(ctx, walker, where, level)
    if rule.kind == "broadcast" and _is_square(node):
        quad = _quadratic_dims(node)
        why = f"{where}: squares summed over the axis (an RMS norm; orthogonal maps keep the sum)"
        for _, v in ctx.tensor_args():
            out += _positions(ctx.atoms(v), lambda d, r: ORTHO if d - r in quad else PERM, why)
        out += _positions(ctx.out_atoms(), lambda d, r: ORTHO if d - r in quad else PERM, why)
        if not _quadratic_means(node):
            _sums(walker, [a for a, lv, _ in out if lv == ORTHO], f"{where}: a sum of squares over the axis")
        return out
    for _, v in ctx.tensor_args():
        out += [(a, level, where) for a in ctx.atoms(v) or ()]
    out += [(a, level, where) for a in ctx.out_atoms()]
    if level in (ORTHO_ONES, ORTHO):
        _sums(walker, [a for a, _, _ in out], f"{where}: group {rule.group!r} declared for every axis")
    return out


def _sums(walker: Any, atoms, why: str) -> None:
    """Record atoms that an op keeps under orthogonal maps only as a *sum* over the axis (``q·k``, ``Σ x²``, a
    tied parameter): between widths, an orthonormal embedding stretched by ``√(n_t/n_s)`` (which keeps
    every mean, as a norm takes) would change them (``fxfuse.planner.procrustes.embedding``)."""
    summed = getattr(walker, "summed", None)
    if summed is not None:
        summed.extend((a, why) for a in atoms)


def _positions(atoms, level_at, where) -> list[tuple[int, int, str]]:
    atoms = list(atoms or ())
    rank = len(atoms)
    return [(a, level_at(d, rank), where) for d, a in enumerate(atoms)]


def _is_param(ctx: Any, walker: Any, value: Any) -> str | None:
    import torch

    return walker.param_view.get(value) if isinstance(value, torch.fx.Node) else None


def _einsum_limits(ctx, walker, where) -> list[tuple[int, int, str]]:
    rule = ctx.rule
    binding = getattr(ctx, "einsum_binding", None)
    if binding is None:
        return []
    named, ellipses, sizes, chosen = binding
    groups = dict(rule.groups)
    produced = {n for arg, sig in chosen if arg == "out" or (arg.startswith("out") and arg[3:].isdigit())
                for n in sig.names}
    carriers: dict[str, list[str]] = {}
    for arg, dim, _, size in named:
        if size != 1 and arg not in ("out",) and not (arg.startswith("out") and arg[3:].isdigit()):
            for n in dim.names:
                carriers.setdefault(n, []).append(arg)
    limited: dict[str, tuple[int, str]] = {}
    for name in sizes:
        level, why = LEVELS[groups.get(name, "perm")], where
        if level == INVERTIBLE and name not in produced:
            params = [a for a in carriers.get(name, []) if _is_param(ctx, walker, ctx.value(a))]
            if len(params) != 1 or len(carriers.get(name, [])) < 2:
                level, why = ORTHO, f"{where}: '{name}' is contracted between two activations (q·k)"
        limited[name] = (level, why)
    summed = {n for n, (level, _) in limited.items() if level in (ORTHO_ONES, ORTHO) and n not in rule.means}
    for arg in rule.scale:  # a per-channel scale keeps the larger groups only while it is uniform
        if not ctx.has(arg):
            continue
        value = ctx.value(arg)
        pname = _is_param(ctx, walker, value)
        sig = dict(chosen).get(arg)
        if sig is None or ctx.shape(value) is None:
            continue
        if pname is not None and walker.uniform(pname):
            walker.scales.add(pname)
            continue
        what = f"parameter {pname}" if pname else f"argument '{arg}'"
        for n in sig.names:
            if limited.get(n, (PERM,))[0] > PERM:
                limited[n] = (PERM, f"{where}: its scale {what} is not uniform (not folded into linear readers)")
    out = []
    for arg, dim, atom, size in named:
        if size == 1:
            continue
        names = [n for n in dim.names if sizes.get(n, 1) != 1] or list(dim.names)
        level, why = min((limited[n] for n in names), key=lambda x: x[0])
        out.append((atom, level, why))
        if level in (ORTHO_ONES, ORTHO) and summed.intersection(names):
            _sums(walker, [atom], f"{where}: summed over the axis ('means' does not list it)")
    ell_level = LEVELS[groups.get("...", "perm")]
    for atoms, _shape in ellipses:
        out += [(a, ell_level, where) for a in atoms]
    return out


def _broadcast_limits(ctx, walker, where) -> list[tuple[int, int, str]]:
    """``sum``/``product`` element-wise ops, per position aligned from the right."""
    rule, node = ctx.rule, ctx.node
    tensors = [(k, v, ctx.atoms(v), list(ctx.shape(v))) for k, v in ctx.tensor_args()]
    out_atoms, out_shape = ctx.out_atoms(), list(ctx.out_shape)
    limits = []
    first = tensors[0][0] if tensors else None
    for k in range(1, len(out_shape) + 1):
        if out_shape[-k] == 1:
            continue
        varying = [(name, v, atoms) for name, v, atoms, shape in tensors if len(shape) >= k and shape[-k] != 1]
        level, why = INVERTIBLE, where
        if rule.group == "sum":
            if len(varying) < len(tensors) or _adds_scalar(node):
                level, why = ORTHO_ONES, f"{where}: adds a value constant along the axis"
        else:
            movers = []
            for name, v, _ in varying:
                pname = _is_param(ctx, walker, v)
                if pname is not None and walker.uniform(pname):
                    walker.scales.add(pname)
                else:
                    movers.append(name)
            if len(movers) > 1:
                level, why = PERM, f"{where}: a product of two tensors that vary along the axis"
            elif movers and movers[0] != first and "div" in ctx.op:
                level, why = PERM, f"{where}: divides by a tensor that varies along the axis"
            elif len(movers) < len(varying):
                why = f"{where} (a uniform per-channel scale)"
        for _, _, atoms in varying:
            limits.append((atoms[-k], level, why))
        limits.append((out_atoms[-k], level, why))
    return limits


def _adds_scalar(node) -> bool:
    """``x + 2`` (``add.Scalar``, or ``add.Tensor`` with a number): a constant vector is added."""
    return any(isinstance(a, (int, float)) and not isinstance(a, bool) and a != 0 for a in node.args[1:2])


def _reduce_limits(ctx, walker, where, kept_level) -> list[tuple[int, int, str]]:
    from .kinds import _dims

    x = ctx.value(ctx.rule.option("input", "self"))
    atoms, shape = ctx.atoms(x), ctx.shape(x)
    if atoms is None:
        return []
    dims = set(_dims(ctx.value(ctx.rule.option("dim", "dim")), len(shape)))
    quad = _quadratic_dims(x) if _is_square(x) else set()
    out = []
    for d, a in enumerate(atoms):
        if d in dims:
            level = ORTHO if d - len(atoms) in quad else PERM
            out.append((a, level, where + (": a sum of squares" if level == ORTHO else ": reduces the axis")))
            if level == ORTHO and "mean" not in str(ctx.op):
                _sums(walker, [a], f"{where}: a sum of squares over the axis")
        else:
            out.append((a, kept_level, where))
    out += [(a, kept_level, where) for a in ctx.out_atoms()]
    return out


def _is_square(node) -> bool:
    import torch

    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and str(node.target) == "aten.pow.Tensor_Scalar" and len(node.args) > 1 and node.args[1] == 2)


def _quadratic_means(node) -> bool:
    """Whether every reader of ``x²`` averages (``mean``) rather than sums: a norm's mean square."""
    return all(str(u.target) == "aten.mean.dim" for u in node.users)


def _quadratic_dims(node) -> set[int]:
    """Dims (negative, from the right) that every reader of ``x²`` sums over: orthogonal maps keep the sum."""
    users = list(node.users)
    rank = len(node.meta["val"].shape)
    common: set[int] | None = None
    for u in users:
        if str(u.target) not in QUADRATIC_READERS:
            return set()
        dims = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
        if dims is None:
            return set()
        dims = {(int(d) % rank) - rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        common = dims if common is None else common & dims
    return common or set()
