"""The descent skips re-solving blocks whose pass-1 cost was already complete: same maps as without."""
from __future__ import annotations

import pytest
import torch

import fxfuse
import zoo
from fxfuse.planner.plan import align
from fxfuse.planner.weight_cost import WeightCost


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


class _Products:
    """Counts the similarity products a weight cost computes."""

    def __init__(self, cost: WeightCost):
        self.count, mm = 0, cost._mm

        def counted(a, b):
            self.count += 1
            return mm(a, b)

        cost._mm = counted


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "swin", "mixtral"])
def test_kept_products_give_the_same_maps_bit_for_bit(name):
    """A block re-solved in a later pass reuses the products of pieces whose other maps did not change."""
    a, args = zoo.ZOO[name](seed=0)
    b, _ = zoo.ZOO[name](seed=1)
    kwargs = {}
    if isinstance(args, dict):
        args, kwargs = (), args
    ta = fxfuse.analyze(a, args, example_kwargs=kwargs)
    costs = [WeightCost(ta, a.state_dict(), b.state_dict()) for _ in range(4)]
    costs[1].product_cache_bytes = costs[1].product_spill_bytes = 0  # every product made again, as before
    costs[2].product_cache_bytes = 16 * 16 * 4  # room for a few small products only, in memory
    costs[2].product_spill_bytes = 0
    costs[3].product_cache_bytes = 0  # every kept product in the scratch file
    counts = [_Products(c) for c in costs]
    kept, fresh, few, spilled = (align(ta, c, seed=3) for c in costs)
    assert kept.maps.keys() == fresh.maps.keys() == few.maps.keys() == spilled.maps.keys() and kept.maps
    assert kept.passes == fresh.passes == few.passes == spilled.passes
    for s, m in [(s, m) for run in (kept, few, spilled) for s, m in run.maps.items()]:
        other = fresh.maps[s]
        for field in ("perm", "matrix", "q", "pair_perms"):
            x, y = getattr(m, field), getattr(other, field)
            assert (x is None and y is None) or torch.equal(x, y), f"space {s} {field}"
        assert m.similarity_aligned == other.similarity_aligned and m.similarity_identity == other.similarity_identity
    assert counts[0].count <= counts[1].count and counts[3].count == counts[0].count
    assert costs[3]._product_bytes == 0
    if name == "llama":  # its residual stream is solved again in later passes, most of its pieces' maps unchanged
        assert kept.passes > 1 and counts[0].count < counts[1].count and costs[3].kept.spilled > 0


def test_products_that_do_not_all_fit_keep_what_fits():
    """With room for half of the products a run keeps, the reused ones stay (no cycling through them)."""
    a, args = zoo.llama(seed=0)
    b, _ = zoo.llama(seed=1)
    ta = fxfuse.analyze(a, args)
    roomy = WeightCost(ta, a.state_dict(), b.state_dict())
    full = align(ta, roomy, seed=3)
    kept_bytes = roomy._product_bytes
    counts = []
    for room in (kept_bytes // 2, 0):
        cost = WeightCost(ta, a.state_dict(), b.state_dict())
        cost.product_cache_bytes, cost.product_spill_bytes = room, 0
        counted = _Products(cost)
        got = align(ta, cost, seed=3)
        assert got.passes == full.passes > 1
        assert all(torch.equal(m.perm, got.maps[s].perm) for s, m in full.maps.items() if m.perm is not None)
        assert cost._product_bytes <= room
        counts.append(counted.count)
    assert kept_bytes > 0 and counts[0] < counts[1]
