"""Function checks: does a transformed model still compute what the original did?

``check_moved`` is the one self-check of every command that writes a moved
model (``permute``, ``compile``): the moved copy must compute what the original
computes on the example inputs (relative error ≤ ``CHECK_TOL``); if it does
not, each space is moved alone to find the one at fault, and the error names
it with every op it passes through and the rule file of each.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..core.derived import forget_derived
from ..core.errors import FxfuseError, UnsoundError
from .trace import op_name as _op_name

CHECK_TOL = 1e-4
BLAMED_OPS = 8  # ops named in an error before "…"


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Floating-point tensors of a model output (tensor, tuple, dict or HF ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):
        values = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
        return [t for v in values for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []


@torch.no_grad()
def run(model: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None) -> list[torch.Tensor]:
    was = model.training
    forget_derived(model).eval()  # computed from its weights as they are now
    try:
        return output_tensors(model(*args, **dict(kwargs or {})))
    finally:
        model.train(was)


def relative_error(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """``max |ref − got| / max(1, max |ref|)`` over all outputs; ``inf`` if shapes differ."""
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        return float("inf")
    if not ref:
        return 0.0
    scale = max(1.0, max(float(a.abs().max()) for a in ref if a.numel()))
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(ref, got) if a.numel())
    return diff / scale


def compare_outputs(a: nn.Module, b: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None) -> float:
    return relative_error(run(a, args, kwargs), run(b, args, kwargs))


def _spaces_in(value: Any) -> set[int]:
    """Spaces of a node's axis expressions (one tensor, or a tuple of them)."""
    if value is None:
        return set()
    if isinstance(value, tuple):
        return {s for v in value for s in _spaces_in(v)}
    parts = getattr(value, "parts", None)
    if parts is not None:
        return {s for p in parts for s in _spaces_in(p)}
    return {value.space}


def ops_through(analysis, rules, space_ids: Iterable[int]) -> list[str]:
    """``"op (rule file:index)"`` for every op (in graph order, subgraphs included) that reads or
    writes an axis of one of ``space_ids``; an op without a rule is named as such."""
    wanted, axes = set(space_ids), analysis.node_axes
    out: list[str] = []
    for path, gm in analysis.traced.graph_module.named_modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        prefix = "".join(f"{part}/" for part in path.split(".") if part)  # node names as the analysis keys them
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            seen = _spaces_in(axes.get(prefix + node.name))
            for arg in node.all_input_nodes:
                seen |= _spaces_in(axes.get(prefix + arg.name))
            if not seen & wanted:
                continue
            op = _op_name(node.target)
            rule = rules.lookup(op)
            entry = f"{op} ({rule.source})" if rule else f"{op} (no rule)"
            if entry not in out:
                out.append(entry)
    return out


def blame(analysis, rules, space_ids: Iterable[int]) -> str:
    """``ops_through`` as one line (at most ``BLAMED_OPS`` ops); never empty."""
    ids = sorted(set(space_ids))
    ops = ops_through(analysis, rules, ids)
    if not ops:  # a space no op touches: only its parameters can say where it is
        members = sorted({m.param for s in ids for m in analysis.spaces[s].members})
        return "no op of the graph (members: " + ", ".join(members[:BLAMED_OPS]) + ")"
    return ", ".join(ops[:BLAMED_OPS]) + (f", … ({len(ops) - BLAMED_OPS} more)" if len(ops) > BLAMED_OPS else "")


def check_outputs(ref: list[torch.Tensor], got: list[torch.Tensor], *, run_one: Callable[[int], list[torch.Tensor]],
                  analysis, rules, spaces: Iterable[int], what: str,
                  error: type[FxfuseError] = UnsoundError) -> float:
    """The relative error of outputs ``got`` against ``ref``; raises ``error`` if it exceeds ``CHECK_TOL``.

    ``spaces``: the spaces moved; ``run_one(s)``: the outputs with space ``s`` moved alone (to find the
    space at fault); ``what``: the move, for the message (``"aligning model 1"``).
    """
    err = relative_error(ref, got)
    if err <= CHECK_TOL:
        return err
    spaces = sorted(spaces)
    head = f"{what} changed its function (relative error {err:.2e})"
    culprit = next((s for s in spaces if not relative_error(ref, run_one(s)) <= CHECK_TOL), None)
    if culprit is None:
        listed = ", ".join(f"s{s}" for s in spaces[:BLAMED_OPS]) + (" …" if len(spaces) > BLAMED_OPS else "")
        raise error(f"{head}: no space changes it alone; the spaces moved ({listed}) pass through "
                    f"{blame(analysis, rules, spaces)}; one of these rules is wrong")
    s = analysis.spaces[culprit]
    raise error(f"{head}: space s{culprit} ({s.name}, size {s.size}) is moved unsoundly; it passes through "
                f"{blame(analysis, rules, [culprit])}; one of these rules is wrong")


def check_moved(original: nn.Module, moved: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None, *,
                analysis, rules, spaces: Iterable[int], move_one: Callable[[int], nn.Module], what: str,
                error: type[FxfuseError] = UnsoundError) -> float:
    """``check_outputs`` of module ``moved`` against ``original`` on ``(args, kwargs)``; ``move_one(s)``:
    ``original`` with space ``s`` moved alone."""
    return check_outputs(run(original, args, kwargs), run(moved, args, kwargs),
                         run_one=lambda s: run(move_one(s), args, kwargs), analysis=analysis, rules=rules,
                         spaces=spaces, what=what, error=error)
