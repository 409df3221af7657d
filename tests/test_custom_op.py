"""The custom-op worked example of rules/README.md: unruled -> pinned, ruled -> free and correct."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fxfuse
from fxfuse.frontend.spaces import Leaf

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_op"
RULES = EXAMPLE / "rules.yaml"
OP = "fxfuse_demo.scaled_gelu.default"
MODULE_NAME = "fxfuse_example_custom_op_model"


def _load_example():
    if MODULE_NAME in sys.modules:  # the custom op is registered once per process
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, EXAMPLE / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture
def built(example):
    return example.build(seed=0)


def _space(analysis, param: str, axis: int):
    expr = analysis.layouts[param].axes[axis]
    assert isinstance(expr, Leaf), f"{param}:{axis} is structured: {expr}"
    return analysis.space(expr.space)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- without the rule


def test_shipped_rules_do_not_know_the_op():
    assert fxfuse.load_rules().lookup(OP) is None


def test_unruled_op_is_reported_and_its_axes_pinned(built):
    model, args = built
    analysis = fxfuse.analyze(model, args)
    assert [u.op for u in analysis.unruled] == [OP]
    unruled = analysis.unruled[0]
    assert unruled.node == "scaled_gelu"
    assert unruled.reason == "no rule for this op"
    # the space feeding the op (fc1's outputs), the op's parameter and the space it feeds are pinned
    for param, axis in [("fc1.weight", 0), ("fc1.bias", 0), ("scale", 0), ("fc2.weight", 1)]:
        space = _space(analysis, param, axis)
        assert not space.free, f"{param}:{axis} should be pinned"
        assert OP in space.reason
    assert analysis.free_spaces == ()
    assert analysis.coverage == 0.0
    report = analysis.report()
    assert report["unruled_ops"] == [{"op": OP, "node": "scaled_gelu", "module": "", "reason": "no rule for this op"}]


def test_strict_raises_naming_the_op(built):
    model, args = built
    with pytest.raises(fxfuse.StrictError, match=r"no usable rule for fxfuse_demo\.scaled_gelu\.default at node scaled_gelu"):
        fxfuse.analyze(model, args, strict=True)


def test_permute_without_rule_changes_nothing(built):
    model, args = built
    permuted = fxfuse.permute(model, args, seed=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(permuted.state_dict()[name], tensor), name


# ---------------------------------------------------------------- with the rule


@pytest.fixture(scope="module")
def rules():
    return fxfuse.load_rules(extra=[RULES])


def test_rule_file_is_valid_and_overrides_nothing_shipped(rules):
    parsed = fxfuse.frontend.rules.parse_rule_file(RULES)
    assert [r.ops for r in parsed] == [(OP,)]
    assert rules.lookup(OP) == parsed[0]
    assert rules.files[-1] == str(RULES)
    assert len(rules) == len(fxfuse.load_rules()) + 1


def test_rule_frees_the_hidden_channels(built, rules):
    model, args = built
    before = fxfuse.analyze(model, args)
    after = fxfuse.analyze(model, args, rules=rules)
    assert after.unruled == ()
    assert after.coverage > before.coverage
    assert after.coverage == pytest.approx(832 / 840)  # all but fc2.bias (8) lie on the hidden space
    hidden = _space(after, "fc1.weight", 0)
    assert hidden.free and hidden.size == 32
    for param, axis in [("fc1.bias", 0), ("scale", 0), ("fc2.weight", 1)]:
        assert _space(after, param, axis).id == hidden.id
    # the interface stays pinned
    assert not _space(after, "fc1.weight", 1).free
    assert not _space(after, "fc2.weight", 0).free
    fxfuse.analyze(model, args, rules=rules, strict=True)  # no error


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_permuted_model_computes_the_same_function(built, rules, seed):
    model, args = built
    original = {k: v.clone() for k, v in model.state_dict().items()}
    permuted = fxfuse.permute(model, args, seed=seed, rules=rules)
    with torch.no_grad():
        ref, out = model(*args), permuted(*args)
    assert _rel_diff(out, ref) <= 1e-5
    # the weights really moved: fc1's rows are a permutation of the original rows, not the same order
    w, w2 = model.fc1.weight.detach(), permuted.fc1.weight.detach()
    assert not torch.equal(w2, w)
    order = [next(i for i in range(len(w)) if torch.equal(w[i], row)) for row in w2]
    assert sorted(order) == list(range(len(w)))
    assert torch.equal(permuted.scale.detach(), model.scale.detach()[order])
    assert torch.equal(permuted.fc2.weight.detach(), model.fc2.weight.detach()[:, order])
    # the original model is left alone
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_broadcast_kind_is_an_equivalent_rule(built, tmp_path):
    model, args = built
    path = tmp_path / "broadcast.yaml"
    path.write_text(f"- op: {OP}\n  kind: broadcast\n")
    rules = fxfuse.load_rules(extra=[path])
    analysis = fxfuse.analyze(model, args, rules=rules)
    assert analysis.unruled == ()
    assert _space(analysis, "fc1.weight", 0).id == _space(analysis, "fc2.weight", 1).id
    permuted = fxfuse.permute(model, args, seed=3, rules=rules)
    with torch.no_grad():
        assert _rel_diff(permuted(*args), model(*args)) <= 1e-5


# ---------------------------------------------------------------- a wrong rule


def test_wrong_rule_breaks_the_model(built, tmp_path):
    """Declaring the output channels free and unrelated to the input is accepted, and wrong."""
    model, args = built
    path = tmp_path / "wrong.yaml"
    path.write_text(
        f'- op: {OP}\n'
        f'  axes: {{x: "... c", scale: "c", out: "... d"}}\n'
        f'  free: [d]\n'
        f'  note: WRONG - output channel d is not independent of input channel c\n'
    )
    rules = fxfuse.load_rules(extra=[path])
    analysis = fxfuse.analyze(model, args, rules=rules)
    assert analysis.unruled == ()  # fxfuse cannot tell that a rule is false
    into, out_of = _space(analysis, "fc1.weight", 0), _space(analysis, "fc2.weight", 1)
    assert into.free and out_of.free and into.id != out_of.id
    permuted = fxfuse.apply_permutations(analysis, fxfuse.random_permutations(analysis, seed=0))
    with torch.no_grad():
        assert _rel_diff(permuted(*args), model(*args)) > 1e-2
    # fxfuse.permute checks its copy: it refuses, naming the op and the rule file
    with pytest.raises(fxfuse.UnsoundError, match=rf"moved unsoundly; it passes through .*{OP} \(wrong.yaml:0\)"):
        fxfuse.permute(model, args, seed=0, rules=rules)


def test_misspelled_argument_is_rejected_against_the_schema(built, tmp_path):
    """Once the op is registered, a rule naming an argument it lacks fails to load, naming file, rule and field."""
    path = tmp_path / "typo.yaml"
    path.write_text(f'- op: {OP}\n  axes: {{inp: "... c", scale: "c", out: "... c"}}\n')
    with pytest.raises(fxfuse.RuleError) as err:
        fxfuse.load_rules(extra=[path])
    assert str(err.value) == (f"{path}: rule 0, field 'axes': {OP}: no argument 'inp' (arguments: x, scale)")


@pytest.mark.parametrize("kind", ["reshape", "transpose", "permute", "cat", "slice", "select", "expand",
                                  "index", "positional", "pad", "subgraph"])
def test_kind_that_does_not_fit_the_op_fails_closed(built, tmp_path, kind):
    model, args = built
    path = tmp_path / f"{kind}.yaml"
    path.write_text(f"- op: {OP}\n  kind: {kind}\n")
    analysis = fxfuse.analyze(model, args, rules=fxfuse.load_rules(extra=[path]))
    assert [u.op for u in analysis.unruled] == [OP]
    assert "does not fit" in analysis.unruled[0].reason


@pytest.mark.parametrize("kind", ["reduce", "split", "ignore"])
def test_kind_that_does_not_fit_is_reported(built, tmp_path, kind):
    model, args = built
    path = tmp_path / f"{kind}.yaml"
    path.write_text(f"- op: {OP}\n  kind: {kind}\n")
    analysis = fxfuse.analyze(model, args, rules=fxfuse.load_rules(extra=[path]))
    assert [(u.op, u.reason.split(":")[0]) for u in analysis.unruled] == [(OP, f"rule {kind}.yaml")]
    assert "does not fit" in analysis.unruled[0].reason
    assert analysis.coverage == 0.0
    with pytest.raises(fxfuse.StrictError, match="does not fit"):
        fxfuse.analyze(model, args, rules=fxfuse.load_rules(extra=[path]), strict=True)
