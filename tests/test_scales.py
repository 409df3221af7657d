"""Learned unit scales of refinement: folded scales are the scaled module, the maps stay exact, the ends of the
curve stay the parents, runs are deterministic."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

import fxfuse
import zoo
from fxfuse.backend.refine import RefineConfig, RefineError
from fxfuse.backend.repair import scale_sites
from fxfuse.backend.scales import UnitScales, fold, strength
from fxfuse.commands.cli import main
from fxfuse.frontend.trace import trace
from fxfuse.frontend.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def _ids(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, zoo.VOCAB, (n, zoo.SEQ), generator=torch.Generator().manual_seed(seed))


def _random_scales(sites, seed: int) -> UnitScales:
    g = torch.Generator().manual_seed(seed)
    return UnitScales(sites, tuple(0.3 * torch.randn(s.units, generator=g) for s in sites),
                      tuple(0.2 * torch.randn(s.units, generator=g) for s in sites), 0.5)


@pytest.mark.parametrize("factory", ["mlp", "gpt2", "bert_mlm"])
def test_folded_scales_are_the_module_with_its_units_rescaled(factory):
    """``fold`` at strength ``s`` equals the module whose every site's output ``y_j`` is replaced by
    ``exp(s·u_j) y_j + s·c_j`` (forward hooks on the modules that own the weights)."""
    model, args = getattr(zoo, factory)(seed=0)
    model.eval()
    state = model.state_dict()
    sites = scale_sites(trace(model, args), state)
    assert sites and len({s.weight for s in sites}) == len(sites)
    scales = _random_scales(sites, 1)
    modules = dict(model.named_modules())
    for s in (1.0, 0.3):
        handles = []
        for site, u, c in zip(sites, scales.log_scale, scales.shift):
            owner = modules[site.weight.rsplit(".", 1)[0]]
            bias = c if site.bias is not None else torch.zeros_like(c)
            handles.append(owner.register_forward_hook(
                lambda _m, _i, y, a=torch.exp(s * u), b=s * bias: y * a + b))
        try:
            with torch.no_grad():
                want = model(*args)
        finally:
            for h in handles:
                h.remove()
        folded = copy.deepcopy(model)
        folded.load_state_dict(fold(state, scales, s))
        with torch.no_grad():
            got = folded(*args)
        want = getattr(want, "logits", want)
        got = getattr(got, "logits", got)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # strength 0 leaves every tensor as it was
    for key, value in fold(state, scales, 0.0).items():
        assert torch.equal(value, state[key]), key


def test_strength_is_a_bump_zero_at_the_ends():
    assert strength(0.0, 0.5) == 0.0 and strength(1.0, 0.5) == 0.0 and strength(0.5, 0.5) == 1.0
    assert strength(0.3, 0.3) == pytest.approx(1.0) and strength(0.7, None) == 1.0


def test_a_moved_copy_refines_with_scales_to_exact_group_elements_deterministically():
    """A ViT and its copy moved by random group elements: refining maps and scales together keeps every map an
    exact group element and the self-check exact (the scales change only the fused model), folds the learnt
    scales into the fused module, and gives bit-identical weights for the same seed."""
    from fxfuse.api.permute import move_by_group_elements
    from fxfuse.frontend.groups import ORTHO
    from test_refine import _assert_group_maps, _level

    model, args = zoo.vit(seed=0)
    moved, _ = move_by_group_elements(model, args, seed=4, largest=ORTHO)
    x = torch.rand(24, *args[0].shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(pixel_values=x).logits.argmax(-1)
    config = RefineConfig(20, x, y, batch_size=8, eval_samples=24, seed=3, scales=True, lr_scales=0.05)
    r = fxfuse.compile([model, moved], args, groups="full", refine=config)
    kinds = _assert_group_maps(r.alignments[1], {s["id"]: _level(s["group"]) for s in r.report["spaces"]})
    assert {"perm", "orthogonal_ones", "in-head"} <= kinds
    assert all(c["hard"] and c["error"] <= 1e-4 for c in r.report["self_check"] if c)
    assert compare_outputs(moved, r.aligned[1], args) <= 1e-4
    assert r.scales is not None and r.report["refine"]["scales"]["sites"] == len(r.scales.sites)
    assert any(float(u.abs().max()) > 0 for u in r.scales.log_scale)  # the scales did learn
    # the fused module is the average of the aligned models with the scales folded in
    avg = {k: 0.5 * (v + r.aligned[1].state_dict()[k]) if v.is_floating_point() else v
           for k, v in r.aligned[0].state_dict().items()}
    for key, value in fold(avg, r.scales).items():
        torch.testing.assert_close(r.module.state_dict()[key], value, atol=1e-6, rtol=1e-6)
    again = fxfuse.compile([model, moved], args, groups="full", refine=config)
    for key, value in r.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[key]), key
    plain = fxfuse.compile([model, moved], args, groups="full", refine=RefineConfig(
        20, x, y, batch_size=8, eval_samples=24, seed=3))
    assert plain.scales is None and "scales" not in plain.report["refine"]


def test_scales_leave_the_barrier_ends_at_the_parents_and_the_midpoint_is_the_fused_model():
    """GPT-2 (groups full, untied head): along the refined curve the scales act at strength λ(1 − λ)/(w(1 − w)),
    so λ = 0 and 1 score A and B exactly and λ = 0.5 scores the model ``compile`` writes."""
    from fxfuse.models.heads import evaluate

    a, args = zoo.gpt2(seed=0)
    b, _ = zoo.gpt2(seed=1)
    ids = _ids()
    config = RefineConfig(6, ids, ids.clone(), batch_size=8, eval_samples=16, scales=True, lr_scales=0.1)
    res = fxfuse.barrier(a, b, ids, ids.clone(), args, points=3, head="causal", groups="full", untie=True,
                         refine=config)
    assert res.refined.loss[0] == pytest.approx(res.vanilla.loss[0], rel=1e-5)
    assert res.refined.loss[-1] == pytest.approx(res.vanilla.loss[-1], rel=1e-5)
    fused = fxfuse.compile([a, b], args, groups="full", untie=True, refine=config)
    assert res.report["refine"]["scales"]["sites"] > 0
    assert res.refined.loss[1] == pytest.approx(evaluate(fused.module, ids, ids.clone(), "causal", None)[0], rel=1e-5)
    plain = fxfuse.compile([a, b], args, groups="full", untie=True, refine=RefineConfig(
        6, ids, ids.clone(), batch_size=8, eval_samples=16))
    assert any(not torch.equal(v, plain.module.state_dict()[k]) for k, v in fused.module.state_dict().items())


def test_a_post_norm_model_refines_with_scales():
    """BERT MLM (post-norm: the stream keeps permutations): scales on its dense layers and LayerNorms lower the
    loss at the fusion weights further than nothing; the self-check stays exact."""
    a, args = zoo.bert_mlm(seed=0)
    b, _ = zoo.bert_mlm(seed=1)
    ids = _ids(24)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3, ids,
                         torch.full_like(ids, -100))
    r = fxfuse.compile([a, b], args, groups="full", refine=RefineConfig(
        8, ids, labels, batch_size=8, eval_samples=24, head="mlm", scales=True, lr_scales=0.1))
    rep = r.report["refine"]
    assert rep["loss_at_weights_after"] < rep["loss_at_weights_before"]
    assert {"layer_norm", "linear"} & {e["node"].split("_")[0] for e in rep["scales"]["per_site"]}
    assert all(c["hard"] and c["error"] <= 1e-4 for c in r.report["self_check"] if c)


def test_cli_refine_scales(tmp_path, capsys):
    import digits

    x, y = digits.load_split()[:2]
    train = tmp_path / "train.pt"
    torch.save({"inputs": x[:64], "labels": y[:64]}, train)
    out = tmp_path / "fused"
    assert main(["compile", "digits:vit", "digits:vit", "-o", str(out), "--groups", "full", "--refine", "3",
                 "--data", str(train), "--refine-scales", "--refine-lr-scales", "0.02", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["refine"]["scales"]["lr"] == 0.02 and report["refine"]["scales"]["sites"] > 0
    recipe = yaml.safe_load((out / "fxfuse-recipe.yaml").read_text())
    assert recipe["refine_scales"] is True and recipe["refine_lr_scales"] == 0.02
    capsys.readouterr()
    assert main(["barrier", "digits:vit", "digits:vit", "--data", str(train), "--points", "3", "--groups", "full",
                 "--refine", "3", "--refine-data", str(train), "--refine-scales", "--json", "-q"]) == 0
    curves = json.loads(capsys.readouterr().out)
    assert curves["refined"]["loss"][0] == pytest.approx(curves["vanilla"]["loss"][0], rel=1e-5)
    assert curves["refined"]["loss"][-1] == pytest.approx(curves["vanilla"]["loss"][-1], rel=1e-5)
    assert main(["compile", "digits:vit", "digits:vit", "-o", str(tmp_path / "bad"), "--refine-scales", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxfuse: error:") and "--refine-scales" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_scales_need_sites():
    """A model with no unit that reaches a nonlinearity or a norm has nothing to scale: one line."""

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 6)
            self.b = torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    m1, m2 = Lin(), Lin()
    x = torch.randn(8, 4)
    with pytest.raises(RefineError, match="no units to scale"):
        fxfuse.compile([m1, m2], (x,), refine=RefineConfig(2, x, torch.zeros(8, dtype=torch.long), scales=True))
