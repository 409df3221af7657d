"""Kept products: the same bits back while their maps stay, in memory up to the room, the rest in a scratch file."""
from __future__ import annotations

import torch

import fxfuse
import zoo
from fxfuse.planner import kept_products
from fxfuse.planner.kept_products import KeptProducts
from fxfuse.planner.plan import align
from fxfuse.planner.weight_cost import WeightCost


def _product(seed: int, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_a_product_comes_back_while_its_tag_is_the_same():
    kept = KeptProducts(room=1 << 20)
    p = _product(0)
    assert kept.put("a", ("s", 1), p)
    assert _same(kept.get("a", ("s", 1)), p)
    assert kept.get("a", ("s", 2)) is None and kept.get("b", ("s", 1)) is None
    assert kept.held == p.numel() * 4 and kept.spilled == 0
    assert kept.entries["a"].reused == 1


def test_products_beyond_the_room_go_to_the_scratch_file_and_come_back_the_same_bits():
    one = 8 * 8 * 4
    kept = KeptProducts(room=2 * one)
    products = {k: _product(k) for k in range(5)}
    for k, p in products.items():
        assert kept.put(k, (k,), p)
    assert kept.held == 2 * one and kept.spilled == 3 * one  # first come, first kept in memory
    assert [k for k, e in kept.entries.items() if e.tensor is None] == [2, 3, 4]
    for k, p in products.items():
        got = kept.get(k, (k,))
        assert _same(got, p)
        assert (got is p) == (k < 2)  # a spilled product is read into a new tensor


def test_a_stale_spilled_product_takes_its_old_slot():
    one = 8 * 8 * 4
    kept = KeptProducts(room=0)
    kept.put("a", (1,), _product(0))
    kept.put("b", (1,), _product(1))
    fresh = _product(2)
    assert kept.get("a", (2,)) is None
    assert kept.put("a", (2,), fresh)
    assert kept.spilled == 2 * one  # the file did not grow
    assert _same(kept.get("a", (2,)), fresh) and _same(kept.get("b", (1,)), _product(1))
    assert kept.get("a", (1,)) is None


def test_a_stale_product_in_memory_takes_its_slot_until_the_room_turns_one_away():
    one = 8 * 8 * 4
    kept = KeptProducts(room=2 * one, spill=0)
    kept.put("a", (1,), _product(0))
    assert kept.put("a", (2,), _product(1)) and kept.held == one  # replaced in place: nothing waits for room
    assert _same(kept.get("a", (2,)), _product(1))
    kept.put("b", (1,), _product(2))
    assert not kept.put("c", (1,), _product(3)) and kept.refused == 1  # the room is full
    assert not kept.put("a", (3,), _product(4))  # stale: dropped, so that the room goes to steadier products
    assert "a" not in kept.entries and kept.held == one
    assert kept.put("c", (1,), _product(3))  # the room it left
    assert kept.put("a", (3,), _product(4)) is False  # no room now
    assert kept.stale == {"a": 1}


def test_a_product_found_stale_twice_in_a_full_room_is_kept_there_no_more():
    one = 8 * 8 * 4
    kept = KeptProducts(room=2 * one, spill=0)
    kept.refused = 1  # a product was turned away already
    kept.put("a", (1,), _product(0))
    assert not kept.put("a", (2,), _product(1))  # stale: dropped from memory, no file to go to
    assert kept.put("a", (2,), _product(1))  # kept again on its next use
    assert not kept.put("a", (3,), _product(2))
    assert not kept.put("a", (3,), _product(2))  # found stale twice: its maps keep moving
    assert kept.stale["a"] == 2 and kept.held == 0
    spill = KeptProducts(room=2 * one)
    spill.refused = 1
    spill.put("a", (1,), _product(0))
    assert spill.put("a", (2,), _product(1)) and spill.entries["a"].tensor is None  # to the file instead
    assert spill.held == 0 and _same(spill.get("a", (2,)), _product(1))


def test_without_room_or_file_nothing_is_kept_and_a_failed_write_stops_spilling(monkeypatch):
    kept = KeptProducts(room=0, spill=0)
    assert not kept.put("a", (1,), _product(0)) and kept.get("a", (1,)) is None

    def full(*_args):
        raise OSError(28, "No space left on device")

    kept = KeptProducts(room=0)
    monkeypatch.setattr(kept_products.os, "pwrite", full)
    assert not kept.put("a", (1,), _product(0))
    assert kept.spill == 0 and kept.spilled == 0 and not kept.entries


def test_only_products_asked_again_with_the_same_maps_are_kept():
    """A residual stream's products are kept (its cost reads every layer's spaces); an MLP space's are not
    (the stream is the only other space of all its pieces: it is solved again only when those change)."""
    a, args = zoo.llama(seed=0)
    b, _ = zoo.llama(seed=1)
    ta = fxfuse.analyze(a, args)
    cost = WeightCost(ta, a.state_dict(), b.state_dict())
    align(ta, cost, seed=3)
    gate = [i for i, item in enumerate(cost.items) if item[0].endswith("mlp.gate_proj.weight")]
    assert len(gate) == 2
    for i in gate:
        mlp, stream = cost.items[i][2]
        assert (i, 1) in cost.kept.entries  # the stream's product, with the MLP map
        assert (i, 0) not in cost.kept.entries  # the MLP space's, with the stream's map
    assert cost.kept.spilled == 0  # the zoo's products fit the room


def test_the_scratch_file_takes_at_most_half_the_free_space(monkeypatch):
    one = 8 * 8 * 4
    monkeypatch.setattr(kept_products.shutil, "disk_usage", lambda _path: type("U", (), {"free": 5 * one})())
    kept = KeptProducts(room=0)
    assert kept.put("a", (1,), _product(0)) and kept.put("b", (1,), _product(1))
    assert not kept.put("c", (1,), _product(2))  # a third would pass half of the free space
    assert kept.spill == 5 * one // 2 and kept.spilled == 2 * one
    assert _same(kept.get("b", (1,)), _product(1))
