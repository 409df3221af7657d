"""Learned refinement: maps stay exact group elements, the midpoint loss drops, runs are deterministic."""
from __future__ import annotations

import json

import yaml

import pytest
import torch

import fxfuse
import digits
from fxfuse.commands.cli import main
from fxfuse.api.fuse import FusionError
from fxfuse.backend.refine import RefineConfig, RefineError, project, straight_through
from fxfuse.frontend.verify import compare_outputs
from dataclasses import replace

pytestmark = pytest.mark.usefixtures("quiet_one_thread")


@pytest.fixture(scope="module")
def data():
    return digits.load_split()


def _trained(factory, seed: int, data, epochs: int = 1, **kw):
    model, args = factory(seed=seed, **kw)
    torch.manual_seed(seed)
    digits.train(model, epochs, seed, lr=1e-2, batch_size=32, data=data[:2])
    return model.eval(), args


@pytest.fixture(scope="module")
def mlp_pair(data):
    a, args = _trained(digits.mlp, 1, data, h1=32, h2=16)
    b, _ = _trained(digits.mlp, 2, data, h1=32, h2=16)
    return a, b, args


@pytest.fixture(scope="module")
def vit_pair(data):
    """Two small digits ViTs trained apart to ~85 % test accuracy."""
    out = []
    for seed in (1, 2):
        model, args = digits.vit(seed=seed, dim=16, heads=2, mlp=32)
        torch.manual_seed(seed)
        digits.train(model, 8, seed, lr=3e-3, batch_size=32, data=data[:2])
        out.append(model.eval())
    return out[0], out[1], args


def _config(data, steps: int = 40, **kw) -> RefineConfig:
    return RefineConfig(steps, data[0], data[1], lr=0.1, eval_samples=400, **kw)


def test_projections_give_exact_group_elements():
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(7, generator=g)
    noisy = torch.eye(7)[perm] + 0.3 * torch.rand(7, 7, generator=g)
    assert torch.equal(project(noisy, "permutation"), torch.eye(7)[perm])
    stacked = project(torch.rand(3, 5, 5, generator=g), "permutation")
    assert torch.equal(stacked.sum(-1), torch.ones(3, 5)) and torch.equal(stacked.sum(-2), torch.ones(3, 5))
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    spd = B @ B.T + 6 * torch.eye(6, dtype=torch.float64)
    O = project(Q @ spd, "orthogonal")  # the polar factor of Q·S is Q
    torch.testing.assert_close(O, Q)
    A = project(torch.rand(3, 6, generator=g), "matching")  # three target units, six source units
    assert torch.allclose(A.sum(1), torch.ones(3)) and bool(((A > 0).sum(0) == 1).all())
    L = torch.rand(4, 4, generator=g, requires_grad=True)
    (straight_through(L, "permutation") * torch.arange(16.0).view(4, 4)).sum().backward()
    assert torch.equal(L.grad, torch.arange(16.0).view(4, 4))
    with pytest.raises(RefineError, match="unknown group"):
        project(L, "rotation")


def test_refinement_stays_in_the_group_lowers_the_midpoint_loss_and_is_deterministic(mlp_pair, data):
    a, b, args = mlp_pair
    first = fxfuse.compile([a, b], args, refine=_config(data))
    rep = first.report["refine"]
    assert rep["loss_at_weights_after"] < rep["loss_at_weights_before"] - 0.01, rep
    assert rep["barrier_at_weights_after"] < rep["barrier_at_weights_before"]
    assert sum(rep["units_changed"][1].values()) > 0
    for m in first.alignments[1].maps.values():
        assert torch.equal(m.perm.sort().values, torch.arange(m.perm.numel()))  # still a permutation
    assert first.report["self_check"][1]["error"] < 1e-4
    assert compare_outputs(b, first.aligned[1], args) < 1e-4
    again = fxfuse.compile([a, b], args, refine=_config(data))
    for key, value in first.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[key]), key


def test_refinement_refuses_soft_maps_and_plain_averaging(mlp_pair, data):
    a, b, args = mlp_pair
    with pytest.raises(FusionError, match="--refine needs exact maps"):
        fxfuse.compile([a, b], args, solver="sinkhorn", refine=_config(data, steps=2))
    with pytest.raises(FusionError, match="--refine needs exact maps"):
        fxfuse.compile([a, b], args, method="vanilla", refine=_config(data, steps=2))
    with pytest.raises(RefineError, match="at least one step"):
        fxfuse.compile([a, b], args, refine=_config(data, steps=0))


