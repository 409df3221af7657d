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
from fxfuse.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("quiet_one_thread")

WINDOW, DIM, HEADS = 3, 8, 2


class RelativeBias(nn.Module):
    """Attention over ``WINDOW²`` tokens plus a bias gathered from a table by a saved index buffer.

    ``bias[h, i, j] = table[index[i, j], h]`` with ``index`` an integer ``(T, T)`` buffer
    (persistent: saved with the model), as in Swin-style relative position bias.
    ``gather``: ``"index"`` (``table[index.view(-1)]``) or ``"index_select"``.
    """

    def __init__(self, gather: str = "index"):
        super().__init__()
        self.gather = gather
        t = WINDOW * WINDOW
        self.table = nn.Parameter(torch.randn((2 * WINDOW - 1) ** 2, HEADS))
        coords = torch.stack(torch.meshgrid(torch.arange(WINDOW), torch.arange(WINDOW), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (WINDOW - 1)
        self.register_buffer("index", rel[..., 0] * (2 * WINDOW - 1) + rel[..., 1])  # (T, T) int64
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.head = nn.Linear(t * DIM, 3)

    def forward(self, x):  # x: (B, T, DIM)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        flat = self.index.view(-1)
        rows = self.table[flat] if self.gather == "index" else torch.index_select(self.table, 0, flat)
        bias = rows.view(t, t, HEADS).permute(2, 0, 1)
        scores = q @ k.transpose(-1, -2) + bias
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, DIM)
        return self.head(torch.relu(self.out(y)).flatten(1))


def relative_bias_case(gather: str = "index"):
    torch.manual_seed(0)
    x = torch.randn(4, WINDOW * WINDOW, DIM, generator=torch.Generator().manual_seed(1))
    return RelativeBias(gather).eval(), (x,)


def donut_swin_case():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DonutSwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                       window_size=2)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return zoo._hf("DonutSwinModel", cfg, 0, (x,))  # random weights: the bias table is not left at zero


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
            for leaf in fxfuse.spaces.expr_leaves(expr):
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
