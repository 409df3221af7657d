"""Activation matching where samples are easy to get wrong, and where there are none.

* Two moved spaces on one activation (multi-query attention: query heads and a
  head dim of their own): the other space's axis is reduced, never a sample.
* An activation that is the same for every sample (a token-type embedding read
  at type 0 only) correlates with nothing, however many samples are summed.
* Spaces inside higher-order subgraphs (a block under ``torch.no_grad()``) are
  read there.
* A space without signal is kept at the identity with a note and a warning.
* Samples that fail a check the traced graph makes on its inputs are named
  in one line.
* Models with several inputs (encoder-decoder) get calibration batches of
  every input, random or from a file of named tensors.
* Weight matching: a space without any tensor to compare is noted; heads that
  no tensor carries alone are still solved in the first pass.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fxfuse
import zoo
from fxfuse.core.errors import InputCheckError
from fxfuse.planner.activations import _Stats, _units, graph_ops
from fxfuse.models.calibration import calibration_batches
from fxfuse.commands.cli import main
from fxfuse.models.data import load_calibration
from fxfuse.models.io import load_model
from fxfuse.frontend.spaces import Leaf, Product, expr_leaves
from fxfuse.frontend.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("quiet_one_thread")
TOL = 1e-4


def spaces_of(exprs) -> set[int]:
    """Spaces on a node's axes (``Analysis.node_axes``), tuple outputs included."""
    if not exprs:
        return set()
    if isinstance(exprs[0], tuple) or exprs[0] is None:
        return set().union(*(spaces_of(e) for e in exprs))
    return {leaf.space for e in exprs for leaf in expr_leaves(e)}


def recovered(model, args, permuted, calib, **kwargs):
    """Fuse ``permuted`` back into ``model`` by activations; the relative output error and the report."""
    r = fxfuse.compile([permuted, model], args, target=1, cost="activations", calib=calib, **kwargs)
    return compare_outputs(model, r.module, args), r.report


# ---------------------------------------------------------------- two spaces on one activation


