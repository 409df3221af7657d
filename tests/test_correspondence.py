"""Matching by graph (``fxfuse.frontend.correspond``, ``fxfuse.frontend.convert``): two implementations of one architecture fuse.

The zoo's Hugging Face GPT-2 against ``handwritten.MiniGPT``, the same function
with other names, a ``ModuleList``, ``nn.Linear`` layout and a fused ``qkv``
split by ``chunk`` (or separate q, k, v); a BERT against a renamed copy; pairs
that differ in one op, in a weight, or in an op that reads no weight, refused.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import handwritten as hw
import zoo
from clirun import refused, run
from fxfuse.frontend.convert import convert, needs_graph
from fxfuse.frontend.correspond import CorrespondenceError
from fxfuse.api.fuse import FusionError, compile as fuse
from fxfuse.api.permute import permute


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def parents():
    a, args = zoo.gpt2(0)
    b, _ = zoo.gpt2(1)
    return a, b, args


@pytest.fixture(scope="module")
def by_names(parents):
    a, b, args = parents
    return fuse([a, b], args)


@pytest.mark.parametrize("qkv", ["chunk", "separate", "unbind", "index"])
def test_hf_gpt2_fuses_with_a_handwritten_copy_of_another_model(parents, by_names, qkv):
    a, b, args = parents
    mini_b = hw.from_hf(b, qkv)
    result = fuse([a, mini_b], args)
    assert type(result.module) is type(a)
    _same(result.module, by_names.module)  # bit for bit what the two HF models give
    entry = result.report["correspondence"]["1"]
    assert entry["error"] <= 1e-6
    kinds = {row[2] for row in entry["rows"]}
    assert "transpose" in kinds and ("transpose+concat" in kinds) == (qkv == "separate")


def test_handwritten_target_takes_hf_source(parents):
    a, b, args = parents
    mini_a = hw.from_hf(a)
    result = fuse([mini_a, b], args)
    assert type(result.module) is hw.MiniGPT
    assert all(c["error"] <= 1e-4 for c in result.report["self_check"] if "error" in c)
    again = fuse([hw.from_hf(a), b], args)
    _same(result.module, again.module)  # deterministic
    rows = {tuple(r) for r in result.report["correspondence"]["1"]["rows"]}
    assert ("transformer.h.0.attn.c_attn.weightᵀ", "blocks.0.qkv.weight", "transpose") in rows
    assert {("lm_head.weight", "tokens.weight", "identity"), ("lm_head.weight", "unembed.weight", "identity")} <= rows


def test_permuted_renamed_relaid_copy_gives_back_the_original(parents):
    a, _, args = parents
    moved = hw.from_hf(permute(a, args, seed=3), "separate")  # permuted, renamed, Linear layout, q/k/v apart
    assert not torch.equal(moved.blocks[0].up.weight, a.transformer.h[0].mlp.c_fc.weight.t())
    result = fuse([a, moved], args)
    _same(result.module, a)


def test_bert_against_a_renamed_copy():
    a, args = zoo.bert(0)
    b, _ = zoo.bert(1)
    renamed = hw.Renamed(b).eval()
    assert not set(renamed.state_dict()) & set(a.state_dict())
    result = fuse([a, renamed], args)
    _same(result.module, fuse([a, b], args).module)
    rows = result.report["correspondence"]["1"]["rows"]
    assert all(s == "body." + t and k == "identity" for s, t, k in rows)


@pytest.mark.parametrize("name", ["cnn", "seq2seq", "lstm", "no_grad_block", "t5", "llama", "mixtral", "swin"])
def test_zoo_models_against_renamed_copies(name):
    """BatchNorm statistics, two inputs, recurrent weights, a higher-order op, relative attention biases,
    rotary embeddings, experts, windows: each renamed copy moves back onto the original's names exactly."""
    made = zoo.ZOO[name](seed=0)
    model, inputs = made[0], (made[1], made[2] if len(made) > 2 else {})
    other = zoo.ZOO[name](seed=1)[0]
    done = convert(hw.Renamed(other).eval(), inputs, model, inputs)
    assert done.error == 0.0 and type(done.module) is type(model)
    _same(done.module, other)


