"""Every zoo model: permuting along the analysed spaces keeps the function.

Each zoo model is built and analysed once per module (``cases`` fixture); the
public ``fxfuse.permute`` is run once per model as well (it re-analyses, which
also checks that analysis and permutation are deterministic).

The zoo's Hugging Face models carry HF's initialisation (weights ~ N(0, 0.02),
zero biases, LayerNorm weights of one). At such weights attention is nearly
uniform and biases are zero, so some wrong permutations (q/k ties, biases) leave
the output unchanged to within the tolerance. The ``random weights`` tests
therefore repeat the equality check on the same analysis with every parameter
redrawn at O(1) scale, and ``test_broken_tie_is_detected`` proves that, at those
weights, breaking any single tie of any free space fails the check.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fxfuse
import zoo
from fxfuse.core.derived import forget_derived, loaded_copy
from fxfuse.planner.layout import permute_tensor
from fxfuse.api.permute import permute_state_dict
from fxfuse.frontend.spaces import Concat, Leaf, Product, expr_leaves
from fxfuse.frontend.trace import USER_INPUT
from outputs import run, tolerance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = list(zoo.ZOO)
TOKEN_MODELS = ("mha", "encoder", "head_bias", "bert", "bert_mlm", "roberta", "distilbert", "gpt2", "gpt_bigcode",
                "llama", "qwen2", "t5", "einsum_attention", "mqa", "lstm", "gru", "mixtral", "squeezebert", "fnet", "phi3", "gqa", "jetmoe")
SEED = 1
# Measured share of moved parameter elements, seed 1: 0.94 (swin, bert_mlm) to 0.999 (mlp, cnn,
# mobilenet_v2). Unmoved elements are fixed points of the permutations and equal values (HF LayerNorm
# weights are all 1, biases all 0). 0.85 leaves margin for other seeds yet fails if a space is skipped.
MOVED_MIN = 0.85
COVERAGE_MIN = 0.90

# Axes that are the model's interface: (parameter, axis). The first layer's input-feature axis
# (vocabulary rows of the token embedding, input channels of the first conv / linear) and the
# output axis of the final classifier or LM head (weight rows and bias).
INTERFACE_AXES = {
    "mlp": [("net.0.weight", 1), ("net.4.weight", 0), ("net.4.bias", 0)],
    "cnn": [("stem.0.weight", 1), ("head.weight", 0), ("head.bias", 0)],
    "mha": [("embed.weight", 0), ("head.weight", 0), ("head.bias", 0)],
    "encoder": [("embed.weight", 0), ("head.weight", 0), ("head.bias", 0)],
    "head_bias": [("embed.weight", 0), ("head.weight", 0), ("head.bias", 0)],
    "seq2seq": [("src_embed.weight", 0), ("tgt_embed.weight", 0), ("head.weight", 0), ("head.bias", 0)],
    "bert": [("bert.embeddings.word_embeddings.weight", 0), ("classifier.weight", 0), ("classifier.bias", 0)],
    "bert_mlm": [("bert.embeddings.word_embeddings.weight", 0), ("cls.predictions.decoder.weight", 0),
                 ("cls.predictions.decoder.bias", 0), ("cls.predictions.bias", 0)],
    "roberta": [("roberta.embeddings.word_embeddings.weight", 0), ("classifier.out_proj.weight", 0),
                ("classifier.out_proj.bias", 0)],
    "distilbert": [("distilbert.embeddings.word_embeddings.weight", 0), ("classifier.weight", 0),
                   ("classifier.bias", 0)],
    "gpt2": [("transformer.wte.weight", 0), ("lm_head.weight", 0)],
    "gpt_bigcode": [("transformer.wte.weight", 0), ("lm_head.weight", 0)],
    "llama": [("model.embed_tokens.weight", 0), ("lm_head.weight", 0)],
    "qwen2": [("model.embed_tokens.weight", 0), ("lm_head.weight", 0)],
    "t5": [("encoder.shared.weight", 0), ("encoder.encoder.embed_tokens.weight", 0), ("head.weight", 0),
           ("head.bias", 0)],
    "vit": [("vit.embeddings.patch_embeddings.projection.weight", 1), ("classifier.weight", 0),
            ("classifier.bias", 0)],
    "swin": [("swin.embeddings.patch_embeddings.projection.weight", 1), ("classifier.weight", 0),
             ("classifier.bias", 0)],
    "convnext": [("convnext.embeddings.patch_embeddings.weight", 1), ("classifier.weight", 0),
                 ("classifier.bias", 0)],
    "resnet": [("resnet.embedder.embedder.convolution.weight", 1), ("classifier.1.weight", 0),
               ("classifier.1.bias", 0)],
    "mobilenet_v2": [("mobilenet_v2.conv_stem.first_conv.convolution.weight", 1), ("classifier.weight", 0),
                     ("classifier.bias", 0)],
    "einsum_attention": [("embed.weight", 0), ("head.weight", 0), ("head.bias", 0)],
    "mqa": [("embed.weight", 0), ("head.weight", 0), ("head.bias", 0)],
    "gqa": [("embed.weight", 0), ("head.weight", 0), ("head.bias", 0)],
    "lstm": [("embed.weight", 0), ("head.weight", 0), ("head.bias", 0)],
    "gru": [("embed.weight", 0), ("head.weight", 0), ("head.bias", 0)],
    "mixtral": [("model.embed_tokens.weight", 0), ("lm_head.weight", 0)],
    "channel_shuffle": [("stem.0.weight", 1), ("head.weight", 0), ("head.bias", 0)],
    "grouped_convs": [("stem.weight", 1), ("head.weight", 0), ("head.bias", 0)],
    "no_grad_block": [("a.weight", 1), ("c.weight", 0), ("c.bias", 0)],
    "relative_bias": [("qkv.weight", 1), ("head.weight", 0), ("head.bias", 0)],
    "donut_swin": [("swin.embeddings.patch_embeddings.projection.weight", 1), ("head.weight", 0),
                   ("head.bias", 0)],
    "levit": [("levit.patch_embeddings.embedding_layer_1.convolution.weight", 1), ("classifier.linear.weight", 0),
              ("classifier.linear.bias", 0)],
    "squeezebert": [("transformer.embeddings.word_embeddings.weight", 0), ("classifier.weight", 0),
                    ("classifier.bias", 0)],
    "siglip": [("vision.embeddings.patch_embedding.weight", 1), ("head.weight", 0), ("head.bias", 0)],
    "beit": [("beit.embeddings.patch_embeddings.projection.weight", 1), ("classifier.weight", 0),
             ("classifier.bias", 0)],
    "fnet": [("fnet.embeddings.word_embeddings.weight", 0), ("classifier.weight", 0), ("classifier.bias", 0)],
    "phi3": [("model.embed_tokens.weight", 0), ("lm_head.weight", 0)],
    "jetmoe": [("model.embed_tokens.weight", 0), ("lm_head.weight", 0)],
}


# ---------------------------------------------------------------- helpers


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


def random_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state dict with every parameter redrawn at O(1) scale (ties kept, buffers as they are).

    Matrices get N(0, 1/fan_in), so attention logits are O(1) and attention is far from uniform;
    vectors (biases, norm weights, layer scales) get their value plus N(0, 0.2), so none is constant.
    """
    g = torch.Generator().manual_seed(seed)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    drawn: dict[int, torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict().items():
        if name not in params or not t.is_floating_point():
            state[name] = t.clone()
            continue
        key = t.data_ptr()
        if key not in drawn:
            if t.dim() >= 2:
                fan_in = max(1, t.numel() // t.shape[0])
                drawn[key] = torch.randn(t.shape, generator=g, dtype=t.dtype) / fan_in ** 0.5
            else:
                drawn[key] = t + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype)
        state[name] = drawn[key]
    return state


def with_state(model: torch.nn.Module, state) -> torch.nn.Module:
    return loaded_copy(model, state)  # nothing cached from the model's own weights (LeViT's attention biases)


def retarget(expr, target: str, space: int, path: str = ""):
    """``expr`` with the single leaf at member path ``target`` replaced by a leaf of ``space``."""
    if isinstance(expr, Leaf):
        return Leaf(space, expr.size) if path == target else expr
    sep = "×" if isinstance(expr, Product) else "|"
    parts = tuple(retarget(p, target, space, f"{path}{sep}{i}/{len(expr.parts)}") for i, p in enumerate(expr.parts))
    return type(expr)(parts, expr.size)


def permute_one_occurrence(t: torch.Tensor, axes: tuple, axis: int, path: str, perm: torch.Tensor) -> torch.Tensor:
    """``t`` with ``perm`` applied at one occurrence of a space (one member) and nowhere else."""
    marker = -12345
    axes = tuple(retarget(e, path, marker) if i == axis else e for i, e in enumerate(axes))
    assert any(leaf.space == marker for leaf in expr_leaves(axes[axis])), f"no leaf at path {path!r}"
    return permute_tensor(t, axes, {marker: perm}, {})


def float_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.is_floating_point()}


