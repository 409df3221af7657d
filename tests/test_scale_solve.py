"""The descent skips re-solving blocks whose pass-1 cost was already complete: same maps as without."""
from __future__ import annotations

import pytest
import torch

import fxfuse
import zoo
from fxfuse.plan import WeightCost, align


class _Counted:
    """A cost model counting its block solves; ``opaque``: it cannot tell whether pass 1 left tensors out."""

    def __init__(self, cost: WeightCost, opaque: bool):
        self.cost, self.calls = cost, 0
        self.tensors_of = cost.tensors_of
        if not opaque:
            self.leaves_out = cost.leaves_out

    def block(self, *args, **kwargs):
        self.calls += 1
        return self.cost.block(*args, **kwargs)


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2", "cnn", "swin"])
def test_skipping_complete_blocks_gives_the_same_maps(name):
    a, args = zoo.ZOO[name](seed=0)
    b, _ = zoo.ZOO[name](seed=1)  # independently initialised: the descent has real work to do
    kwargs = {}
    if isinstance(args, dict):
        args, kwargs = (), args
    ta = fxfuse.analyze(a, args, example_kwargs=kwargs)
    counted = [_Counted(WeightCost(ta, a.state_dict(), b.state_dict()), opaque) for opaque in (False, True)]
    fast, slow = (align(ta, c, seed=3) for c in counted)
    assert fast.maps.keys() == slow.maps.keys() and fast.maps
    for s, m in fast.maps.items():
        assert torch.equal(m.perm, slow.maps[s].perm), f"space {s}"
        assert m.similarity_aligned == slow.maps[s].similarity_aligned
    assert fast.passes <= slow.passes
    assert counted[0].calls < counted[1].calls  # the blocks of the first layers see their full cost at once
