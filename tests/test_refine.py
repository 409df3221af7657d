"""Learned refinement: maps stay exact group elements, the midpoint loss drops, runs are deterministic."""
from __future__ import annotations

import json

import pytest
import torch

import fxfuse
import digits
from fxfuse.cli import main
from fxfuse.fuse import FusionError
from fxfuse.refine import RefineConfig, RefineError, project, straight_through
from fxfuse.verify import compare_outputs

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
    from fxfuse.refine import Mover

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


def test_refinement_refuses_the_maps_of_whole_groups(quiet_one_thread):
    """Maps of ``groups="full"`` (orthogonal streams, in-head maps) are not refined yet: a clear refusal."""
    import zoo

    a, args = zoo.vit(seed=0)
    b, _ = zoo.vit(seed=1)
    x = args[0].repeat(4, 1, 1, 1)
    y = torch.arange(x.shape[0]) % 3
    with pytest.raises(RefineError, match="groups full"):
        fxfuse.compile([a, b], args, groups="full", refine=RefineConfig(2, x, y, head="classification"))
