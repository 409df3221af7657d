"""Soundness: a permuted or aligned copy computes what the model computes, or fxfuse refuses it."""
from __future__ import annotations

import pytest
import torch

import fxfuse
import zoo
from fxfuse.frontend.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- concatenation meeting a reshape


def shuffle_case():
    return zoo.channel_shuffle(0)


@pytest.mark.parametrize("seed", range(4))
def test_channel_shuffle_permutes_soundly(seed):
    model, args = shuffle_case()
    permuted = fxfuse.permute(model, args, seed=seed)
    assert compare_outputs(model, permuted, args) < 1e-6


def test_channel_shuffle_pins_both_views_of_the_shuffled_axis():
    model, args = shuffle_case()
    a = fxfuse.analyze(model, args)
    for param, axis in (("a.weight", 0), ("b.weight", 0), ("head.weight", 1)):
        for leaf in fxfuse.frontend.spaces.expr_leaves(a.layouts[param].axes[axis]):
            s = a.spaces[leaf.space]
            assert not s.free and "conflicting structure" in s.reason, (param, s)


# ---------------------------------------------------------------- the self-check of permute and compile

WRONG_CUMSUM = """\
# deliberately wrong: the order of cumsum's dim matters
- op: aten.cumsum.default
  kind: broadcast
"""

CUMSUM_MODEL = """\
import torch
from torch import nn


class CumsumNet(nn.Module):
    def __init__(self, no_grad=False):
        super().__init__()
        self.no_grad = no_grad
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def body(self, x):
        return self.fc2(torch.cumsum(torch.relu(self.fc1(x)), dim=-1))

    def forward(self, x):
        if not self.no_grad:
            return self.body(x)
        with torch.no_grad():  # a higher-order subgraph: its ops are not nodes of the top graph
            y = self.body(x)
        return y * 2


def make(seed=0, no_grad=False):
    torch.manual_seed(seed)
    return CumsumNet(no_grad).eval(), (torch.randn(4, 8, generator=torch.Generator().manual_seed(0)),)


def make_no_grad():
    return make(no_grad=True)
"""


@pytest.fixture
def cumsum(tmp_path):
    """``(module namespace, wrong rules, path of the rule file, path of the model file)``."""
    rule_file, model_file = tmp_path / "wrong_cumsum.yaml", tmp_path / "cumsum_net.py"
    rule_file.write_text(WRONG_CUMSUM)
    model_file.write_text(CUMSUM_MODEL)
    namespace: dict = {}
    exec(compile(CUMSUM_MODEL, str(model_file), "exec"), namespace)
    return namespace, fxfuse.load_rules(extra=[rule_file]), rule_file, model_file


def _assert_names_cumsum(msg: str, what: str) -> None:
    assert "\n" not in msg
    assert msg.startswith(f"{what} changed its function (relative error ")
    assert "space s0 (fc1.weight:0, size 16) is moved unsoundly; it passes through " in msg
    assert "aten.cumsum.default (wrong_cumsum.yaml:0)" in msg
    assert "aten.linear.default (nn.yaml:" in msg
    assert msg.endswith("; one of these rules is wrong")


def test_permute_refuses_to_return_an_unsound_copy(cumsum):
    ns, wrong, _, _ = cumsum
    model, args = ns["make"]()
    with pytest.raises(fxfuse.UnsoundError) as info:
        fxfuse.permute(model, args, seed=1, rules=wrong)
    assert isinstance(info.value, fxfuse.FxfuseError)
    _assert_names_cumsum(str(info.value), "permuting CumsumNet")
    assert compare_outputs(model, fxfuse.permute(model, args, seed=1), args) < 1e-6  # shipped rules: sound


def test_cli_permute_gives_the_same_message_and_writes_nothing(cumsum, tmp_path, capsys):
    from fxfuse.commands.cli import main

    _, _, rule_file, model_file = cumsum
    out = tmp_path / "out"
    code = main(["permute", f"{model_file}:make", "-o", str(out), "--rules", str(rule_file), "-q", "--seed", "1"])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == "" and not out.exists()
    assert err.startswith("fxfuse: error: ") and err.count("\n") == 1
    _assert_names_cumsum(err.strip().removeprefix("fxfuse: error: "), "permuting CumsumNet")


