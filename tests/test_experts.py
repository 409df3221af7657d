"""Routed experts: experts move as a space, each expert's hidden units as a space nested under it.

``RoutedMoE`` writes the mixture-of-experts layer the way ``transformers`` 5
does (top-k of the router's softmax, sort by expert id, ``histc``/``cumsum``
offsets, ``transformers::grouped_mm_fallback``, weighted unsort, sum over
slots); its variants break the pattern and must keep the experts pinned.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
import zoo
from fxfuse.api.permute import checked_permutation, random_permutations
from outputs import run, tolerance

pytestmark = pytest.mark.usefixtures("quiet_one_thread")

E, K, H, UNITS = 4, 2, 8, 6


class RoutedMoE(nn.Module):
    """``x (B, S, 5) -> linear -> + routed experts -> linear (3)``; ``variant`` changes how it routes."""

    def __init__(self, variant: str = "plain", gated: bool = True, seed: int = 0, units: int = UNITS,
                 kernel: str = "fallback"):
        import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.variant, self.gated, self.kernel = variant, gated, kernel
        self.inp = nn.Linear(5, H)
        self.router = nn.Linear(H, E, bias=False)
        self.up = nn.Parameter(torch.randn(E, (2 if gated else 1) * units, H, generator=g) / H ** 0.5)
        self.down = nn.Parameter(torch.randn(E, H, units, generator=g) / units ** 0.5)
        self.head = nn.Linear(H, 3)
        with torch.no_grad():
            for m in (self.inp, self.router, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)

    def forward(self, x):
        if self.kernel == "fallback":
            mm = torch.ops.transformers.grouped_mm_fallback
        else:  # torch._grouped_mm takes bfloat16
            def mm(a, w, offs):
                return torch._grouped_mm(a.to(torch.bfloat16), w.to(torch.bfloat16), offs=offs).float()
        h = self.inp(x)
        b, s, _ = h.shape
        flat = h.reshape(-1, H)
        probs = self.router(flat).softmax(-1)
        top, idx = probs.topk(K, dim=-1, largest=self.variant != "smallest")
        top = top / top.sum(-1, keepdim=True)
        ids_sorted, perm = torch.sort(idx.reshape(-1))
        rows = flat[perm // K]
        pair_w = top.reshape(-1)[perm]
        if self.variant == "counts_by_comparison":  # the same counts, written without histc
            counts = (ids_sorted.unsqueeze(0) == torch.arange(E).unsqueeze(1)).sum(1)
        elif self.variant == "narrow_cast":  # ids through int16 on the way to histc
            counts = torch.histc(ids_sorted.to(torch.int16).float(), bins=E, min=0, max=E - 1)
        else:
            counts = torch.histc(ids_sorted.float(), bins=E, min=0, max=E - 1)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        up = mm(rows, self.up.transpose(-2, -1), offs=offs)
        if self.gated:
            gate, lin = up.chunk(2, dim=-1)
            hidden = F.silu(gate) * lin
        else:
            hidden = F.gelu(up) if self.kernel == "fallback" else F.relu(up)
        out = mm(hidden, self.down.transpose(-2, -1), offs=offs) * pair_w.unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0))
        y = out[inv].view(b * s, K, H).sum(1)
        if self.variant == "indices_read":  # one more op reads the routing indices
            y = y + idx.float().mean(-1, keepdim=True)
        return self.head((flat + y).view(b, s, H))


def build(variant="plain", gated=True, **kw):
    model = RoutedMoE(variant, gated, **kw).eval()
    return model, (torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(1)),)


def expert_spaces(a, up="up", down="down", router="router.weight"):
    """(experts, units) space ids, read from the layouts of the stacks and the router."""
    experts = a.layout_of(up).axes[0].space
    units = a.layout_of(down).axes[2].space
    assert a.layout_of(router).axes[0].space == experts
    return experts, units


@pytest.mark.parametrize("gated", [True, False])
def test_experts_are_a_space_and_units_nest_under_them(gated):
    model, args = build(gated=gated)
    a = fxfuse.analyze(model, args)
    assert a.unruled == () and a.notes == ()
    experts, units = expert_spaces(a)
    assert a.spaces[experts].free and a.spaces[experts].size == E
    assert a.spaces[units].free and a.spaces[units].size == UNITS
    assert a.parents[units] == experts
    assert a.group(experts).name == "perm" and a.group(units).name == "perm"
    up_units = a.layout_of("up").axes[1]
    leaves = [leaf.space for leaf in fxfuse.frontend.spaces.expr_leaves(up_units)]
    assert leaves == ([units, units] if gated else [units]), "gate and up halves share the expert's units"
    (probe,) = a.probes.values()  # every expert's units on every token: the activation cost's signal
    assert [e.space for e in probe.axes[1:]] == [experts, units]


@pytest.mark.parametrize("gated", [True, False])
def test_permuting_experts_and_their_units_keeps_the_function(gated):
    model, args = build(gated=gated)
    a = fxfuse.analyze(model, args)
    experts, units = expert_spaces(a)
    perms = random_permutations(a, seed=4)
    sigma, tau = perms[experts], perms[units]
    assert tau.shape == (E, UNITS) and len({tuple(r.tolist()) for r in tau}) > 1, "one permutation per expert"
    moved, err = checked_permutation(a, perms, fxfuse.load_rules())
    ref = run(model, args)
    assert (run(moved, args) - ref).abs().max() <= tolerance(ref)
    rho = perms[a.layout_of("up").axes[2].space]  # the hidden stream moves too
    for i in range(E):  # new expert i is old expert sigma[i], its units in the order tau[i]
        old_up = model.up[sigma[i]].view(-1, UNITS, H)
        assert torch.equal(moved.up[i].view(-1, UNITS, H), old_up[:, tau[i]][:, :, rho])
        assert torch.equal(moved.down[i], model.down[sigma[i]][rho][:, tau[i]])
        assert torch.equal(moved.router.weight[i], model.router.weight[sigma[i], rho])
    assert not torch.equal(sigma, torch.arange(E))


@pytest.mark.parametrize("variant,reason", [
    ("indices_read", "top-k indices: expected one reader (aten.reshape.default, aten.view.default), found aten.reshape.default, aten.mean.dim"),
    ("counts_by_comparison", "expected one reader (aten.histc.default)"),
    ("smallest", "top-k not of the largest K along the experts"),
    ("narrow_cast", "integer values cast to a narrower type"),
])
def test_routing_off_the_pattern_keeps_experts_pinned_and_says_why(variant, reason):
    model, args = build(variant)
    a = fxfuse.analyze(model, args)
    experts = a.layout_of("up").axes[0].space
    assert not a.spaces[experts].free and "routed experts not recognised" in a.spaces[experts].reason
    assert reason in a.spaces[experts].reason
    (note,) = [n for n in a.notes if "routed experts not recognised" in n]
    assert reason in note and "the expert axis stays pinned" in note
    assert not a.spaces[a.layout_of("router.weight").axes[0].space].free
    moved = fxfuse.permute(model, args, seed=2)  # still sound: the units inside keep one shared permutation
    ref = run(model, args)
    assert (run(moved, args) - ref).abs().max() <= tolerance(ref)
    for i in range(E):  # each expert stays where it is (its entries move only inside it)
        assert torch.equal(moved.up[i].flatten().sort().values, model.up[i].flatten().sort().values)


def test_aten_grouped_mm_kernel_matches_too():
    """``torch._grouped_mm`` (bfloat16): small integer weights and inputs keep its sums exact in any order."""
    model, _ = build(gated=False, units=8, kernel="aten")  # rows of a multiple of 16 bytes
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in ("inp.weight", "up", "down"):
            p = model.get_parameter(name)
            p.copy_(torch.randint(-1, 2, p.shape, generator=g).float())
        model.inp.bias.zero_()
    args = (torch.randint(-2, 3, (2, 6, 5), generator=g).float(),)
    a = fxfuse.analyze(model, args)
    assert "aten._grouped_mm.default" in {str(n.target) for n in a.traced.graph.nodes}
    experts, units = expert_spaces(a)
    assert a.spaces[experts].free and a.parents[units] == experts and a.notes == ()
    moved = fxfuse.permute(model, args, seed=6)
    ref = run(model, args)
    assert (run(moved, args) - ref).abs().max() <= tolerance(ref)


def test_a_rule_file_can_switch_the_pattern_off(tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text("- op: pattern.routed_experts\n  kind: pin\n")
    model, args = build()
    a = fxfuse.analyze(model, args, rules=fxfuse.load_rules(extra=[off]))
    assert not a.spaces[a.layout_of("up").axes[0].space].free
    assert a.notes == ()


def test_zoo_mixtral_experts_move_and_units_nest():
    model, args = zoo.mixtral()
    a = fxfuse.analyze(model, args)
    assert a.unruled == () and a.notes == ()
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        experts, units = expert_spaces(a, f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj", f"{p}.gate.weight")
        assert a.spaces[experts].free and a.spaces[units].free and a.parents[units] == experts
    moved = fxfuse.permute(model, args, seed=3)
    ref = run(model, args)
    assert (run(moved, args) - ref).abs().max() <= tolerance(ref)
    assert not torch.equal(moved.model.layers[0].mlp.gate.weight, model.model.layers[0].mlp.gate.weight)


def tiny_moe(name):
    from transformers import OlmoeConfig, Qwen2MoeConfig

    from zoo import VOCAB, _hf, _ids

    shared = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
    if name == "qwen2_moe":  # with a shared expert (an ordinary gated MLP) next to the routed ones
        cfg = Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                             decoder_sparse_step=1, **shared)
        return _hf("Qwen2MoeForCausalLM", cfg, 0, (_ids(),))
    return _hf("OlmoeForCausalLM", OlmoeConfig(intermediate_size=24, **shared), 0, (_ids(),))


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe"])
def test_other_transformers_moe_layers_match(name):
    model, args = tiny_moe(name)
    a = fxfuse.analyze(model, args)
    assert a.unruled == () and a.notes == ()
    p = "model.layers.0.mlp"
    experts, units = expert_spaces(a, f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj", f"{p}.gate.weight")
    assert a.spaces[experts].free and a.spaces[units].free and a.parents[units] == experts
    moved = fxfuse.permute(model, args, seed=5)
    ref = run(model, args)
    assert (run(moved, args) - ref).abs().max() <= tolerance(ref)


@pytest.mark.parametrize("cost", ["weights", "activations"])
@pytest.mark.parametrize("case", ["routed", "mixtral"])
def test_permuted_experts_fuse_back_exactly(case, cost):
    model, args = zoo.mixtral() if case == "mixtral" else build()
    permuted = fxfuse.permute(model, args, seed=3)
    result = fxfuse.compile([model, permuted], args, cost=cost, calib=32)
    fused = result.module.state_dict()
    for name, t in model.state_dict().items():
        assert torch.allclose(fused[name], t, atol=1e-6), name


def test_cli_permute_moves_the_zoo_mixtral_experts(tmp_path, capsys):
    from safetensors.torch import load_file

    from clirun import run as cli

    code, out, err = cli(capsys, "permute", "zoo:mixtral", "-o", tmp_path / "moved", "--seed", 7, "-q")
    assert code == 0, err
    model, args = zoo.mixtral()
    moved, _ = zoo.mixtral()
    moved.load_state_dict(load_file(tmp_path / "moved" / "model.safetensors"), strict=False)
    ref = run(model, args)
    assert (run(moved, args) - ref).abs().max() <= tolerance(ref)
    router, router_moved = model.model.layers[0].mlp.gate.weight, moved.model.layers[0].mlp.gate.weight
    rows = lambda w: [tuple(r.tolist()) for r in w.sort(dim=1).values]  # noqa: E731  (the hidden axis moves too)
    assert sorted(rows(router_moved)) == sorted(rows(router)) and rows(router_moved) != rows(router)


def test_a_signature_that_does_not_fit_pins_the_whole_layer(monkeypatch):
    """The safety net: if the pattern's kind fails on a matched subgraph, nothing it owns stays free."""
    from fxfuse.frontend.all_kinds import KINDS
    from fxfuse.frontend.kinds import Kind, RuleMismatch

    def broken(ctx):
        raise RuleMismatch("broken on purpose")

    monkeypatch.setitem(KINDS, "routed_experts", Kind("routed_experts", broken, ""))
    model, args = build()
    a = fxfuse.analyze(model, args)
    assert [u.op for u in a.unruled] == ["pattern.routed_experts"] and "broken on purpose" in a.unruled[0].reason
    for name, axis in (("up", 0), ("up", 1), ("down", 0), ("down", 2), ("router.weight", 0)):
        for leaf in fxfuse.frontend.spaces.expr_leaves(a.layout_of(name).axes[axis]):
            assert not a.spaces[leaf.space].free, (name, axis)
    moved = fxfuse.permute(model, args, seed=1)
    ref = run(model, args)
    assert (run(moved, args) - ref).abs().max() <= tolerance(ref)
