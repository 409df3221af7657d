"""Rules checked against op schemas when loaded, and rules that fit no node reported by the analysis."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.commands.cli import main
from fxfuse.frontend.render import render_text
from fxfuse.frontend.rules import parse_rule_file
from fxfuse.core.schema import op_schema, unresolved_ops


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- schema errors: file, rule N, field, op

SCHEMA_ERRORS = {
    "misspelt_argument": ('- op: aten.linear.default\n  axes: {inp: "... i", weight: "o i", out: "... o"}\n',
                          "axes", "aten.linear.default: no argument 'inp' (arguments: input, weight, bias)"),
    "one_op_of_a_list": ('- op: [aten.layer_norm.default, aten.rms_norm.default]\n'
                         '  axes: {input: "... c", weight: "c", bias: "c", out: "... c"}\n',
                         "axes", "aten.rms_norm.default: no argument 'bias'"),
    "not_a_tensor": ('- op: aten.layer_norm.default\n  axes: {input: "... c", normalized_shape: "c", out: "... c"}\n',
                     "axes", "argument 'normalized_shape' is not a tensor"),
    "tensor_list": ('- op: aten.cat.default\n  axes: {tensors: "a", out: "a"}\n',
                    "axes", "argument 'tensors' is a list of tensors"),
    "out_of_a_tuple_op": ('- op: aten.native_layer_norm.default\n  axes: {input: "... c", out: "... c"}\n',
                          "axes", "'out': the op returns 3 results; name them out0..out2"),
    "result_out_of_range": ('- op: aten.native_layer_norm.default\n  axes: {input: "... c", out3: "... c"}\n',
                            "axes", "'out3': the op returns only 3 results"),
    "numbered_single_result": ('- op: aten.relu.default\n  axes: {self: "... c", out0: "... c"}\n',
                               "axes", "'out0': the op returns one result; call it 'out'"),
    "list_result": ('- op: aten.split.Tensor\n  axes: {self: "a", out0: "a"}\n',
                    "axes", "the op returns a list of tensors"),
    "size_from_a_tensor": ('- op: aten.conv2d.default\n'
                           '  axes: {input: "... (g i) h w", weight: "(g o) i kh kw", out: "... (g o) oh ow"}\n'
                           '  sizes: {g: bias}\n', "sizes", "size of 'g': 'bias' is not an integer argument"),
    "size_from_nothing": ('- op: aten.group_norm.default\n'
                          '  axes: {input: "b (g c) ...", out: "b (g c) ..."}\n  sizes: {g: groups}\n',
                          "sizes", "size of 'g': 'groups' is not an argument"),
    "option_names_no_argument": ('- op: aten.swapdims.default\n  kind: transpose\n  options: {dim0: axis0, dim1: axis1}\n',
                                 "options", "option 'dim0': no argument 'axis0' (arguments: self, dim0, dim1)"),
    "packet_without_the_argument": ('- op: aten.arange\n  axes: {input: "a", out: "a"}\n',
                                    "axes", "aten.arange: no argument 'input'"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_ERRORS))
def test_rule_against_schema_names_file_rule_and_field(tmp_path, case):
    text, field, reason = SCHEMA_ERRORS[case]
    path = _write(tmp_path, f"{case}.yaml", "- op: aten.relu.default\n  kind: broadcast\n" + text)
    with pytest.raises(fxfuse.RuleError) as info:
        parse_rule_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: rule 1, field '{field}': "), message
    assert reason in message and "\n" not in message
    with pytest.raises(fxfuse.RuleError):
        fxfuse.load_rules(extra=[path])  # loading a rule set checks the same way


def test_overload_packet_accepts_an_argument_of_some_overload(tmp_path):
    """``aten.add`` covers add.Tensor (other: Tensor) and add.Scalar: 'other' is a tensor in one of them."""
    rules = parse_rule_file(_write(tmp_path, "ok.yaml", '- op: aten.add\n  axes: {self: "a", other: "a", out: "a"}\n'))
    assert rules[0].ops == ("aten.add",)
    assert "other" in op_schema("aten.add").tensors and "alpha" in op_schema("aten.add").arguments
    # aten.max: max.default returns one tensor, max.dim two; either naming fits some overload
    for name, result in (("max.yaml", "out"), ("max1.yaml", "out1")):
        text = f'- op: aten.max\n  axes: {{self: "... a", {result}: "..."}}\n'
        assert len(parse_rule_file(_write(tmp_path, name, text))) == 1
    with pytest.raises(fxfuse.RuleError, match="'out2': the op returns only 2 results"):
        parse_rule_file(_write(tmp_path, "max2.yaml", '- op: aten.max\n  axes: {self: "... a", out2: "..."}\n'))


def test_ops_torch_does_not_know_are_not_checked(tmp_path):
    path = _write(tmp_path, "later.yaml", '- op: notyet.op.default\n  axes: {inp: "a", out: "a"}\n'
                                          '- op: higher_order.wrap_with_autocast\n  kind: subgraph\n')
    assert len(parse_rule_file(path)) == 2
    assert unresolved_ops(["notyet.op.default", "aten.relu.default", "aten.nonexistent_op.default",
                           "higher_order.wrap_with_autocast"]) == ["notyet.op.default", "aten.nonexistent_op.default"]


def test_every_shipped_rule_passes_the_schema_check():
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    for path in fxfuse.frontend.rules.shipped_rule_files():
        for rule in parse_rule_file(path):  # raises on the first bad rule
            assert rule.origin == (str(path), int(rule.source.rsplit(":", 1)[1]))
    assert unresolved_ops(op for path in fxfuse.frontend.rules.shipped_rule_files()
                          for rule in parse_rule_file(path) for op in rule.ops) == []


def test_custom_op_registered_after_loading_is_checked_at_analysis(tmp_path):
    path = _write(tmp_path, "late.yaml", '- op: fxfuse_schema_test.late.default\n'
                                         '  axes: {inp: "... c", out: "... c"}\n')
    rules = fxfuse.load_rules(extra=[path])  # the op does not exist yet: not checked

    @torch.library.custom_op("fxfuse_schema_test::late", mutates_args=())
    def late(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @late.register_fake
    def _(x):
        return torch.empty_like(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(late(self.a(x)))

    with pytest.raises(fxfuse.RuleError) as info:
        fxfuse.analyze(M(), (torch.randn(2, 4),), rules=rules)
    assert str(info.value) == (f"{path}: rule 0, field 'axes': fxfuse_schema_test.late.default: "
                               "no argument 'inp' (arguments: x)")


# ---------------------------------------------------------------- the CLI


def test_cli_rules_check_fails_with_one_line(tmp_path, capsys):
    text, field, reason = SCHEMA_ERRORS["misspelt_argument"]
    path = _write(tmp_path, "bad.yaml", text)
    assert main(["rules", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"fxfuse: error: {path}: rule 0, field 'axes': {reason}\n"


def test_cli_rules_check_lists_unchecked_ops(tmp_path, capsys):
    path = _write(tmp_path, "mixed.yaml", '- op: [aten.relu.default, mylib.thing.default]\n  kind: broadcast\n'
                                          '  custom: true\n')
    assert main(["rules", "check", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert out == (f"ok: {path}: 1 rules for 2 ops (1 checked against their torch schema)\n"
                   "  not in torch.ops here, so unchecked: mylib.thing.default\n")


# ---------------------------------------------------------------- rules that fit no node


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def build_two_linears():
    torch.manual_seed(0)
    return TwoLinears().eval(), (torch.randn(2, 4),)


def test_rule_that_fits_no_node_is_recorded(tmp_path):
    """A linear rule written for rank-3 inputs fits neither node: both are pinned, the rule is named."""
    path = _write(tmp_path, "rank3.yaml", '- op: aten.linear.default\n'
                                          '  axes: {input: "b s i", weight: "o i", bias: "o", out: "b s o"}\n')
    model, args = build_two_linears()
    analysis = fxfuse.analyze(model, args, rules=fxfuse.load_rules(extra=[path]))
    assert [(u.rule, u.ops, u.nodes) for u in analysis.unfit_rules] == [("rank3.yaml:0", ("aten.linear.default",), 2)]
    assert "'input' has rank 2" in analysis.unfit_rules[0].reason
    assert analysis.free_spaces == ()  # both linears fail closed
    assert [u.op for u in analysis.unruled] == ["aten.linear.default"] * 2
    note = analysis.notes[0]
    assert note.startswith("rule rank3.yaml:0 fits no node of the model (aten.linear.default at 2 nodes, all pinned)")
    report = analysis.report()
    assert report["notes"] == [note]
    assert report["unfit_rules"] == [{"rule": "rank3.yaml:0", "ops": ["aten.linear.default"], "nodes": 2,
                                      "reason": analysis.unfit_rules[0].reason}]
    text = render_text(analysis, "spec")
    assert "rules that fit no node of this model" in text and "rank3.yaml:0 for aten.linear.default ×2" in text


def test_rule_that_fits_some_nodes_is_not_recorded(tmp_path):
    path = _write(tmp_path, "rank2.yaml", '- op: aten.linear.default\n'
                                          '  axes: {input: "b i", weight: "o i", bias: "o", out: "b o"}\n')

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.a(x).unsqueeze(0))

    analysis = fxfuse.analyze(Mixed(), (torch.randn(2, 4),), rules=fxfuse.load_rules(extra=[path]))
    assert [u.op for u in analysis.unruled] == ["aten.linear.default"]  # the rank-3 call
    assert analysis.unfit_rules == () and analysis.notes == ()


def test_shipped_rules_fit_the_zoo_mlp():
    model, args = build_two_linears()
    analysis = fxfuse.analyze(model, args)
    assert analysis.unfit_rules == () and analysis.report()["notes"] == []


def test_explain_shows_the_unfit_rule(tmp_path, capsys):
    spec_file = _write(tmp_path, "m.py", "import torch\nfrom torch import nn\n"
                                         "def build():\n    torch.manual_seed(0)\n"
                                         "    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval(), "
                                         "(torch.randn(2, 4),)\n")
    path = _write(tmp_path, "rank3.yaml", '- op: aten.linear.default\n'
                                          '  axes: {input: "b s i", weight: "o i", bias: "o", out: "b s o"}\n')
    assert main(["explain", f"{spec_file}:build", "--rules", str(path), "-q"]) == 0
    out, _ = capsys.readouterr()
    assert "rules that fit no node of this model" in out
    assert "rank3.yaml:0 for aten.linear.default ×2: no signature fits: 'input' has rank 2" in out


def test_compile_report_carries_the_unfit_rule(tmp_path):
    path = _write(tmp_path, "rank3.yaml", '- op: aten.linear.default\n'
                                          '  axes: {input: "b s i", weight: "o i", bias: "o", out: "b s o"}\n')
    model, args = build_two_linears()
    other = TwoLinears().eval()
    result = fxfuse.compile([other, model], args, target=1, rules=fxfuse.load_rules(extra=[path]))
    assert result.report["unfit_rules"] == [{"rule": "rank3.yaml:0", "ops": ["aten.linear.default"], "nodes": 2}]
    assert result.report["notes"][0].startswith("rule rank3.yaml:0 fits no node of the model")
