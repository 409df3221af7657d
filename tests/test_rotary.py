"""Rotary position embeddings: the dims inside each head move by one 2×2 rotation per frequency pair.

The known answers: a Llama (or Qwen2) moved by random elements of every space's group, the rotary dims by
random angles, computes what it did, and fusing it with the original gives the original back (from weights
and from activations); a subgraph that only looks like a rotary embedding keeps its dims pinned.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
import zoo
from fxfuse.api.permute import move_by_group_elements
from fxfuse.frontend.groups import ORTHO
from fxfuse.frontend.verify import compare_outputs
from fxfuse.passes import canonical_analysis

pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def _rotary_spaces(analysis):
    return [s for s in analysis.spaces if analysis.group(s.id).name == "rotary"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_copy_moved_by_random_rotations_fuses_back(family):
    model, args = getattr(zoo, family)(seed=0)
    moved, info = move_by_group_elements(model, args, seed=3, largest=ORTHO)
    assert info["groups"].get("rotary") == 2 and info["error"] < 1e-5  # q/k dims of both layers, rotated
    assert compare_outputs(model, moved, args) < 1e-5
    calib = torch.randint(0, zoo.VOCAB, (32, zoo.SEQ), generator=torch.Generator().manual_seed(1))
    for cost in ("weights", "activations"):
        result = fxfuse.compile([model, moved], args, groups="full", cost=cost,
                                calib=calib if cost == "activations" else None)
        assert result.report["self_check"][1]["error"] < 1e-4
        assert compare_outputs(model, result.module, args) < 1e-5, cost
        maps = [s["models"][0]["map"] for s in result.report["spaces"] if s["group"] == "rotary"]
        assert maps == ["group", "group"]


def test_rotary_dims_are_pinned_with_permutations_only():
    model, args = zoo.llama(seed=0)
    a = fxfuse.analyze(model, args)
    assert not _rotary_spaces(a)
    result = fxfuse.compile([model, zoo.llama(seed=1)[0]], args)
    assert not any(s["group"] == "rotary" for s in result.report["spaces"])


class Rope(nn.Module):
    """One attention layer with a hand-written rotary embedding; ``halves``: the frequencies of the upper half
    (``same``: those of the lower half, as RoPE has it); ``leak``: the rotated half is also read elsewhere."""

    def __init__(self, halves: str = "same", leak: bool = False, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.halves, self.leak = heads, halves, leak
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        m = width // heads
        self.register_buffer("inv_freq", 1.0 / 100.0 ** (torch.arange(m // 2) / (m // 2)), persistent=False)

    def forward(self, x):
        b, t, w = x.shape
        split = lambda y: y.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        f = torch.arange(t, dtype=x.dtype)[:, None] * self.inv_freq[None]
        emb = torch.cat([f, f if self.halves == "same" else 2 * f], -1)
        cos, sin = emb.cos(), emb.sin()
        h = q.shape[-1] // 2

        def rotate_half(y):
            return torch.cat([-y[..., h:], y[..., :h]], -1)

        rq = rotate_half(q)
        q, k = q * cos + rq * sin, k * cos + rotate_half(k) * sin
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        y = self.o(out.transpose(1, 2).reshape(b, t, w))
        return y + rq.sum() if self.leak else y


@pytest.mark.parametrize("halves,leak,recognised", [("same", False, True), ("other", False, False),
                                                    ("same", True, False)])
def test_only_the_exact_pattern_is_recognised(halves, leak, recognised):
    torch.manual_seed(0)
    model = Rope(halves, leak).eval()
    x = torch.randn(2, 6, 16)
    analysis, _ = canonical_analysis(model, (x,), {}, fxfuse.load_rules(), False)
    q_dims = [s for s in analysis.spaces if s.parent is not None
              and any(m.param == "q.weight" for m in s.members)]
    if recognised:
        assert [analysis.group(s.id).name for s in q_dims] == ["rotary"] and q_dims[0].free
        other = Rope(halves, leak)
        result = fxfuse.compile([model, other.eval()], (x,), groups="full")
        assert result.report["self_check"][1]["error"] < 1e-4  # the rotations found keep the model's function
    else:
        assert not _rotary_spaces(analysis)
        pinned = [s for s in analysis.spaces if any(m.param == "q.weight" and m.axis == 0 for m in s.members)
                  and not s.free]
        assert pinned  # analysed op by op: cos and sin (from the unsaved inv_freq) pin the dims


def test_a_rule_file_can_switch_the_recognition_off(tmp_path):
    rules = tmp_path / "off.yaml"
    rules.write_text("- op: pattern.rotary_embedding\n  kind: pin\n")
    model, args = zoo.llama(seed=0)
    analysis, _ = canonical_analysis(model, args, {}, fxfuse.load_rules([rules]), False)
    assert not _rotary_spaces(analysis)
