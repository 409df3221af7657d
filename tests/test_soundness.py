"""Soundness: a permuted or aligned copy computes what the model computes, or fxfuse refuses it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- concatenation meeting a reshape


class ChannelShuffle(nn.Module):
    """``cat([a(x), b(x)])`` viewed as ``(2, C)``, transposed to ``(C, 2)`` and flattened: a channel shuffle."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.c = c
        self.a, self.b = nn.Linear(5, c), nn.Linear(5, c)
        self.head = nn.Linear(2 * c, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = y.view(-1, 2, self.c).transpose(1, 2).reshape(-1, 2 * self.c)
        return self.head(torch.relu(y))


def shuffle_case():
    torch.manual_seed(0)
    return ChannelShuffle().eval(), (torch.randn(4, 5, generator=torch.Generator().manual_seed(1)),)


@pytest.mark.parametrize("seed", range(4))
def test_channel_shuffle_permutes_soundly(seed):
    model, args = shuffle_case()
    permuted = fxfuse.permute(model, args, seed=seed)
    assert compare_outputs(model, permuted, args) < 1e-6


def test_channel_shuffle_pins_both_views_of_the_shuffled_axis():
    model, args = shuffle_case()
    a = fxfuse.analyze(model, args)
    for param, axis in (("a.weight", 0), ("b.weight", 0), ("head.weight", 1)):
        for leaf in fxfuse.spaces.expr_leaves(a.layouts[param].axes[axis]):
            s = a.spaces[leaf.space]
            assert not s.free and "conflicting structure" in s.reason, (param, s)
