"""Tensors a module derives from its weights and keeps outside its state dict.

LeViT's attention gathers a bias table by an index buffer and, in eval mode,
caches the gathered ``(heads, T, T)`` bias in a plain dict that ``train()``
drops. The state dict does not carry the cache, a deep copy keeps it and
``load_state_dict`` does not refresh it: a model that has run once traces
with the cache as a constant, and moved or fused copies would compute with
the bias of the model they were copied from. Every copy, check and output
fxfuse makes must compute what its own weights say.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.frontend.verify import compare_outputs, run

pytestmark = pytest.mark.usefixtures("quiet_one_thread")

TOKENS, DIM, HEADS = 4, 8, 2


class CachedBias(nn.Module):
    """Attention over ``TOKENS`` tokens plus ``bias[h, i, j] = table[h, index[i, j]]``, ``index = |i − j|``.

    In eval mode the gathered bias is kept in ``self.cache`` (a dict, not a buffer) after its
    first use; ``train()`` empties it, as ``LevitAttention`` does.
    """

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 3)
        self.table = nn.Parameter(torch.randn(HEADS, TOKENS))
        pos = torch.arange(TOKENS)
        self.register_buffer("index", (pos[:, None] - pos[None, :]).abs(), persistent=False)  # (T, T) int64
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.cache = {}
        return self

    def bias(self) -> torch.Tensor:  # (HEADS, T, T)
        if self.training:
            return self.table[:, self.index]
        if "bias" not in self.cache:
            self.cache["bias"] = self.table[:, self.index]
        return self.cache["bias"]

    def forward(self, x):  # x: (B, T, DIM) -> (B, 3)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) + self.bias()
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, DIM)
        return self.head(torch.relu(self.out(y)).mean(1))


def cached_bias(seed: int = 0):
    torch.manual_seed(seed)
    model = CachedBias().eval()
    x = torch.randn(6, TOKENS, DIM, generator=torch.Generator().manual_seed(1))
    run(model, (x,))  # the model has run once: its cache holds the bias of these weights
    assert model.cache
    return model, (x,)


def fresh_outputs(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    """What ``model``'s weights compute in a new instance of its class (as when saved and loaded)."""
    new = type(model)().eval()
    new.load_state_dict(model.state_dict(), strict=True)
    return run(new, args)


def assert_computes_its_weights(model: nn.Module, args: tuple) -> None:
    got, want = run(model, args), fresh_outputs(model, args)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "a cached tensor outlived the weights it came from"


def test_trace_reads_the_weights_not_a_cache():
    model, args = cached_bias()
    a = fxfuse.analyze(model, args)
    heads = a.layout_of("table").axes[0]
    qkv = a.layout_of("qkv.weight").axes[0]  # 3 × heads × head_dim
    assert heads.space in {leaf.space for leaf in fxfuse.frontend.spaces.expr_leaves(qkv)}
    assert a.space(heads.space).free
    assert not any("constant tensor" in (s.reason or "") for s in a.spaces)


def test_permuted_copy_of_a_model_that_ran():
    model, args = cached_bias()
    permuted = fxfuse.permute(model, args, seed=1)
    assert not torch.equal(permuted.table, model.table)
    assert_computes_its_weights(permuted, args)
    assert compare_outputs(model, permuted, args) < 1e-5


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_permuted_copy_fuses_back_exactly(cost):
    model, args = cached_bias()
    permuted = fxfuse.permute(model, args, seed=1)
    run(permuted, args)
    result = fxfuse.compile([permuted, model], args, cost=cost, calib=32 if cost == "activations" else None)
    fused = result.module.state_dict()
    for name, t in permuted.state_dict().items():
        assert torch.equal(fused[name], t), name
    assert_computes_its_weights(result.module, args)
    assert compare_outputs(permuted, result.module, args) < 1e-5


def test_two_seeds_fuse_and_every_model_keeps_computing_its_weights():
    (a, args), (b, _) = cached_bias(0), cached_bias(1)
    result = fxfuse.compile([a, b], args, cost="weights")
    assert all(c["error"] < 1e-4 for c in result.report["self_check"])
    for m in (result.module, a, b):
        assert_computes_its_weights(m, args)
    assert not torch.equal(result.module.table, a.table)  # the fused bias table is an average, and it is used


def tiny_levit(seed: int):
    """The zoo's tiny HF ``LevitForImageClassification`` (a 4 × 4 grid, subsample attention down to 2 × 2),
    run once in eval mode: every attention caches its gathered bias."""
    pytest.importorskip("transformers")
    import zoo

    model, args = zoo.levit(seed)
    run(model, args)
    return model, args


def assert_levit_computes_its_weights(model: nn.Module, args: tuple) -> None:
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert compare_outputs(fresh, model, args) == 0.0, "a cached attention bias outlived its table"


def test_levit_permuted_copy_fuses_back_to_the_original():
    model, args = tiny_levit(0)
    permuted = fxfuse.permute(model, args, seed=2)
    assert_levit_computes_its_weights(permuted, args)
    biases = [n for n in model.state_dict() if n.endswith("attention_biases")]
    assert biases and any(not torch.equal(permuted.state_dict()[n], model.state_dict()[n]) for n in biases)
    result = fxfuse.compile([model, permuted], args, cost="weights")
    fused, original = result.module.state_dict(), model.state_dict()
    for name, t in original.items():
        assert torch.equal(fused[name], t), name
    assert compare_outputs(model, result.module, args) == 0.0
    assert_levit_computes_its_weights(result.module, args)


def test_levit_two_seeds_pass_the_self_check():
    (a, args), (b, _) = tiny_levit(0), tiny_levit(1)
    result = fxfuse.compile([a, b], args, cost="weights")
    assert all(c["error"] < 1e-4 for c in result.report["self_check"])
    assert_levit_computes_its_weights(result.module, args)  # the fused bias tables are the ones used


class StickyCache(CachedBias):
    """``CachedBias`` whose cache survives ``train()``: nothing tells fxfuse how to drop it."""

    def train(self, mode: bool = True):
        return nn.Module.train(self, mode)


def test_a_parameter_the_graph_does_not_read_stays_put():
    torch.manual_seed(0)
    model = StickyCache().eval()
    args = (torch.randn(6, TOKENS, DIM, generator=torch.Generator().manual_seed(1)),)
    run(model, args)  # the graph reads the cached bias as a constant, not the table
    a = fxfuse.analyze(model, args)
    for axis in a.layout_of("table").axes:
        space = a.space(axis.space)
        assert not space.free and "read by no op" in space.reason
    permuted = fxfuse.permute(model, args, seed=1)
    assert torch.equal(permuted.table, model.table)
    assert not torch.equal(permuted.qkv.weight, model.qkv.weight)  # the rest still moves
    assert compare_outputs(model, permuted, args) < 1e-5