def test_refinement_composes_with_widths_three_models_and_depths(mlp_pair, data):
    a, b, args = mlp_pair
    wide, _ = _trained(digits.mlp, 3, data, h1=64, h2=16)
    r = fxfuse.compile([a, wide], args, refine=_config(data, steps=20))  # wide source into the narrow target
    A = r.alignments[1].maps[next(iter(r.alignments[1].maps))].matrix
    widths = {m.matrix.shape for m in r.alignments[1].maps.values() if m.matrix is not None}
    assert (32, 64) in widths and A is not None
    for m in r.alignments[1].maps.values():
        if m.matrix is not None:  # still a hard many-to-one matching: every source unit goes whole to one unit
            assert torch.allclose(m.matrix.sum(1), torch.ones(m.matrix.shape[0], dtype=m.matrix.dtype))
            assert bool(((m.matrix > 0).sum(0) == 1).all())
    c, _ = _trained(digits.mlp, 4, data, h1=32, h2=16)
    three = fxfuse.compile([a, b, c], args, refine=_config(data, steps=20))
    assert set(three.report["refine"]["units_changed"]) <= {1, 2}
    assert all(ch["error"] < 1e-4 for ch in three.report["self_check"])
    deep, vargs = digits.vit(seed=1, depth=2, dim=16, heads=2, mlp=32)
    shallow, _ = digits.vit(seed=2, depth=1, dim=16, heads=2, mlp=32)
    for target in (0, 1):  # blocks left out of the deep source; identity blocks in the shallow source
        r = fxfuse.compile([shallow, deep], vargs, target=target, refine=_config(data, steps=3), calib=data[0][:32])
        assert r.report["depth_maps"] and r.report["refine"]["steps"] == 3
        assert all(c.get("error", 0.0) < 1e-4 for c in r.report["self_check"])
    identity = r.report["depth_maps"][0]["identity"]
    assert identity  # the target's own weights in the identity block, its writers at zero
    for name, value in r.aligned[0].state_dict().items():
        if name.startswith(f"blocks.{identity[0]}.") and "out_proj" not in name and "mlp.2" not in name:
            assert torch.equal(value, deep.state_dict()[name]), name


def test_cli_compile_and_barrier_with_refine(tmp_path, capsys, data):
    spec = "digits:mlp"
    train = tmp_path / "train.pt"
    torch.save({"inputs": data[0][:128], "labels": data[1][:128]}, train)
    out = tmp_path / "fused"
    assert main(["compile", spec, "digits:mlp", "-o", str(out), "--refine", "3", "-q"]) == 2
    assert "--refine needs labelled data: pass --data FILE" in capsys.readouterr().err
    assert main(["compile", spec, spec, "-o", str(out), "--data", str(train), "--quality", "fast", "-q"]) == 2
    assert "only used with --refine" in capsys.readouterr().err  # without the preset (which refines by default)
    assert not out.exists()
    assert main(["compile", spec, spec, "-o", str(out), "--refine", "3", "--data", str(train), "-q"]) == 0
    assert "refined 3 steps" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["refine"]["steps"] == 3 and report["self_check"][1]["error"] < 1e-4
    assert main(["barrier", spec, spec, "--data", str(train), "--points", "3", "--refine", "3", "--refine-data",
                 str(train), "-q"]) == 0
    text = capsys.readouterr().out
    assert "refined loss" in text and "refined (3 steps" in text