def free_leaves(analysis, expr) -> list[int]:
    return [leaf.space for leaf in expr_leaves(expr) if analysis.spaces[leaf.space].free]


def expr_spaces(value) -> set[int]:
    """Space ids in a node's axes (``Analysis.node_axes`` value); -1 (no parameter) dropped."""
    if value is None:
        return set()
    if isinstance(value, (Leaf, Product, Concat)):
        return {leaf.space for leaf in expr_leaves(value) if leaf.space >= 0}
    return set().union(*(expr_spaces(v) for v in value)) if value else set()


# ---------------------------------------------------------------- fixtures


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    args: tuple
    snapshot: dict
    analysis: fxfuse.Analysis
    permuted: torch.nn.Module  # fxfuse.permute(model, args, SEED)


@pytest.fixture(scope="module")
def cases():
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            model, args = zoo.ZOO[name](seed=0)
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
            analysis = fxfuse.analyze(model, args)
            permuted = fxfuse.permute(model, args, seed=SEED)
            cache[name] = Case(name, model, args, snapshot, analysis, permuted)
        return cache[name]

    return get


# ---------------------------------------------------------------- equality


@pytest.mark.parametrize("name", MODELS)
def test_permute_preserves_output(cases, name):
    c = cases(name)
    y0, y1 = run(c.model, c.args), run(c.permuted, c.args)
    diff, tol = max_diff(y0, y1), tolerance(y0)
    assert diff <= tol, f"{name}: permuted output differs by {diff:.3e} (tolerance {tol:.3e})"
    # the original is untouched and shares no tensor with the copy (else equality would be trivial)
    for k, v in c.model.state_dict().items():
        assert torch.equal(v, c.snapshot[k]), f"{name}: permute modified the original's {k}"
    originals = {p.data_ptr() for p in c.model.parameters()}
    assert not any(p.data_ptr() in originals for p in c.permuted.parameters()), f"{name}: copy shares storage"


