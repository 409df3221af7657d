"""Cross-layer alignment (``fxfuse.planner.depth``): block lists, block costs, the DP, residual writers, relayering."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import digits
import zoo
from fxfuse.planner.depth import (
    BlockList, DepthMap, FusionDepthError, block_cost_matrix, block_outputs, cross_layer_dp, depth_map,
    find_block_lists, linear_cka, ot_block_cost, relayer, writer_params,
)
from fxfuse.core.errors import FxfuseError

pytestmark = pytest.mark.usefixtures("one_thread")


def small_vit(seed: int = 0, depth: int = 2) -> tuple[nn.Module, tuple]:
    return digits.vit(seed, dim=32, heads=4, mlp=64, depth=depth)


def hand_map(path: str, source_size: int, source_of, dropped=()) -> DepthMap:
    costs = tuple((0.0,) * source_size for _ in source_of)
    return DepthMap(path, len(source_of), source_size, tuple(source_of), tuple(dropped), costs, "cka")


def images(seed: int, n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class NonResidual(nn.Module):
    """A stack of ``Linear + ReLU`` blocks: no residual stream, so no identity block exists."""

    def __init__(self, depth: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ---------------------------------------------------------------- block lists


@pytest.mark.parametrize("factory, expected", [
    (lambda: small_vit(depth=3), (BlockList("blocks", 3),)),
    (lambda: zoo.bert(0, layers=3), (BlockList("bert.encoder.layer", 3),)),
    (lambda: zoo.vit(0, layers=1), (BlockList("vit.layers", 1),)),
    (lambda: zoo.gpt2(0), (BlockList("transformer.h", 2),)),
    (lambda: zoo.mlp(0), ()),
    (lambda: (NonResidual(3), ()), (BlockList("layers", 3),)),
])
def test_find_block_lists(factory, expected):
    model, _ = factory()
    assert find_block_lists(model) == expected


def test_find_block_lists_needs_identical_children_with_parameters():
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5))
    params_free = nn.ModuleList([nn.ReLU(), nn.ReLU()])
    model = nn.Module()
    model.mixed, model.free = mixed, params_free
    model.lists = nn.ModuleList([nn.ModuleList([nn.Linear(2, 2)]) for _ in range(2)])
    assert find_block_lists(model) == (BlockList("lists", 2),)   # not descended into


# ---------------------------------------------------------------- block outputs and costs


def test_block_outputs_are_sample_by_feature_float64():
    model, _ = small_vit(depth=2)
    batches = [((images(1, 4),), {}), ((images(2, 3),), {})]
    outs = block_outputs(model, "blocks", batches)
    assert len(outs) == 2 and all(o.dtype == torch.float64 and o.shape == ((4 + 3) * 17, 32) for o in outs)
    with torch.no_grad():
        x = images(2, 3)
        h = model.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([model.cls.expand(3, -1, -1), h], dim=1) + model.pos
        h = model.blocks[1](model.blocks[0](h))
    torch.testing.assert_close(outs[1][4 * 17:], h.reshape(-1, 32).double())


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(60, 6, generator=g, dtype=torch.float64), torch.randn(60, 4, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, 7.5 * Y) == pytest.approx(linear_cka(X, Y), rel=1e-12)
    assert 0.0 <= linear_cka(X, Y) < 0.5
    assert linear_cka(X, torch.ones(60, 3, dtype=torch.float64)) == 0.0
    with pytest.raises(FusionDepthError):
        linear_cka(X, Y[:10])


def test_ot_block_cost():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(60, 6, generator=g, dtype=torch.float64), torch.randn(60, 5, generator=g, dtype=torch.float64)
    assert ot_block_cost(X, X) == pytest.approx(0.0, abs=1e-9)
    assert ot_block_cost(X, 3.0 * X[:, torch.randperm(6, generator=g)] + 1.0) == pytest.approx(0.0, abs=1e-9)
    assert 0.5 < ot_block_cost(X, Y) <= 2.0
    assert ot_block_cost(X[:, :1], -X[:, :1]) == pytest.approx(2.0, abs=1e-9)      # anti-correlated units


def test_block_cost_matrix_orientation_and_unknown_cost():
    g = torch.Generator().manual_seed(0)
    deep = [torch.randn(30, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    shallow = [deep[2], deep[0]]
    for cost in ("cka", "ot"):
        C = block_cost_matrix(deep, shallow, cost)
        assert C.shape == (3, 2)
        assert C[2, 0] == pytest.approx(0.0, abs=1e-9) and C[0, 1] == pytest.approx(0.0, abs=1e-9)
        assert C[0, 0] > 1e-3 and C[1, 1] > 1e-3
    with pytest.raises(FusionDepthError, match="unknown block cost"):
        block_cost_matrix(deep, shallow, "l2")


# ---------------------------------------------------------------- the DP


def brute_force(C: np.ndarray, anchor_last: bool = False) -> float:
    m, n = C.shape
    return min(C[0, 0] + sum(C[l, k] for k, l in enumerate(rest, start=1))
               for rest in itertools.combinations(range(1, m), n - 1)
               if not (anchor_last and n > 1 and rest[-1] != m - 1))


def test_dp_known_answers():
    assert cross_layer_dp(np.array([[0.0, 5.0], [1.0, 1.0], [5.0, 0.0]])) == (0, 2)
    assert cross_layer_dp(np.array([[9.0, 9.0], [0.0, 9.0], [9.0, 0.0]])) == (0, 2)     # first stays first
    C = np.array([[0.0, 9, 9], [9, 0, 9], [9, 9, 9], [9, 9, 0], [9, 9, 1]])
    assert cross_layer_dp(C, anchor_last=False) == (0, 1, 3)
    assert cross_layer_dp(C) == (0, 1, 4)                                                # last to last


def test_dp_ties_go_to_the_earliest_deep_block():
    assert cross_layer_dp(np.zeros((4, 2)), anchor_last=False) == (0, 1)
    assert cross_layer_dp(np.zeros((5, 3)), anchor_last=False) == (0, 1, 2)
    assert cross_layer_dp(np.zeros((5, 3))) == (0, 1, 4)
    # block 1 is followed by an identity copy of it (equal costs): the real block wins
    C = np.array([[0.0, 0.7], [0.7, 0.2], [0.7, 0.2], [0.9, 0.9]])
    assert cross_layer_dp(C, anchor_last=False) == (0, 1)
    near = C.copy()
    near[2, 1] -= 1e-14                                   # equal up to a relative 1e-12: still a tie
    assert cross_layer_dp(near, anchor_last=False) == (0, 1)
    near[2, 1] -= 1e-6                                    # really better
    assert cross_layer_dp(near, anchor_last=False) == (0, 2)
    # the same with the ends anchored: a middle block and the identity copy after it tie
    C = np.array([[0.0, 0.7, 0.9], [0.7, 0.2, 0.9], [0.7, 0.2, 0.9], [0.9, 0.9, 0.0]])
    assert cross_layer_dp(C) == (0, 1, 3)


def test_dp_square_and_single_column():
    C = np.random.default_rng(0).random((4, 4))
    assert cross_layer_dp(C) == (0, 1, 2, 3)
    assert cross_layer_dp(np.array([[3.0], [0.0], [1.0]])) == (0,)
    assert cross_layer_dp(np.array([[3.0], [0.0], [1.0]]), anchor_last=True) == (0,)


def test_dp_is_optimal_and_increasing():
    rng = np.random.default_rng(1)
    for m, n in [(6, 3), (7, 4), (5, 5), (8, 2)]:
        C = rng.random((m, n))
        match = cross_layer_dp(C, anchor_last=False)
        assert match[0] == 0 and all(a < b for a, b in zip(match, match[1:])) and match[-1] < m
        assert sum(C[l, k] for k, l in enumerate(match)) == pytest.approx(brute_force(C), abs=1e-12)
        anchored = cross_layer_dp(C)
        assert anchored[0] == 0 and anchored[-1] == m - 1 and all(a < b for a, b in zip(anchored, anchored[1:]))
        assert sum(C[l, k] for k, l in enumerate(anchored)) == pytest.approx(brute_force(C, True), abs=1e-12)


@pytest.mark.parametrize("C", [np.zeros((2, 3)), np.zeros(3), np.zeros((3, 0)), np.array([[np.nan], [0.0]])])
def test_dp_rejects_bad_matrices(C):
    with pytest.raises(FusionDepthError):
        cross_layer_dp(C)


# ---------------------------------------------------------------- residual writers


def test_writer_params_on_digits_vit_are_the_output_projections():
    model, args = small_vit(depth=3)
    writers = writer_params(model, "blocks", args)
    assert writers == {i: (f"blocks.{i}.attn.out_proj.weight", f"blocks.{i}.attn.out_proj.bias",
                           f"blocks.{i}.mlp.2.weight", f"blocks.{i}.mlp.2.bias") for i in range(3)}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for names in writers.values():
            for name in names:
                params[name].zero_()
        x = torch.randn(4, 17, 32)
        for block in model.blocks:
            assert torch.equal(block(x), x)


def test_writer_params_refuses_post_norm_and_non_residual_blocks():
    bert, args = zoo.bert(0)
    assert writer_params(bert, "bert.encoder.layer", args) == {0: (), 1: ()}
    post = writer_params(bert, "bert.encoder.layer", args, pre_norm_only=False)  # kept, for approximate identities
    assert post[1] == tuple(f"bert.encoder.layer.1.{m}.dense.{p}" for m in ("attention.output", "output")
                            for p in ("weight", "bias"))
    model = NonResidual(2)
    assert writer_params(model, "layers", (torch.randn(3, 8),)) == {0: (), 1: ()}
    with pytest.raises(FusionDepthError, match="nowhere"):
        writer_params(model, "nowhere", (torch.randn(3, 8),))


# ---------------------------------------------------------------- relayering


def relayered_matches(model, args, path, size, identities, output=lambda out: out):
    """Relayer ``model`` (``size`` blocks) with identity blocks at ``identities``; assert it computes the same."""
    writers = writer_params(model, path, args)
    positions = size + len(identities)
    placed = iter(range(size))
    source_of = tuple(None if l in identities else next(placed) for l in range(positions))
    result = relayer(model, [hand_map(path, size, source_of)], {path: writers})
    assert len(result.module.get_submodule(path)) == positions
    assert result.identity_blocks == tuple(f"{path}.{l}".lstrip(".") for l in identities)
    with torch.no_grad():
        torch.testing.assert_close(output(result.module(*args)), output(model(*args)), atol=1e-6, rtol=0)
    return result


def test_relayer_digits_vit_with_identity_blocks_is_exact():
    model, args = small_vit(depth=2)
    result = relayered_matches(model, args, "blocks", 2, (1, 3))
    assert result.zeroed == ("blocks.1.attn.out_proj.weight", "blocks.1.attn.out_proj.bias", "blocks.1.mlp.2.weight",
                             "blocks.1.mlp.2.bias", "blocks.3.attn.out_proj.weight", "blocks.3.attn.out_proj.bias",
                             "blocks.3.mlp.2.weight", "blocks.3.mlp.2.bias")
    assert isinstance(result.module.blocks, nn.ModuleList)
    assert len(model.blocks) == 2 and bool(model.blocks[0].mlp[2].weight.abs().sum() > 0)   # source untouched
    state = result.module.state_dict()
    assert all(bool((state[name] == 0).all()) for name in result.zeroed)
    torch.testing.assert_close(state["blocks.2.ln1.weight"], model.blocks[1].ln1.weight)


def test_relayer_hf_vit_updates_the_config():
    model, args = zoo.vit(0)
    result = relayered_matches(model, args, "vit.layers", 2, (1, 3), output=lambda out: out.logits)
    assert result.module.config.num_hidden_layers == 4 and model.config.num_hidden_layers == 2


def test_relayer_gpt2_sets_layer_idx():
    model, args = zoo.gpt2(0)
    result = relayered_matches(model, args, "transformer.h", 2, (0, 3), output=lambda out: out.logits)
    assert [b.attn.layer_idx for b in result.module.transformer.h] == [0, 1, 2, 3]
    assert result.module.config.n_layer == 4 and model.config.n_layer == 2


def test_relayer_layer_scale_writers():
    model, args = zoo.convnext(0)
    path = "convnext.encoder.stages.0.layers"
    result = relayered_matches(model, args, path, 1, (1,), output=lambda out: out.logits)
    assert result.zeroed == (f"{path}.1.layer_scale_parameter",)
    assert type(result.module.get_submodule(path)) is type(model.get_submodule(path))


def test_relayer_a_sequential_at_the_root():
    torch.manual_seed(0)
    model = nn.Sequential(*(digits.Block(16, 2, 32) for _ in range(2))).eval()
    assert find_block_lists(model) == (BlockList("", 2),)
    result = relayered_matches(model, (torch.randn(3, 5, 16),), "", 2, (0, 2))
    assert type(result.module) is nn.Sequential and result.identity_blocks == ("0", "2")
    assert result.zeroed[0] == "0.attn.out_proj.weight"


def test_relayer_dropping_a_block_changes_the_output():
    model, args = small_vit(depth=2)
    result = relayer(model, [hand_map("blocks", 2, (0,), dropped=(1,))], {})
    assert len(result.module.blocks) == 1 and result.identity_blocks == () and result.zeroed == ()
    with torch.no_grad():
        assert (result.module(*args) - model(*args)).abs().max() > 1e-3


def test_relayer_refuses_identity_blocks_without_a_residual_branch():
    model = NonResidual(2)
    writers = writer_params(model, "layers", (torch.randn(3, 8),))
    with pytest.raises(FusionDepthError, match=r"layers\.0.*layers\.1") as err:
        relayer(model, [hand_map("layers", 2, (0, None, 1))], {"layers": writers})
    assert isinstance(err.value, FxfuseError) and "\n" not in str(err.value)


def test_relayer_checks_the_map_against_the_model():
    model, _ = small_vit(depth=2)
    with pytest.raises(FusionDepthError, match="no writer parameters given"):
        relayer(model, [hand_map("blocks", 2, (0, None, 1))], {})
    with pytest.raises(FusionDepthError, match="blocks"):
        relayer(model, [hand_map("blocks", 3, (0, 1, 2))], {})
    with pytest.raises(FusionDepthError, match="blocks"):
        hand_map("blocks", 2, (1, 0))


# ---------------------------------------------------------------- end to end


def strong_vit(seed: int, depth: int) -> nn.Module:
    """A DigitsViT whose blocks each change the representation a lot (weights of std ~ 1.5/√fan_in)."""
    model, _ = small_vit(seed, depth)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.5 * p[0].numel() ** -0.5)
            else:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("cost", ["cka", "ot"])
def test_depth_map_recovers_inserted_identity_blocks(cost):
    A = strong_vit(3, depth=3)
    args = (images(0),)
    writers = writer_params(A, "blocks", args)
    B = relayer(A, [hand_map("blocks", 3, (0, None, 1, None, 2))], {"blocks": writers}).module
    batches = [((images(1),), {}), ((images(2),), {})]

    onto_a = depth_map(A, B, "blocks", batches, cost)          # the source is deeper
    assert (onto_a.target_size, onto_a.source_size, onto_a.cost) == (3, 5, cost)
    assert onto_a.source_of == (0, 2, 4) and onto_a.dropped == (1, 3)
    assert all(c == pytest.approx(0.0, abs=1e-9) for c in onto_a.matched_costs())
    assert np.array(onto_a.costs).shape == (3, 5)
    assert min(onto_a.costs[1][0], onto_a.costs[1][4], onto_a.costs[2][2]) > 1e-3   # blocks really differ

    onto_b = depth_map(B, A, "blocks", batches, cost)          # the target is deeper
    assert onto_b.source_of == (0, None, 1, None, 2) and onto_b.dropped == ()
    assert onto_b.matched_costs()[1] is None and np.array(onto_b.costs).shape == (5, 3)
    np.testing.assert_allclose(np.array(onto_b.costs), np.array(onto_a.costs).T, atol=1e-12)

    same = depth_map(A, A, "blocks", batches[:1], cost)
    assert same.source_of == (0, 1, 2) and same.dropped == () and len(same.costs) == 3

    rebuilt = relayer(B, [onto_a], {"blocks": writer_params(B, "blocks", args)}).module
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*args), A(*args), atol=1e-6, rtol=0)
