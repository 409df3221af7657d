"""Layout transforms between two models' parameters: views, their text, and assembly of a target tensor.

A view is a tuple of steps applied in order to a whole tensor ``W``:

* ``("t",)``: the transpose of a 2-D tensor (``Wᵀ``);
* ``("narrow", dim, start, length)``: ``W.narrow(dim, start, length)``, a slice of a fused tensor.

A canonical operand is ``view(W)``: a linear weight in ``(out, in)`` layout, a
bias, a slice of a fused projection. Two operands that play one role in two
graphs are equal tensors, so a target tensor is assembled piece by piece,
``view_t(T) ← view_s(S)``, each write going through the view into ``T``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..core.errors import FxfuseError

View = tuple


class LayoutError(FxfuseError):
    """Pieces that do not assemble a target tensor: a gap, or two pieces that disagree."""


def compose(view: View, step: tuple) -> View:
    """``view`` followed by ``step``; two transposes in a row cancel."""
    if step == ("t",) and view and view[-1] == ("t",):
        return view[:-1]
    return view + (step,)


def apply(t: torch.Tensor, view: View) -> torch.Tensor:
    """``view(t)``, a view sharing ``t``'s storage (writing into it writes into ``t``)."""
    for step in view:
        t = t.t() if step[0] == "t" else t.narrow(step[1], step[2], step[3])
    return t


def shape_of(shape: tuple[int, ...], view: View) -> tuple[int, ...]:
    """The shape of ``view`` of a tensor of ``shape``."""
    shape = list(shape)
    for step in view:
        if step[0] == "t":
            shape = shape[::-1]
        else:
            shape[step[1]] = step[3]
    return tuple(shape)


def text(name: str, view: View, shape: tuple[int, ...]) -> str:
    """``view`` of the tensor ``name`` as an expression: ``qkv.weight[0:32]``, ``c_attn.weight[:, 32:64]ᵀ``."""
    expr, shape = name, list(shape)
    for step in view:
        if step[0] == "t":
            expr, shape = f"{expr}ᵀ", shape[::-1]
        else:
            _, dim, start, length = step
            if start == 0 and length == shape[dim]:
                continue
            expr = f"{expr}[{':, ' * dim}{start}:{start + length}]"
            shape[dim] = length
    return expr


def transform_name(source_view: View, target_view: View, source_shape, target_shape) -> str:
    """What a piece does: ``identity``, ``transpose``, ``slice`` (of a fused source), ``concat`` (into a fused
    target), joined with ``+``."""
    parts = []
    if sum(step == ("t",) for step in source_view + target_view) % 2:
        parts.append("transpose")
    if _narrowed(source_view, source_shape):
        parts.append("slice")
    if _narrowed(target_view, target_shape):
        parts.append("concat")
    return "+".join(parts) or "identity"


def _narrowed(view: View, shape) -> bool:
    """Whether ``view`` keeps only part of a tensor of ``shape``."""
    shape = list(shape)
    for step in view:
        if step[0] == "t":
            shape = shape[::-1]
        elif step[3] != shape[step[1]]:
            return True
    return False


@dataclass(frozen=True)
class Piece:
    """``view_t(target) ← view_s(source)``: one canonical operand of two matched ops."""

    target: str
    target_view: View
    source: str
    source_view: View


def assemble(pieces: tuple[Piece, ...], source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
             labels: tuple[str, str] = ("source", "target")) -> dict[str, torch.Tensor]:
    """Each target tensor named by ``pieces``, built from the ``source`` tensors (``target`` gives shapes and
    dtypes); ``LayoutError`` where a piece leaves part of it unwritten or two pieces write different values."""
    out: dict[str, torch.Tensor] = {}
    written: dict[str, torch.Tensor] = {}
    for p in pieces:
        like = target[p.target]
        if p.target not in out:
            out[p.target] = torch.zeros_like(like, device="cpu")
            written[p.target] = torch.zeros(like.shape, dtype=torch.bool)
        value = apply(source[p.source].detach().to("cpu", like.dtype), p.source_view)
        into, mask = apply(out[p.target], p.target_view), apply(written[p.target], p.target_view)
        if mask.any() and not torch.equal(into[mask], value[mask]):
            raise LayoutError(f"{labels[1]} {p.target} is read in several places that {labels[0]} fills from "
                              f"different values (one of them {p.source}): the models do not tie the same weights")
        into.copy_(value)
        mask.fill_(True)
    for name, mask in written.items():
        if not bool(mask.all()):
            raise LayoutError(f"{labels[1]} {name}: only {int(mask.sum())} of its {mask.numel()} values have a "
                              f"counterpart in {labels[0]}")
    return out