@pytest.mark.parametrize("name", MODELS)
def test_permute_preserves_output_at_random_weights(cases, name):
    """Same analysis and permutations, every parameter redrawn: nothing is hidden by zeros, ones or 0.02 init."""
    c = cases(name)
    state = random_state(c.model, seed=7)
    base = with_state(c.model, state)
    perms = fxfuse.random_permutations(c.analysis, SEED)
    permuted = with_state(c.model, permute_state_dict(c.analysis, state, perms))
    y0, y1 = run(base, c.args), run(permuted, c.args)
    diff, tol = max_diff(y0, y1), tolerance(y0)
    assert diff <= tol, f"{name}: permuted output at random weights differs by {diff:.3e} (tolerance {tol:.3e})"


@pytest.mark.parametrize("name", MODELS)
def test_broken_tie_is_detected(cases, name):
    """Mutation check: permuting one member of a free space alone must change the output beyond the tolerance.

    Run at random weights; the permutation is a cyclic shift (never the identity, even for size 2).
    This shows the equality tests above can fail for every space the analysis frees.
    """
    c = cases(name)
    a = c.analysis
    state = random_state(c.model, seed=7)
    work = with_state(c.model, state)
    y0 = run(work, c.args)
    tol = tolerance(y0)
    undetected = []
    for space in a.free_spaces:
        if space.size < 2:
            continue
        member = max(space.members, key=lambda m: (len(a.layouts[m.param].shape), m.param))
        layout = a.layouts[member.param]
        shift = torch.roll(torch.arange(space.size), 1)
        broken = dict(state)
        t = permute_one_occurrence(state[member.param], layout.axes, member.axis, member.path, shift)
        for key in (member.param,) + layout.aliases:
            broken[key] = t
        work.load_state_dict(broken, strict=True)
        forget_derived(work)  # nothing cached from the weights before (LeViT's attention biases)
        diff = max_diff(run(work, c.args), y0)
        if diff <= tol:
            undetected.append(f"s{space.id} {space.name} roles={list(space.roles)} via {member}: diff {diff:.2e}")
    assert not undetected, f"{name}: breaking these ties went unnoticed (tolerance {tol:.2e}):\n" + "\n".join(
        undetected)