@pytest.mark.parametrize("factory", ["gpt2", "bert_mlm"])
def test_refinement_of_language_models_with_tied_embeddings(factory):
    import zoo

    a, args = getattr(zoo, factory)(seed=0)
    b, _ = getattr(zoo, factory)(seed=1)
    ids = torch.randint(0, zoo.VOCAB, (16, zoo.SEQ), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    if factory == "bert_mlm":
        labels[:, ::2] = -100
    r = fxfuse.compile([a, b], args, refine=RefineConfig(4, ids, labels, batch_size=8, eval_samples=16))
    assert r.report["refine"]["head"] == ("causal" if factory == "gpt2" else "mlm")
    assert r.report["self_check"][1]["error"] < 1e-4
    assert compare_outputs(b, r.aligned[1], args) < 1e-4


def test_an_orthogonal_map_moves_writers_by_o_and_readers_by_its_inverse_transpose():
    from fxfuse.backend.refine import Mover

    model, args = digits.mlp(seed=0, h1=8, h2=6)
    analysis = fxfuse.analyze(model, args)
    hidden = next(s.id for s in analysis.spaces if any(m.param == "fc1.weight" and m.axis == 0 for m in s.members))
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    state = model.state_dict()
    moved = Mover(analysis, state, {}, {hidden}, frozenset({hidden}))({hidden: Q})
    torch.testing.assert_close(moved["fc1.weight"], Q @ state["fc1.weight"])
    torch.testing.assert_close(moved["fc2.weight"] @ moved["fc1.weight"], state["fc2.weight"] @ state["fc1.weight"])
    P = torch.eye(8)[torch.randperm(8, generator=torch.Generator().manual_seed(1))]
    perm = Mover(analysis, state, {}, {hidden})({hidden: P})  # a permutation reads by P as well
    torch.testing.assert_close(perm["fc2.weight"] @ perm["fc1.weight"], state["fc2.weight"] @ state["fc1.weight"])


def test_orthogonal_projections_and_rotations_are_group_elements():
    from fxfuse.backend.refine import rotation

    g = torch.Generator().manual_seed(0)
    eye, ones = torch.eye(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    for group in ("orthogonal", "orthogonal_ones"):
        Q = project(torch.randn(3, 6, 6, generator=g, dtype=torch.float64), group)  # a stack, as inside heads
        torch.testing.assert_close(Q.transpose(1, 2) @ Q, eye.expand(3, 6, 6))
        A = torch.randn(3, 6 - (group == "orthogonal_ones"), 6 - (group == "orthogonal_ones"), generator=g,
                        dtype=torch.float64)
        R = rotation(A, group)
        torch.testing.assert_close(R.transpose(1, 2) @ R, eye.expand(3, 6, 6))
        if group == "orthogonal_ones":  # the ones vector stays where it is
            torch.testing.assert_close(Q @ ones, ones.expand(3, 6))
            torch.testing.assert_close(R @ ones, ones.expand(3, 6))
            torch.testing.assert_close(project(Q[0] + 0.1 * eye, group), project(Q[0] + 0.1 * eye, group) @ eye)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    Q = project(torch.randn(6, 6, generator=g, dtype=torch.float64), "orthogonal_ones")
    torch.testing.assert_close(project(Q @ (B @ B.T + 6 * eye), "orthogonal_ones"), project(Q, "orthogonal_ones"))


def _assert_group_maps(alignment, levels):
    """Every map of ``alignment`` is an exact group element: a permutation, or orthogonal (fixing ``1``)."""
    from fxfuse.frontend.groups import ORTHO_ONES, ROTARY

    kinds = set()
    for sid, m in alignment.maps.items():
        if m.q is None:
            p = m.perm if m.perm.dim() == 2 else m.perm[None]
            assert torch.equal(p.sort(-1).values, torch.arange(p.shape[-1]).expand_as(p)), sid
            kinds.add("perm")
            continue
        q = m.q.double()
        torch.testing.assert_close(q.transpose(-1, -2) @ q, torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q),
                                   atol=1e-12, rtol=0)
        if levels.get(sid) == ORTHO_ONES:
            ones = torch.ones(q.shape[-1], dtype=q.dtype)
            torch.testing.assert_close(q @ ones, ones.expand(q.shape[:-1]), atol=1e-12, rtol=0)
            kinds.add("orthogonal_ones")
        elif levels.get(sid) == ROTARY:  # one 2x2 rotation per frequency pair (i, i + m/2), nothing else
            h = q.shape[-1] // 2
            i = torch.arange(h)
            planes = torch.zeros(q.shape[-2:], dtype=torch.bool)
            planes[i, i] = planes[i + h, i + h] = planes[i, i + h] = planes[i + h, i] = True
            assert float(q[..., ~planes].abs().max()) == 0.0
            torch.testing.assert_close(q[..., i, i], q[..., i + h, i + h], atol=1e-12, rtol=0)
            kinds.add("rotary")
        else:
            kinds.add("in-head" if q.dim() == 3 else "orthogonal")
    return kinds


@pytest.mark.parametrize("orthogonal", ["project", "exp"])
def test_refinement_over_whole_groups_of_a_moved_copy_stays_exact(orthogonal):
    """A ViT and its copy moved by random orthogonal group elements (``fxfuse permute --groups full``): the
    data-free alignment undoes the move; refining over the whole groups from there keeps every map an exact group
    element (orthogonal fixing ``1`` on the stream, orthogonal in heads, permutations; the self-check exact) and
    never loses the exact solution: the loss at the fusion weights ends no higher than the model's own. (The maps
    do move: the labels are the model's own predictions, whose loss an interpolation of the two can lower.)"""
    import zoo
    from fxfuse.frontend.groups import ORTHO
    from fxfuse.api.permute import move_by_group_elements

    model, args = zoo.vit(seed=0)
    moved, info = move_by_group_elements(model, args, seed=4, largest=ORTHO)
    assert info["groups"].get("orthogonal_ones") and info["groups"].get("orthogonal")
    x = torch.rand(24, *args[0].shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(pixel_values=x).logits.argmax(-1)
    config = RefineConfig(30, x, y, batch_size=8, eval_samples=24, orthogonal=orthogonal, seed=3)
    r = fxfuse.compile([model, moved], args, groups="full", refine=config)
    kinds = _assert_group_maps(r.alignments[1], {s["id"]: _level(s["group"]) for s in r.report["spaces"]})
    assert {"perm", "orthogonal_ones", "in-head"} <= kinds
    assert all(c["hard"] and c["error"] <= 1e-4 for c in r.report["self_check"] if c)
    assert compare_outputs(moved, r.aligned[1], args) <= 1e-4
    rep = r.report["refine"]
    own = rep["loss_of_models"][0]
    assert abs(rep["loss_at_weights_before"] - own) <= 1e-5  # the data-free start is the model itself
    assert rep["loss_at_weights_after"] <= own
    again = fxfuse.compile([model, moved], args, groups="full", refine=config)
    for key, value in r.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[key]), key


def _level(name: str) -> int:
    from fxfuse.frontend.groups import SpaceGroup

    return SpaceGroup(name).level


@pytest.mark.parametrize("orthogonal", ["project", "exp"])
def test_refinement_over_whole_groups_of_two_models(orthogonal, vit_pair, data):
    """Two ViTs trained apart: refinement moves the orthogonal maps, lowers the midpoint loss, never leaves the
    group (the self-check stays exact), and is deterministic for a seed (another seed gives other maps)."""
    a, b, args = vit_pair
    config = _config(data, steps=40, orthogonal=orthogonal, lr_orthogonal=0.03)
    r = fxfuse.compile([a, b], args, groups="full", refine=config)
    rep = r.report["refine"]
    assert rep["loss_at_weights_after"] < rep["loss_at_weights_before"] - 0.01, rep
    start = fxfuse.compile([a, b], args, groups="full")
    moved = [s for s, m in r.alignments[1].maps.items() if m.q is not None
             and not torch.allclose(m.q, start.alignments[1].maps[s].q, atol=1e-3)]
    assert moved and sum(rep["units_changed"][1].values()) > 0
    levels = {s["id"]: _level(s["group"]) for s in r.report["spaces"]}
    # trained, nn.MultiheadAttention's first norm keeps its scale (its output is also transposed), so the
    # stream keeps permutations here; heads' inner maps are orthogonal
    assert {"perm", "in-head"} <= _assert_group_maps(r.alignments[1], levels)
    assert all(c["hard"] and c["error"] <= 1e-4 for c in r.report["self_check"])
    assert compare_outputs(b, r.aligned[1], args) <= 1e-4
    again = fxfuse.compile([a, b], args, groups="full", refine=config)
    for key, value in r.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[key]), key
    other = fxfuse.compile([a, b], args, groups="full", refine=replace(config, seed=1))
    assert any(not torch.equal(v, other.module.state_dict()[k]) for k, v in r.module.state_dict().items())


