"""``fxfuse rules check``: an ``einsum`` rule's ranks and axis order checked by running its op on meta tensors.

ATen schemas give no tensor ranks, so the rule is tried on the op itself:
every axis name gets its own size (a group the product of its names', ``...``
one dim of size 2), each input a ``meta`` tensor of that shape, and the op is
called (no data, no compute). Then

* the op runs: each ``out`` signature must have the rank and the sizes of the
  result (a result of another rank is reported with its real rank);
* the op refuses those inputs, but takes them once one argument has another
  rank (its leading or trailing dims kept, or size-2 dims added): that
  argument's rank is wrong, and the message gives the rank the op takes;
* or once one argument's axes are put in another order: the rule has them
  swapped.

A rule the op refuses for any other reason (an integer argument it needs, a
size it takes from an argument, a constraint no signature states) is left
alone: the analysis reports a rule that fits no node (``rules/README.md``).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Any

import torch

from ..core.errors import RuleError
from ..core.schema import _is_tensor
from .rules import Rule, Signature

ELLIPSIS = (2,)  # the dims '...' stands for, the same in every tensor
SIZES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47)  # one per axis name, all different
MAX_PROBED_RANK = 5


def _overload(op: str):
    parts = op.split(".")
    if len(parts) != 3:
        return None
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        return None


def _shape(sig: Signature, size: dict[str, int]) -> tuple[int, ...]:
    dims: list[int] = []
    for d in sig.dims:
        if d.is_ellipsis:
            dims += ELLIPSIS
        else:
            n = 1
            for name in d.names:
                n *= size[name]
            dims.append(n)
    return tuple(dims)


def _call(overload, shapes: dict[str, tuple[int, ...]], integer: frozenset[str]):
    """The op on meta tensors of ``shapes`` (those in ``integer`` as int64); the result, or raises."""
    kwargs = {a: torch.empty(s, device="meta", dtype=torch.int64 if a in integer else torch.float32)
              for a, s in shapes.items()}
    return overload(**kwargs)


def _runs(overload, shapes, dtype_sets) -> tuple[Any, frozenset[str]] | None:
    """``(result, integer arguments)`` for the first dtype assignment the op takes, else ``None``."""
    for integer in dtype_sets:
        try:
            return _call(overload, shapes, integer), integer
        except Exception:  # noqa: BLE001 — any refusal of the op: try the next
            continue
    return None


def _variants(shape: tuple[int, ...]):
    """``(rank, shape)`` of other ranks: leading or trailing dims kept, size-2 dims added in front or behind."""
    for r in range(MAX_PROBED_RANK + 1):
        if r < len(shape):
            yield r, shape[:r]
            yield r, shape[len(shape) - r:]
        elif r > len(shape):
            yield r, (2,) * (r - len(shape)) + shape
            yield r, shape + (2,) * (r - len(shape))


def _results(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: ops tried at odd ranks print deprecation notes from C++ there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_ranks(rule: Rule, path: str, index: int) -> None:
    """Run ``rule``'s ops on meta tensors of its signatures (see the module doc); raise ``RuleError`` naming the
    rule, the field and the op's real rank or order."""
    if rule.kind != "einsum" or any(isinstance(src, str) for _, src in rule.sizes):
        return
    with _quiet_stderr():
        _check_ops(rule, path, index)


def _check_ops(rule: Rule, path: str, index: int) -> None:
    for op in rule.ops:
        overload = _overload(op)
        if overload is None:
            continue
        schema = overload._schema
        tensors = {a.name for a in schema.arguments if _is_tensor(a.type)}
        for alt in rule.axes:
            _check_alternative(rule, op, overload, schema, tensors, alt, path, index)


def _check_alternative(rule, op, overload, schema, tensors, alt, path, index) -> None:
    inputs = {a: s for a, s in alt if a in tensors}
    outputs = {a: s for a, s in alt if a not in tensors}
    needed = [a.name for a in schema.arguments if not a.has_default_value() and not getattr(a, "is_out", False)]
    if not inputs or any(n not in inputs for n in needed):
        return
    names = sorted({n for _, s in alt for n in s.names})
    if len(names) > len(SIZES):
        return
    size = dict(zip(names, SIZES))
    size.update({n: v for n, v in rule.sizes if isinstance(v, int)})
    shapes = {a: _shape(s, size) for a, s in inputs.items()}
    dtype_sets = [frozenset(c) for r in range(len(inputs) + 1) for c in itertools.combinations(sorted(inputs), r)]

    def fail(message: str) -> RuleError:
        return RuleError(path, index, "axes", f"{op}: {message}")

    ran = _runs(overload, shapes, dtype_sets)
    if ran is not None:
        _check_results(ran[0], outputs, size, shapes, fail, sizes_known=True)
        return
    for n in (1, 2):  # the ranks may be right and the sizes constrained (a size-1 slope, a (real, imag) pair)
        uniform = {a: _shape(s, dict.fromkeys(size, n)) for a, s in inputs.items()}
        ran = _runs(overload, uniform, dtype_sets)
        if ran is not None:
            _check_results(ran[0], outputs, dict.fromkeys(size, n), uniform, fail, sizes_known=False)
            break
    else:  # no sizes make the rule's ranks run: is one argument's rank what the op refuses?
        for trial in (shapes, *({a: _shape(s, dict.fromkeys(size, n)) for a, s in inputs.items()} for n in (1, 2))):
            for arg, sig in inputs.items():
                for rank, shape in _variants(trial[arg]):
                    if _runs(overload, dict(trial, **{arg: shape}), dtype_sets) is not None:
                        raise fail(f"argument '{arg}' has rank {len(trial[arg])} in the rule ({sig.text!r}), but "
                                   f"the op takes rank {rank} there")
    for arg, sig in inputs.items():
        dims = [d for d in sig.dims if not d.is_ellipsis]
        if sig.ellipsis is not None or len(dims) > 4:
            continue
        for order in itertools.permutations(range(len(dims))):
            shape = tuple(shapes[arg][i] for i in order)
            if shape != shapes[arg] and _runs(overload, dict(shapes, **{arg: shape}), dtype_sets) is not None:
                swapped = " ".join(" ".join(dims[i].names) if not dims[i].group else f"({' '.join(dims[i].names)})"
                                   for i in order)
                raise fail(f"argument '{arg}' is {sig.text!r} in the rule, but the op takes its axes as "
                           f"{swapped!r} (swapped axes?)")


def _check_results(out, outputs, size, shapes, fail, sizes_known: bool) -> None:
    """Each ``out`` signature against the op's result: its rank, and (``sizes_known``) its axis order."""
    results = _results(out)
    for arg, sig in outputs.items():
        k = 0 if arg == "out" else int(arg[3:])
        if k >= len(results) or not isinstance(results[k], torch.Tensor):
            continue
        got, want = tuple(results[k].shape), _shape(sig, size)
        if len(got) != len(want):
            raise fail(f"'{arg}' has rank {len(want)} in the rule ({sig.text!r}), but the op returns rank "
                       f"{len(got)} for inputs of the rule's ranks ({_shown(shapes)})")
        if sizes_known and got != want and sorted(got) == sorted(want):
            raise fail(f"'{arg}' is {sig.text!r} in the rule, but the op returns shape {got} for inputs "
                       f"{_shown(shapes)} (swapped axes?)")


def _shown(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{a} {s}" for a, s in shapes.items())
