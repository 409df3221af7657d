"""Each pass of ``fxfuse.compile`` run alone (``fxfuse.passes``), on zoo models and their permuted copies.

A pass takes frozen results of the passes before it and returns a new one; it
must not change what it was given. Running the passes by hand in order gives
what ``compile`` gives, bit for bit.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse import passes
import zoo
from fxfuse.api.permute import apply_permutations, random_permutations
from fxfuse.frontend.spaces import analyze


@pytest.fixture(scope="module")
def mlp_pair():
    """The zoo MLP and a copy permuted along every free space (same function, shuffled weights)."""
    model, args = zoo.mlp(0)
    analysis = analyze(model, args)
    return model, apply_permutations(analysis, random_permutations(analysis, seed=3)), args


def run_to(stage: str, models, args, options: passes.Options, **prepare):
    """Run the passes up to ``stage`` (inclusive); a dict of every result so far."""
    out = {"inputs": passes.prepare(models, args, {}, options, **prepare)}
    out["same_depth"] = passes.relayer(out["inputs"], options)
    if stage == "relayer":
        return out
    out["analysed"] = passes.analyse(out["inputs"], out["same_depth"], options)
    if stage == "analyse":
        return out
    out["planned"] = passes.plan(out["inputs"], out["same_depth"], out["analysed"], options)
    out["emitted"] = passes.emit(out["analysed"], out["planned"])
    if stage == "emit":
        return out
    out["checked"] = passes.check(out["inputs"], out["same_depth"], out["analysed"], out["planned"], out["emitted"])
    if stage == "check":
        return out
    out["fused"] = passes.average(out["inputs"], out["analysed"], out["checked"], options)
    return out


# -- prepare ----------------------------------------------------------------------------------------------------

def test_options_validate_and_normalise():
    opts = passes.Options.of(3, target=-1, weights=[1, 1, 2])
    assert opts.target == 2 and opts.weights == (0.25, 0.25, 0.5)
    with pytest.raises(passes.FusionError, match="unknown solver 'lp' .one of exact, sinkhorn"):
        passes.Options.of(2, solver="lp")
    with pytest.raises(passes.FusionError, match="out of range for 2 models"):
        passes.Options.of(2, target=2)
    with pytest.raises(passes.FusionError, match="--repair needs calibration"):
        passes.Options.of(2, repair=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.cost = "activations"


def test_prepare_refuses_nan_naming_the_tensor(mlp_pair):
    model, permuted, args = mlp_pair
    bad = copy.deepcopy(permuted)
    with torch.no_grad():
        next(iter(bad.parameters()))[0, 0] = float("nan")
    name = next(iter(dict(bad.named_parameters())))
    with pytest.raises(passes.FusionError, match=f"model 1: {name} holds NaN"):
        passes.prepare([model, bad], args, {}, passes.Options.of(2))


def test_prepare_batches_activation_calibration(mlp_pair):
    model, permuted, args = mlp_pair
    opts = passes.Options.of(2, cost="activations")
    inputs = passes.prepare([model, permuted], args, {}, opts, calib=torch.randn(40, *args[0].shape[1:]))
    batch = inputs.batches[0][0][0].shape[0]
    assert all(b[0][0].shape == (batch,) + args[0].shape[1:] for b in inputs.batches)
    assert len(inputs.batches) == 40 // batch
    assert torch.equal(inputs.args[0], inputs.batches[0][0][0])  # traced at the first batch
    assert any(f"calibration used {40 // batch * batch} of 40" in n for n in inputs.notes) == bool(40 % batch)
    assert passes.prepare([model, permuted], args, {}, passes.Options.of(2)).batches is None


# -- relayer ----------------------------------------------------------------------------------------------------

class Stack(nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(depth))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def test_relayer_leaves_equal_depths_alone_and_matches_other_depths(mlp_pair):
    model, permuted, args = mlp_pair
    same = run_to("relayer", [model, permuted], args, passes.Options.of(2))["same_depth"]
    assert same.plans == (None, None) and same.models[1] is permuted

    torch.manual_seed(0)
    shallow, deep, x = Stack(2), Stack(4), (torch.randn(6, 8),)
    done = run_to("relayer", [shallow, deep], x, passes.Options.of(2), calib=torch.randn(12, 8))["same_depth"]
    assert done.plans[0] is None and done.plans[1] is not None
    assert set(done.models[1].state_dict()) == set(shallow.state_dict())
    assert len(deep.blocks) == 4  # the given model is left as it was
    with pytest.raises(passes.FusionError, match="plain averaging needs models of equal depth"):
        run_to("relayer", [shallow, deep], x, passes.Options.of(2, method="vanilla"), calib=torch.randn(12, 8))


# -- analyse ----------------------------------------------------------------------------------------------------

def test_analyse_gives_one_analysis_per_model_with_pins(mlp_pair):
    model, permuted, args = mlp_pair
    opts = passes.Options.of(2, pin=("net.0.weight:0",))
    analysed = run_to("analyse", [model, permuted], args, opts)["analysed"]
    assert len(analysed.analyses) == 2 and analysed.ref is analysed.analyses[0]
    assert [s.size for s in analysed.analyses[0].spaces] == [s.size for s in analysed.analyses[1].spaces]
    (sid, why), = analysed.fixed.items()
    assert "net.0.weight" in {m.param for m in analysed.ref.spaces[sid].members} and "pinned by the user" in why
    assert analysed.levels == {} and analysed.canonical == ()
    with pytest.raises(passes.FusionError, match="--pin nope: matches no parameter axis"):
        run_to("analyse", [model, permuted], args, passes.Options.of(2, pin=("nope",)))


def test_analyse_shares_the_analysis_of_a_twin_only_for_weight_matching():
    a, args = zoo.bert(0)
    b, _ = zoo.bert(1)
    plain = run_to("analyse", [a, b], args, passes.Options.of(2))["analysed"]
    assert plain.analyses[1] is plain.analyses[0]  # one graph: traced once
    full = run_to("analyse", [a, b], args, passes.Options.of(2, groups="full"))["analysed"]
    assert full.analyses[1] is not full.analyses[0] and len(full.canonical) == 2
    assert set(full.levels) == {s.id for s in full.ref.spaces}


# -- plan, emit, check, average, report ------------------------------------------------------------------------------

@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_plan_and_emit_invert_the_permutation(mlp_pair, cost):
    model, permuted, args = mlp_pair
    opts = passes.Options.of(2, cost=cost)
    extra = {"calib": torch.randn(32, *args[0].shape[1:])} if cost == "activations" else {}
    done = run_to("emit", [model, permuted], args, opts, **extra)
    planned, emitted = done["planned"], done["emitted"]
    assert planned.alignments[0] is None and planned.alignments[1].hard
    assert emitted.aligned[0] is done["analysed"].states[0]  # the target is not moved
    target = model.state_dict()
    for key, value in emitted.aligned[1].items():
        assert torch.equal(value, target[key]), key


def test_check_accepts_exact_maps_and_refuses_a_wrong_one(mlp_pair):
    model, permuted, args = mlp_pair
    opts = passes.Options.of(2)
    done = run_to("emit", [model, permuted], args, opts)
    checked = passes.check(done["inputs"], done["same_depth"], done["analysed"], done["planned"], done["emitted"])
    assert [e["model"] for e in checked.entries] == [0, 1]
    assert checked.entries[1]["hard"] and checked.entries[1]["error"] < 1e-6
    assert len(checked.modules) == 2

    # weights that are not the source's moved by its maps: the self-check refuses them
    broken_weights = dict(done["emitted"].aligned[1])
    key = next(k for k in broken_weights if k.endswith("weight"))
    broken_weights[key] = broken_weights[key].flip(0)
    broken = passes.Emitted((done["emitted"].aligned[0], broken_weights))
    with pytest.raises(passes.FusionError, match="aligning model 1"):
        passes.check(done["inputs"], done["same_depth"], done["analysed"], done["planned"], broken)


def test_average_and_report(mlp_pair):
    model, permuted, args = mlp_pair
    opts = passes.Options.of(2, weights=[3, 1])
    done = run_to("average", [model, permuted], args, opts)
    fused = done["fused"]
    for key, value in fused.module.state_dict().items():
        assert torch.allclose(value, model.state_dict()[key], atol=1e-6), key  # 3/4 A + 1/4 (P aligned = A)
    assert fused.state is None and fused.repair is None
    report = passes.report(opts, done["inputs"], done["same_depth"], done["analysed"], done["planned"],
                           done["checked"], fused, {"total_s": 1.0})
    assert report["weights"] == [0.75, 0.25] and report["self_check"] == list(done["checked"].entries)
    free = [s for s in report["spaces"] if s["free"]]
    assert free and all(m["units_moved"] <= s["size"] for s in free for m in s["models"])


def test_passes_by_hand_equal_compile_and_leave_their_inputs_alone(mlp_pair):
    model, permuted, args = mlp_pair
    before = {k: v.clone() for k, v in permuted.state_dict().items()}
    opts = passes.Options.of(2)
    done = run_to("average", [model, permuted], args, opts)
    result = fxfuse.compile([model, permuted], args)
    for key, value in result.module.state_dict().items():
        assert torch.equal(value, done["fused"].module.state_dict()[key]), key
    for key, value in permuted.state_dict().items():
        assert torch.equal(value, before[key]), key
    for name in ("inputs", "same_depth", "analysed", "planned", "emitted", "checked", "fused"):
        assert dataclasses.is_dataclass(done[name]) and type(done[name]).__dataclass_params__.frozen, name
