"""Rules checked against the schemas of the ops they name.

A rule for an op that exists in ``torch.ops`` must use that op's argument
names, put axis signatures on tensor arguments only, name outputs the op
returns (``out`` for one tensor, ``out0..outN-1`` for N results) and take sizes
from integer arguments. ``check_rule`` raises ``RuleError`` naming the file,
rule index and field; ops not in ``torch.ops`` (not loaded yet, or from another
torch version) are skipped and listed by ``unresolved_ops``.

A name with an overload (``aten.add.Tensor``) is checked against that overload.
A name without one (``aten.arange``) covers every overload, so each argument
name must exist in at least one of them (out= variants aside); the analysis
then fails closed on the overloads a rule does not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import RuleError


@dataclass(frozen=True)
class OpSchema:
    """What a rule may name for one op (or every overload of a packet)."""

    op: str
    tensors: frozenset[str]  # single-tensor arguments (``Tensor``, ``Tensor?``)
    lists: frozenset[str]  # tensor-list arguments (``Tensor[]``)
    ints: frozenset[str]  # integer arguments (``int``, ``SymInt``, ``int?``)
    others: frozenset[str]  # every other argument, by name
    returns: frozenset[int]  # number of results of each overload; -1 for a list of tensors
    tensor_returns: frozenset[int]  # indices of results that are tensors
    order: tuple[str, ...] = ()  # every argument name, in schema order

    @property
    def arguments(self) -> frozenset[str]:
        return frozenset(self.order)


def _base(t) -> object:
    while isinstance(t, torch.OptionalType):
        t = t.getElementType()
    return t


def _is_tensor(t) -> bool:
    return isinstance(_base(t), torch.TensorType)


def _is_tensor_list(t) -> bool:
    t = _base(t)
    return isinstance(t, torch.ListType) and _is_tensor(t.getElementType())


def _is_int(t) -> bool:
    return isinstance(_base(t), (torch.IntType, torch.SymIntType))


def _from_schemas(op: str, schemas: list) -> OpSchema:
    tensors, lists, ints, others = set(), set(), set(), set()
    returns, tensor_returns, order = set(), set(), {}
    for schema in schemas:
        for arg in schema.arguments:
            if getattr(arg, "is_out", False):
                continue
            order.setdefault(arg.name, None)
            if _is_tensor(arg.type):
                tensors.add(arg.name)
            elif _is_tensor_list(arg.type):
                lists.add(arg.name)
            elif _is_int(arg.type):
                ints.add(arg.name)
            else:
                others.add(arg.name)
        rets = list(schema.returns)
        if len(rets) == 1 and _is_tensor_list(rets[0].type):
            returns.add(-1)
        else:
            returns.add(len(rets))
            tensor_returns |= {i for i, r in enumerate(rets) if _is_tensor(r.type)}
    return OpSchema(op, frozenset(tensors), frozenset(lists), frozenset(ints), frozenset(others - tensors - lists),
                    frozenset(returns), frozenset(tensor_returns), tuple(order))


_FOUND: dict[str, OpSchema] = {}


def op_schema(op: str) -> OpSchema | None:
    """The schema of ``ns.op.overload`` (or of every overload of ``ns.op``); None when torch has no such op.

    Found schemas are cached; a miss is not, since a custom op may be registered later.
    """
    if op not in _FOUND:
        schema = _lookup(op)
        if schema is None:
            return None
        _FOUND[op] = schema
    return _FOUND[op]


def _lookup(op: str) -> OpSchema | None:
    parts = op.split(".")
    if parts[0] == "higher_order" or len(parts) not in (2, 3):
        return None
    try:
        packet = getattr(getattr(torch.ops, parts[0]), parts[1])
    except (AttributeError, RuntimeError):
        return None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    if len(parts) == 3:
        try:
            schemas = [getattr(packet, parts[2])._schema]
        except (AttributeError, RuntimeError):
            return None
    else:
        schemas = []
        for name in packet.overloads():
            schema = getattr(packet, name)._schema
            if not any(getattr(a, "is_out", False) for a in schema.arguments):
                schemas.append(schema)
        if not schemas:
            return None
    return _from_schemas(op, schemas)


def unresolved_ops(ops: Iterable[str]) -> list[str]:
    """Op names (not higher-order ops, not ``pattern.`` subgraphs) that ``torch.ops`` does not know, in order."""
    return [op for op in ops if not op.startswith(("higher_order.", "pattern.")) and op_schema(op) is None]


def _output_index(arg: str) -> int | None:
    """0 for ``out``, N for ``outN``, None for an input name."""
    if arg == "out":
        return 0
    if arg.startswith("out") and arg[3:].isdigit():
        return int(arg[3:])
    return None


def _check_result(arg: str, k: int, schema: OpSchema, fail) -> None:
    """``out`` needs an overload with one result, ``outN`` one with more than N (a tuple), each a tensor."""
    counts = schema.returns - {-1}
    most = max(counts, default=0)
    if not counts:
        raise fail("axes", f"'{arg}': the op returns a list of tensors, which a signature cannot describe")
    if most == 0:
        raise fail("axes", f"'{arg}': the op returns no result")
    if arg == "out" and 1 not in counts:
        raise fail("axes", f"'out': the op returns {most} results; name them out0..out{most - 1}")
    if arg != "out" and most == 1:
        raise fail("axes", f"'{arg}': the op returns one result; call it 'out'")
    if k >= most:
        raise fail("axes", f"'{arg}': the op returns only {most} results")
    if k not in schema.tensor_returns:
        raise fail("axes", f"'{arg}': that result is not a tensor")


def check_rule(rule, path: str, index: int, ops: Iterable[str] | None = None) -> None:
    """Check ``rule`` (from rule ``index`` of file ``path``) against each of its ops known to torch."""
    for op in (rule.ops if ops is None else ops):
        schema = op_schema(op)
        if schema is None:
            continue

        def fail(fieldname: str, message: str) -> RuleError:
            return RuleError(path, index, fieldname, f"{op}: {message}")

        for alt in rule.axes:
            for arg, sig in alt:
                k = _output_index(arg)
                if k is None:
                    if arg in schema.tensors:
                        continue
                    if arg in schema.lists:
                        raise fail("axes", f"argument '{arg}' is a list of tensors; a signature describes one tensor")
                    if arg in schema.arguments:
                        raise fail("axes", f"argument '{arg}' is not a tensor; only tensor arguments take a signature")
                    raise fail("axes", f"no argument '{arg}' (arguments: {', '.join(schema.order)})")
                _check_result(arg, k, schema, fail)
        for name, src in rule.sizes:
            if isinstance(src, str) and src not in schema.ints:
                what = "is not an integer argument" if src in schema.arguments else "is not an argument"
                raise fail("sizes", f"size of '{name}': '{src}' {what}")
        if rule.kind != "subgraph":  # subgraph options are positions, checked when the file is read
            for key, value in rule.options:
                if value not in schema.arguments:
                    raise fail("options", f"option '{key}': no argument '{value}' (arguments: {', '.join(schema.order)})")