def test_a_pair_that_differs_in_one_op_is_refused(parents):
    a, _, args = parents
    relu, _ = hw.mini_gpt(1, act="relu")
    with pytest.raises(CorrespondenceError) as err:
        fuse([a, relu], args)
    assert str(err.value) == ("model 1 is a MiniGPT, model 0 a GPT2LMHeadModel, and matching their weights by graph "
                              "failed: the graphs differ: model 1 node relu (aten.relu.default) against model 0 node "
                              "mul (aten.mul.Tensor)")


class _Head(nn.Module):
    """``Linear → ReLU → Linear`` on float features, the first linear with or without a bias, as ``nn.Linear``
    or as HF's ``addmm`` on a ``(in, out)`` weight (``conv1d``)."""

    def __init__(self, bias: bool = True, conv1d: bool = False, plus: bool = False):
        super().__init__()
        self.conv1d, self.plus = conv1d, plus
        self.w = nn.Parameter(torch.randn(4, 6) if conv1d else torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(6)) if bias else None
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        if self.plus:  # x @ W + b, written out
            h = x @ (self.w if self.conv1d else self.w.t()) + self.b
        elif self.conv1d:
            h = torch.addmm(self.b, x, self.w)
        else:
            h = nn.functional.linear(x, self.w, self.b)
        return self.out(torch.relu(h))


@pytest.mark.parametrize("plus", [False, True], ids=["addmm", "matmul-plus-bias"])
def test_a_linear_on_the_inputs_in_either_layout(plus):
    x = torch.randn(3, 4)
    torch.manual_seed(0)
    source, target = _Head(conv1d=True, plus=plus).eval(), _Head().eval()
    done = convert(source, ((x,), {}), target, ((x,), {}))
    assert done.correspondence.rows()[:2] == [("wᵀ", "w", "transpose"), ("b", "b", "identity")]
    assert torch.equal(done.module.w, source.w.t())
    assert convert(_Head(plus=True), ((x,), {}), target, ((x,), {})).correspondence.identity


def test_a_bias_without_counterpart_is_refused():
    x = torch.randn(3, 4)
    with pytest.raises(CorrespondenceError) as err:
        convert(_Head(bias=False), ((x,), {}), _Head(), ((x,), {}))
    assert str(err.value) == ("the graphs differ: source node linear (linear, reading w) against target node "
                              "linear (linear, reading b, w)")


def test_a_weight_without_counterpart_is_refused(parents):
    a, _, args = parents
    extra, _ = hw.mini_gpt(1)
    extra.spare = nn.Parameter(torch.ones(3))  # never read
    with pytest.raises(CorrespondenceError, match=r"^model 1 is a MiniGPT, model 0 a GPT2LMHeadModel, and matching their weights by graph failed: "
                                                  r"model 1 spare has no counterpart in model 0: the graph reads "
                                                  r"no such weight there$"):
        fuse([a, extra], args)


def test_a_tied_target_filled_from_two_different_source_tensors_is_refused(parents):
    a, _, args = parents
    untied, _ = hw.mini_gpt(1)
    with torch.no_grad():
        untied.unembed.weight.mul_(2.0)  # no longer the embedding: GPT-2's tied head cannot hold both
    with pytest.raises(CorrespondenceError, match=r"^model 1 is a MiniGPT, model 0 a GPT2LMHeadModel, and matching their weights by graph failed: "
                                                  r"model 0 lm_head.weight is read in several places that model 1 "
                                                  r"fills from different values \(one of them (unembed|tokens).weight"
                                                  r"\): the models do not tie the same weights$"):
        fuse([a, untied], args)


def test_three_models_only_the_other_class_is_moved(parents, by_names):
    a, b, args = parents
    result = fuse([a, hw.from_hf(b), b], args)
    assert list(result.report["correspondence"]) == ["1"]
    _same(result.module, fuse([a, b, b], args).module)


