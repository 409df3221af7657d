"""Function checks: does a transformed model still compute what the original did?"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


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
    model.eval()
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
