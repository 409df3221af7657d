"""Failing closed: unruled ops, untraceable models, tied parameters, broken ties, the report."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxfuse
import zoo
from fxfuse.api.permute import permute_state_dict
from fxfuse.frontend.rules import load_rules
from fxfuse.frontend.spaces import Leaf, Product, expr_leaves
from outputs import run, tolerance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

UNRULED_OP = "aten.cummax.default"


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def space_of(analysis, param: str, axis: int):
    (leaf,) = expr_leaves(analysis.layouts[param].axes[axis])
    return analysis.spaces[leaf.space]


# ---------------------------------------------------------------- an op without a rule


class RunningMax(nn.Module):
    """Running maximum along the feature axis: order-dependent, so that axis must not move."""

    def forward(self, x):
        return torch.cummax(x, dim=-1).values


class ScanNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.scan = RunningMax()
        self.fc3 = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc3(self.scan(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def scan_case():
    torch.manual_seed(0)
    model = ScanNet().eval()
    args = (torch.randn(5, 8, generator=torch.Generator().manual_seed(1)),)
    return model, args, fxfuse.analyze(model, args)


def test_chosen_op_really_has_no_rule():
    rules = load_rules()
    assert rules.lookup(UNRULED_OP) is None
    assert rules.lookup("aten.cummax") is None


def test_unruled_op_is_reported(scan_case):
    _, _, a = scan_case
    assert len(a.unruled) == 1, a.unruled
    (u,) = a.unruled
    assert u.op == UNRULED_OP
    assert u.module == "scan"
    assert u.node and u.reason


def test_unruled_op_pins_what_it_touches(scan_case):
    _, _, a = scan_case
    touched = [space_of(a, "fc2.weight", 0), space_of(a, "fc3.weight", 1)]
    for s in touched:
        assert not s.free, s
        assert UNRULED_OP in s.reason and "scan" in s.reason, s.reason
    # the hidden space before it is not affected and stays free
    assert space_of(a, "fc1.weight", 0).free
    assert space_of(a, "fc2.weight", 1).free


def test_unruled_model_still_permutes_soundly(scan_case):
    model, args, a = scan_case
    permuted = fxfuse.apply_permutations(a, fxfuse.random_permutations(a, 3))
    y0, y1 = run(model, args), run(permuted, args)
    assert max_diff(y0, y1) <= tolerance(y0)
    assert not torch.equal(model.fc1.weight, permuted.fc1.weight), "the free space before the op should move"
    assert torch.equal(model.fc3.weight, permuted.fc3.weight), "the pinned axes after the op must not move"
    # the pin is needed: moving the space the op touches (as a permissive guess would) changes the output
    pinned = space_of(a, "fc2.weight", 0)
    guess = fxfuse.apply_permutations(a, {pinned.id: torch.roll(torch.arange(pinned.size), 1)})
    assert max_diff(run(guess, args), y0) > tolerance(y0)


def test_strict_raises_naming_the_op(scan_case):
    model, args, _ = scan_case
    with pytest.raises(fxfuse.StrictError) as info:
        fxfuse.analyze(model, args, strict=True)
    msg = str(info.value)
    assert UNRULED_OP in msg and "scan" in msg, msg
    assert "\n" not in msg


# ---------------------------------------------------------------- a model that cannot be traced


class SignBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.fc(x)
        return -self.fc(x)


def test_unexportable_model_raises_trace_error():
    with pytest.raises(fxfuse.TraceError) as info:
        fxfuse.analyze(SignBranch().eval(), (torch.randn(2, 4),))
    msg = str(info.value)
    assert "\n" not in msg.strip(), msg
    assert "SignBranch" in msg, msg
    assert "hint:" in msg, msg
    assert isinstance(info.value, fxfuse.FxfuseError)


# ---------------------------------------------------------------- tied parameters


@pytest.fixture(scope="module")
def mlm_case():
    model, args = zoo.bert_mlm(seed=0)
    return model, args, fxfuse.analyze(model, args)


def test_tied_parameters_stay_tied(mlm_case):
    model, args, a = mlm_case
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    permuted = fxfuse.apply_permutations(a, fxfuse.random_permutations(a, 5))
    out_w, in_w = permuted.get_output_embeddings().weight, permuted.get_input_embeddings().weight
    assert out_w is in_w or torch.equal(out_w, in_w)
    assert not torch.equal(in_w, model.get_input_embeddings().weight), "the embedding's hidden axis should move"
    y0, y1 = run(model, args), run(permuted, args)
    assert max_diff(y0, y1) <= tolerance(y0)


def test_tied_names_get_one_permuted_tensor(mlm_case):
    """The state-dict names of one tensor are one tensor: they must get one layout and one permuted value.

    Otherwise ``load_state_dict`` writes both values into the same Parameter and the one loaded last wins.
    """
    model, _, a = mlm_case
    aliases = a.traced.aliases
    assert aliases, "bert_mlm ties its word embeddings and decoder"
    state = permute_state_dict(a, model.state_dict(), fxfuse.random_permutations(a, 5))
    problems = []
    for canonical, others in aliases.items():
        for other in others:
            if not torch.equal(state[canonical], state[other]):
                problems.append(f"{canonical} and {other} got different permuted values")
            if other in a.layouts and a.layouts[other].axes != a.layouts[canonical].axes:
                problems.append(f"{canonical} and {other} have different layouts")
    vocab = [leaf.space for leaf in expr_leaves(a.layouts["bert.embeddings.word_embeddings.weight"].axes[0])]
    if any(a.spaces[s].free for s in vocab):
        problems.append("the word embedding's vocabulary axis is free")
    assert not problems, "; ".join(problems)


# ---------------------------------------------------------------- a broken tie is caught


def random_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter redrawn at O(1) scale (matrices N(0, 1/fan_in), vectors + N(0, 0.2)); ties kept."""
    g = torch.Generator().manual_seed(seed)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    drawn, state = {}, {}
    for name, t in model.state_dict().items():
        if name not in params or not t.is_floating_point():
            state[name] = t.clone()
            continue
        if t.data_ptr() not in drawn:
            if t.dim() >= 2:
                drawn[t.data_ptr()] = torch.randn(t.shape, generator=g) / max(1, t.numel() // t.shape[0]) ** 0.5
            else:
                drawn[t.data_ptr()] = t + 0.2 * torch.randn(t.shape, generator=g)
        state[name] = drawn[t.data_ptr()]
    return state


@pytest.fixture(scope="module")
def bert_case():
    model, args = zoo.bert(seed=0)
    return model, args, fxfuse.analyze(model, args)


def _rows_permuted(model: nn.Module, state, names, idx: torch.Tensor) -> nn.Module:
    state = dict(state)
    for n in names:
        state[n] = state[n].index_select(0, idx)
    clone = copy.deepcopy(model)
    clone.load_state_dict(state, strict=True)
    return clone


def test_query_only_permutation_is_caught(bert_case):
    """Permuting the query rows without the key breaks the q·k tie: the equality check must fail.

    The zoo's BERT has HF's 0.02 initialisation, where attention is nearly uniform and this change stays
    below the tolerance; at O(1) weights (as test_zoo's random-weight equality check uses) it is large.
    Permuting query and key together is a valid move and keeps the output.
    """
    model, args, a = bert_case
    prefix = "bert.encoder.layer.0.attention.self"
    q_axis = a.layouts[f"{prefix}.query.weight"].axes[0]
    assert isinstance(q_axis, Product) and all(isinstance(p, Leaf) for p in q_axis.parts)
    heads, qk_dim = q_axis.parts
    assert (heads.size, qk_dim.size) == (4, 8)
    shift_h, shift_d = (torch.roll(torch.arange(n), 1) for n in (heads.size, qk_dim.size))
    idx = (shift_h[:, None] * qk_dim.size + shift_d[None, :]).reshape(-1)  # rows are (head, dim), row-major
    state = random_state(model, seed=3)
    base = copy.deepcopy(model)
    base.load_state_dict(state, strict=True)
    y0 = run(base, args)
    tol = tolerance(y0)
    query = [f"{prefix}.query.weight", f"{prefix}.query.bias"]
    key = [f"{prefix}.key.weight", f"{prefix}.key.bias"]
    only_query = run(_rows_permuted(model, state, query, idx), args)
    assert max_diff(only_query, y0) > tol, "a query-only permutation went unnoticed"
    # only q·k is tied: moving the qk_dim of query and key together is exact (heads alone would need value too)
    qk_idx = (torch.arange(heads.size)[:, None] * qk_dim.size + shift_d[None, :]).reshape(-1)
    both = run(_rows_permuted(model, state, query + key, qk_idx), args)
    assert max_diff(both, y0) <= tol


def test_ffn_half_permutation_is_caught(bert_case):
    """At the zoo's own weights: permuting the intermediate rows without the output columns is caught."""
    model, args, a = bert_case
    prefix = "bert.encoder.layer.0"
    space = space_of(a, f"{prefix}.intermediate.dense.weight", 0)
    assert space.free
    idx = torch.roll(torch.arange(space.size), 1)
    state = model.state_dict()
    y0 = run(model, args)
    broken = run(_rows_permuted(model, state, [f"{prefix}.intermediate.dense.weight",
                                               f"{prefix}.intermediate.dense.bias"], idx), args)
    assert max_diff(broken, y0) > tolerance(y0)
    # and the complete move of that space is exact
    whole = fxfuse.apply_permutations(a, {space.id: idx})
    assert max_diff(run(whole, args), y0) <= tolerance(y0)


# ---------------------------------------------------------------- the report


def test_report_is_json(scan_case, bert_case):
    for _, _, a in (scan_case, bert_case):
        report = a.report()
        text = json.dumps(report)
        assert {"spaces", "pinned", "unruled_ops", "coverage"} <= set(report)
        back = json.loads(text)
        assert back["coverage"] == pytest.approx(a.coverage, abs=1e-6)
        assert len(back["spaces"]) == len(a.spaces)
        assert {p["id"] for p in back["pinned"]} == {s.id for s in a.spaces if not s.free}
    scan_report = scan_case[2].report()
    assert [u["op"] for u in scan_report["unruled_ops"]] == [UNRULED_OP]
    assert scan_report["unruled_ops"][0]["module"] == "scan"
    assert bert_case[2].report()["unruled_ops"] == []


# ---------------------------------------------------------------- sizes that depend on the data


class MaskedRows(nn.Module):
    """Rows chosen by a mask (``torch.export`` knows their count only as an unbacked symbol), then three learned
    rows appended along that axis: the learned rows' axis is joined to an axis of unknown size."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.extra = nn.Parameter(torch.randn(3, 16))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        rows = torch.cat([h[x[:, 0] > 0], self.extra])
        return self.head(rows.mean(0, keepdim=True))


def test_data_dependent_size_pins_what_it_touches_and_never_crashes():
    torch.manual_seed(0)
    model, args = MaskedRows().eval(), (torch.randn(6, 8, generator=torch.Generator().manual_seed(0)),)
    a = fxfuse.analyze(model, args)
    assert a.unruled == (), "an unknown size is no missing rule"
    extra = space_of(a, "extra", 0)
    assert not extra.free and "depend on the data" in extra.reason, extra.reason
    assert space_of(a, "lin.weight", 0).free, "the feature axis the mask does not touch stays free"
    permuted = fxfuse.permute(model, args, seed=1)
    assert max_diff(run(model, args), run(permuted, args)) <= tolerance(run(model, args))
    assert not torch.equal(permuted.lin.weight, model.lin.weight)