def test_an_op_without_weights_that_differs_fails_the_check(parents):
    a, _, args = parents
    mini, _ = hw.mini_gpt(1)

    class Unmasked(hw.MiniGPT):  # no causal mask: the graphs match, the function does not
        def forward(self, idx):
            x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
            mask = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool)
            for block in self.blocks:
                x = block(x, mask)
            return self.unembed(self.final_norm(x))

    unmasked = Unmasked().eval()
    unmasked.load_state_dict(mini.state_dict())
    with pytest.raises(CorrespondenceError, match=r"^model 1 is a Unmasked, model 0 a GPT2LMHeadModel, and matching "
                                                  r"their weights by graph failed: model 1 moved into the class and "
                                                  r"names of model 0 computes "
                                                  r"something else \(relative error .* > 0.0001\)"):
        fuse([a, unmasked], args)


def test_ambiguous_weights_are_refused():
    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.left(x) + self.right(x)

    torch.manual_seed(0)
    a, b = Twin().eval(), hw.Renamed(Twin()).eval()
    with pytest.raises(CorrespondenceError, match=r"^ambiguous match: source node linear .* and target node "
                                                  r"linear .* compute alike"):
        convert(b, ((torch.randn(2, 4),), {}), a, ((torch.randn(2, 4),), {}))


def test_match_option(parents):
    a, b, args = parents
    mini = hw.from_hf(b)
    assert not needs_graph([a, b], 0, "auto") and needs_graph([a, b], 0, "graph") and needs_graph([a, mini], 0, "auto")
    with pytest.raises(FusionError, match=r"^model 1 is a MiniGPT, model 0 a GPT2LMHeadModel$"):
        fuse([a, mini], args, match="names")
    forced = fuse([a, b], args, match="graph")  # one class: the identity correspondence, the same weights
    _same(forced.module, fuse([a, b], args).module)
    assert all(s == t for s, t, _ in forced.report["correspondence"]["1"]["rows"])


def test_recipe_of_specs_of_two_classes(by_names):
    """``fxfuse.compile(recipe)`` loads each model with its own example inputs and matches by graph."""
    from fxfuse import Recipe, compile as fuse_recipe

    result = fuse_recipe(Recipe(models=("zoo:gpt2", "handwritten:mini_gpt_b")))
    assert type(result.module).__name__ == "GPT2LMHeadModel" and "correspondence" in result.report
    _same(result.module, by_names.module)


def test_the_correspondence_is_deterministic(parents):
    a, b, args = parents
    runs = [convert(hw.from_hf(b, "separate"), (args, {}), a, (args, {})) for _ in range(2)]
    assert runs[0].correspondence == runs[1].correspondence
    assert runs[0].correspondence.rows() == runs[1].correspondence.rows()


def test_explain_correspondence_cli(capsys, tmp_path):
    code, out, err = run(capsys, "explain", "handwritten:mini_gpt_b", "zoo:gpt2", "--correspondence", "-q")
    assert code == 0, err
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0] == "handwritten:mini_gpt_b zoo:gpt2 transform"
    assert "blocks.0.qkv.weightᵀ -> transformer.h.0.attn.c_attn.weight transpose" in lines
    assert "unembed.weight -> lm_head.weight identity" in lines
    assert lines[-1].startswith("29 rows; the moved copy computes what handwritten:mini_gpt_b computes")
    code, out, _ = run(capsys, "explain", "handwritten:mini_gpt_b", "zoo:gpt2", "--correspondence", "--json", "-q")
    table = json.loads(out)
    assert code == 0 and len(table["rows"]) == 29 and table["self_check_error"] <= 1e-6
    line = refused(capsys, tmp_path, "explain", "handwritten:mini_gpt_relu", "zoo:gpt2", "--correspondence", "-q")
    assert line == ("the graphs differ: handwritten:mini_gpt_relu node relu (aten.relu.default) against zoo:gpt2 "
                    "node mul (aten.mul.Tensor)")
    assert refused(capsys, tmp_path, "explain", "zoo:gpt2", "zoo:mlp", "-q") == \
        "a second model (zoo:mlp) is read only with --correspondence"
    assert refused(capsys, tmp_path, "explain", "zoo:gpt2", "--correspondence", "-q") == \
        "--correspondence needs two models: MODEL TARGET"