def test_refinement_refuses_group_maps_that_are_not_orthogonal():
    from fxfuse.planner.plan import Alignment, TransportMap
    from fxfuse.backend.refine import latents_of

    q = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    with pytest.raises(RefineError, match="not orthogonal"):
        latents_of(Alignment({0: TransportMap(0, q=q)}, 1, "weights", "exact"))
    with pytest.raises(RefineError, match="unknown parametrisation"):
        a, args = digits.mlp(seed=0, h1=8, h2=6)
        x = args[0]
        fxfuse.compile([a, a], args, refine=RefineConfig(1, x, torch.zeros(x.shape[0], dtype=torch.long),
                                                         orthogonal="cayley"))


def test_cli_compile_with_groups_full_and_refine(tmp_path, capsys, data):
    train = tmp_path / "train.pt"
    torch.save({"inputs": data[0][:96], "labels": data[1][:96]}, train)
    out = tmp_path / "fused"
    assert main(["compile", "digits:vit", "digits:vit", "-o", str(out), "--groups", "full", "--refine", "3",
                 "--data", str(train), "-q"]) == 0
    assert "refined 3 steps" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["refine"]["steps"] == 3 and report["groups"] == "full"
    assert all(c["hard"] and c["error"] < 1e-4 for c in report["self_check"] if c)
    with pytest.raises(SystemExit) as info:
        main(["compile", "digits:vit", "digits:vit", "-o", str(tmp_path / "bad"), "--groups", "full", "--refine", "3",
              "--data", str(train), "--refine-orthogonal", "cayley", "-q"])
    assert info.value.code == 2 and "--refine-orthogonal" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["compile", "digits:vit", "digits:vit", "-o", str(tmp_path / "p"), "--groups", "full", "--refine", "3",
                 "--data", str(train), "--refine-orthogonal", "project", "--refine-lr-orthogonal", "0.02", "-q"]) == 0
    recipe = yaml.safe_load((tmp_path / "p" / "fxfuse-recipe.yaml").read_text())
    assert recipe["refine_orthogonal"] == "project" and recipe["refine_lr_orthogonal"] == 0.02


