"""Learned per-unit scales of the fused model: repair as parameters of refinement.

Averaging aligned units shrinks their spread (``fxfuse.backend.repair``). Instead
of measuring a correction after the maps are fixed, refinement can learn one with
them: every *site* (a producer's output units ``y_j``, found as repair's points)
gets a log-scale ``u_j`` and a shift ``c_j``, and the fused model computes

    y_j ← exp(s·u_j) · y_j + s·c_j,

folded into the producer's weight and bias, ``W[j] ← exp(s·u_j) W[j]``,
``b_j ← exp(s·u_j) b_j + s·c_j`` (``W[j]`` the slice of the output unit along
``weight_dim``). ``s`` is the *strength*: 1 in the fused model written at its
fusion weights; along a two-model interpolation ``θ(λ)`` (``λ`` the source's
weight, ``w`` its fusion weight)

    s(λ) = λ (1 − λ) / (w (1 − w)),

a bump that is 0 at both ends (the parents compute exactly what they did) and 1 at
``λ = w``. Refinement samples ``λ`` near ``w`` and applies the scales at ``s(λ)``,
so what it learns is the curve ``fxfuse.barrier`` draws. The maps stay exact group
elements: the scales change only the fused model, never the aligned parents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


@dataclass(frozen=True)
class ScaleSite:
    """Output units of one producer: ``weight`` (its ``weight_dim`` holds the units), ``bias`` (or ``None``)."""

    node: str
    weight: str
    weight_dim: int
    bias: str | None
    units: int


@dataclass(frozen=True)
class UnitScales:
    """Learnt ``(log_scale, shift)`` per site (``(units,)`` each, float32); ``weight``: the source's fusion
    weight ``w`` at which the strength is 1 (two models), ``None`` (more models: always 1)."""

    sites: tuple[ScaleSite, ...]
    log_scale: tuple[torch.Tensor, ...]
    shift: tuple[torch.Tensor, ...]
    weight: float | None = None

    def summary(self) -> dict:
        """Per site: mean and extremes of ``exp(u)`` and the mean ``|c|`` (for the report)."""
        out = []
        for site, u, c in zip(self.sites, self.log_scale, self.shift):
            a = u.double().exp()
            out.append({"node": site.node, "weight": site.weight, "units": site.units,
                        "scale_mean": float(a.mean()), "scale_min": float(a.min()), "scale_max": float(a.max()),
                        "shift_abs_mean": float(c.double().abs().mean()) if site.bias is not None else 0.0})
        return {"sites": len(self.sites), "per_site": out}


def strength(lam: float, weight: float | None) -> float:
    """``λ(1 − λ) / (w(1 − w))`` (``weight = w``); ``1`` where ``weight`` is ``None``."""
    if weight is None:
        return 1.0
    return lam * (1 - lam) / (weight * (1 - weight))


def apply(state: Mapping[str, torch.Tensor], sites: Sequence[ScaleSite], log_scale: Sequence[torch.Tensor],
          shift: Sequence[torch.Tensor], s: float = 1.0, work: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``state`` with every site's units rescaled at strength ``s`` (differentiable in the scales; the state's
    tensors are not changed in place), computed in ``work`` (default: each tensor's own dtype) and returned in
    each tensor's dtype. A site without bias gets the scale only."""
    out = dict(state)
    for site, u, c in zip(sites, log_scale, shift):
        w = out[site.weight]
        dt = work or w.dtype
        a = torch.exp(s * u.to(device=w.device, dtype=work or u.dtype)).to(dt)
        shape = [1] * w.dim()
        shape[site.weight_dim] = -1
        out[site.weight] = (w.to(dt) * a.view(shape)).to(w.dtype)
        if site.bias is not None:
            b = out[site.bias]
            out[site.bias] = (b.to(dt) * a + (s * c.to(device=b.device, dtype=work or c.dtype)).to(dt)).to(b.dtype)
    return out


def fold(state: Mapping[str, torch.Tensor], scales: UnitScales, s: float = 1.0) -> dict[str, torch.Tensor]:
    """The scales folded into ``state`` at strength ``s``, computed in float64, each tensor in its own dtype."""
    with torch.no_grad():
        return apply(state, scales.sites, scales.log_scale, scales.shift, s, torch.float64)