def test_compile_cli_writes_the_target_class_and_says_so(capsys, tmp_path, parents):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compile", "zoo:gpt2", "handwritten:mini_gpt_b", "-o", out, "-q")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["correspondence"]["1"]["model"] == "handwritten:mini_gpt_b"
    assert "## Correspondence" in (out / "README.md").read_text()
    code, _, err = run(capsys, "compile", "zoo:gpt2", "handwritten:gpt2_b", "-o", tmp_path / "ref", "-q")
    assert code == 0, err
    from safetensors.torch import load_file

    got, ref = load_file(out / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    line = refused(capsys, tmp_path, "compile", "zoo:gpt2", "handwritten:mini_gpt_b", "-o", tmp_path / "o2",
                   "--match", "names", "-q")
    assert line == "model 1 is a MiniGPT, model 0 a GPT2LMHeadModel"


def test_barrier_runs_to_a_handwritten_copy_as_to_the_hf_model(parents):
    """``barrier`` moves B of another class into A's names first: both curves are those of the two HF models."""
    from fxfuse.api.barrier import barrier

    a, b, args = parents
    ids = torch.randint(0, a.config.vocab_size, (4, args[0].shape[1]), generator=torch.Generator().manual_seed(0))
    both_hf = barrier(a, b, ids, ids, args, points=3)
    mixed = barrier(a, hw.from_hf(b), ids, ids, args, points=3)
    for got, want in ((mixed.vanilla, both_hf.vanilla), (mixed.aligned, both_hf.aligned)):
        assert got.loss == pytest.approx(want.loss, rel=1e-5, abs=1e-6)
    assert mixed.report["correspondence"]["1"]["error"] <= 1e-6 and "correspondence" not in both_hf.report
    with pytest.raises(FusionError):  # by names, the hand-written model's weights have no counterparts
        barrier(a, hw.from_hf(b), ids, ids, args, points=3, match="names")


def test_barrier_cli_by_graph(capsys, tmp_path):
    """``fxfuse barrier`` of an HF GPT-2 and a hand-written one: matched by graph (auto), refused by names."""
    a, args = zoo.gpt2(0)
    ids = torch.randint(0, a.config.vocab_size, (4, args[0].shape[1]), generator=torch.Generator().manual_seed(0))
    torch.save({"inputs": ids, "labels": ids}, tmp_path / "data.pt")
    code, out, err = run(capsys, "barrier", "zoo:gpt2", "handwritten:mini_gpt_b", "--data", tmp_path / "data.pt",
                         "--points", "3", "--json", "-q")
    assert code == 0, err
    curves = json.loads(out)
    assert len(curves["correspondence"]["1"]["rows"]) == 29 and curves["correspondence"]["1"]["error"] <= 1e-6
    code, out, err = run(capsys, "barrier", "zoo:gpt2", "handwritten:mini_gpt_b", "--data", tmp_path / "data.pt",
                         "--points", "3", "-q")
    assert code == 0 and out.startswith("B matched to A by graph: 29 rows, the moved copy's error "), err
    code, out, err = run(capsys, "barrier", "zoo:gpt2", "handwritten:gpt2_b", "--data", tmp_path / "data.pt",
                         "--points", "3", "--json", "-q")
    assert code == 0, err
    both_hf = json.loads(out)  # the same B as a Hugging Face model: the same curves
    for name in ("vanilla", "aligned"):
        assert curves[name]["loss"] == pytest.approx(both_hf[name]["loss"], rel=1e-5, abs=1e-6), name
    line = refused(capsys, tmp_path, "barrier", "zoo:gpt2", "handwritten:mini_gpt_b", "--data", tmp_path / "data.pt",
                   "--match", "names", "-q")
    assert line.startswith("model 1 is a MiniGPT, model 0 a GPT2LMHeadModel"), line