@pytest.mark.parametrize("name", MODELS)
def test_weights_moved(cases, name):
    c = cases(name)
    before, after = float_params(c.model), float_params(c.permuted)
    total = sum(t.numel() for t in before.values())
    moved = sum((before[n] != after[n]).sum().item() for n in before)
    share = moved / total
    assert share >= MOVED_MIN, f"{name}: only {share:.3f} of {total} parameter elements moved (need {MOVED_MIN})"


@pytest.mark.parametrize("name", MODELS)
def test_seeds(cases, name):
    c = cases(name)
    a = c.analysis
    p1, p1_again, p2 = (fxfuse.random_permutations(a, s) for s in (SEED, SEED, SEED + 1))
    assert p1.keys() == p1_again.keys() == p2.keys() == {s.id for s in a.free_spaces if s.size > 1}
    assert all(torch.equal(p1[k], p1_again[k]) for k in p1), f"{name}: same seed, different permutations"
    assert any(not torch.equal(p1[k], p2[k]) for k in p1), f"{name}: seeds {SEED} and {SEED + 1} agree"
    # the same seed gives identical weights, also through a second, independent analysis (fxfuse.permute)
    again = fxfuse.apply_permutations(a, p1).state_dict()
    other = fxfuse.apply_permutations(a, p2).state_dict()
    fresh = c.permuted.state_dict()
    assert again.keys() == fresh.keys()
    same = [k for k in fresh if not torch.equal(again[k], fresh[k])]
    assert not same, f"{name}: seed {SEED} gave different weights in {same[:5]}"
    assert any(not torch.equal(other[k], fresh[k]) for k in fresh), f"{name}: different seeds, same weights"


# ---------------------------------------------------------------- interface axes


@pytest.mark.parametrize("name", MODELS)
def test_graph_interface_spaces_are_pinned(cases, name):
    """Every space on an axis of a graph input or a graph output is pinned."""
    c = cases(name)
    a = c.analysis
    inputs, outputs = set(), set()
    for node in a.traced.graph.nodes:
        if node.op == "placeholder":
            ph = a.traced.placeholders.get(node.name)
            if ph is None or ph.kind == USER_INPUT:
                inputs |= expr_spaces(a.node_axes.get(node.name))
        elif node.op == "output":
            for leaf in torch.utils._pytree.tree_leaves(node.args[0]):
                if isinstance(leaf, torch.fx.Node):
                    outputs |= expr_spaces(a.node_axes.get(leaf.name))
    assert outputs, f"{name}: no parameter axis reaches the graph output (the head's output axis should)"
    free = sorted(s for s in inputs | outputs if a.spaces[s].free)
    assert not free, f"{name}: interface spaces are free: {[(s, a.spaces[s].name) for s in free]}"


def _interface(name):
    assert name in INTERFACE_AXES, f"add the interface axes of zoo model {name!r} to INTERFACE_AXES"
    return INTERFACE_AXES[name]


@pytest.mark.parametrize("name", MODELS)
def test_interface_axes_unchanged(cases, name):
    """Head output rows and first-layer input features keep their order; only the other axes move."""
    c = cases(name)
    before, after = c.model.state_dict(), c.permuted.state_dict()
    for pname, axis in _interface(name):
        w0, w1 = before[pname], after[pname]
        assert w0.shape == w1.shape
        n = w0.shape[axis]
        # each slice along `axis`, as a multiset of values, must stay at its index
        s0 = w0.movedim(axis, 0).reshape(n, -1).sort(dim=1).values
        s1 = w1.movedim(axis, 0).reshape(n, -1).sort(dim=1).values
        moved = (s0 != s1).any(dim=1).nonzero().flatten().tolist()
        assert not moved, f"{name}: {pname} axis {axis} was permuted (slices {moved[:8]} changed)"
        if w0.dim() > 1 and any(free_leaves(c.analysis, e) for i, e in enumerate(c.analysis.layout_of(pname).axes)
                                if i != axis):
            assert not torch.equal(w0, w1), f"{name}: {pname} did not move at all, the check above proves nothing"