def test_moved_axes_are_reduced_not_sampled():
    """Units of space 5 from a tensor that also carries moved space 6: invariant to 6's order."""
    x = torch.randn(7, 3, 4)
    exprs = (Leaf(-1, 7), Leaf(5, 3), Leaf(6, 4))
    (feature, plain), = _units(x, exprs, 5, None)
    assert feature == 0 and plain.shape == (28, 3)  # 6 not moved: its axis holds samples
    (f1, mean), (f2, square) = _units(x, exprs, 5, None, moved=frozenset({5, 6}))
    assert (f1, f2) == (1, 2) and mean.shape == square.shape == (7, 3)
    torch.testing.assert_close(mean, x.double().mean(2))
    torch.testing.assert_close(square, (x.double() ** 2).mean(2))
    shuffled = x[:, :, torch.randperm(4, generator=torch.Generator().manual_seed(0))]
    for a, (_, b) in zip((mean, square), _units(shuffled, exprs, 5, None, moved=frozenset({5, 6}))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batches", [16, 64, 256])
def test_a_constant_activation_correlates_with_nothing(batches):
    """Both models constant along units of space 5 (another moved space 6 beside it, reduced by its mean and
    mean square): ``E[x²] − E[x]²`` cancels to rounding noise in float64, which must not read as a variance
    (it gave ``|ρ|`` up to 673)."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 8, generator=g)
    shuffled = c[:, torch.randperm(8, generator=g)]
    varying = torch.randn(batches * 64, 4, 8, generator=g)
    exprs = (Leaf(-1, 64), Leaf(6, 4), Leaf(5, 8))
    stats: dict[tuple[str, int], _Stats] = {}
    for b in range(batches):
        for kind, x, y in (("constant", c.expand(64, 4, 8), shuffled.expand(64, 4, 8)),
                           ("varying", varying[b * 64:(b + 1) * 64], varying[b * 64:(b + 1) * 64, :, [1, 0, *range(2, 8)]])):
            for (feature, a), (_, s) in zip(_units(x, exprs, 5, None, frozenset({5, 6})),
                                            _units(y, exprs, 5, None, frozenset({5, 6}))):
                stats.setdefault((kind, feature), _Stats(8, 8)).add(a, s)
    for feature in (1, 2):
        assert not stats[("constant", feature)].correlation().any()
        rho = stats[("varying", feature)].correlation()  # the floor leaves real variances alone
        assert abs(rho[0, 1] - 1) < 1e-9 and abs(rho[2, 2] - 1) < 1e-9 and abs(rho).max() <= 1 + 1e-9


class TypedGroups(nn.Module):
    """Token embeddings plus a token-type embedding read at type 0 only (constant over samples, as in BERT-like
    models called without token types), then 1×1 convolutions of 4 then 2 groups: a 2 × 2 × 8 hidden
    stream whose middle level is reduced where the outer level's units are read."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.embed, self.types = nn.Embedding(zoo.VOCAB, width), nn.Embedding(2, width)
        self.up = nn.Conv1d(width, 2 * width, 1, groups=4)
        self.down = nn.Conv1d(2 * width, width, 1, groups=2)
        self.head = nn.Linear(width, 3)

    def forward(self, ids):
        h = self.embed(ids) + self.types(torch.zeros_like(ids))
        y = self.down(torch.nn.functional.gelu(self.up(h.transpose(1, 2)))).transpose(1, 2)
        return self.head((h + y)[:, 0])


def typed_groups():
    torch.manual_seed(0)
    model = TypedGroups()
    zoo._informative(model)
    return model.eval(), (zoo._ids(),)


@pytest.mark.parametrize("calib", [16, 256])  # before the variance floor: relative errors 0.056 and 0.31
def test_constant_activation_beside_nested_groups_fuses_back(calib):
    model, args = typed_groups()
    a = fxfuse.analyze(model, args)
    assert any(s.parent is not None for s in a.spaces) and a.nesting_notes == ()  # the premise: nested groups
    permuted = fxfuse.permute(model, args, seed=1)
    err, _ = recovered(model, args, permuted, calib)
    assert err <= TOL, f"fused model differs from the model by {err:.3e}"


@pytest.mark.parametrize("calib", [64, 256])  # before the variance floor: relative errors 0.67 and 0.42
def test_squeezebert_fuses_back_by_activations(calib):
    """SqueezeBERT's token-type embeddings are constant (no token types given) and its grouped convolutions
    nest groups inside groups; with more calibration the rounding noise of the constant grew into the costs."""
    model, args = zoo.squeezebert()
    permuted = fxfuse.permute(model, args, seed=1)
    err, _ = recovered(model, args, permuted, calib)
    assert err <= TOL, f"fused model differs from the model by {err:.3e}"


def test_multi_query_heads_and_head_dim_share_an_activation():
    """The premise of the gpt_bigcode zoo model: two free top-level spaces in one product axis."""
    model, args = zoo.gpt_bigcode()
    a = fxfuse.analyze(model, args)
    roots = {s.id for s in a.spaces if s.free and s.size > 1 and s.parent is None}
    shared = [name for name, exprs in a.node_axes.items()
              if isinstance(exprs, tuple) and any(isinstance(e, Product) and len(roots & {leaf.space for leaf in
                                                                                           expr_leaves(e)}) >= 2
                                                  for e in exprs)]
    assert shared, "no activation carries two free top-level spaces in one axis"


# the permuted copy fusing back by activations: tests/test_fuse.py, zoo model gpt_bigcode


# ---------------------------------------------------------------- higher-order subgraphs


def no_grad_block():
    return zoo.no_grad_block(0)


def test_subgraph_nodes_are_named_and_read():
    model, args = no_grad_block()
    a = fxfuse.analyze(model, args)
    hops = [n.target.name() for n in a.traced.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)]
    assert hops == ["wrap_with_set_grad_enabled"]  # the premise: the block is a subgraph
    hidden = a.layout_of("b1.weight").axes[0].space
    assert a.spaces[hidden].free
    calls = [n for n in graph_ops(a.traced.graph_module) if hidden in spaces_of(a.node_axes.get(n))]
    inner, top = [n for n in calls if "/" in n], [n for n in calls if "/" not in n]
    assert inner and not top, (inner, top)  # only the subgraph exposes it


def test_subgraph_permuted_copy_fuses_back_by_activations():
    model, args = no_grad_block()
    permuted = fxfuse.permute(model, args, seed=1)
    err, report = recovered(model, args, permuted, 32)
    assert err <= TOL, f"no_grad block: fused by activations, output differs by {err:.3e}"
    assert not report["notes"]


def silent_block():
    """The no_grad block with hidden units constant on every input (zero weights, negative biases)."""
    model, args = no_grad_block()
    with torch.no_grad():
        model.b1.weight.zero_()
        model.b1.bias.copy_(-1.0 - torch.rand(24))  # relu(b1(h)) = 0 whatever h
    hidden = fxfuse.analyze(model, args).layout_of("b1.weight").axes[0].space
    return model, args, hidden


