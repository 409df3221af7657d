"""Integer tensors whose values are indices: their axes never move unless a rule relates them.

A saved integer buffer that indexes a parameter table (Swin's relative position
bias) holds positions as values; moving the buffer's own axes while the table
and the gathered output stay put changes the model. The analysis must pin them.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
import zoo
from fxfuse.frontend.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("quiet_one_thread")

def relative_bias_case(gather: str = "index"):
    return zoo.relative_bias(0, gather)


def donut_swin_case():
    pytest.importorskip("transformers")
    return zoo.donut_swin(0)


CASES = {"index": lambda: relative_bias_case("index"), "index_select": lambda: relative_bias_case("index_select"),
         "donut_swin": donut_swin_case}


def index_buffers(model: nn.Module) -> list[str]:
    return [n for n, b in model.named_buffers() if not b.is_floating_point() and "index" in n]


@pytest.mark.parametrize("case", sorted(CASES))
def test_axes_of_an_index_buffer_are_pinned(case):
    model, args = CASES[case]()
    names = index_buffers(model)
    assert names
    a = fxfuse.analyze(model, args)
    for name in names:
        for axis, expr in enumerate(a.layout_of(name).axes):
            for leaf in fxfuse.frontend.spaces.expr_leaves(expr):
                space = a.space(leaf.space)
                assert not space.free, f"{name}:{axis} lies on free space s{space.id}"
                assert space.reason
    assert any(s.free and s.size > 1 for s in a.spaces)  # the rest of the model still moves


@pytest.mark.parametrize("case", sorted(CASES))
def test_permuted_copy_computes_the_same_and_fuses_back(case):
    model, args = CASES[case]()
    permuted = fxfuse.permute(model, args, seed=2)
    assert compare_outputs(model, permuted, args) < 1e-5
    before, after = model.state_dict(), permuted.state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before)  # something did move
    for name in index_buffers(model):
        assert torch.equal(before[name], after[name])
    result = fxfuse.compile([permuted, model], args)
    fused = result.module.state_dict()
    for name, t in after.items():
        assert torch.allclose(fused[name], t, atol=1e-6), name
    assert compare_outputs(permuted, result.module, args) < 1e-5
