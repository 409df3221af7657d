"""What a rule kind sees of one node: ``OpContext`` (argument values, shapes, atoms; the tie/pin verbs).

Shapes are concrete lists of ints, ``None`` for a size that depends on the data; ``out`` stands for
the node's output (``outN`` for the N-th of several). The context writes through the walker's
``AxisStore`` (``fxfuse.frontend.walker``); a kind that does not fit raises ``RuleMismatch``.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.axes import CONCAT, PRODUCT
from .kinds import RuleMismatch


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _dim(size: Any) -> int | None:
    """A dim's size, ``None`` where it depends on the data (an unbacked symbol such as ``u0``)."""
    if isinstance(size, int):
        return size
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return None if free_unbacked_symbols(size) else int(size)


class OpContext:
    """What a kind sees of one node: argument values, shapes, atoms, and the tie/pin verbs."""

    def __init__(self, walker: Any, node: torch.fx.Node, rule: Any, op: str, out: Any, val: Any):
        self.walker, self.node, self.rule, self.op = walker, node, rule, op
        self.store = walker.store
        self.out = out
        self.out_shape = self._shape_of_val(val)
        self._bound = self._bind(node)

    @staticmethod
    def _shape_of_val(val: Any) -> Any:
        if _is_tensor(val):
            return [_dim(s) for s in val.shape]
        if isinstance(val, (list, tuple)):
            return [[_dim(s) for s in v.shape] if _is_tensor(v) else None for v in val]
        return None

    def _bind(self, node: torch.fx.Node) -> dict[str, Any]:
        schema = getattr(node.target, "_schema", None)
        bound: dict[str, Any] = {}
        if schema is not None:
            for i, arg in enumerate(schema.arguments):
                if i < len(node.args) and not arg.kwarg_only:
                    bound[arg.name] = node.args[i]
                elif arg.name in node.kwargs:
                    bound[arg.name] = node.kwargs[arg.name]
                elif arg.has_default_value():
                    bound[arg.name] = arg.default_value
        else:
            for i, a in enumerate(node.args):
                bound[f"arg{i}"] = a
            bound.update(node.kwargs)
        return bound

    # -- reading
    def value(self, name: str) -> Any:
        """The argument called ``name`` (schema name; ``out``/``outN`` for outputs)."""
        if name == "out":
            return _OUT
        if name.startswith("out") and name[3:].isdigit():
            return (_OUT, int(name[3:]))
        return self._bound.get(name)

    def has(self, name: str) -> bool:
        """Whether the op has an argument (or output) called ``name``."""
        if name == "out" or (name.startswith("out") and name[3:].isdigit()):
            return True
        return name in self._bound

    def shape(self, value: Any) -> list[int] | None:
        if value is _OUT:
            single = self.out is not None and all(isinstance(a, int) for a in self.out)  # one tensor's atoms
            return self.out_shape if single else None
        if isinstance(value, tuple) and len(value) == 2 and value[0] is _OUT:
            shapes = self.out_shape
            return shapes[value[1]] if isinstance(shapes, list) and value[1] < len(shapes) and isinstance(shapes[value[1]], list) else None
        if isinstance(value, torch.fx.Node):
            return self._shape_of_val(value.meta.get("val")) if _is_tensor(value.meta.get("val")) else None
        return None

    def atoms(self, value: Any) -> list[int] | None:
        if value is _OUT:
            return self.out
        if isinstance(value, tuple) and len(value) == 2 and value[0] is _OUT:
            return self.out[value[1]]
        if isinstance(value, torch.fx.Node):
            return self.walker.env.get(value)
        return None

    def tensor_args(self) -> list[tuple[str, torch.fx.Node]]:
        return [(k, v) for k, v in self._bound.items()
                if isinstance(v, torch.fx.Node) and _is_tensor(v.meta.get("val"))]

    def out_atoms(self) -> list[int]:
        return self.walker.atoms_flat(self.out)

    # -- writing
    def new_atom(self, size: int) -> int:
        return self.store.new(size)

    def tie(self, a: int, b: int) -> None:
        if self.store.size(a) != self.store.size(b):
            raise RuleMismatch(f"cannot tie axes of sizes {self.store.size(a)} and {self.store.size(b)}")
        self.store.unify(a, b, f"{self.op} at {self.node.name}")

    def pin(self, atom: int, reason: str) -> None:
        self.store.pin(atom, f"{reason} at {self.node.name}")

    def free(self, atom: int) -> None:
        self.store.touched.add(atom)

    def defer_row(self, atom: int, selected: int, row: int, out: int) -> bool:
        """Record that ``out`` is row ``row`` of ``atom`` in a packed ``(selected × atom)`` axis.

        Returns False (tie as usual) unless some product refinement has exactly the
        classes of ``selected`` and ``atom`` as its two factors.
        """
        store = self.store
        p, e = store.find(selected), store.find(atom)
        for root, ref in store._refine.items():
            if (store.find(root) == root and ref.kind == PRODUCT and len(ref.children) == 2
                    and store.find(ref.children[0]) == p and store.find(ref.children[1]) == e):
                self.walker.rows.append((e, p, root, row, out))
                self.free(out)
                return True
        return False

    def role(self, atom: int, name: str) -> None:
        self.store.add_role(atom, name)

    def param_use(self, value: Any, atom: int, consumed: bool) -> None:
        """Record how an op uses an axis of a parameter: read by a contraction (``consumed``) or not."""
        name = self.walker.param_view.get(value) if isinstance(value, torch.fx.Node) else None
        if name is not None:
            self.walker.param_uses.append((name, atom, consumed))

    def compose(self, atoms: list[int], kind: str) -> int:
        """An atom refined as ``kind`` over ``atoms`` (the atom itself when there is one)."""
        if len(atoms) == 1:
            return atoms[0]
        sizes = [self.store.size(a) for a in atoms]
        total = sum(sizes) if kind == CONCAT else _prod(sizes)
        joined = self.store.new(total)
        for child, atom in zip(self.store.refine(joined, kind, sizes), atoms):
            self.store.unify(child, atom, f"{self.op} at {self.node.name}")
        return joined

    def analyze_subgraph(self, sub: torch.fx.Node, operands) -> list:
        gm = getattr(self.walker.traced.graph_module, sub.target)
        inputs = [self.walker.env.get(o) if isinstance(o, torch.fx.Node) else None for o in operands]
        outer = self.walker.prefix
        self.walker.prefix = subgraph_prefix(outer, sub.target)
        try:
            return self.walker.walk(gm, top=False, inputs=inputs)
        finally:
            self.walker.prefix = outer


def subgraph_prefix(prefix: str, submodule: str) -> str:
    """Nodes of a higher-order op's submodule are named ``submodule/node`` (nested: ``outer/inner/node``)."""
    return f"{prefix}{submodule}/"


_OUT = object()


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
