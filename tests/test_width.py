"""Fusion across widths: spaces of different sizes in the models.

The known answer: a model ``A`` and a wider copy ``W`` of it whose extra units
duplicate existing ones (rows copied where a unit is written, columns split
where it is read, then every space shuffled) compute the same function. Fusing
``W`` into ``A``'s widths must merge the copies back (average what they write,
sum what reads them), and fusing ``A`` into ``W``'s widths must split its
units the same way: either fused model computes what ``A`` computes.
"""
from __future__ import annotations


import re

import pytest
import torch

import fxfuse
import zoo
from digits import DigitsMLP, DigitsViT
from fxfuse.api.fuse import FusionError
from fxfuse.frontend.verify import compare_outputs

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def widen(state: dict, n: int, extra: list[int], written: list[tuple[str, int]], read: list[tuple[str, int]],
          seed: int) -> dict:
    """``state`` with ``n`` units grown by copies of units ``extra``, then shuffled.

    ``written``: (parameter, dim) pairs where the units are produced (copied);
    ``read``: where they are consumed (split between the copies).
    """
    index = torch.cat([torch.arange(n), torch.tensor(extra, dtype=torch.long)])
    share = 1.0 / torch.bincount(index, minlength=n).to(torch.float32)[index]
    shuffle = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))
    index, share = index[shuffle], share[shuffle]
    out = dict(state)
    for name, dim in written:
        out[name] = out[name].index_select(dim, index)
    for name, dim in read:
        shape = [1] * out[name].dim()
        shape[dim] = -1
        out[name] = out[name].index_select(dim, index) * share.view(shape)
    return out


def informative(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights with a spread that makes every unit matter (library inits hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.2))
    return model.eval()


def wide_mlp(narrow: DigitsMLP, extra1: list[int], extra2: list[int], seed: int = 1) -> DigitsMLP:
    h1, h2 = narrow.fc1.out_features, narrow.fc2.out_features
    state = widen(narrow.state_dict(), h1, extra1, [("fc1.weight", 0), ("fc1.bias", 0)], [("fc2.weight", 1)], seed)
    state = widen(state, h2, extra2, [("fc2.weight", 0), ("fc2.bias", 0)], [("fc3.weight", 1)], seed + 1)
    wide = DigitsMLP(h1 + len(extra1), h2 + len(extra2))
    wide.load_state_dict(state)
    return wide.eval()


@pytest.fixture(scope="module")
def mlp_pair():
    torch.manual_seed(0)
    narrow = informative(DigitsMLP(12, 8), seed=0)
    wide = wide_mlp(narrow, [0, 3, 3, 7], [1, 5, 6])
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert compare_outputs(narrow, wide, (x,)) < TOL  # the construction itself is exact
    return narrow, wide, x


@pytest.mark.parametrize("cost", ["weights", "activations"])
@pytest.mark.parametrize("target", [0, 1])
def test_duplicated_units_fuse_back(mlp_pair, cost, target):
    narrow, wide, x = mlp_pair
    result = fxfuse.compile([narrow, wide], (x,), target=target, cost=cost, calib=64)
    assert compare_outputs(narrow, result.module, (x,)) < TOL
    # the fused model has the target's widths
    shapes = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in (narrow, wide)[target].state_dict().items()}
    widths = result.report["width_maps"]
    assert sorted(tuple(w["sizes"]) for w in widths) == [(8, 11), (12, 16)]
    source = 1 - target
    maps = [m for s in result.report["spaces"] for m in s["models"] if "sizes" in s]
    assert {m["map"] for m in maps} == {"matching"} and {m["model"] for m in maps} == {source}
    # aligning a wider model (merge) or a narrower one (split) changed nothing here
    check = result.report["self_check"][source]
    assert check["hard"] is False and check["drift"] < TOL


def test_plain_averaging_is_refused_across_widths(mlp_pair):
    narrow, wide, x = mlp_pair
    with pytest.raises(FusionError, match="equal widths"):
        fxfuse.compile([narrow, wide], (x,), method="vanilla")


def test_sinkhorn_across_widths_averages(mlp_pair):
    """Soft maps between unequal sizes: every fused unit an average (rows of A sum to 1)."""
    narrow, wide, x = mlp_pair
    result = fxfuse.compile([wide, narrow], (x,), target=1, solver="sinkhorn")
    al = result.alignments[0]
    for m in al.maps.values():
        assert m.matrix is not None and m.matrix.shape[0] < m.matrix.shape[1]
        assert torch.allclose(m.matrix.sum(1), torch.ones(m.matrix.shape[0]), atol=1e-4)
    assert result.module(x).shape == (32, 10)