@pytest.mark.parametrize("factory,untie", [("llama", False), ("gpt2", True)])
def test_refinement_over_whole_groups_of_language_models(factory, untie):
    """An RMSNorm stream (orthogonal; the RoPE dims by 2x2 rotations) and a LayerNorm stream with the LM head untied
    (orthogonal fixing ``1``): refined maps stay group elements and the self-check exact."""
    import zoo

    a, args = getattr(zoo, factory)(seed=0)
    b, _ = getattr(zoo, factory)(seed=1)
    ids = torch.randint(0, zoo.VOCAB, (16, zoo.SEQ), generator=torch.Generator().manual_seed(0))
    r = fxfuse.compile([a, b], args, groups="full", untie=untie,
                       refine=RefineConfig(4, ids, ids.clone(), batch_size=8, eval_samples=16))
    levels = {s["id"]: _level(s["group"]) for s in r.report["spaces"]}
    stream = "orthogonal_ones" if untie else "orthogonal"
    assert {"perm", stream} | ({"rotary"} if factory == "llama" else set()) <= _assert_group_maps(r.alignments[1],
                                                                                                 levels)
    assert all(c["hard"] and c["error"] <= 1e-4 for c in r.report["self_check"] if c)
    assert compare_outputs(b, r.aligned[1], args) <= 1e-4
    rep = r.report["refine"]
    assert rep["loss_at_weights_after"] < rep["loss_at_weights_before"]


@pytest.mark.parametrize("factory", ["llama", "gpt2"])
@pytest.mark.parametrize("groups", ["perm", "full"])
def test_refinement_learns_on_the_models_it_emits(factory, groups):
    """The losses refinement reports are those of the models it writes: each aligned parent's is the parent's
    own (its maps are exact), and the refined mix's is the fused model's. Llama's grouped-query attention puts two
    spaces under each key/value head on one axis (query groups and value dims in ``o_proj``), which both must move."""
    import zoo
    from fxfuse.models.heads import head_loss

    a, args = getattr(zoo, factory)(seed=0)
    b, _ = getattr(zoo, factory)(seed=1)
    ids = torch.randint(0, zoo.VOCAB, (16, zoo.SEQ), generator=torch.Generator().manual_seed(0))
    r = fxfuse.compile([a, b], args, groups=groups, refine=RefineConfig(4, ids, ids.clone(), batch_size=8,
                                                                         eval_samples=16))
    rep = r.report["refine"]
    with torch.no_grad():
        own = [float(head_loss(m(ids).logits, ids, rep["head"])) for m in (a, b, r.module)]
    assert rep["loss_of_models"] == pytest.approx(own[:2], rel=1e-5)
    assert rep["loss_at_weights_after"] == pytest.approx(own[2], rel=1e-5)