def test_compile_names_ops_inside_a_subgraph(cumsum):
    ns, wrong, _, _ = cumsum
    model, args = ns["make_no_grad"]()
    analysis = fxfuse.analyze(model, args, rules=wrong)
    assert analysis.spaces[0].free, "the wrong rule frees the hidden space, which lives inside the subgraph"
    permuted = fxfuse.apply_permutations(analysis, fxfuse.random_permutations(analysis, seed=1))
    with pytest.raises(fxfuse.FusionError) as info:
        fxfuse.compile([model, permuted], args, rules=wrong)
    msg = str(info.value)
    _assert_names_cumsum(msg, "aligning model 1")
    assert "higher_order.wrap_with_set_grad_enabled (higher_order.yaml:" in msg


@pytest.mark.parametrize("name", ["mlp", "cnn", "mha", "bert"])
def test_every_space_is_blamed_on_some_op(name):
    import zoo
    from fxfuse.frontend.rules import load_rules
    from fxfuse.frontend.verify import ops_through

    model, args = zoo.ZOO[name]()
    analysis, rules = fxfuse.analyze(model, args), load_rules()
    for s in analysis.spaces:
        if s.size > 1:
            assert ops_through(analysis, rules, [s.id]), s


# ---------------------------------------------------------------- groups nested inside groups


def grouped_case(groups):
    return zoo.grouped_convs(0, groups)


def planned(analysis) -> set[int]:
    from fxfuse.planner.plan import blocks

    return {s for b in blocks(analysis, set()) for s in ((b.root,) if b.root_free else ()) + b.children}


def test_nesting_is_cut_to_one_level_and_reported():
    model, args = grouped_case((2, 4))
    a = fxfuse.analyze(model, args)
    parents = a.parents
    assert parents, "the groups nest"
    assert all(p not in parents for p in parents.values()), "no space is nested under a nested space"
    permuted = set(fxfuse.random_permutations(a, seed=0))
    assert permuted == planned(a), "permute and the planner move the same spaces"
    # the middle level (4 groups inside each of 2) moves by one permutation for both outer groups
    (note,) = a.notes
    assert "moves by one permutation shared by all of them: nesting is planned one level deep" in note
    assert a.report()["notes"] == [note]
    from fxfuse.frontend.render import render_text

    assert note in render_text(a, "grouped")


@pytest.mark.parametrize("groups", [(2,), (2, 4)])
@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_permuted_grouped_convs_fuse_back_exactly(groups, cost, quiet_one_thread):
    model, args = grouped_case(groups)
    permuted = fxfuse.permute(model, args, seed=3)
    assert not torch.equal(permuted.convs[0].weight, model.convs[0].weight)
    result = fxfuse.compile([model, permuted], args, cost=cost, calib=64)
    assert result.report["notes"][:len(result.analysis.notes)] == list(result.analysis.notes)
    fused = result.module.state_dict()
    for name, t in model.state_dict().items():
        assert torch.allclose(fused[name], t, atol=1e-6), name


@pytest.mark.parametrize("name", ["mlp", "cnn", "mha", "bert", "llama", "mobilenet_v2"])
def test_permute_and_the_planner_move_the_same_spaces(name):
    model, args = zoo.ZOO[name]()
    a = fxfuse.analyze(model, args)
    assert set(fxfuse.random_permutations(a, seed=0)) == planned(a)
    assert all(p not in a.parents for p in a.parents.values())


def test_soft_maps_refuse_units_nested_under_another_axis_in_one_line(quiet_one_thread):
    model, args = grouped_case((2,))
    with pytest.raises(fxfuse.FxfuseError, match=r"^space s\d+ is nested under a space of another axis .*not soft maps"):
        fxfuse.compile([model, fxfuse.permute(model, args, seed=3)], args, solver="sinkhorn")