def test_transformer_mlp_units_duplicated(one_thread):
    """Wider MLPs inside a pre-norm transformer (the stream and heads unchanged) also merge back exactly."""
    narrow = informative(DigitsViT(dim=16, heads=2, mlp=24, depth=2), seed=4)
    state = narrow.state_dict()
    extra = [2, 2, 9, 20]
    for b in range(2):
        p = f"blocks.{b}.mlp"
        state = widen(state, 24, extra, [(f"{p}.0.weight", 0), (f"{p}.0.bias", 0)], [(f"{p}.2.weight", 1)], seed=b)
    wide = DigitsViT(dim=16, heads=2, mlp=28, depth=2)
    wide.load_state_dict(state)
    wide.eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    assert compare_outputs(narrow, wide, (x,)) < TOL
    for target in (0, 1):
        result = fxfuse.compile([narrow, wide], (x,), target=target)
        assert compare_outputs(narrow, result.module, (x,)) < TOL


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_hf_widths_64_and_96(family):
    """Independent HF models of widths 64 (4 heads) and 96 (6 heads of the same size), both directions."""
    build = getattr(zoo, family)
    a, args = build(seed=0, hidden=64, heads=4)
    b, _ = build(seed=1, hidden=96, heads=6)
    for target, size in ((0, 64), (1, 96)):
        result = fxfuse.compile([a, b], args, target=target)
        assert result.module.config.hidden_size == size
        with torch.no_grad():
            out = result.module(*args).logits
        assert torch.isfinite(out).all()
        sizes = {tuple(w["sizes"]) for w in result.report["width_maps"]}
        assert (64, 96) in sizes and (128, 192) in sizes and (4, 6) in sizes  # stream, MLP, heads
        # the fused model is neither parent: both contributed
        assert compare_outputs(result.module, (a, b)[target], args) > 1e-3


def test_head_size_mismatch_is_refused():
    a, args = zoo.vit(seed=0, hidden=64, heads=4)
    b, _ = zoo.vit(seed=1, hidden=96, heads=4)
    with pytest.raises(FusionError, match=r"q_proj.weight has shape \(64, 64\) in model 0 and \(96, 96\) in model 1; "
                                          r"the size inside each head differs \(16 against 24"):
        fxfuse.compile([a, b], args)
    with pytest.raises(FusionError, match=r"the size inside each head differs"):
        fxfuse.compile([a, b], args, heads="flat")


def test_different_classes_name_the_parameter():
    a, b = DigitsMLP(12, 8, classes=10).eval(), DigitsMLP(16, 8, classes=5).eval()
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(FusionError, match=r"^architectures differ: fc3.weight has shape \(10, 8\) in model 0 and "
                                          r"\(5, 8\) in model 1; axis 0 cannot be aligned \(interface"):
        fxfuse.compile([a, b], (x,))


def test_different_patch_sizes_name_the_parameter():
    from transformers import ViTConfig, ViTForImageClassification

    def vit(patch):
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        image_size=16, patch_size=patch, num_labels=3)
        return ViTForImageClassification(cfg).eval()

    x = torch.rand(2, 3, 16, 16)
    # 4 or 16 patches (+ CLS): the first parameter whose shape differs is the position table
    with pytest.raises(FusionError, match=r"^architectures differ: vit.embeddings.position_embeddings has shape "
                                          r"\(1, 5, 32\) in model 0 and \(1, 17, 32\) in model 1; axis 1 cannot be aligned"):
        fxfuse.compile([vit(8), vit(4)], (x,))


def test_cli_wide_into_narrow_example(tmp_path, capsys):
    """The shipped wide MLP fused into the shipped narrow one: widths printed, no vanilla row, narrow output."""
    import json
    from pathlib import Path

    from fxfuse.commands.cli import main
    from fxfuse.models.io import load_model

    examples = Path(__file__).resolve().parents[1] / "examples"
    out = tmp_path / "fused"
    code = main(["compile", str(examples / "digits-mlp-wide"), str(examples / "digits-mlp-a"), "-o", str(out),
                 "--target", "1", "--show-depth-map", "--eval", str(examples / "digits-test.safetensors"), "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "width: s0 (fc1.weight:0) sizes 256 / 128 -> 128" in stdout
    assert "width: s3 (fc2.weight:0) sizes 128 / 64 -> 64" in stdout
    assert re.search(r"vanilla average +n/a \(the shapes differ\)", stdout)
    fused_acc = float(re.search(r"fused \(fxfuse\) +([\d.]+)%", stdout).group(1))
    assert fused_acc > 90.0  # the parents score about 96-97 %; a broken merge scores far lower
    assert json.loads((out / "fxfuse.json").read_text())["kwargs"] == {"h1": 128, "h2": 64}
    report = json.loads((out / "report.json").read_text())
    assert report["eval"]["accuracy"]["vanilla average"] is None
    assert tuple(load_model(str(out)).module.fc1.weight.shape) == (128, 64)
