"""Rows of a packed axis (nn.MultiheadAttention's in_proj: one (3 × E) output split by select)."""
from __future__ import annotations

import torch
from torch import nn

import fxfuse
import zoo
from fxfuse.frontend.spaces import Concat, Leaf, Product
from fxfuse.frontend.verify import compare_outputs


def test_packed_in_proj_gives_q_k_and_v_their_own_segments():
    model, args = zoo.mha(seed=0)
    a = fxfuse.analyze(model, args)
    axis = a.layout_of("attn.in_proj_weight").axes[0]
    assert isinstance(axis, Concat) and len(axis.parts) == 3
    q, k, v = axis.parts
    assert all(isinstance(p, Product) for p in (q, k, v))
    assert q == k, "q and k contract their inside-head dims: one permutation"
    heads, qk_dim = q.parts
    v_heads, v_dim = v.parts
    assert v_heads == heads and v_dim != qk_dim, "v shares the heads but moves its dims on its own"
    assert a.spaces[v_dim.space].free and a.spaces[v_dim.space].parent == heads.space
    out_proj = a.layout_of("attn.out_proj.weight").axes[1]
    assert out_proj == Product((heads, v_dim), heads.size * v_dim.size)
    permuted = fxfuse.permute(model, args, seed=4)
    assert compare_outputs(model, permuted, args) < 1e-5
    w0, w1 = model.attn.in_proj_weight, permuted.attn.in_proj_weight
    assert not torch.equal(w0[64:], w1[64:]), "the v rows moved"


class PackedRows(nn.Module):
    """A packed projection whose three rows are read by separate heads; optionally also summed over
    the rows, which puts E in a tensor without the row axis."""

    def __init__(self, summed: bool):
        super().__init__()
        self.summed = summed
        self.proj = nn.Linear(6, 3 * 5)
        self.heads = nn.ModuleList(nn.Linear(5, 2) for _ in range(4))

    def forward(self, x):
        packed = self.proj(x).unflatten(-1, (3, 5))
        out = sum(self.heads[i](torch.relu(packed.select(-2, i))) for i in range(3))
        if self.summed:
            out = out + self.heads[3](packed.sum(-2))
        return out


def test_rows_move_independently_unless_e_appears_without_the_row_axis():
    args = (torch.randn(4, 6, generator=torch.Generator().manual_seed(0)),)
    for summed in (False, True):
        torch.manual_seed(0)
        model = PackedRows(summed).eval()
        a = fxfuse.analyze(model, args)
        axis = a.layout_of("proj.weight").axes[0]
        if summed:  # a reduction over rows keeps E alone: one permutation for every row
            assert isinstance(axis, Product) and isinstance(axis.parts[1], Leaf), axis
            assert a.spaces[axis.parts[1].space].free
        else:
            assert isinstance(axis, Concat) and len({p.space for p in axis.parts}) == 3, axis
            assert all(a.spaces[p.space].free for p in axis.parts)
        permuted = fxfuse.permute(model, args, seed=1)
        assert compare_outputs(model, permuted, args) < 1e-5
        assert not torch.equal(model.proj.weight, permuted.proj.weight)
