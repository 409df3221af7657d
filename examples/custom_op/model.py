"""A model with a custom op that fxfuse has no rule for.

``fxfuse_demo::scaled_gelu(Tensor x, Tensor scale) -> Tensor`` computes
``gelu(x) * scale`` with ``x`` of shape ``[..., C]`` and ``scale`` a per-channel
parameter of shape ``[C]``. It is used between two linear layers::

    Linear(16 -> 32) -> scaled_gelu(., scale[32]) -> Linear(32 -> 8)

Without a rule the analyser pins every axis the op touches, so the 32 hidden
channels cannot be permuted. ``rules.yaml`` next to this file declares that the
op is element-wise along the channel axis, which frees them.

Try it::

    fxfuse explain examples/custom_op/model.py:build
    fxfuse explain examples/custom_op/model.py:build --rules examples/custom_op/rules.yaml
"""
from __future__ import annotations

import torch
from torch import nn

IN, HIDDEN, OUT, BATCH = 16, 32, 8, 4


@torch.library.custom_op("fxfuse_demo::scaled_gelu", mutates_args=())
def scaled_gelu(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``gelu(x) * scale``; ``scale`` has one entry per channel (the last axis of ``x``)."""
    return torch.nn.functional.gelu(x) * scale


@scaled_gelu.register_fake
def _(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    torch._check(scale.dim() == 1 and scale.shape[0] == x.shape[-1])
    return torch.empty_like(x)


class ScaledGeluMLP(nn.Module):
    """``Linear -> scaled_gelu -> Linear``; ``scale`` is a learned per-channel parameter."""

    def __init__(self, d_in: int = IN, hidden: int = HIDDEN, d_out: int = OUT):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.scale = nn.Parameter(torch.rand(hidden) + 0.5)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(scaled_gelu(self.fc1(x), self.scale))


def build(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``(module, example_args)``: the model in eval mode with random weights from ``seed``."""
    torch.manual_seed(seed)
    model = ScaledGeluMLP().eval()
    g = torch.Generator().manual_seed(1234)
    return model, (torch.randn(BATCH, IN, generator=g),)