def test_the_refined_barrier_curve_ends_at_b_with_an_untied_head():
    """``--groups full --untie``: A's aligned copy carries an untied LM head; the refined curve runs B's refined
    state in that copy, so at λ = 1 it scores B itself (read in A's tied class, the untied head would be lost)."""
    import zoo

    a, args = zoo.gpt2(seed=0)
    b, _ = zoo.gpt2(seed=1)
    ids = torch.randint(0, zoo.VOCAB, (16, zoo.SEQ), generator=torch.Generator().manual_seed(0))
    res = fxfuse.barrier(a, b, ids, ids.clone(), args, points=3, head="causal", groups="full", untie=True,
                         refine=RefineConfig(4, ids, ids.clone(), batch_size=8, eval_samples=16))
    for c in (res.aligned, res.refined):
        assert c.loss[0] == pytest.approx(res.vanilla.loss[0], rel=1e-4)
        assert c.loss[-1] == pytest.approx(res.vanilla.loss[-1], rel=1e-4)


def test_stretched_maps_are_invertible_within_the_bound_and_read_by_their_inverse_transpose():
    from fxfuse.backend.latents import stretched

    g = torch.Generator().manual_seed(0)
    eye = torch.eye(5, dtype=torch.float64)
    for scale in (0.0, 0.1, 10.0):  # at zero the identity; large generators stay within the bound
        X = scale * torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
        M, R = stretched(X, 4.0)
        torch.testing.assert_close(R.transpose(-1, -2) @ M, eye.expand(3, 5, 5))  # R = M^{-T}
        assert float(torch.linalg.cond(M).max()) <= 4.0 + 1e-9
        if scale == 0.0:
            torch.testing.assert_close(M, eye.expand(3, 5, 5))
        if scale == 10.0:
            assert float(torch.linalg.cond(M).min()) > 1.5  # stretched, within the (Frobenius, so loose) bound


def test_refinement_over_invertible_in_head_maps_stays_exact_and_within_the_bound():
    """``condition``: the value/output in-head maps learn over invertible maps: they leave the orthogonal group,
    stay within the condition bound, and B's aligned copy still computes B (the self-check exact)."""
    import zoo
    from fxfuse.frontend.groups import INVERTIBLE

    a, args = zoo.gpt2(seed=0)
    b, _ = zoo.gpt2(seed=1)
    ids = torch.randint(0, zoo.VOCAB, (32, zoo.SEQ), generator=torch.Generator().manual_seed(0))
    config = RefineConfig(20, ids, ids.clone(), batch_size=8, eval_samples=16, condition=3.0, lr_orthogonal=0.1)
    r = fxfuse.compile([a, b], args, groups="full", untie=True, refine=config)
    levels = {s["id"]: _level(s["group"]) for s in r.report["spaces"]}
    inv = [m.q.double() for s, m in r.alignments[1].maps.items() if levels.get(s) == INVERTIBLE and m.q is not None]
    assert inv and r.report["refine"]["invertible"]["spaces"] == len(inv)
    eye = torch.eye(inv[0].shape[-1], dtype=torch.float64)
    assert any(not torch.allclose(q.transpose(-1, -2) @ q, eye.expand_as(q), atol=1e-3) for q in inv)
    assert max(float(torch.linalg.cond(q).max()) for q in inv) <= 3.0 + 1e-9
    assert r.report["refine"]["invertible"]["largest_condition"] <= 3.0 + 1e-9
    assert all(c["hard"] and c["error"] <= 1e-4 for c in r.report["self_check"] if c)
    assert compare_outputs(b, r.aligned[1], args) <= 1e-4
    with pytest.raises(RefineError, match="--refine-condition 3.0: need a bound above 1, with --refine-orthogonal exp"):
        fxfuse.compile([a, b], args, groups="full", untie=True, refine=replace(config, orthogonal="project"))
