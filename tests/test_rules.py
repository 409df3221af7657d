"""Rule files: validation errors with exact locations, loading, overriding, lookup, signatures."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.frontend.rules import Dim, parse_rule_file, parse_signature

GOOD = '- op: aten.relu.default\n  kind: broadcast\n'  # rule 0 of every bad file below: errors are in rule 1


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path) -> str:
    with pytest.raises(fxfuse.RuleError) as info:
        parse_rule_file(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- malformed rules: file, rule N, field

BAD_RULES = {
    "unknown_key": ('- op: aten.foo.default\n  kind: broadcast\n  axis: {self: "a"}\n',
                    "axis", "unknown key"),
    "unknown_kind": ('- op: aten.foo.default\n  kind: einsun\n', "kind", "unknown kind 'einsun'"),
    "unclosed_group": ('- op: aten.foo.default\n  axes: {self: "o (i", out: "o"}\n', "axes", "unclosed '('"),
    "two_ellipses": ('- op: aten.foo.default\n  axes: {self: "... ...", out: "..."}\n', "axes",
                     "more than one '...'"),
    "repeated_axis": ('- op: aten.foo.default\n  axes: {self: "a a", out: "a"}\n', "axes", "'a' repeated"),
    "bad_axis_name": ('- op: aten.foo.default\n  axes: {self: "1x", out: "a"}\n', "axes", "bad axis name '1x'"),
    "nested_group": ('- op: aten.foo.default\n  axes: {self: "(a (b c))", out: "a"}\n', "axes", "nested '('"),
    "empty_group": ('- op: aten.foo.default\n  axes: {self: "() a", out: "a"}\n', "axes", "empty or unopened"),
    "ellipsis_in_group": ('- op: aten.foo.default\n  axes: {self: "(... a)", out: "a"}\n', "axes",
                          "'...' inside a group"),
    "signature_not_string": ('- op: aten.foo.default\n  axes: {self: 3, out: "a"}\n', "axes",
                             "must be a string"),
    "bad_argument_name": ('- op: aten.foo.default\n  axes: {"se lf": "a", out: "a"}\n', "axes",
                          "bad argument name"),
    "axes_not_mapping": ('- op: aten.foo.default\n  axes: "a b"\n', "axes", "expected a mapping"),
    "sizes_missing_axis": ('- op: aten.foo.default\n  axes: {self: "(g o)", out: "o"}\n  sizes: {h: groups}\n',
                           "sizes", "axis 'h' does not appear in axes"),
    "sizes_bad_value": ('- op: aten.foo.default\n  axes: {self: "(g o)", out: "o"}\n  sizes: {g: -2}\n',
                        "sizes", "positive integer or an argument name"),
    "pin_missing_axis": ('- op: aten.foo.default\n  axes: {self: "a", out: "a"}\n  pin: [b]\n',
                         "pin", "axis 'b' does not appear in axes"),
    "pin_not_list": ('- op: aten.foo.default\n  axes: {self: "a", out: "a"}\n  pin: a\n',
                     "pin", "expected a list of axis names"),
    "free_missing_axis": ('- op: aten.foo.default\n  axes: {self: "a", out: "a"}\n  free: [z]\n',
                          "free", "axis 'z' does not appear in axes"),
    "pin_and_free": ('- op: aten.foo.default\n  axes: {self: "a", out: "a"}\n  pin: [a]\n  free: [a]\n',
                     "free", "both pinned and free"),
    "option_not_allowed": ('- op: aten.foo.default\n  kind: broadcast\n  options: {dim: dim}\n',
                           "options", "unknown option 'dim' for kind 'broadcast' (allowed: none)"),
    "option_of_other_kind": ('- op: aten.foo.default\n  kind: reduce\n  options: {dims: dims}\n',
                             "options", "allowed: dim, input, keepdim"),
    "einsum_options": ('- op: aten.foo.default\n  axes: {self: "a", out: "a"}\n  options: {dim: dim}\n',
                       "options", "for kind 'einsum'"),
    "options_not_mapping": ('- op: aten.foo.default\n  kind: reduce\n  options: [dim]\n',
                            "options", "expected a mapping"),
    "needs_axes": ('- op: aten.foo.default\n  note: einsum is the default kind\n', "axes",
                   "kind 'einsum' needs axes"),
    "takes_no_axes": ('- op: aten.foo.default\n  kind: broadcast\n  axes: {self: "a", out: "a"}\n', "axes",
                      "kind 'broadcast' takes no axes"),
    "op_one_part": ('- op: aten\n  kind: broadcast\n', "op", "'aten' is not an op name"),
    "op_four_parts": ('- op: aten.linear.default.x\n  kind: broadcast\n', "op", "is not an op name"),
    "op_colons": ('- op: "aten::linear"\n  kind: broadcast\n', "op", "is not an op name"),
    "op_space": ('- op: aten.linear default\n  kind: broadcast\n', "op", "is not an op name"),
    "op_in_list": ('- op: [aten.add.Tensor, aten.9.default]\n  kind: broadcast\n', "op", "'aten.9.default'"),
    "op_not_string": ('- op: 3\n  kind: broadcast\n', "op", "is not an op name"),
    "op_missing": ('- kind: broadcast\n', "op", "missing"),
    "op_empty_list": ('- op: []\n  kind: broadcast\n', "op", "empty list"),
    "note_not_string": ('- op: aten.foo.default\n  kind: broadcast\n  note: [a]\n', "note", "expected a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_RULES))
def test_malformed_rule_names_file_rule_and_field(tmp_path, case):
    body, field, detail = BAD_RULES[case]
    path = _write(tmp_path, f"bad_{case}.yaml", GOOD + body)
    message = _error(path)
    assert message.startswith(f"{path}: rule 1, field '{field}': "), message
    assert detail in message
    err = pytest.raises(fxfuse.RuleError, parse_rule_file, path).value
    assert (err.path, err.index, err.field) == (str(path), 1, field)


def test_signature_error_names_the_argument(tmp_path):
    path = _write(tmp_path, "sig.yaml", GOOD + '- op: aten.foo.default\n  axes: {self: "a", weight: "o (i"}\n')
    assert f"{path}: rule 1, field 'axes': argument 'weight': unclosed '(' in 'o (i'" == _error(path)


def test_error_in_an_alternative_is_located(tmp_path):
    path = _write(tmp_path, "alt.yaml", GOOD + '- op: aten.foo.default\n  axes:\n    - {self: "a", out: "a"}\n'
                  '    - {self: "a b", out: "a b c c"}\n')
    assert "rule 1, field 'axes': argument 'out': axis 'c' repeated" in _error(path)


def test_rules_are_counted_from_zero(tmp_path):
    path = _write(tmp_path, "first.yaml", '- op: aten.foo.default\n  kind: nope\n' + GOOD)
    assert f"{path}: rule 0, field 'kind'" in _error(path)


def test_rule_that_is_not_a_mapping(tmp_path):
    path = _write(tmp_path, "scalar_rule.yaml", GOOD + "- aten.linear.default\n")
    message = _error(path)
    assert message.startswith(f"{path}: rule 1: ") and "a rule must be a mapping, got str" in message


def test_invalid_yaml_reports_the_line(tmp_path):
    path = _write(tmp_path, "syntax.yaml", GOOD + '- op: aten.foo.default\n   kind: broadcast\n')
    message = _error(path)
    assert message.startswith(f"{path}: line 4: invalid YAML: ")
    assert ": rule " not in message


def test_invalid_yaml_unclosed_flow_mapping(tmp_path):
    path = _write(tmp_path, "flow.yaml", GOOD + '- op: aten.foo.default\n  axes: {self: "a", out: "a"\n')
    assert re.match(rf"{re.escape(str(path))}: line \d+: invalid YAML: ", _error(path))


@pytest.mark.parametrize("text", [
    "op: aten.relu.default\nkind: broadcast\n",  # a single rule, not in a list
    "aten.relu.default\n",
    "rules: {op: aten.relu.default, kind: broadcast}\n",
    "rules: []\nextra: 1\n",
])
def test_top_level_must_be_a_list(tmp_path, text):
    path = _write(tmp_path, "toplevel.yaml", text)
    assert _error(path) == f"{path}: expected a list of rules (or a mapping with key 'rules')"


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    message = _error(path)
    assert message.startswith(f"{path}: cannot read")


# ---------------------------------------------------------------- well-formed files


def test_mapping_with_key_rules_and_empty_files(tmp_path):
    rules = parse_rule_file(_write(tmp_path, "mapped.yaml", "rules:\n" + "".join("  " + line + "\n" for line in
                                                                               GOOD.splitlines())))
    assert [r.ops for r in rules] == [("aten.relu.default",)]
    assert parse_rule_file(_write(tmp_path, "empty.yaml", "")) == []
    assert parse_rule_file(_write(tmp_path, "comments.yaml", "# nothing yet\n")) == []
    assert parse_rule_file(_write(tmp_path, "null.yaml", "rules:\n")) == []


def test_parsed_rule_fields(tmp_path):
    path = _write(tmp_path, "full.yaml", GOOD + (
        '- op: [mylib.conv.default, mylib.conv2]\n'
        '  axes:\n'
        '    - {x: "... (g i) h w", weight: "(g o) i kh kw", out: "... (g o) oh ow"}\n'
        '    - {x: "(g i)", out: "(g o)"}\n'
        '  sizes: {g: groups, kh: 3}\n'
        '  pin: [kh]\n'
        '  free: [oh]\n'
        '  note: a test\n'))
    rule = parse_rule_file(path)[1]
    assert rule.ops == ("mylib.conv.default", "mylib.conv2")
    assert rule.kind == "einsum" and rule.source == "full.yaml:1"
    assert len(rule.axes) == 2 and [arg for arg, _ in rule.axes[0]] == ["x", "weight", "out"]
    assert dict(rule.sizes) == {"g": "groups", "kh": 3}
    assert rule.pin == {"kh"} and rule.free == {"oh"} and rule.note == "a test"
    kinds = parse_rule_file(_write(tmp_path, "kinds.yaml", '- op: mylib.sum\n  kind: reduce\n  options: {dim: dims}\n'))
    assert kinds[0].kind == "reduce" and kinds[0].option("dim") == "dims" and kinds[0].option("keepdim") is None


def test_every_kind_accepts_its_own_options(tmp_path):
    from fxfuse.frontend.all_kinds import KINDS
    text = ""
    for name, kind in sorted(KINDS.items()):
        text += f"- op: test.{name}\n  kind: {name}\n"
        if kind.uses_axes:
            text += '  axes: {self: "a", out: "a"}\n'
        if kind.options:
            values = [str(i + 1) if name == "subgraph" else o for i, o in enumerate(kind.options)]
            text += "  options: {" + ", ".join(f"{o}: {v}" for o, v in zip(kind.options, values)) + "}\n"
    rules = parse_rule_file(_write(tmp_path, "kinds.yaml", text))
    assert {r.kind for r in rules} == set(KINDS)


def test_shipped_rules_load():
    rules = fxfuse.load_rules()
    assert len(rules) > 100
    assert all(f.endswith(".yaml") for f in rules.files)
    linear = rules.lookup("aten.linear.default")
    assert linear.kind == "einsum" and linear.source.startswith("nn.yaml:")
    sig = dict(linear.axes[0])
    assert {arg: s.text for arg, s in sig.items()} == {"input": "... i", "weight": "o i", "bias": "o", "out": "... o"}
    expected = {
        "aten.conv2d.default": "einsum", "aten.add.Tensor": "broadcast", "aten.view.default": "reshape",
        "aten.mean.dim": "reduce", "aten.cat.default": "cat", "aten.transpose.int": "transpose",
        "aten.scaled_dot_product_attention.default": "einsum", "aten.zeros_like.default": "constant",
        "higher_order.wrap_with_autocast": "subgraph", "aten.sym_size.int": "ignore",
    }
    assert {op: rules.lookup(op).kind for op in expected} == expected
    assert rules.lookup("mylib.unknown.default") is None


def test_shipped_rule_files_each_parse():
    from fxfuse.frontend.rules import shipped_rule_files
    files = shipped_rule_files()
    assert {f.name for f in files} >= {"elementwise.yaml", "nn.yaml", "shape.yaml", "higher_order.yaml"}
    for f in files:
        assert parse_rule_file(f)


def test_extra_file_overrides_a_shipped_rule(tmp_path):
    path = _write(tmp_path, "override.yaml", '- op: aten.linear.default\n  kind: pin\n  note: mine\n')
    shipped = fxfuse.load_rules()
    rules = fxfuse.load_rules(extra=[path])
    assert rules.files == shipped.files + (str(path),)
    assert rules.lookup("aten.linear.default").kind == "pin"
    assert rules.lookup("aten.linear.default").source == "override.yaml:0"
    assert rules.lookup("aten.relu.default") == shipped.lookup("aten.relu.default")
    assert len(rules) == len(shipped)

    torch.manual_seed(0)
    model, args = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), (torch.randn(2, 6),)
    assert fxfuse.analyze(model, args, rules=shipped).coverage > 0
    pinned = fxfuse.analyze(model, args, rules=rules)
    assert pinned.coverage == 0 and pinned.unruled == ()  # kind 'pin' is deliberate, not unruled


def test_later_extra_file_wins(tmp_path):
    a = _write(tmp_path, "a.yaml", '- op: mylib.op.default\n  kind: pin\n')
    b = _write(tmp_path, "b.yaml", '- op: mylib.op.default\n  kind: broadcast\n')
    assert fxfuse.load_rules(extra=[a, b], shipped=False).lookup("mylib.op.default").kind == "broadcast"
    assert fxfuse.load_rules(extra=[b, a], shipped=False).lookup("mylib.op.default").kind == "pin"
    same = _write(tmp_path, "same.yaml", '- op: mylib.op.default\n  kind: pin\n- op: mylib.op.default\n  kind: constant\n')
    with pytest.raises(fxfuse.RuleError, match=r"rule 1, field 'op': mylib.op.default is ruled twice: by rule 0 "
                                               r"\(line 1\) and rule 1 \(line 3\); keep one"):
        fxfuse.load_rules(extra=[same], shipped=False)  # within one file, an op is ruled once


def test_overload_less_name_matches_every_overload(tmp_path):
    rules = fxfuse.load_rules()
    arange = rules.lookup("aten.arange")
    assert arange is not None and arange.kind == "pin"
    for overload in ("aten.arange.default", "aten.arange.start", "aten.arange.start_step"):
        assert rules.lookup(overload) is arange
    assert rules.lookup("aten.arangex.default") is None


def test_exact_overload_wins_over_overload_less_name(tmp_path):
    exact = _write(tmp_path, "exact.yaml", '- op: mylib.op.special\n  kind: constant\n')
    generic = _write(tmp_path, "generic.yaml", '- op: mylib.op\n  kind: broadcast\n')
    for order in ([exact, generic], [generic, exact]):
        rules = fxfuse.load_rules(extra=order, shipped=False)
        assert rules.lookup("mylib.op.special").kind == "constant"
        assert rules.lookup("mylib.op.default").kind == "broadcast"
        assert rules.lookup("mylib.op").kind == "broadcast"
        assert rules.lookup("mylib.other.default") is None


# ---------------------------------------------------------------- signatures


def test_parse_signature_dims():
    sig = parse_signature("... (g o) h w")
    assert sig.dims == (Dim(("...",)), Dim(("g", "o"), group=True), Dim(("h",)), Dim(("w",)))
    assert sig.ellipsis == 0
    assert sig.names == ("g", "o", "h", "w")
    assert sig.dims[0].is_ellipsis and not sig.dims[1].is_ellipsis
    assert sig.text == "... (g o) h w"


def test_parse_signature_spacing_and_scalars():
    assert parse_signature("b(h d)...").dims == (Dim(("b",)), Dim(("h", "d"), group=True), Dim(("...",)))
    assert parse_signature("b(h d)...").ellipsis == 2
    assert parse_signature("").dims == () and parse_signature("").ellipsis is None
    assert parse_signature("...").names == ()
    assert parse_signature("(heads group) q_len").names == ("heads", "group", "q_len")


@pytest.mark.parametrize("text, reason", [
    ("o (i", "unclosed '('"), ("... ...", "more than one '...'"), ("a a", "repeated"), ("1x", "bad axis name"),
    ("a (b a)", "repeated"), ("a)", "empty or unopened"), ("a-b", "bad axis name"), ("a..", "bad axis name"),
])
def test_parse_signature_rejects(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_signature(text)


# ---------------------------------------------------------------- regressions


def test_free_may_name_the_ellipsis(tmp_path):
    path = _write(tmp_path, "free_dots.yaml", '- op: mylib.op.default\n  axes: {x: "... c", out: "... c"}\n'
                  '  free: ["..."]\n')
    assert "..." in parse_rule_file(path)[0].free


def test_integer_option_value_is_a_rule_error(tmp_path):
    path = _write(tmp_path, "intdim.yaml", '- op: aten.mean.dim\n  kind: reduce\n  options: {dim: 1}\n')
    torch.manual_seed(0)

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).mean(dim=1)

    with pytest.raises(fxfuse.RuleError, match=r"rule 0, field 'options': option 'dim' must be an argument name"):
        fxfuse.load_rules(extra=[path])
    assert Pool()(torch.randn(2, 3, 4)).shape == (2, 4)
