"""Reading and comparing model outputs in tests."""
from __future__ import annotations

import torch

RTOL = 1e-5


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def run(model, args):
    with torch.no_grad():
        return logits(model(*args))


def tolerance(reference: torch.Tensor) -> float:
    """``RTOL`` relative to the output scale (at least 1)."""
    return RTOL * max(1.0, reference.abs().max().item())
