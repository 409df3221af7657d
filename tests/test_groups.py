"""Symmetry groups: inferred per space, random elements keep the function, fusion recovers them."""
from __future__ import annotations

import pytest
import torch

import fxfuse
import digits
import zoo
from fxfuse.passes import canonical_analysis
from fxfuse.frontend.groups import ORTHO
from fxfuse.api.permute import move_by_group_elements
from fxfuse.frontend.verify import compare_outputs
from fxfuse.frontend.spaces import analyze

TRANSFORMERS = ["bert", "bert_mlm", "roberta", "distilbert", "gpt2", "llama", "qwen2", "t5", "vit", "encoder", "mha"]


def _build(name):
    return digits.vit(0) if name == "digits_vit" else getattr(zoo, name)(0)


def _canonical(name):
    model, args = _build(name)
    analysis, folded = canonical_analysis(model, args, {}, fxfuse.load_rules(), False)
    return model, args, analysis, folded


def test_prenorm_layernorm_stream_is_orthogonal_fixing_ones():
    _, _, a, folded = _canonical("vit")
    assert not folded.refused and folded.folds
    stream = next(s for s in a.spaces if any(m.param == "vit.embeddings.cls_token" and m.axis == 2 for m in s.members))
    assert a.group(stream.id).name == "orthogonal_ones"
    assert "layer_norm" in a.group(stream.id).limited_by


def test_rmsnorm_stream_is_orthogonal_and_rope_rotates_the_query_key_dims():
    model, args, a, folded = _canonical("llama")
    assert len(folded.folds) == 5 and not folded.refused
    stream = next(s for s in a.spaces if any(m.param == "model.embed_tokens.weight" and m.axis == 1
                                             for m in s.members))
    assert a.group(stream.id).name == "orthogonal"
    assert "sum of squares" in a.group(stream.id).limited_by or "rms" in a.group(stream.id).limited_by.lower()
    # RoPE rotates dim i with i + d/2 by the position's angle: recognised whole, the query/key dims inside each
    # key/value head are free and move by one 2x2 rotation per frequency pair
    q_inside = [s for s in a.spaces if s.parent is not None and any(m.param.endswith("q_proj.weight")
                                                                    for m in s.members)]
    rotary = [s for s in q_inside if a.group(s.id).name == "rotary"]
    assert len(rotary) == 2 and all(s.free and s.size == 8 for s in rotary)  # one per layer
    assert all("rotary embedding" in a.group(s.id).limited_by for s in rotary)
    v_inside = [s for s in a.spaces if s.free and s.parent is not None and s.size == 8 and s not in rotary]
    assert v_inside and {a.group(s.id).name for s in v_inside} == {"invertible"}
    # op by op (permutations only), cos and sin, from the unsaved inv_freq, pin them as before
    plain = analyze(model, args)
    q_plain = [s for s in plain.spaces if any(m.param.endswith("q_proj.weight") and m.axis == 0 for m in s.members)
               and s.size == 4]
    assert q_plain and all(not s.free and "inv_freq" in s.reason for s in q_plain)


def test_postnorm_bert_stream_stays_permutation_and_says_why():
    _, _, a, folded = _canonical("bert")
    refused = {r.scale: r.reason for r in folded.refused}
    assert "residual" in " ".join(refused) or any("aten.add.Tensor" in r for r in refused.values())
    stream = next(s for s in a.spaces if any(m.param == "bert.embeddings.word_embeddings.weight" and m.axis == 1
                                             for m in s.members))
    g = a.group(stream.id)
    assert g.name == "perm" and "LayerNorm.weight is not uniform" in g.limited_by


def test_heads_and_mlp_groups():
    _, _, a, _ = _canonical("gpt2")
    heads = [s for s in a.spaces if s.free and any(c.parent == s.id for c in a.spaces)]
    assert heads and {a.group(s.id).name for s in heads} == {"perm"}
    inside = {a.group(s.id).name for s in a.spaces if s.free and s.parent is not None}
    assert inside == {"orthogonal", "invertible"}  # q/k dims orthogonal (q·k), v/o dims invertible
    mlp = next(s for s in a.spaces if any(m.param == "transformer.h.0.mlp.c_fc.weight" and m.axis == 1
                                          for m in s.members))
    assert a.group(mlp.id).name == "perm"
    # the tied LM head keeps the last norm's scale: the stream stays a permutation space, and says why
    stream = next(s for s in a.spaces if any(m.param == "transformer.wte.weight" and m.axis == 1 for m in s.members))
    assert a.group(stream.id).name == "perm" and "ln_f.weight" in a.group(stream.id).limited_by


def test_groups_off_by_default_keep_permutations():
    model, args = zoo.gpt2(0)
    a = fxfuse.analyze(model, args)
    stream = next(s for s in a.spaces if any(m.param == "transformer.wte.weight" and m.axis == 1 for m in s.members))
    assert a.group(stream.id).name == "perm"  # scales not folded: nothing larger than permutations


@pytest.mark.parametrize("name", TRANSFORMERS + ["digits_vit", "phi3", "mixtral"])
def test_random_group_elements_keep_the_function(name):
    """(Phi-3 slices an empty pass-through part off the rotated dims: an empty piece has nothing to move.)"""
    model, args = _build(name)
    moved, info = move_by_group_elements(model, args, seed=3)
    assert type(moved) is type(model)
    assert compare_outputs(model, moved, args) <= 1e-5
    assert sum(n for g, n in info["groups"].items() if g != "perm") >= 2
    before, after = model.state_dict(), moved.state_dict()
    changed = sum(int((before[k] != after[k]).sum()) for k in before if before[k].is_floating_point())
    assert changed > 0.9 * sum(before[k].numel() for k in before if before[k].is_floating_point())


