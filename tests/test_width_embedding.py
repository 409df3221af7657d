"""Residual streams of different widths moved by stretched orthonormal embeddings (``--width-maps embedding``).

The known answer: a model ``A`` with a stream of ``n_s`` units and its copy ``W`` embedded into ``n_t > n_s``
units by ``Q = √(n_t/n_s)·Q̃`` (``Q̃`` orthonormal columns, ``Q·1 = 1``: writers ``Q·W``, readers
``W·(Q⁺)``) compute the same function, LayerNorms included. Fusing ``A`` into ``W``'s widths must find
``Q`` (the fused model is ``W``); fusing ``W`` into ``A``'s must project it back onto ``A``.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fxfuse
import zoo
from fxfuse.backend.refine import RefineConfig
from fxfuse.frontend.rules import RuleError, load_rules
from fxfuse.frontend.verify import compare_outputs
from fxfuse.planner.groupmaps import ones_complement
from fxfuse.planner.procrustes import embedding

pytestmark = pytest.mark.usefixtures("quiet_one_thread")

TOL = 1e-5


class Stream(nn.Module):
    """A pre-norm residual block on a stream of ``n`` units, then a norm and a linear head."""

    def __init__(self, n: int, d_in: int = 6, hidden: int = 16, classes: int = 4, sums: bool = False):
        super().__init__()
        self.embed, self.sums = nn.Linear(d_in, n), sums
        self.norm1, self.norm2 = nn.Identity() if sums else nn.LayerNorm(n), nn.LayerNorm(n)
        self.fc1, self.fc2 = nn.Linear(n, hidden), nn.Linear(hidden, n)
        self.head = nn.Linear(n, classes)

    def forward(self, x):
        s = self.embed(x)
        h = s / s.pow(2).sum(-1, keepdim=True).sqrt() if self.sums else self.norm1(s)
        s = s + self.fc2(torch.relu(self.fc1(h)))
        return self.head(self.norm2(s))


def stream_model(n: int, seed: int, sums: bool = False) -> Stream:
    g = torch.Generator().manual_seed(seed)
    m = Stream(n, sums=sums)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                continue  # uniform norm scales (ones): the stream keeps its orthogonal group
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def embedded(a: Stream, n_t: int, seed: int) -> tuple[Stream, torch.Tensor]:
    """``a`` embedded into ``n_t`` stream units by a random stretched orthonormal ``Q`` (``Q·1 = 1``), its hidden
    units shuffled; ``(the wide model, Q)``."""
    n_s = a.embed.out_features
    g = torch.Generator().manual_seed(seed)
    O, _ = torch.linalg.qr(torch.randn(n_t - 1, n_s - 1, generator=g, dtype=torch.float64))
    Bt, Bs = ones_complement(n_t), ones_complement(n_s)
    Q = (Bt @ O @ Bs.T + 1.0 / (n_t * n_s) ** 0.5) * (n_t / n_s) ** 0.5
    read = Q * (n_s / n_t)  # (Q⁺)ᵀ
    perm = torch.randperm(a.fc1.out_features, generator=g)
    w = Stream(n_t)
    sd = {k: v.double() for k, v in a.state_dict().items()}
    new = {
        "embed.weight": Q @ sd["embed.weight"], "embed.bias": Q @ sd["embed.bias"],
        "norm1.weight": torch.ones(n_t), "norm1.bias": Q @ sd["norm1.bias"],
        "norm2.weight": torch.ones(n_t), "norm2.bias": Q @ sd["norm2.bias"],
        "fc1.weight": (sd["fc1.weight"] @ read.T)[perm], "fc1.bias": sd["fc1.bias"][perm],
        "fc2.weight": (Q @ sd["fc2.weight"])[:, perm], "fc2.bias": Q @ sd["fc2.bias"],
        "head.weight": sd["head.weight"] @ read.T, "head.bias": sd["head.bias"],
    }
    w.load_state_dict({k: v.float() for k, v in new.items()})
    return w.eval(), Q


@pytest.fixture(scope="module")
def pair():
    a = stream_model(12, seed=0)
    w, Q = embedded(a, 20, seed=1)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    return a, w, Q, x


def test_the_embedded_copy_computes_the_same(pair):
    a, w, _, x = pair
    assert compare_outputs(a, w, (x,)) < TOL


def test_fused_into_the_wider_model_finds_the_embedding(pair):
    a, w, Q, x = pair
    result = fxfuse.compile([a, w], (x,), target=1, groups="full")
    m = result.alignments[0].maps[next(s for s, m in result.alignments[0].maps.items() if m.q is not None)]
    assert m.kind == "embedding" and m.hard and m.q.shape == (20, 12)
    assert torch.allclose(m.q.double(), Q, atol=1e-4)  # the construction's map, found from the weights
    assert result.report["self_check"][0]["error"] < TOL  # checked exactly, like a permutation
    assert compare_outputs(a, result.module, (x,)) < 1e-4  # A and its embedded copy average to the same model


def test_fused_into_the_narrower_model_projects_back(pair):
    a, w, _, x = pair
    result = fxfuse.compile([a, w], (x,), target=0, groups="full")
    entry = result.report["self_check"][1]
    assert "drift" in entry and "error" not in entry  # a projection: reported, not claimed exact
    assert entry["drift"] < 1e-4  # W lies in the span of an embedding of A: the projection is A again
    assert compare_outputs(a, result.module, (x,)) < 1e-4


def test_matching_across_widths_is_kept_on_request(pair):
    a, w, _, x = pair
    result = fxfuse.compile([a, w], (x,), target=1, groups="full", width_maps="matching")
    maps = [s["models"][0]["map"] for s in result.report["spaces"] if s.get("sizes") == [12, 20]]
    assert maps and set(maps) == {"matching"}
    assert result.report["self_check"][0]["drift"] > 1e-2  # the norms read the duplicated units


def test_a_stream_kept_only_as_a_sum_is_matched():
    """``s / ‖s‖`` sums squares: no stretch keeps it across widths, so the stream falls back to a matching."""
    a = stream_model(12, seed=0, sums=True)
    b = stream_model(20, seed=3, sums=True)
    x = torch.randn(8, 6)
    result = fxfuse.compile([a, b], (x,), target=1, groups="full")
    stream = next(s for s in result.report["spaces"] if s.get("sizes") == [12, 20] and s["group"] != "perm")
    assert stream["models"][0]["map"] == "matching"
    assert any("sum of squares" in why for why in result.analysis.summed.values())


def test_hf_vit_embedded_exactly_into_the_wider_model():
    """HF ViTs 64 wide (4 heads) and 96 wide (6 heads): heads and MLP units are matched either way; the stream is
    embedded, so the narrow model aligned into the wide one computes what it did."""
    a, args = zoo.vit(seed=0, hidden=64, heads=4)
    b, _ = zoo.vit(seed=1, hidden=96, heads=6)
    drift = {}
    for maps in ("embedding", "matching"):
        result = fxfuse.compile([a, b], args, target=1, groups="full", width_maps=maps)
        drift[maps] = result.report["self_check"][0]["drift"]
        stream = next(s for s in result.report["spaces"] if s.get("sizes") == [64, 96] and s["group"] != "perm")
        assert stream["models"][0]["map"] == maps
    assert drift["embedding"] < 1e-5 < 1e-2 < drift["matching"]


def test_refined_embedding_stays_exact(pair):
    a, w, _, x = pair
    b = stream_model(20, seed=5)  # an independent wide model: the maps have something to learn
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(0))
    inputs = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    for orthogonal in ("project", "exp"):
        result = fxfuse.compile([a, b], (x,), target=1, groups="full",
                                refine=RefineConfig(20, inputs, y, orthogonal=orthogonal, lr_orthogonal=0.1))
        m = next(m for m in result.alignments[0].maps.values() if m.embeds)
        Q = m.q.double()
        assert "refined" in m.solver and result.report["refine"]["units_changed"][0][f"s{m.space}"] > 0
        assert torch.allclose(Q.T @ Q, torch.eye(12, dtype=Q.dtype) * 20 / 12, atol=1e-6)  # still an embedding
        assert torch.allclose(Q.sum(1), torch.ones(20, dtype=Q.dtype), atol=1e-6)  # Q·1 = 1 (LayerNorm)
        assert result.report["self_check"][0]["error"] < TOL
        with torch.no_grad():  # the loss refinement reports is the fused model's (its moves are emission's)
            loss = float(nn.functional.cross_entropy(result.module(inputs), y))
        assert loss == pytest.approx(result.report["refine"]["loss_at_weights_after"], rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(n_t=st.integers(2, 9), n_s=st.integers(2, 9), ones=st.booleans(), seed=st.integers(0, 2**16))
def test_embedding_is_the_best_stretched_orthonormal_map(n_t, n_s, ones, seed):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(n_t, n_s))
    Q = embedding(S, fix_ones=ones) / np.sqrt(n_t / n_s)
    gram = Q.T @ Q if n_t >= n_s else Q @ Q.T
    assert np.allclose(gram, np.eye(min(n_t, n_s)), atol=1e-9)
    if ones:
        assert np.allclose(Q.sum(1) * np.sqrt(n_t / n_s), 1.0, atol=1e-9)
    for _ in range(5):  # no other orthonormal map of the same kind does better
        R = np.linalg.qr(rng.normal(size=(max(n_t, n_s), min(n_t, n_s))))[0]
        R = R if n_t >= n_s else R.T
        if ones:
            Bt, Bs = ones_complement(n_t).numpy(), ones_complement(n_s).numpy()
            R = Bt @ embedding(rng.normal(size=(n_t - 1, n_s - 1))) / np.sqrt((n_t - 1) / (n_s - 1)) @ Bs.T \
                + 1.0 / np.sqrt(n_t * n_s)
        assert (Q * S).sum() >= (R * S).sum() - 1e-9


def test_means_must_name_an_axis_with_a_group(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- op: aten.rms_norm.default\n  axes: {input: '... c', weight: c, out: '... c'}\n"
                    "  groups: {c: orthogonal}\n  means: [d]\n")
    with pytest.raises(RuleError, match=r"bad.yaml.*means.*'d' has no group"):
        load_rules([path])


def gqa_llama(seed: int, hidden: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=zoo.VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      use_cache=False, tie_word_embeddings=False)
    return zoo._hf("LlamaForCausalLM", cfg, seed, (zoo._ids(),))


@pytest.mark.parametrize("groups", ["perm", "full"])
def test_grouped_query_attention_of_different_widths(groups):
    """Llamas of 2 and 3 key/value heads (2 query heads each): the query groups and the value dims are both nested
    under the matched key/value heads on ``o_proj``'s input axis and move together; into the wider target with
    ``groups full`` the narrow model is embedded exactly."""
    a, args = gqa_llama(0, 32, 4, 2)
    b, _ = gqa_llama(1, 48, 6, 3)
    for target in (0, 1):
        result = fxfuse.compile([a, b], args, target=target, groups=groups)
        with torch.no_grad():
            assert torch.isfinite(result.module(*args).logits).all()
        assert (2, 3) in {tuple(w["sizes"]) for w in result.report["width_maps"]}
        if groups == "full" and target == 1:
            assert result.report["self_check"][0]["drift"] < TOL


def test_cli_width_maps(tmp_path, capsys):
    """``compile --groups full`` embeds the narrow ViT's stream into the wide one (exact, reported);
    ``--width-maps matching`` matches it and is kept in the recipe."""
    import json

    import yaml

    from fxfuse.commands.cli import main

    a, _ = zoo.vit(seed=0, hidden=64, heads=4)
    b, _ = zoo.vit(seed=1, hidden=96, heads=6)
    a.save_pretrained(tmp_path / "narrow")
    b.save_pretrained(tmp_path / "wide")
    for maps in ("embedding", "matching"):
        out = tmp_path / maps
        flags = [] if maps == "embedding" else ["--width-maps", "matching"]
        capsys.readouterr()
        assert main(["compile", str(tmp_path / "narrow"), str(tmp_path / "wide"), "-o", str(out), "--target", "1",
                     "--groups", "full", "--show-depth-map", "-q", *flags]) == 0
        assert re.search(rf"width: s\d+ \(vit\.embeddings\.cls_token:2\) sizes 64 / 96 -> 96 by {maps}\n",
                         capsys.readouterr().out)
        report = json.loads((out / "report.json").read_text())
        stream = next(s for s in report["spaces"] if s.get("sizes") == [64, 96] and s["group"] != "perm")
        assert stream["models"][0]["map"] == maps
        assert stream["models"][0]["hard"] == (maps == "embedding")
        assert yaml.safe_load((out / "fxfuse-recipe.yaml").read_text()).get("width_maps", "embedding") == maps
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["compile", str(tmp_path / "narrow"), str(tmp_path / "wide"), "-o", str(tmp_path / "bad"),
              "--width-maps", "rectangular", "-q"])
    assert exit_.value.code == 2
    assert "--width-maps" in capsys.readouterr().err and not (tmp_path / "bad").exists()
