"""A nested space must know which unit of its parent it moves under.

In SqueezeBERT's feed-forward, 1×1 convolutions of 2, then 4, then 2 groups
structure the hidden channels as ``a × b × c`` and the intermediate ones as
``(a × b) × d``; the last convolution's weight holds ``b`` twice, on its
output rows ``(a × (b × c))`` and on its input columns ``(b × d)``. ``d``
under ``b`` is well defined on every tensor but that one, where the two
occurrences of ``b`` make the pairing ambiguous: ``d`` moves by one
permutation for every unit of ``b`` there, or the permuted copy computes
something else.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.frontend.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("quiet_one_thread")

WIDTH = 16


class GroupedFeedForward(nn.Module):
    """``h = conv₂(x) + x``, ``y = conv₂'(gelu(conv₄(h))) + h``: SqueezeBERT's layer without its attention."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(3, WIDTH, 1)
        self.mix = nn.Conv1d(WIDTH, WIDTH, 1, groups=2)
        self.up = nn.Conv1d(WIDTH, 2 * WIDTH, 1, groups=4)
        self.down = nn.Conv1d(2 * WIDTH, WIDTH, 1, groups=2)
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x):  # x: (B, 3, L) -> (B, 5)
        h = self.stem(x)
        h = h + self.mix(h)
        y = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(y.mean(-1))


def grouped_ffn():
    torch.manual_seed(0)
    return GroupedFeedForward().eval(), (torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(1)),)


def test_a_parent_held_twice_by_a_tensor_of_the_child_does_not_nest_it():
    model, args = grouped_ffn()
    a = fxfuse.analyze(model, args)
    down = a.layout_of("down.weight").axes
    leaves = [leaf.space for axis in down for leaf in fxfuse.frontend.spaces.expr_leaves(axis)]
    twice = {s for s in leaves if leaves.count(s) > 1}
    assert twice, "the down convolution holds one space on its rows and its columns"
    for child, parent in a.parents.items():
        assert not (parent in twice and child in leaves), f"s{child} nested under s{parent}, held twice by down.weight"
    assert any(a.space(leaf.space).free and leaf.size > 1 for leaf in fxfuse.frontend.spaces.expr_leaves(down[1]))


@pytest.mark.parametrize("seed", range(3))
def test_grouped_feed_forward_permutes_soundly_and_fuses_back(seed):
    model, args = grouped_ffn()
    permuted = fxfuse.permute(model, args, seed=seed)
    assert not torch.equal(permuted.up.weight, model.up.weight)
    assert compare_outputs(model, permuted, args) < 1e-5
    result = fxfuse.compile([model, permuted], args, cost="weights")
    for name, t in model.state_dict().items():
        assert torch.allclose(result.module.state_dict()[name], t, atol=1e-6), name