@pytest.mark.parametrize("name", MODELS)
def test_interface_axes_pinned_in_analysis(cases, name):
    c = cases(name)
    a = c.analysis
    for pname, axis in _interface(name):
        layout = a.layout_of(pname)  # raises KeyError if the analysis lost the tensor
        free = free_leaves(a, layout.axes[axis])
        tied = [n for n in a.traced.aliases.get(pname, ())] + [k for k, v in a.traced.aliases.items() if pname in v]
        assert not free, (f"{name}: interface axis {pname}:{axis} lies on free space(s) "
                          f"{[(s, a.spaces[s].name, a.spaces[s].size) for s in free]}"
                          + (f"; the tensor is tied with {tied}" if tied else ""))


# ---------------------------------------------------------------- rules and coverage


@pytest.mark.parametrize("name", MODELS)
def test_no_unruled_ops(cases, name):
    a = cases(name).analysis
    assert a.unruled == (), f"{name}: ops without rules: {[(u.op, u.module) for u in a.unruled]}"


@pytest.mark.parametrize("name", zoo.TRANSFORMERS)
def test_transformer_coverage(cases, name):
    a = cases(name).analysis
    pinned = sorted({(s.name, s.size, s.reason) for s in a.spaces if not s.free and s.size > 1})
    assert a.coverage >= COVERAGE_MIN, f"{name}: coverage {a.coverage:.3f} < {COVERAGE_MIN}; pinned: {pinned}"


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", TOKEN_MODELS)
def test_other_batch_and_length(cases, name):
    """Traced on (2, 8); the permuted weights must serve any shape (no shape-specialised permutation)."""
    c = cases(name)
    low = 2 if name == "roberta" else 0  # RoBERTa: ids 0/1 are <s>/<pad>, the zoo's own inputs start at 2
    ids = torch.randint(low, zoo.VOCAB, (3, 13), generator=torch.Generator().manual_seed(99))
    assert tuple(c.args[0].shape) != (3, 13)
    y0, y1 = run(c.model, (ids,)), run(c.permuted, (ids,))
    diff, tol = max_diff(y0, y1), tolerance(y0)
    assert diff <= tol, f"{name}: on ids of shape (3, 13) outputs differ by {diff:.3e} (tolerance {tol:.3e})"


# ---------------------------------------------------------------- structure


def test_bert_heads_structure(cases):
    a = cases("bert").analysis
    layers = 2
    heads = [s for s in a.spaces if "heads" in s.roles and s.size == 4]
    qk = [s for s in a.spaces if "qk_dim" in s.roles and s.size == 8]
    v = [s for s in a.spaces if "v_dim" in s.roles and s.size == 8]
    assert len(heads) == len(qk) == len(v) == layers, (len(heads), len(qk), len(v))
    assert all(s.free for s in heads + qk + v)
    seen_heads = set()
    for layer in range(layers):
        prefix = f"bert.encoder.layer.{layer}.attention"
        q = a.layouts[f"{prefix}.self.query.weight"].axes[0]
        k = a.layouts[f"{prefix}.self.key.weight"].axes[0]
        val = a.layouts[f"{prefix}.self.value.weight"].axes[0]
        out = a.layouts[f"{prefix}.output.dense.weight"].axes[1]
        assert isinstance(q, Product) and len(q.parts) == 2, q
        h, d = q.parts
        assert isinstance(h, Leaf) and isinstance(d, Leaf)
        assert "heads" in a.spaces[h.space].roles and h.size == 4
        assert "qk_dim" in a.spaces[d.space].roles and d.size == 8
        assert k == q, "key rows must share the query's heads and qk_dim spaces"
        assert isinstance(val, Product) and val.parts[0] == h, "value shares the heads space"
        assert "v_dim" in a.spaces[val.parts[1].space].roles and val.parts[1].size == 8
        assert val.parts[1].space != d.space, "v_dim and qk_dim are independent"
        assert a.spaces[d.space].parent == h.space and a.spaces[val.parts[1].space].parent == h.space, \
            "inside-head dims may move differently per head (nested under the heads space)"
        assert out == val, "the output projection's input axis is the value's (heads × v_dim)"
        seen_heads.add(h.space)
    assert len(seen_heads) == layers, "each layer has its own heads space"