@pytest.mark.parametrize("name,untie", [("digits_vit", False), ("llama", False), ("bert", False), ("gpt2", True)])
@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_moved_copy_fuses_back_exactly(name, untie, cost):
    model, args = _build(name)
    moved, _ = move_by_group_elements(model, args, seed=5, largest=ORTHO, untie=untie)
    result = fxfuse.compile([model, moved], args, cost=cost, calib=48, groups="full", untie=untie)
    assert compare_outputs(model, result.module, args) <= 1e-4
    assert all(c["hard"] and c["error"] <= 1e-4 for c in result.report["self_check"])
    grouped = [e for e in result.report["spaces"] if e["group"] != "perm" and e["models"]]
    assert grouped and all(e["models"][0]["solver"].startswith("procrustes") for e in grouped)
    assert type(result.module) is type(model)
    fused = result.module.state_dict()
    assert set(fused) == set(model.state_dict())
    folds = result.report["canonicalize"][0]["folded"]
    for f in folds:  # folded norms keep unit scale
        assert torch.equal(fused[f["scale"]], torch.ones_like(fused[f["scale"]]))
    if untie:  # the tied LM head took the last norm's scale: reported, and the stream is orthogonal
        assert any(f["untied"] == ["lm_head.weight"] for f in folds)
        stream = next(e for e in result.report["spaces"] if e["name"] == "transformer.wte.weight:1")
        assert stream["group"] == "orthogonal_ones"
        assert not result.module.config.tie_word_embeddings


def test_cli_permute_and_explain_with_groups(tmp_path, capsys):
    from fxfuse.commands.cli import main
    from fxfuse.models.io import load_model

    out = tmp_path / "moved"
    assert main(["permute", "zoo:vit", "-o", str(out), "--groups", "full", "--seed", "2", "-q"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"wrote {out}:") and "orthogonal_ones" in text and "norm scales folded" in text
    model, args = zoo.vit(0)
    assert compare_outputs(model, load_model(str(out)).module, args) <= 1e-4
    assert main(["explain", "zoo:bert", "--groups", "full", "-q"]) == 0
    text = capsys.readouterr().out
    assert "groups (the maps each free space may move by" in text
    assert "not folded: bert.embeddings.LayerNorm.weight" in text and "aten.add.Tensor" in text


def test_too_large_group_is_caught_naming_the_rule(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- op: aten.relu.default\n  kind: broadcast\n  group: orthogonal\n")
    rules = fxfuse.load_rules(extra=[bad])
    model, args = zoo.mlp(0)
    with pytest.raises(fxfuse.FxfuseError, match=r"bad\.yaml:0"):
        move_by_group_elements(model, args, seed=0, rules=rules)


def test_untie_is_refused_where_the_output_cannot_record_it(tmp_path, capsys):
    from fxfuse.commands.cli import main

    code = main(["compile", "zoo:gpt2", "zoo:gpt2", "-o", str(tmp_path / "out"), "--groups", "full",
                 "--untie", "-q"])
    assert code == 2 and "--untie needs a Hugging Face model directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,match", [
    ("- op: aten.relu.default\n  kind: broadcast\n  group: rotation\n", r"bad\.yaml.*unknown group 'rotation'"),
    ("- op: aten.relu.default\n  kind: broadcast\n  groups: {c: perm}\n", r"bad\.yaml.*takes 'group', not per-axis"),
    ("- op: aten.linear.default\n  axes: {input: '... i', out: '... o'}\n  groups: {k: orthogonal}\n",
     r"bad\.yaml.*axis 'k' does not appear in axes"),
    ("- op: aten.linear.default\n  axes: {input: '... i', out: '... i'}\n  group: orthogonal\n",
     r"bad\.yaml.*gives groups per axis"),
])
def test_group_keys_are_validated(tmp_path, text, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(fxfuse.RuleError, match=match):
        fxfuse.load_rules(extra=[bad])


def test_norm_scales_fold_through_transposes_that_keep_the_normalised_axis_last():
    """nn.MultiheadAttention transposes its normalised input (batch and sequence) before the in-projection: the
    fold passes through, so a trained digits ViT's stream is orthogonal fixing ``1``; a transpose that moves the
    normalised axis stops the fold."""
    model, args = digits.vit(0, dim=16, heads=2, mlp=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("norm."):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    analysis, folded = canonical_analysis(model, args, {}, fxfuse.load_rules(), False)
    assert {f.scale for f in folded.folds} >= {"blocks.0.ln1.weight", "blocks.1.ln1.weight"}
    assert not folded.refused
    stream = next(s for s in analysis.spaces if s.name == "cls:2")  # the residual stream (cls token's last axis)
    assert analysis.group(stream.id).name == "orthogonal_ones"
    assert compare_outputs(model, folded.module, args) <= 1e-5

    class Moves(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.norm(x).transpose(-1, -2))

    m = Moves()
    with torch.no_grad():
        m.norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    _, canon = canonical_analysis(m, (torch.randn(2, 4, 4),), {}, fxfuse.load_rules(), False)
    assert not canon.folds and "moves the normalised axis" in canon.refused[0].reason
