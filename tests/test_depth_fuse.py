"""Fusion across depths through ``fxfuse.compile`` and ``fxfuse compile``.

The known answer: a pre-norm transformer ``A`` with 3 blocks and ``B``, the
same model with identity blocks inserted at positions 1 and 3 (their writers
zeroed) and every space shuffled, compute the same function. The cross-layer
alignment must find where the identities were inserted, and fusing into
either depth must give back ``A``'s function.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fxfuse
import zoo
from fxfuse.commands.cli import main
from fxfuse.planner.depth import relayer, writer_params
from digits import DigitsViT
from fxfuse.api.fuse import FusionError
from fxfuse.frontend.verify import compare_outputs

from test_depth import hand_map

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def strong(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that every block changes the stream (library inits barely do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 * p[0].numel() ** -0.5)
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def images(seed: int, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def deep_pair():
    shallow = strong(DigitsViT(dim=16, heads=2, mlp=24, depth=3), seed=0)
    args = (images(0),)
    writers = writer_params(shallow, "blocks", args)
    deep = relayer(shallow, [hand_map("blocks", 3, (0, None, 1, None, 2))], {"blocks": writers}).module
    deep = fxfuse.permute(deep, args, seed=3)
    assert compare_outputs(shallow, deep, args) < TOL
    return shallow, deep, args


@pytest.mark.parametrize("depth_cost", ["cka", "ot"])
@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_inserted_identity_blocks_are_found_and_fused_away(deep_pair, depth_cost, cost):
    shallow, deep, args = deep_pair
    calib = images(1, 64)
    # into the shallow depth: the identity blocks are left out, the rest is permuted back
    result = fxfuse.compile([shallow, deep], args, target=0, cost=cost, calib=calib, depth_cost=depth_cost)
    (entry,) = result.report["depth_maps"]
    assert (entry["path"], entry["model"], entry["source_of"], entry["dropped"]) == ("blocks", 1, [0, 2, 4], [1, 3])
    assert entry["target_blocks"] == 3 and entry["source_blocks"] == 5 and entry["cost"] == depth_cost
    assert all(c == pytest.approx(0.0, abs=1e-6) for c in entry["matched_costs"])
    assert compare_outputs(shallow, result.module, args) < TOL
    check = result.report["self_check"][1]
    assert check["error"] < TOL and check["depth_drift"] < TOL and check["drift"] < TOL
    assert any("blocks.1, blocks.3" in n and "left out" in n for n in result.report["notes"])
    # into the deep depth: identity blocks for the shallow model, matched blocks in the deep basis
    result = fxfuse.compile([shallow, deep], args, target=1, cost=cost, calib=calib, depth_cost=depth_cost)
    (entry,) = result.report["depth_maps"]
    assert entry["source_of"] == [0, None, 1, None, 2] and entry["identity"] == [1, 3] and entry["dropped"] == []
    assert len(result.module.blocks) == 5
    assert compare_outputs(shallow, result.module, args) < TOL
    assert result.report["self_check"][0]["depth_drift"] < TOL


def test_identity_blocks_take_the_target_weights(deep_pair):
    """A fused identity block is the target's block with its writers scaled by the target's fusion weight."""
    shallow, deep, args = deep_pair
    other = strong(DigitsViT(dim=16, heads=2, mlp=24, depth=5), seed=7)
    result = fxfuse.compile([shallow, other], args, target=1, weights=[0.25, 0.75])
    (entry,) = result.report["depth_maps"]
    identity = entry["identity"]
    assert len(identity) == 2 and 0 not in identity and 4 not in identity  # first and last blocks are matched
    fused, tgt = result.module.state_dict(), other.state_dict()
    for b in identity:
        names = [n for n in fused if n.startswith(f"blocks.{b}.")]
        assert len(names) == 12
        for name in names:
            writer = name.startswith((f"blocks.{b}.attn.out_proj.", f"blocks.{b}.mlp.2."))
            torch.testing.assert_close(fused[name], tgt[name] * (0.75 if writer else 1.0))


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_hf_depths_4_and_2(family):
    build = getattr(zoo, family)
    deep, args = build(seed=0, layers=4)
    shallow, _ = build(seed=1, layers=2)
    for target, layers in ((0, 4), (1, 2)):
        result = fxfuse.compile([deep, shallow], args, target=target)
        assert result.module.config.num_hidden_layers == layers
        (entry,) = result.report["depth_maps"]
        assert entry["source_of"][0] == 0 and entry["source_of"][-1] == entry["source_blocks"] - 1
        with torch.no_grad():
            assert torch.isfinite(result.module(*args).logits).all()
        check = result.report["self_check"][1 - target]
        assert check["error"] < 1e-4  # the permutations are exact on the relayered source
        if target == 0 and family == "vit":  # pre-norm: identity blocks are exact
            assert check["depth_drift"] < TOL
        if target == 0 and family == "bert":  # post-norm: the norms remain, and the report says so
            assert check["depth_drift"] > 1e-3
            assert any("not exact" in n for n in result.report["notes"])


def test_widths_and_depths_at_once():
    deep, args = zoo.vit(seed=0, layers=4, hidden=64, heads=4)
    narrow, _ = zoo.vit(seed=1, layers=2, hidden=96, heads=6)
    result = fxfuse.compile([deep, narrow], args, target=1)
    assert (result.module.config.num_hidden_layers, result.module.config.hidden_size) == (2, 96)
    assert result.report["depth_maps"][0]["dropped"] == [1, 2]
    assert {tuple(w["sizes"]) for w in result.report["width_maps"]} >= {(64, 96), (4, 6)}


def test_depth_without_block_lists_is_refused():
    from digits import DigitsMLP

    class Deeper(DigitsMLP):
        def __init__(self):
            super().__init__(16, 8)
            self.fc4 = torch.nn.Linear(10, 10)

        def forward(self, x):
            return self.fc4(super().forward(x))

    x = images(0, 4)
    a, b = Deeper().eval(), Deeper().eval()
    del b.fc4
    b.fc4 = torch.nn.Identity()
    with pytest.raises(FusionError, match=r"^architectures differ: model 0 has no parameter fc4.bias, and no list of "
                                          r"repeated blocks .* cannot align their depths"):
        fxfuse.compile([b, a], (x,), target=1)
    with pytest.raises(FusionError, match=r"^architectures differ: model 1 has an extra parameter fc4.bias, and no "):
        fxfuse.compile([b, a], (x,), target=0)


def test_vanilla_is_refused_across_depths(deep_pair):
    shallow, deep, args = deep_pair
    with pytest.raises(FusionError, match="equal depth"):
        fxfuse.compile([shallow, deep], args, method="vanilla")


# ---------------------------------------------------------------- CLI


def model_dir(path: Path, model: torch.nn.Module, kwargs: dict) -> Path:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "fxfuse.json").write_text(json.dumps({"factory": "digits:vit", "kwargs": kwargs,
                                                  "weights": "model.safetensors"}))
    return path


def test_cli_show_depth_map(tmp_path, capsys, deep_pair):
    shallow, deep, args = deep_pair
    kw = {"dim": 16, "heads": 2, "mlp": 24}
    a = model_dir(tmp_path / "deep", deep, dict(kw, depth=5))
    b = model_dir(tmp_path / "shallow", shallow, dict(kw, depth=3))
    out = tmp_path / "fused"
    code = main(["compile", str(a), str(b), "-o", str(out), "--target", "1", "--show-depth-map",
                 "--depth-cost", "ot", "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "depth map, model 0 -> target: blocks (5 -> 3 blocks, cost OT cost)" in stdout
    rows = [line.split() for line in stdout.splitlines() if line.startswith("  blocks.")]
    assert [r[:2] for r in rows] == [["blocks.0", "blocks.0"], ["blocks.1", "blocks.2"], ["blocks.2", "blocks.4"]]
    assert "left out: blocks.1, blocks.3" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["depth_maps"][0]["source_of"] == [0, 2, 4]
    manifest = json.loads((out / "fxfuse.json").read_text())
    assert manifest["kwargs"]["depth"] == 3
    loaded = fxfuse.models.io.load_model(str(out))
    assert compare_outputs(shallow, loaded.module, args) < TOL