def test_space_without_signal_is_matched_by_weights_noted_and_warned():
    """Constant hidden units carry no activation signal: weight matching aligns them, and says so."""
    model, args, hidden = silent_block()
    permuted = fxfuse.permute(model, args, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = fxfuse.compile([permuted, model], args, target=1, cost="activations", calib=32)
    named = [re.match(r"no activation signal for space\(s\) ([s\d, ]+) \(.*matched by weights$", n)
             for n in r.report["notes"]]
    assert [m.group(1).split(", ") for m in named if m] == [[f"s{hidden}"]], r.report["notes"]
    assert any(f"s{hidden}" in str(w.message) for w in caught)
    entry = next(s for s in r.report["spaces"] if s["id"] == hidden)
    assert entry["models"][0]["units_moved"] > 0
    aligned = r.aligned[0].state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(aligned[name], t), name


def test_space_without_signal_is_kept_at_the_identity_where_weights_cannot_stand_in():
    """Soft maps: the silent space keeps the identity, and the note and a warning say so."""
    model, args, hidden = silent_block()
    permuted = fxfuse.permute(model, args, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = fxfuse.compile([permuted, model], args, target=1, cost="activations", calib=32, solver="sinkhorn")
    silent = [re.match(r"no signal for space\(s\) ([s\d, ]+) \(", n) for n in r.report["notes"]]
    assert [m.group(1).split(", ") for m in silent if m] == [[f"s{hidden}"]], r.report["notes"]
    assert any(f"s{hidden}" in str(w.message) for w in caught)


# ---------------------------------------------------------------- several inputs


def seq2seq_pair():
    model, args = zoo.seq2seq()
    return model, args, fxfuse.permute(model, args, seed=1)


def test_random_calibration_batches_every_input():
    model, args = zoo.seq2seq()
    batches = calibration_batches(20, args, {}, seed=0, forward=model)
    assert len(batches) == 1
    (src, tgt), kwargs = batches[0]
    assert src.shape == (16, 8) and tgt.shape == (16, 6) and not kwargs
    assert not torch.equal(src[:, :6], tgt)
    # fusing back from random calibration: tests/test_fuse.py, zoo model seq2seq


def seq2seq_file(path, n=32, **extra):
    g = torch.Generator().manual_seed(5)
    tensors = {"src": torch.randint(0, zoo.VOCAB, (n, 8), generator=g),
               "tgt": torch.randint(0, zoo.VOCAB, (n, 6), generator=g), **extra}
    save_file(tensors, str(path))
    return path


def test_seq2seq_fuses_back_from_a_file_of_named_inputs(tmp_path):
    model, args, permuted = seq2seq_pair()
    calib = load_calibration(seq2seq_file(tmp_path / "calib.safetensors", labels=torch.zeros(32, dtype=torch.long)))
    assert set(calib) == {"src", "tgt"}  # labels are left out
    err, _ = recovered(model, args, permuted, calib)
    assert err <= TOL


@pytest.mark.parametrize("calib,match", [
    (torch.randint(0, 9, (16, 8)), r"the models take 2 batched inputs \(src, tgt\): give calibration data with one "
                                   "tensor per input, by name"),
    ({"src": torch.randint(0, 9, (16, 8))}, r"calibration data has no 'tgt' \(the models take src, tgt"),
    ({"src": torch.randint(0, 9, (16, 8)), "tgt": torch.randint(0, 9, (16, 6)), "tgt_mask": torch.ones(16, 6)},
     r"calibration data has 'tgt_mask', which names no input of the models \(they take src, tgt\)"),
    ({"src": torch.randint(0, 9, (16, 8)), "tgt": torch.randint(0, 9, (12, 6))},
     r"calibration inputs have different numbers of samples \(src: 16, tgt: 12\)"),
    ({"src": torch.randint(0, 9, (16, 8)), "tgt": torch.randn(16, 6)},
     r"calibration data for 'tgt' has dtype torch.float32; the models take torch.int64"),
])
def test_bad_named_calibration(calib, match):
    model, args, permuted = seq2seq_pair()
    with pytest.raises(fxfuse.FusionError, match=match):
        fxfuse.compile([permuted, model], args, target=1, cost="activations", calib=calib)


def test_cli_seq2seq_with_a_calibration_file(tmp_path, capsys):
    spec = "zoo:seq2seq"
    assert main(["permute", spec, "-o", str(tmp_path / "p"), "--seed", "1", "-q"]) == 0
    calib = seq2seq_file(tmp_path / "calib.safetensors")
    out = tmp_path / "fused"
    code = main(["compile", str(tmp_path / "p"), spec, "--target", "1", "-o", str(out), "-q",
                 "--cost", "activations", "--calib", str(calib)])
    assert code == 0, capsys.readouterr().err
    model, args = zoo.seq2seq()
    assert compare_outputs(model, load_model(str(out)).module, args) <= TOL


def test_cli_hf_encoder_decoder_with_named_inputs(tmp_path, capsys):
    """A tiny T5 encoder-decoder as an HF directory; the file gives ids, decoder ids and a mask."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=zoo.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, use_cache=False, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).eval()
    zoo._informative(model)
    model.save_pretrained(tmp_path / "t5")
    assert main(["permute", str(tmp_path / "t5"), "-o", str(tmp_path / "p"), "--seed", "1", "-q"]) == 0
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(16, 16, dtype=torch.long)  # the CLI's example inputs are (2, 16)
    mask[:, 12:] = 0  # padded sources
    save_file({"input_ids": torch.randint(3, zoo.VOCAB, (16, 16), generator=g),
               "decoder_input_ids": torch.randint(3, zoo.VOCAB, (16, 16), generator=g),
               "attention_mask": mask}, str(tmp_path / "calib.safetensors"))
    out = tmp_path / "fused"
    code = main(["compile", str(tmp_path / "p"), str(tmp_path / "t5"), "--target", "1", "-o", str(out), "-q",
                 "--cost", "activations", "--calib", str(tmp_path / "calib.safetensors")])
    assert code == 0, capsys.readouterr().err
    fused = load_model(str(out)).module
    ids = torch.randint(3, zoo.VOCAB, (2, 9), generator=g)
    dec = torch.randint(3, zoo.VOCAB, (2, 5), generator=g)
    assert compare_outputs(model, fused, (), {"input_ids": ids, "decoder_input_ids": dec}) <= TOL


# ---------------------------------------------------------------- weight matching


def test_weight_matching_notes_a_space_without_compared_tensors():
    """A planned space that no floating-point tensor carries (an integer index buffer, or all left out)."""
    from fxfuse.planner.plan import align
    from fxfuse.planner.weight_cost import WeightCost

    model, args = zoo.mlp()
    a = fxfuse.analyze(model, args)
    hidden = a.layout_of("net.0.weight").axes[0].space
    left_out = frozenset(m.param for m in a.spaces[hidden].members)
    state = model.state_dict()
    with pytest.warns(UserWarning, match=rf"no signal for space\(s\) s{hidden} \(no floating-point member"):
        alignment = align(a, WeightCost(a, state, state, skip=left_out))
    assert torch.equal(alignment.maps[hidden].perm, torch.arange(a.spaces[hidden].size))
    assert len(alignment.notes) == 1 and f"s{hidden}" in alignment.notes[0]


def test_heads_without_a_tensor_of_their_own_are_solved_in_the_first_pass():
    """head_bias: heads and head dims are separate spaces and every tensor with heads also has a head
    dim. The first pass must still see those tensors (their unsolved axes reduced, not left out), or it
    fixes heads at the identity and the descent settles on a wrong basis."""
    from fxfuse.planner.plan import align
    from fxfuse.planner.weight_cost import WeightCost

    model, args = zoo.head_bias()
    a = fxfuse.analyze(model, args)
    heads = a.layout_of("layers.0.q").axes[1].space
    assert a.spaces[heads].free and a.spaces[heads].parent is None
    assert all(len(layout.axes) > 1 for layout in a.layouts.values()
               if any(leaf.space == heads for e in layout.axes for leaf in expr_leaves(e)))
    perms = fxfuse.random_permutations(a, seed=1)
    permuted = fxfuse.apply_permutations(a, perms)
    first = align(a, WeightCost(a, model.state_dict(), permuted.state_dict()), max_passes=1)
    for sid, p in perms.items():  # target unit j takes source unit q[j]; the source's unit k is p[k]
        assert torch.equal(p[first.maps[sid].perm], torch.arange(p.shape[-1])), f"s{sid} is wrong after pass 1"


@pytest.mark.parametrize("perm_seed", [2, 3])  # seeds where the descent used to stop at 0.18 relative error
def test_head_bias_permuted_copy_fuses_back_by_weights(perm_seed):
    model, args = zoo.head_bias()
    permuted = fxfuse.permute(model, args, seed=perm_seed)
    r = fxfuse.compile([permuted, model], args, target=1, cost="weights")
    err = compare_outputs(model, r.module, args)
    assert err <= TOL, f"head_bias, permutation seed {perm_seed}: fused by weights, output differs by {err:.3e}"


# ---------------------------------------------------------------- spaces without activation signal


class ConstantBranch(nn.Module):
    """An MLP plus a branch on a saved constant: the branch's hidden units are the same on every input."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 5)
        self.register_buffer("const", torch.randn(1, 8))
        self.ca, self.cb = nn.Linear(8, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + self.cb(torch.relu(self.ca(self.const)))


def test_a_space_without_activation_signal_is_matched_by_weights():
    torch.manual_seed(0)
    model = ConstantBranch().eval()
    args = (torch.randn(4, 16, generator=torch.Generator().manual_seed(1)),)
    permuted = fxfuse.permute(model, args, seed=3)
    assert not torch.equal(permuted.ca.weight, model.ca.weight)  # the branch's units moved too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxfuse.compile([model, permuted], args, cost="activations", calib=64)
    assert not any("kept at the identity" in str(w.message) for w in caught)
    assert any("no activation signal for space(s)" in n and "matched by weights" in n
               for n in result.report["notes"]), result.report["notes"]
    fused = result.module.state_dict()
    for name, t in model.state_dict().items():
        assert torch.allclose(fused[name], t, atol=1e-6), name


# ---------------------------------------------------------------- assignments the signal does not determine


def test_noise_driven_spaces_are_matched_by_weights_noted_and_warned():
    """EfficientNet's deep units vary by rounding noise only: their correlations follow noise (a permuted copy
    fused back 0.27-0.30 off, silently). The two halves of the samples disagree there; weights match them."""
    model, args = zoo.efficientnet()
    permuted = fxfuse.permute(model, args, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err, report = recovered(model, args, permuted, 16)
    assert err <= TOL, f"fused model differs from the model by {err:.3e}"
    noted = [n for n in report["notes"] if "is not determined by its signal" in n and n.endswith("matched by weights")]
    assert len(noted) == 1, report["notes"]
    assert any("is not determined by its signal" in str(w.message) for w in caught)


def test_a_permuted_copy_with_signal_flags_nothing():
    """Where every unit carries signal both halves solve the same permutation: no note, the maps are the full
    data's."""
    model, args = zoo.bert()
    permuted = fxfuse.permute(model, args, seed=1)
    err, report = recovered(model, args, permuted, 16)
    assert err <= TOL
    assert not any("determined by its signal" in n for n in report["notes"]), report["notes"]


def test_rows_of_data_dependent_size_are_no_samples():
    """Two independently drawn JetMoE models route different tokens to each expert: the dispatched rows differ
    in number and in meaning between them, so they are read at no node (they used to crash the statistics)."""
    a, args = zoo.jetmoe(0)
    b, _ = zoo.jetmoe(1)
    r = fxfuse.compile([b, a], args, target=1, cost="activations", calib=16)
    assert r.report["cost"] == "activations" and type(r.module) is type(a)


class _PoolsEnd(nn.Module):
    """Pools the hidden state at the end-of-sequence token (id 2), as encoder-decoder classifiers do: the
    exported graph checks that every sample holds one."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(16, 8), nn.Linear(8, 12), nn.Linear(12, 3)

    def forward(self, ids):
        h = self.fc(self.emb(ids)).relu()
        return self.out(h[ids.eq(2)].view(ids.shape[0], -1, 12)[:, -1])


def test_samples_that_fail_an_input_check_of_the_graph_are_named_in_one_line():
    torch.manual_seed(0)
    model = _PoolsEnd().eval()
    ids = torch.randint(3, 16, (2, 6))
    ids[:, -1] = 2
    good = torch.randint(3, 16, (32, 6))
    good[:, -1] = 2
    fused = fxfuse.compile([model, model], (ids,), cost="activations", calib=good)  # real samples: fine
    assert torch.equal(fused.module(ids), model(ids))
    with pytest.raises(InputCheckError) as err:  # random ids: no end-of-sequence token
        fxfuse.compile([model, model], (ids,), cost="activations", calib=torch.randint(3, 16, (32, 6)))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("node '") and "--calib" in msg, msg
