"""Axis expressions: one dimension of a parameter as a tree over spaces.

``Leaf(space, size)`` is one space; ``Product(parts)`` a row-major product of
its parts (heads × head dim: unit ``(h, d)`` is index ``h·|D| + d``);
``Concat(parts)`` its parts' segments one after the other (a ``cat`` along
the axis). ``size`` is the dimension's length: a product's is the product of
its parts', a concatenation's their sum.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Leaf:
    space: int
    size: int


@dataclass(frozen=True)
class Product:
    parts: tuple["AxisExpr", ...]
    size: int


@dataclass(frozen=True)
class Concat:
    parts: tuple["AxisExpr", ...]
    size: int


AxisExpr = Leaf | Product | Concat


def expr_leaves(expr: AxisExpr) -> list[Leaf]:
    if isinstance(expr, Leaf):
        return [expr]
    return [leaf for part in expr.parts for leaf in expr_leaves(part)]


def expr_text(expr: AxisExpr) -> str:
    if isinstance(expr, Leaf):
        return f"s{expr.space}"
    sep = "×" if isinstance(expr, Product) else " | "
    return "(" + sep.join(expr_text(p) for p in expr.parts) + ")"
